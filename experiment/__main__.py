"""rung launcher: `python -m experiment <command> [flags]`.

`python -m experiment --help` lists the commands; `python -m experiment <command>
--help` lists that command's flags. Config fields are overridden with
`--config.<group>.<field>=value`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sys
import textwrap
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from sharding import ConfigError
from sharding.distributed import JoinError
from experiment import failed_checkpoint_io
from experiment.host import cpu_only_host, one_blas_thread_per_cpu_device
from experiment.path_flag import define_path

_PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id",
                  "join_timeout_s", "heartbeat_timeout_s")


@dataclasses.dataclass(frozen=True)
class Command:
  """One launcher command: what it does, an example, the flags it reads."""
  summary: str
  example: str
  flags: tuple[str, ...]


COMMANDS = {
    "train": Command(
        "train --config in --workdir; resumes from its latest checkpoint",
        "--config=experiments/llama_tiny.py --workdir=runs/tiny "
        "[--config.mesh.tensor=2 --config.model.num_layers=3 ...]",
        ("config", "workdir", *_PROCESS_FLAGS)),
    "import-hf": Command(
        "local HF checkpoint (--hf_dir; Llama, Qwen2/3, Mistral, Mixtral) -> rung "
        "run dir (--workdir) at step 0",
        "--hf_dir=path/to/llama --workdir=runs/llama",
        ("hf_dir", "workdir", "config", *_PROCESS_FLAGS)),
    "export-hf": Command(
        "a run's parameters (--workdir, --step) -> HF safetensors in --out",
        "--workdir=runs/llama --out=path/to/hf_out",
        ("workdir", "out", "step", *_PROCESS_FLAGS)),
    "inspect": Command(
        "list a run's checkpoints, metrics and parameter shardings",
        "--workdir=runs/tiny", ("workdir", *_PROCESS_FLAGS)),
    "generate": Command(
        "continue --prompt with a run's latest checkpoint, streaming text; or each "
        "prompt of a --prompts file, in batches, as JSON lines",
        '--workdir=runs/tiny --prompt="def main(" [--max_new_tokens=200 '
        "--temperature=0.8 --top_p=0.95 --config.mesh.tensor=2] (or --prompts=F.txt "
        "--output_jsonl=out.jsonl --batch_size=8 [--resume_output])",
        ("workdir", "prompt", "prompts", "output_jsonl", "resume_output", "batch_size",
         "max_new_tokens",
         "temperature", "top_k", "top_p", "seed", "step", "config", *_PROCESS_FLAGS)),
    "compile": Command(
        "compile --config's step for a TPU --topology (no TPU needed): memory, "
        "fit, FLOPs, collectives, time",
        "--config=experiments/llama_1b.py --topology=v5p:2x2x2 [--what=train|decode "
        "--output_json=F --dump_hlo=DIR --libtpu_flags=maxtext --slices=2 "
        "--config.mesh.tensor=4]",
        ("config", "topology", "what", "output_json", "dump_hlo", "libtpu_flags",
         "slices")),
    "plan": Command(
        "compile every mesh and remat plan for --topology; rank them",
        "--config=experiments/llama_1b.py --topology=v5e:2x4 [--max_plans=12 "
        "--plan_sequence --plan_remats=save_dots --libtpu_flags=maxtext --slices=2 "
        "--output_json=F]",
        ("config", "topology", "max_plans", "plan_sequence", "plan_remats",
         "output_json", "libtpu_flags", "slices")),
}
# Commands that need --config (import-hf defaults to experiments/base.py).
_NEEDS_CONFIG = ("train", "compile", "plan")
# Commands that only ask the TPU compiler: no --workdir, no multi-process join.
_COMPILER_COMMANDS = ("compile", "plan")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file; `path.py:arg` passes arg to get_config.",
    lock_config=True)
_WORKDIR = define_path("workdir", None, "Run directory (metrics, checkpoints).")
_HF_DIR = define_path("hf_dir", None, "HF checkpoint directory.")
_OUT = define_path("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step "
                             "(default latest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: host:port of process 0 (with "
    "--num_processes and --process_id). Without them, TPU pods, SLURM and "
    "Kubernetes are detected from the environment.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's id.")
_JOIN_TIMEOUT = flags.DEFINE_integer("join_timeout_s", 300, "Multi-process: seconds "
                                     "to wait for every process to join.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "Multi-process: seconds without a heartbeat after "
    "which a process counts as dead and JAX ends every process (exit status 134); "
    "the last committed checkpoint resumes.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPTS = define_path(
    "prompts", None, "A file of prompts to continue instead: one per line, or in a "
    '.jsonl file {"prompt": ...} per line; - reads standard input.')
_OUTPUT_JSONL = define_path(
    "output_jsonl", None, "With --prompts: write the completions here (a new file), "
    "one JSON object per prompt; default (or -): standard output.")
_RESUME_OUTPUT = flags.DEFINE_bool(
    "resume_output", False, "With --output_jsonl: continue the file an interrupted "
    "run left (its whole batches are kept; the same --batch_size and --seed give "
    "an uninterrupted run's file).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "With --prompts: prompts "
                                   "generated together.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to add (0: print the prompt only).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in [0, 1] (0: greedy).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed, in [0, 2**32).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU generation and "
                                "slice shape, e.g. v5p:2x2x2, v5e:2x4, v4:2x2x2, v6e:2x4.")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "decode"], "The train "
                          "step, or one KV-cache decode step (train.batch_size "
                          "sequences, a cache of data.seq_len positions).")
_OUTPUT_JSON = define_path("output_json", None, "Also write the report as JSON here.")
_DUMP_HLO = define_path("dump_hlo", None, "Write the lowered and compiled programs into "
                         "this directory.")
_MAX_PLANS = flags.DEFINE_integer(
    "max_plans", None, "plan: compile at most this many candidates (default: all), "
    "plans without pipeline stages first, then by tensor size.")
_LIBTPU_FLAGS = flags.DEFINE_string(
    "libtpu_flags", None, "compile / plan: TPU compiler options for this compile, "
    "as LIBTPU_INIT_ARGS writes them ('--xla_enable_async_all_gather=true ...'), "
    "or 'maxtext' for the flags of MaxText's published v5e / v5p configs.")
_SLICES = flags.DEFINE_integer(
    "slices", 1, "compile / plan: copies of --topology joined over the data-center "
    "network (multi-slice); the outermost mesh axes with room span them.")
# The launcher imports no model code before parsing; plan's policies, spelled out
# (tests/test_launcher.py checks them against model.config.REMAT).
PLAN_REMATS = ("none", "full", "save_dots", "save_dots_attention", "offload_dots")
_PLAN_REMATS = flags.DEFINE_multi_enum(
    "plan_remats", [], PLAN_REMATS, "plan: remat policies to try, e.g. "
    "--plan_remats=full --plan_remats=save_dots; none given: every policy")
_PLAN_SEQUENCE = flags.DEFINE_bool("plan_sequence", False, "Also try "
                                   "mesh.sequence > 1.")


_WIDTH = 88


def _usage() -> str:
  """The top-level help: every command, aligned, with an example."""
  pad = max(len(name) for name in COMMANDS) + 4
  lines = ["usage: python -m experiment <command> [flags]", "", "Commands:"]
  for name, command in COMMANDS.items():
    lines += textwrap.wrap(command.summary, _WIDTH, initial_indent=f"  {name:<{pad - 2}}",
                           subsequent_indent=" " * pad)
  lines += ["", "Examples:"]
  for name, command in COMMANDS.items():
    lines += textwrap.wrap(f"python -m experiment {name} {command.example}", _WIDTH,
                           initial_indent="  ", subsequent_indent="      ",
                           break_on_hyphens=False)
  lines += ["", "`python -m experiment <command> --help` lists a command's flags."]
  return "\n".join(lines)


def _command_help(name: str) -> str:
  """One command's help: usage, what it does, and only the flags it reads."""
  command = COMMANDS[name]
  lines = textwrap.wrap(f"usage: python -m experiment {name} {command.example}",
                        _WIDTH, subsequent_indent="    ", break_on_hyphens=False)
  lines += ["", *textwrap.wrap(command.summary, _WIDTH), "", "flags:"]
  pad = max(len(f) for f in command.flags) + 6
  for flag_name in command.flags:
    flag = flags.FLAGS[flag_name]
    text = flag.help + ("" if flag.default is None else f" (default: {flag.default})")
    lines += textwrap.wrap(text, _WIDTH, initial_indent=f"  --{flag_name:<{pad - 4}}",
                           subsequent_indent=" " * pad, break_on_hyphens=False)
  if "config" in command.flags:
    lines += ["  --config.<group>.<field>=VALUE", *textwrap.wrap(
        "override one config field (experiments/base.py lists them, "
        "docs/configuration.md explains them)", _WIDTH, initial_indent=" " * pad,
        subsequent_indent=" " * pad)]
  return "\n".join(lines)


