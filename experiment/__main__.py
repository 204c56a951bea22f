"""rung launcher.

  python -m experiment train --config=experiments/llama_tiny.py --workdir=runs/tiny
      [--config.mesh.tensor=2 --config.model.num_layers=3 ...]

Commands:
  train   train the config in --workdir (metrics.jsonl, TensorBoard, progress bar)
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from sharding import ConfigError

COMMANDS = {
    "train": "train the config in --workdir",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file; `path.py:arg` passes arg to get_config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints).")


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


def main(argv: list[str]) -> None:
  command = argv[1]
  if _CONFIG.value is None:
    _config_error(ConfigError("--config", "no experiment config was given.",
                              "pass --config=experiments/llama_tiny.py."))
  try:
    if command == "train":
      if not _WORKDIR.value:
        raise ConfigError("--workdir", "train needs a run directory.",
                          "pass --workdir=runs/NAME.")
      import train
      train.train(_CONFIG.value, _WORKDIR.value)
  except ConfigError as err:
    _config_error(err)


if __name__ == "__main__":
  app.run(main, flags_parser=parse)
