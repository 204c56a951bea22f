"""rung launcher.

  python -m experiment train --config=experiments/llama_tiny.py --workdir=runs/tiny
      [--config.mesh.tensor=2 --config.model.num_layers=3 ...]
  python -m experiment import-hf --hf_dir=path/to/llama --workdir=runs/llama
  python -m experiment export-hf --workdir=runs/llama --out=path/to/hf_out
  python -m experiment inspect --workdir=runs/tiny
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sharding import ConfigError

COMMANDS = {
    "train": "train --config in --workdir; resumes from its latest checkpoint",
    "import-hf": "local HF Llama (--hf_dir) -> rung run dir (--workdir) at step 0",
    "export-hf": "a run's parameters (--workdir, --step) -> HF safetensors in --out",
    "inspect": "list a run's checkpoints, metrics and parameter shardings",
}
# Commands that need --config (import-hf defaults to experiments/base.py).
_NEEDS_CONFIG = ("train",)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file; `path.py:arg` passes arg to get_config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "import-hf: HF checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "export-hf: output directory.")
_STEP = flags.DEFINE_integer("step", None, "export-hf: step to export (default latest).")


def _usage() -> str:
  lines = [__doc__.split("Commands:")[0].rstrip(), "", "Commands:"]
  lines += [f"  {name:<8}{text}" for name, text in COMMANDS.items()]
  return "\n".join(lines)


def _config_error(err: ConfigError) -> None:
  sys.stderr.write(f"\n{err}\n\n")
  sys.exit(2)


def parse(argv: list[str]) -> list[str]:
  """absl parsing, with config mistakes reported as ConfigErrors (exit status 2)."""
  from experiment import config_errors
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  if argv[1] not in COMMANDS:
    sys.stderr.write(f"unknown command {argv[1]!r}.\n\n{_usage()}\n")
    sys.exit(2)
  has_config = any(a.startswith("--config=") for a in argv)
  if argv[1] == "import-hf" and not has_config:
    from experiments import base  # the defaults, so --config.* overrides apply
    argv = [*argv[:2], f"--config={base.__file__}", *argv[2:]]
  elif not has_config and any(a.startswith("--config.") for a in argv):
    _config_error(ConfigError("--config", "--config.* overrides were given without "
                              "a config file to override.",
                              "pass --config=experiments/NAME.py as well."))
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
    if isinstance(err, ConfigError):
      _config_error(err)
    config = config_errors.load_config(argv)
    if config is None:  # the config file itself is broken: show its traceback
      raise
    _config_error(config_errors.unknown_key(argv, config)
                  or config_errors.from_flag_error(err, config))


def _require(flag, value, example: str):
  if not value:
    raise ConfigError(f"--{flag.name}", f"this command needs --{flag.name}.",
                      f"pass --{flag.name}={example}.")
  return value


def main(argv: list[str]) -> None:
  command = argv[1]
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO logs only with -v 0
  try:
    if command in _NEEDS_CONFIG and _CONFIG.value is None:
      raise ConfigError("--config", "no experiment config was given.",
                        "pass --config=experiments/llama_tiny.py.")
    workdir = _require(_WORKDIR, _WORKDIR.value, "runs/NAME")
    if command == "train":
      import train
      train.train(_CONFIG.value, workdir)
    elif command == "import-hf":
      from train import hf
      hf.import_hf(_require(_HF_DIR, _HF_DIR.value, "path/to/hf_model"), workdir,
                   _CONFIG.value)
    elif command == "export-hf":
      from train import hf
      hf.export_hf(workdir, _require(_OUT, _OUT.value, "path/to/out"), _STEP.value)
    elif command == "inspect":
      from train.inspect_run import describe_run
      print(describe_run(workdir))
  except ConfigError as err:
    _config_error(err)


if __name__ == "__main__":
  app.run(main, flags_parser=parse)