def _config_error(err: ConfigError) -> None:
  who = ""
  if "jax" in sys.modules:
    import jax
    if jax.distributed.is_initialized():
      who = f"[process {jax.process_index()} of {jax.process_count()}] "
  sys.stderr.write(f"\n{who}{err}\n\n")
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
  if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort")
         for a in argv[2:]):
    print(_command_help(argv[1]))
    sys.exit(0)
  _refuse_other_commands_flags(argv)
  if "config" not in COMMANDS[argv[1]].flags and _config_overrides(argv[2:]):
    _config_error(ConfigError(
        "--config", f"the {argv[1]} command takes no --config.* overrides: it reads "
        "the run's own config.json.",
        f"drop them; `python -m experiment {argv[1]} --help` lists its flags."))
  has_config = any(a.startswith("--config=") for a in argv)
  workdir = next((os.path.expanduser(a.split("=", 1)[1]) for a in argv
                  if a.startswith("--workdir=")), None)
  if argv[1] == "import-hf" and not has_config:
    from experiments import base  # the defaults, so --config.* overrides apply
    argv = [*argv[:2], f"--config={base.__file__}", *argv[2:]]
  elif argv[1] == "generate" and not has_config and workdir:
    _check(_no_run(workdir))
    from experiments import saved  # the run's own config; overrides pick the mesh
    argv = [*argv[:2], f"--config={saved.__file__}:{workdir}", *argv[2:]]
  elif not has_config and _config_overrides(argv):
    _config_error(ConfigError("--config", "--config.* overrides were given without "
                              "a config file to override.",
                              "pass --config=experiments/NAME.py as well."))
  if has_config:
    _check(config_errors.missing_config_file(argv))
    # A config file may import the modules next to it; appended, they never
    # shadow rung's packages.
    sys.path.append(os.path.dirname(os.path.abspath(config_errors.config_arg(argv)[0])))
  try:
    rest = flags.FLAGS(argv)
  except Exception as err:  # noqa: BLE001 -- each kind is reported below
    if isinstance(err, ConfigError):
      _config_error(err)
    unknown = config_errors.unknown_flag(err, argv[1], COMMANDS[argv[1]].flags)
    if unknown:
      _config_error(unknown)
    try:
      config = config_errors.load_config(argv)  # names a broken config file
    except ConfigError as broken:
      _config_error(broken)
    if config is None:
      raise
    _config_error(config_errors.unknown_key(argv, config)
                  or config_errors.from_flag_error(err, config))
  if len(rest) > 2:  # [program, command, anything that is not a flag...]
    stray = rest[2:]
    _config_error(ConfigError(
        "command line", f"{' '.join(map(repr, stray))} "
        f"{'is not a flag' if len(stray) == 1 else 'are not flags'}; "
        f"{argv[1]} takes --name=value flags only.",
        "quote a value that holds spaces, e.g. " + (
            '--prompt="the quick fox"' if argv[1] == "generate" else
            '--workdir="runs/my run"') + ", or drop the extra words."))
  return rest


def _refuse_other_commands_flags(argv: list[str]) -> None:
  """A launcher flag the command does not read is a mistake, not something to
  ignore silently (e.g. `train --prompt=...`)."""
  name, command = argv[1], COMMANDS[argv[1]]
  own = {f for c in COMMANDS.values() for f in c.flags}
  for arg in argv[2:]:
    flag = arg.lstrip("-").split("=", 1)[0]
    flag = flag[2:] if flag.startswith("no") and flag[2:] in own else flag
    if arg.startswith("-") and flag in own and flag not in command.flags:
      _config_error(ConfigError(
          f"--{flag}", f"the {name} command does not read --{flag}.",
          f"drop it; `python -m experiment {name} --help` lists the flags of "
          f"{name}."))


def _no_run(workdir: str) -> ConfigError | None:
  from train import run_config
  return run_config.no_run(workdir)


def _no_hf_model(hf_dir: str) -> ConfigError | None:
  """A ConfigError when `hf_dir` has no config.json, as a Hugging Face model has."""
  if os.path.isfile(os.path.join(hf_dir, "config.json")):
    return None
  what = ("is a file, not a directory" if os.path.isfile(hf_dir) else
          "does not exist" if not os.path.exists(hf_dir) else
          "holds no Hugging Face model (it has no config.json)")
  return ConfigError(
      "--hf_dir", f"{hf_dir} {what}.",
      "pass the directory that holds the model's config.json and *.safetensors (what "
      "save_pretrained writes).")


@contextlib.contextmanager
def _interrupted(command: str, target: str):
  """Ctrl-C during import-hf / export-hf: one line saying what `target` holds
  (they move their files there only once all are written, `train.staged`),
  exit status 130."""
  try:
    yield
  except KeyboardInterrupt:
    done = os.path.isfile(os.path.join(target, "config.json"))
    sys.stderr.write(
        f"\n{command} interrupted " + (
            f"after it finished: {target} is complete.\n" if done else
            f"before it finished: none of its files are in {target}; run the "
            "command again.\n"))
    sys.exit(130)


def _check(error: ConfigError | None) -> None:
  if error is not None:
    _config_error(error)


def _require(flag, value, example: str, instead: str = ""):
  """`value`, or the ConfigError for a flag left out or empty; `instead`: the
  other way to give it (", or --prompts=FILE")."""
  if not value:
    raise ConfigError(f"--{flag.name}", f"--{flag.name} is empty." if flag.present
                      else f"this command needs --{flag.name}.",
                      f"pass --{flag.name}={example}{instead}.")
  return value


def _with_cache_dir(config):
  """`data.cache_dir` from $XDG_CACHE_HOME (the XDG base-directory spec) when the
  config leaves it None; without either, the library uses ~/.cache/rung/tokens."""
  if config.data.cache_dir is None and os.environ.get("XDG_CACHE_HOME"):
    config.data.cache_dir = os.path.join(os.environ["XDG_CACHE_HOME"], "rung",
                                         "tokens")
  return config


# A write the file system refused: a full disk or quota, a file-size limit, a
# read-only mount (the command's own bad input is a ConfigError before this).
_CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def main(argv: list[str]) -> None:
  command = argv[1]
  failed_checkpoint_io.install()  # what a failed checkpoint read or write leaves
  if not flags.FLAGS["verbosity"].present:
    # rung prints what a user needs; --verbosity=0 shows the libraries' INFO logs.
    logging.set_verbosity(logging.ERROR)
  if cpu_only_host():
    import jax
    jax.config.update("jax_platforms", "cpu")
  try:
    if command in _NEEDS_CONFIG and _CONFIG.value is None:
      raise ConfigError("--config", "no experiment config was given.",
                        "pass --config=experiments/llama_tiny.py.")
    if command in _NEEDS_CONFIG or command == "import-hf":
      from experiment import config_errors
      from experiments import base  # only placeholders may be None
      _check(config_errors.unset_field(_CONFIG.value, base.get_config()))
    if command in _NEEDS_CONFIG:  # an override the run would not read is a mistake
      from train import unread
      check = unread.unread_by_planning if command == "plan" else unread.unread_override
      _check(check(_CONFIG.value, _config_overrides()))
    if command in _COMPILER_COMMANDS:
      _ask_compiler(command, _require(_TOPOLOGY, _TOPOLOGY.value, "v5p:2x2x2"))
      return
    workdir = _require(_WORKDIR, _WORKDIR.value, "runs/NAME")
    import sharding
    if sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value,
                                       timeout_s=_JOIN_TIMEOUT.value,
                                       heartbeat_s=_HEARTBEAT.value):
      sys.stderr.write(f"joined as {sharding.describe_process()}\n")
      sharding.distributed.check_same_on_every_process(
          _CONFIG.value.to_json() if _CONFIG.value is not None else "", "--config",
          "launch every process with the same --config file and --config.* "
          "overrides.", num_processes=_NUM_PROCESSES.value)
    if command == "train":
      import train
      try:
        train.train(_with_cache_dir(_CONFIG.value), workdir)
      except KeyboardInterrupt as err:  # a second signal: stopped at once
        sys.stderr.write(f"\n{err or 'KeyboardInterrupt'}: stopped at once; a resume "
                         "reads the latest checkpoint that finished saving\n")
        sys.exit(130)
    elif command == "import-hf":
      from train import hf
      hf_dir = _require(_HF_DIR, _HF_DIR.value, "path/to/hf_model")
      _check(_no_hf_model(hf_dir))
      with _interrupted(command, workdir):
        hf.import_hf(hf_dir, workdir, _CONFIG.value, _config_overrides())
    elif command == "export-hf":
      from train import hf
      _check(_no_run(workdir))
      out = _require(_OUT, _OUT.value, "path/to/out")
      with _interrupted(command, out):
        hf.export_hf(workdir, out, _STEP.value)
    elif command == "generate":
      from train.unread import unread_by_serving
      _check(unread_by_serving(_CONFIG.value, _config_overrides()))
      _generate(workdir)
    elif command == "inspect":
      import jax
      from train.inspect_run import describe_run
      _check(_no_run(workdir))
      text = describe_run(workdir)  # on every process alike, so they end together
      if jax.process_index() == 0:  # (one ending first fails JAX's shutdown barrier)
        print(text)
  except ConfigError as err:
    _config_error(err)
  except JoinError as err:
    sys.stderr.write(f"\n{err}\n")
    sys.exit(1)
  except OSError as err:
    if err.errno not in _CANNOT_WRITE:
      raise
    sys.stderr.write(f"\nCould not write{f' {err.filename}' if err.filename else ''}: "
                     f"{err.strerror}. Free space there (or fix the file system) and "
                     "run the command again; a training run resumes from its latest "
                     "checkpoint, which a failed write leaves intact.\n")
    sys.exit(1)
  except RuntimeError as err:  # an unreadable checkpoint, a diverged run: no traceback
    from train.checkpoint import CheckpointError
    from train.loop import Diverged
    if not isinstance(err, (CheckpointError, Diverged)):
      raise
    kind = "Checkpoint error" if isinstance(err, CheckpointError) else "Diverged"
    sys.stderr.write(f"\n{kind}: {err}\n")
    sys.exit(1)


# A value that works for each generation flag, for the fix of a ConfigError.
_GENERATION_EXAMPLES = {"max_new_tokens": "64", "temperature": "0.8", "top_k": "50",
                        "top_p": "0.95", "seed": "0"}


def _config_overrides(args: list[str] | None = None) -> list[str]:
  """The config fields `args` (default: the command line) set
  (`--config.model.num_layers=3`, or absl's single-dash form -> "model.num_layers")."""
  return [arg.lstrip("-")[len("config."):].split("=")[0]
          for arg in (sys.argv[1:] if args is None else args)
          if arg.startswith("-") and arg.lstrip("-").startswith("config.")]


def _generate(workdir: str) -> None:
  import infer.text
  if _PROMPTS.present and _PROMPT.present:
    raise ConfigError("--prompts", "is given with --prompt; generate continues one "
                      "or the other.", "drop --prompt (or --prompts).")
  if not _PROMPTS.present:
    for flag in (_OUTPUT_JSONL, _BATCH_SIZE, _RESUME_OUTPUT):
      if flag.present:
        raise ConfigError(f"--{flag.name}", f"--{flag.name} is read only with "
                          "--prompts (a file of prompts).",
                          f"pass --prompts=FILE, or drop --{flag.name}.")
  if _RESUME_OUTPUT.value and not _OUTPUT_JSONL.present:
    raise ConfigError("--resume_output", "continues an --output_jsonl file, and none "
                      "is given.", "pass --output_jsonl=FILE, or drop --resume_output.")
  prompts = _require(_PROMPTS, _PROMPTS.value, "prompts.txt") if _PROMPTS.present else None
  prompt = None if prompts else _require(_PROMPT, _PROMPT.value, '"def main("',
                                         " (or --prompts=FILE, one prompt a line)")
  try:
    infer.check_sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                         max_new_tokens=_MAX_NEW.value, seed=_SEED.value)
  except infer.SamplingArgumentError as err:
    flag = f"--{err.argument}"
    raise ConfigError(flag, str(err), f"pass e.g. {flag}="
                      f"{_GENERATION_EXAMPLES[err.argument]}.") from None
  sampling = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                  top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                  step=_STEP.value)
  shown = warnings.showwarning

  def show(message, category, filename, *args, **kwargs):
    """rung's own warnings (sampling arguments with no effect) as one line."""
    if os.path.dirname(os.path.abspath(filename)) == os.path.dirname(infer.__file__):
      sys.stderr.write(f"warning: {message}\n")
    else:
      shown(message, category, filename, *args, **kwargs)

  try:
    with warnings.catch_warnings():  # restores showwarning
      warnings.showwarning = show
      if prompts:
        infer.text.generate_file(workdir, _CONFIG.value, prompts,
                                 output=_OUTPUT_JSONL.value,
                                 batch_size=_BATCH_SIZE.value,
                                 resume=_RESUME_OUTPUT.value, **sampling)
      else:
        infer.text.generate_text(workdir, _CONFIG.value, prompt, **sampling)
  except KeyboardInterrupt:  # Ctrl-C: what was finished is printed or written
    sys.exit(130)


# compile / plan exit with this when nothing they compiled fits the chip's HBM
# (2 is a config error, 1 a crash).
NO_FIT_STATUS = 3


def _ask_compiler(command: str, topology: str) -> None:
  """compile / plan: deviceless TPU compiles, printed and optionally saved as JSON."""
  import json
  import jax
  from train import output_path
  for flag, kind in ((_OUTPUT_JSON, "file"), (_DUMP_HLO, "directory")):
    why = flag.value and output_path.problem(flag.value, kind)
    if why:  # before the compiles, not after them
      _config_error(ConfigError(f"--{flag.name}", f"{why}.",
                                f"pass a {kind} path where you can write, e.g. "
                                f"--{flag.name}=" + ("report.json" if kind == "file"
                                                     else "hlo_dump") + "."))
  if "JAX_PLATFORMS" not in os.environ:  # the host's own accelerators are not used
    jax.config.update("jax_platforms", "cpu")
  # Another process may hold libtpu's lock file; a deviceless compile needs no chip.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import aot
  if command == "compile":
    report = aot.compile_step(_CONFIG.value, topology, _WHAT.value, _DUMP_HLO.value,
                              compiler_flags=_LIBTPU_FLAGS.value,
                              slices=_SLICES.value)
    print(report.table())
    result = report.to_dict()
    fits = report.fits
  else:
    from aot import plan
    plans = plan.plan(_CONFIG.value, topology, sequence=_PLAN_SEQUENCE.value,
                      remats=tuple(_PLAN_REMATS.value) or None,
                      max_plans=_MAX_PLANS.value,
                      compiler_flags=_LIBTPU_FLAGS.value, slices=_SLICES.value)
    print(plan.table(plans, topology, _SLICES.value))
    result = [p.to_dict() for p in plans]
    fits = any(p.fits for p in plans)
    nothing = plan.none_fits(plans, f"{topology}'s HBM")
  if _OUTPUT_JSON.value:  # its directory is made, as --dump_hlo's is
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value)), exist_ok=True)
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(result, f, indent=2)
  if not fits:  # for scripts: a plan the chip cannot hold is not a success
    what = (f"the step does not fit {topology}'s HBM" if command == "compile"
            else nothing)
    sys.stderr.write(f"{what} (exit status {NO_FIT_STATUS})\n")
    sys.exit(NO_FIT_STATUS)


if __name__ == "__main__":
  one_blas_thread_per_cpu_device()
  app.run(main, flags_parser=parse)
