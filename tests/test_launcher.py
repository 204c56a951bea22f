"""The launcher's help, its refusal of flags a command does not read, and the config
errors it gives for malformed command lines."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_cli, run_cli_many
from experiment.__main__ import COMMANDS, PLAN_REMATS

OWN_FLAGS = {f for c in COMMANDS.values() for f in c.flags}


def test_top_level_help_aligns_every_command():
  proc = run_cli("--help")
  assert proc.returncode == 0, proc.stderr
  rows = {}
  for line in proc.stdout.splitlines():
    m = re.match(r"  (\S+)( +)(\S.*)", line)
    if m and m.group(1) in COMMANDS:
      rows[m.group(1)] = (len(m.group(1)) + len(m.group(2)), m.group(3))
  assert set(rows) == set(COMMANDS)
  assert len({column for column, _ in rows.values()}) == 1  # one summary column
  for name, (_, text) in rows.items():
    assert COMMANDS[name].summary.startswith(text.rstrip())
  for name in COMMANDS:  # each example sits on its own line
    assert re.search(rf"^  python -m experiment {name} --", proc.stdout, re.M)


@pytest.fixture(scope="module")
def helps():
  """`python -m experiment COMMAND --help` for every command, each its own process."""
  return dict(zip(COMMANDS, run_cli_many([(c, "--help") for c in COMMANDS])))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_lists_only_its_flags_and_exits_0(command, helps):
  proc = helps[command]
  assert proc.returncode == 0, proc.stderr[-2000:]
  listed = set(re.findall(r"^  --(\w+)", proc.stdout, re.M))
  assert listed & OWN_FLAGS == set(COMMANDS[command].flags)
  assert proc.stdout.startswith(f"usage: python -m experiment {command} ")


def test_flag_of_another_command_exits_2():
  proc = run_cli("train", "--config=experiments/llama_tiny.py", "--workdir=/tmp/x",
                 "--prompt=hello")
  assert proc.returncode == 2
  assert "Config error in `--prompt`: the train command does not read --prompt" in (
      proc.stderr)


def test_config_overrides_to_a_command_without_a_config_say_so():
  """export-hf and inspect read the run's own config: a --config.* override there
  is refused as such (it was told to add --config=..., which it then refused as a
  flag the command does not read: a loop a trial found)."""
  commands = [c for c, spec in COMMANDS.items() if "config" not in spec.flags]
  assert set(commands) == {"export-hf", "inspect"}
  procs = run_cli_many([(c, "--workdir=/tmp/x",
                         *(("--out=/tmp/y",) if c == "export-hf" else ()),
                         "--config.model.block=standard") for c in commands])
  for command, proc in zip(commands, procs):
    assert proc.returncode == 2, proc.stderr
    assert (f"Config error in `--config`: the {command} command takes no --config.* "
            "overrides: it reads the run's own config.json.") in proc.stderr
    assert "pass --config=" not in proc.stderr


# A value each launcher flag's parser refuses, by command.
# (command, flag=value, what the error says the value is not)
BAD_VALUES = [("compile", "--what=bogus", "a valid value"),
              ("compile", "--slices=two", "an integer"),
              ("plan", "--max_plans=many", "an integer"),
              ("plan", "--plan_sequence=maybe", "true or false"),
              ("generate", "--temperature=hot", "a number"),
              ("generate", "--max_new_tokens=ten", "an integer"),
              ("plan", "--plan_remats=bogus", "a valid value")]


def test_a_malformed_launcher_flag_names_the_flag_and_a_value_that_parses():
  """`--slices=two` is a config error in `--slices` (exit 2, no traceback), and the
  value its fix suggests is one the flag's own parser accepts."""
  from absl import flags
  base = {"compile": ["--topology=v5e:2x2"], "plan": ["--topology=v5e:2x2"],
          "generate": ["--workdir=/tmp/unused"]}
  runs = run_cli_many([(command, "--config=experiments/llama_tiny.py", *base[command],
                        value) for command, value, _ in BAD_VALUES])
  for (command, value, kind), proc in zip(BAD_VALUES, runs):
    name = value[2:].split("=")[0]
    assert proc.returncode == 2, (value, proc.stderr[-1000:])
    assert f"Config error in `--{name}`: '{value.split('=')[1]}' is not {kind}" in (
        proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    fix = re.search(rf"Fix: pass --{name}=(\S+?)(?: \(one of [^)]*\))?\.$", proc.stderr.strip())
    assert fix, proc.stderr
    flags.FLAGS[name].parser.parse(fix.group(1))  # raises if the fix does not parse


def test_a_malformed_step_or_process_id_is_offered_a_value_that_can_work():
  """From a trial: `--step=abc` was offered `--step=1`, a step a run rarely saved
  (the fix then failed as "not a saved step"); `--process_id`'s generic `1`
  fails in a one-process run. The step's fix is to leave it out (the latest) or
  list the saved ones; the process id's is 0, which every run has."""
  runs = run_cli_many([
      ("generate", "--config=experiments/llama_tiny.py", "--workdir=/tmp/unused",
       "--prompt=a", "--step=abc"),
      ("train", "--config=experiments/llama_tiny.py", "--workdir=runs/x",
       "--process_id=first")])
  for proc in runs:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1000:]
  assert ("Config error in `--step`: 'abc' is not an integer" in runs[0].stderr and
          "Fix: leave --step out to read the latest saved step, or pass one that "
          "is saved (`python -m experiment inspect --workdir=DIR` lists them)."
          in runs[0].stderr), runs[0].stderr
  assert ("Config error in `--process_id`: 'first' is not an integer" in runs[1].stderr
          and "e.g. --process_id=0." in runs[1].stderr), runs[1].stderr


def test_multi_process_timeouts_below_one_second_are_config_errors():
  """--join_timeout_s=0 and --heartbeat_timeout_s=-5 exit 2 before joining, naming
  the flag, with a fix of at least one second."""
  runs = run_cli_many([("train", "--config=experiments/llama_tiny.py", "--workdir=runs/x",
                        "--coordinator_address=127.0.0.1:1", "--num_processes=2",
                        "--process_id=0", flag) for flag in
                       ("--join_timeout_s=0", "--heartbeat_timeout_s=-5")])
  for proc, (name, value) in zip(runs, (("join_timeout_s", 0),
                                        ("heartbeat_timeout_s", -5))):
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert (f"Config error in `--{name}`: {value} seconds cannot be waited for. "
            f"Fix: pass --{name}=") in proc.stderr, proc.stderr
    fix = int(re.search(rf"--{name}=(\d+)", proc.stderr.split("Fix:")[1]).group(1))
    assert fix >= 1 and "joining the run" not in proc.stderr


def test_launch_flags_that_join_no_run_are_config_errors():
  """From a trial: an address without a port was a ValueError traceback; an id
  past the count waited out the join timeout. Both, and a count below 1, exit 2
  before joining, naming the flag."""
  base = ("train", "--config=experiments/llama_tiny.py", "--workdir=runs/x")
  runs = run_cli_many([
      (*base, "--coordinator_address=127.0.0.1", "--num_processes=2", "--process_id=1"),
      (*base, "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"),
      (*base, "--coordinator_address=127.0.0.1:1", "--num_processes=0", "--process_id=0")])
  for proc, message in zip(runs, (
      "Config error in `--coordinator_address`: '127.0.0.1' is not HOST:PORT. Fix: "
      "pass process 0's host and a free port, e.g. "
      "--coordinator_address=127.0.0.1:1234",
      "Config error in `--process_id`: 2 is not a process of a run of 2 (ids 0 to 1).",
      "Config error in `--num_processes`: 0 processes cannot run.")):
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert message in proc.stderr, proc.stderr[-1000:]
    assert "joining the run" not in proc.stderr and "Traceback" not in proc.stderr


def test_an_unknown_flag_or_config_file_is_a_config_error_that_says_what_exists():
  """A misspelt flag names itself and the flag meant; a --config path that is not a
  file names the shipped configs, and the suggested one exists."""
  misspelt, missing, entry, early = run_cli_many([
      ("train", "--config=experiments/llama_tiny.py", "--workdri=runs/x"),
      ("train", "--config=experiments/llama_tiyn.py", "--workdir=runs/x"),
      ("train", "--config=experiments/llama_tiny.py", "--workdir=runs/x",
       "--config.data.mixture.web.weight=0.5"),
      ("train", "--workdir=runs/x", "--config.train.steps=2",
       "--config=experiments/llama_tiny.py")])
  assert {r.returncode for r in (misspelt, missing, entry, early)} == {2}
  # an override before the file (from a trial: the fix said to check its spelling)
  assert ("Config error in `--config`: the override --config.train.steps=2 comes "
          "before --config=FILE, whose config it changes. Fix: put --config=FILE "
          "before every --config.* override.") in early.stderr, early.stderr
  # An entry of a table the config leaves empty: not "valid keys here: ." (none).
  assert ("Config error in `data.mixture.web`: `data.mixture` is empty in this config, "
          "so it has no entry `web`") in entry.stderr
  assert "Config error in `--workdri`: there is no such flag; did you mean --workdir?" in (
      misspelt.stderr)
  assert "Config error in `--config`: there is no config file at experiments/llama_tiyn.py" in (
      missing.stderr)
  suggested = re.search(r"--config=(\S+\.py)", missing.stderr).group(1)
  assert os.path.isfile(os.path.join(REPO, suggested)), missing.stderr


def test_plan_remats_are_the_models_policies():
  """The launcher spells out plan's policies (it imports no model code before
  parsing); they must be model.config.REMAT."""
  from model.config import REMAT
  assert PLAN_REMATS == REMAT


def test_an_hf_dir_that_is_a_file_or_missing_says_so(tmp_path):
  """--hf_dir=.../config.json said the file "has no config.json"."""
  from experiment.__main__ import _no_hf_model
  (tmp_path / "config.json").write_text("{}")
  assert _no_hf_model(str(tmp_path)) is None
  assert "config.json is a file, not a directory" in str(
      _no_hf_model(str(tmp_path / "config.json")))
  assert "nowhere does not exist" in str(_no_hf_model(str(tmp_path / "nowhere")))


def test_a_directory_without_its_files_is_a_config_error(tmp_path):
  """import-hf from a directory with no HF config.json, and export-hf / generate /
  inspect of a --workdir that holds no run, exit 2 naming the flag (no traceback)
  and create nothing."""
  empty, out = tmp_path / "empty", tmp_path / "out"
  empty.mkdir()
  runs = run_cli_many([
      ("import-hf", f"--hf_dir={empty}", f"--workdir={tmp_path / 'imported'}"),
      ("export-hf", f"--workdir={empty}", f"--out={out}"),
      ("generate", f"--workdir={empty}", "--prompt=hi"),
      ("inspect", f"--workdir={empty}")])
  for proc, flag, what in zip(runs, ("--hf_dir", "--workdir", "--workdir", "--workdir"),
                              ("no Hugging Face model", "no run", "no run", "no run")):
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert f"Config error in `{flag}`: {empty} holds {what} (it has no config.json)" in (
        proc.stderr)
    assert "Traceback" not in proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# (file body, the message's start after "<path> ", and a fix fragment); each file
# defines get_config from experiments/base.py unless the case is about that.
BROKEN_CONFIGS = {
    "misspelt_field": (
        "def get_config(arg=None):\n  c = base.get_config()\n"
        "  c.model.update(num_layer=2)\n  return c\n",
        "line 4: there is no config field `num_layer`; did you mean `num_layers`?",
        "experiments/base.py lists every field"),
    "misspelt_attribute": (
        "def get_config(arg=None):\n  c = base.get_config()\n"
        "  c.optim.warmup_step = 3\n  return c\n",
        "line 4: there is no config field `warmup_step`; did you mean `warmup_steps`?",
        "experiments/base.py lists every field"),
    "syntax": ("def get_config(arg=None)\n  return base.get_config()\n",
               "line 2: expected ':'.", "fix the file's syntax"),
    "no_get_config": ("def config(arg=None):\n  return base.get_config()\n",
                      "defines no get_config function.", "define get_config(arg=None)"),
    "wrong_type": (
        "def get_config(arg=None):\n  c = base.get_config()\n"
        "  c.model.d_model = '128'\n  return c\n",
        "line 4: field `d_model` is declared int; it was given '128', a str.",
        "give `d_model` an int"),
    "raises": ("def get_config(arg=None):\n  return 1 / 0\n",
               "line 3: ZeroDivisionError: division by zero", "line 3."),
    # quotes in a message are the user's own (they were stripped off its ends)
    "raises_quoted": ("def get_config(arg=None):\n  raise ValueError(f'no variant {arg!r}')\n",
                      "line 3: ValueError: no variant None", "line 3."),
    "raises_quoted_end": ("def get_config(arg=None):\n  raise ValueError(\"variant ''\")\n",
                          "line 3: ValueError: variant ''", "line 3."),
    "raises_key": ("def get_config(arg=None):\n  return {}['model']\n",
                   "line 3: KeyError: model", "line 3."),
}


def test_a_config_file_that_cannot_give_a_config_is_a_config_error(tmp_path):
  """Each way a config file fails (a misspelt field on the locked base config, bad
  syntax, no get_config, a mistyped value, an exception) exits 2 naming the file,
  its line and a fix; no traceback. A config may import the module next to it."""
  cases = list(BROKEN_CONFIGS.items())
  for name, (body, _, _) in cases:
    (tmp_path / f"{name}.py").write_text("from experiments import base\n" + body)
  (tmp_path / "steps.py").write_text("STEPS = 0\n")
  (tmp_path / "sibling.py").write_text(
      "import steps\nfrom experiments import llama_tiny\n\n\ndef get_config(arg=None):\n"
      "  c = llama_tiny.get_config()\n  c.train.steps = steps.STEPS\n  return c\n")
  runs = run_cli_many(
      [("train", f"--config={tmp_path / name}.py", f"--workdir={tmp_path / 'run'}")
       for name, _ in cases]
      + [("train", f"--config={tmp_path / 'sibling.py'}", f"--workdir={tmp_path / 'run'}"),
         ("train", "--config=experiments/saved.py", f"--workdir={tmp_path / 'run'}"),
         ("train", f"--config=experiments/saved.py:{tmp_path / 'nope'}",
          f"--workdir={tmp_path / 'run'}")])
  for (name, (_, problem, fix)), proc in zip(cases, runs):
    assert proc.returncode == 2, (name, proc.stderr[-2000:])
    assert f"Config error in `--config`: {tmp_path / name}.py {problem}" in proc.stderr, (
        name, proc.stderr[-2000:])
    assert fix in proc.stderr.split("Fix:")[1], (name, proc.stderr)
    assert "Traceback" not in proc.stderr
  sibling, no_arg, no_run = runs[len(cases):]
  # the sibling module was imported: its train.steps=0 reached validation
  assert "Config error in `train.steps`: must be at least 1, got 0" in sibling.stderr, (
      sibling.stderr[-2000:])
  assert ("Config error in `--config`: experiments/saved.py reads the config of a run, "
          "and no run directory was given") in no_arg.stderr
  assert f"Config error in `--config`: {tmp_path / 'nope'} holds no run" in no_run.stderr
  assert not (tmp_path / "run").exists()


# (the wrongly typed assignment in a config file, the example its fix must give)
WRONG_TYPES = [
    ("c.mesh.rules.embed = 'fsdp'", "embed = ('fsdp',)"),  # the command line takes it
    ("c.mesh.rules.batch = 'data,fsdp'", "batch = ('data', 'fsdp')"),
    ("c.model.ladder_layers = [4, 5]", "ladder_layers = '4,5'"),
    ("c.train.steps = '30'", "steps = 30"),
    ("c.train.steps = 30.0", "steps = 30"),
    ("c.optim.learning_rate = '3e-4'", "learning_rate = 0.0003"),
    ("c.model.tie_embeddings = 'no'", "tie_embeddings = False"),
    ("c.data.stop_ids = 7", "stop_ids = (7,)"),
    ("c.model.d_model = 'big'", None),  # no reading: the type alone
    ("c.train.steps = 3.5", None),
]


def test_a_wrongly_typed_field_in_a_config_file_is_given_an_example_that_loads(tmp_path):
  """From the carried list: `mesh.rules.embed="fsdp"` passes on the command line
  but a config file was told only "give `embed` a tuple" (and `ladder_layers=[1]`
  "a str"). The fix now writes the value as the declared type, and that
  assignment, put in its place, loads."""
  from experiment import config_errors
  from sharding import ConfigError

  def load(line: str):
    path = tmp_path / "c.py"
    path.write_text("from experiments import base\n\n\ndef get_config(arg=None):\n"
                    f"  c = base.get_config()\n  {line}\n  return c\n")
    return config_errors.load_config(["experiment", f"--config={path}"])

  for line, example in WRONG_TYPES:
    with pytest.raises(ConfigError) as err:
      load(line)
    fix = str(err.value).split("Fix:")[1]
    field = line.split("=")[0].strip().split(".")[-1]
    if example is None:
      assert "e.g." not in fix, (line, fix)
      continue
    assert f"e.g. `{example}`." in fix, (line, fix)
    target = line.split("=")[0].strip()
    config = load(f"{target} = {example.split(' = ', 1)[1]}")  # the fix followed
    value = eval(example.split(" = ", 1)[1])
    node = config
    for part in target.split(".")[1:]:
      node = node[part]
    assert node == value and type(node) is type(value), (line, field, node)


def test_a_config_variant_that_does_not_exist_names_the_one_meant():
  """A config file's `:VARIANT` missing or misspelt is a config error (exit 2)
  whose fix names a variant that exists (it was a ValueError "fix the file")."""
  runs = run_cli_many([("train", f"--config=experiments/{arg}", "--workdir=runs/x")
                       for arg in ("ladder_compare.py", "ladder_compare.py:ladderr",
                                   "moe_tiny.py:NO_AUX", "llama_1b.py:lcal",
                                   "llama_tiny.py:big", "base.py:x")])
  assert [r.returncode for r in runs] == [2] * 6
  for run, problem, fix in zip(runs, (
      "experiments/ladder_compare.py needs a variant; its variants: standard, "
      "parallel, ladder, hybrid.", "experiments/ladder_compare.py has no variant "
      "'ladderr'", "experiments/moe_tiny.py has no variant 'NO_AUX'; its variants: "
      "default, no_aux.", "experiments/llama_1b.py has no variant 'lcal'; its "
      "variants: local."), ("ladder_compare.py:standard", "ladder_compare.py:ladder",
                           "moe_tiny.py:no_aux", "llama_1b.py:local")):
    assert f"Config error in `--config`: {problem}" in run.stderr, run.stderr
    assert f"Fix: pass --config=experiments/{fix}." in run.stderr
  # a file without variants refused one (it trained the file's config, ignoring it)
  for run, name in zip(runs[4:], ("llama_tiny.py", "base.py")):
    assert (f"Config error in `--config`: experiments/{name} has no variants, and "
            f"was given") in run.stderr, run.stderr
    assert (f"Fix: pass --config=experiments/{name}; a config file built on it calls "
            "its get_config() without the variant") in run.stderr


def test_a_refused_write_is_one_line_naming_the_file(tmp_path):
  """A full disk (here a real refused write under a per-file size limit,
  RLIMIT_FSIZE) while the run writes its config ended in an OSError traceback
  naming no file; the launcher names the file and what to do, exit status 1."""
  import resource
  import signal

  def limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # config.json is ~4 kB
  proc = subprocess.run(
      [sys.executable, "-m", "experiment", "train", "--config=experiments/llama_tiny.py",
       f"--workdir={tmp_path}", "--config.data.source=synthetic"], cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO), preexec_fn=limit, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert (f"Could not write {tmp_path}/config.json: File too large. Free space there "
          "(or fix the file system) and run the command again") in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_tilde_in_a_path_flag_is_the_home_directory(tmp_path, monkeypatch):
  """The shell leaves `--workdir=~/runs` as it is (it expands a tilde only at a
  word's start), and rung took `~` for a directory of that name: `train` made
  ./~/runs, and the other commands said `~/x` holds nothing. Every path flag, the
  saved-config argument and checkpoint.init_from now expand it."""
  from train.checkpoint import parse_init_from
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  cases = {
      ("inspect", "--workdir=~/nothing"): "--workdir",
      ("export-hf", "--workdir=~/nothing", "--out=~/o"): "--workdir",
      ("generate", "--workdir=~/nothing", "--prompt=a"): "--workdir",
      ("import-hf", "--hf_dir=~/nothing", "--workdir=~/w"): "--hf_dir",
      ("train", "--config=experiments/saved.py:~/nothing", "--workdir=~/w"): "--config",
  }
  procs = run_cli_many(list(cases))
  for (args, field), proc in zip(cases.items(), procs):
    assert proc.returncode == 2, (args, proc.stderr[-1500:])
    assert f"Config error in `{field}`: {home / 'nothing'} " in proc.stderr, (
        args, proc.stderr[-1500:])
    assert "~" not in proc.stderr, (args, proc.stderr[-1500:])
  assert parse_init_from("~/run:5") == (str(home / "run"), 5)
  assert parse_init_from("~/run") == (str(home / "run"), None)


_PATH_WORDS = {"file", "directory", "directories", "dir", "png", "here", "path", "root",
               "out", "rows"}


def test_every_path_flag_of_the_launcher_and_benchmarks_expands_a_tilde(tmp_path):
  """The launcher's path flags expanded `~` but the benchmarks' (--root, --out,
  --write_rows, --plot, ...) did not: `--write_rows=~/r.jsonl` wrote ./~/r.jsonl.
  Every string flag whose name or help says it holds a path must come from
  `experiment.path_flag.define_path`; one benchmark is run to show the effect."""
  import ast
  import glob
  plain = []
  for path in [os.path.join(REPO, "experiment", "__main__.py"),
               *glob.glob(os.path.join(REPO, "benchmarks", "*.py"))]:
    for node in ast.walk(ast.parse(open(path).read())):
      if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") in
          ("DEFINE_string", "DEFINE_list", "DEFINE_multi_string")):
        name, _, help_node = node.args[:3]
        words = re.findall("[a-z]+", (name.value + " " + ast.unparse(help_node)).lower())
        if _PATH_WORDS.intersection(words):
          plain.append(f"{os.path.basename(path)}: --{name.value}")
  assert not plain, plain
  home = tmp_path / "home"
  (home / "run").mkdir(parents=True)
  rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.7}]
  (home / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "plot_loss.py"),
       "--out=~/plots/loss.png", "~/run"], cwd=tmp_path, capture_output=True, text=True,
      env=dict(os.environ, HOME=str(home), PYTHONPATH=REPO), timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (home / "plots" / "loss.png").stat().st_size > 0
  assert not (tmp_path / "~").exists()


def test_an_empty_variant_is_reported_as_the_config_file_raised_it(tmp_path):
  """`--config=exp.py:` passes "" to get_config (as ml_collections does); rung's
  diagnosis called get_config(None), which succeeded, so the user saw a garbled
  "'?' is not a valid value ... --config.config=..." instead of the file's own
  error at its line."""
  (tmp_path / "exp.py").write_text(
      "from experiments import llama_tiny\n\n\ndef get_config(arg=None):\n"
      "  if arg is None:\n    return llama_tiny.get_config()\n"
      "  raise ValueError(f'no variant {arg!r}')\n")
  proc = run_cli("train", f"--config={tmp_path / 'exp.py'}:", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert (f"Config error in `--config`: {tmp_path / 'exp.py'} line 7: ValueError: "
          "no variant ''.") in proc.stderr, proc.stderr[-2000:]
  assert "--config.config" not in proc.stderr


def test_a_mixture_weight_written_as_an_integer_says_how_to_pass_fractions(tmp_path):
  """Weights are relative, but a config file's `weight=3` made the field an int,
  and `--config.data.mixture.b.weight=0.5` was refused with the fix "pass a value
  of type int". The fix now says to write floats in the file; followed, the
  override parses (the run then stops at a later check)."""
  mix = ("from ml_collections import ConfigDict\nfrom experiments import llama_tiny\n\n\n"
         "def get_config():\n  c = llama_tiny.get_config()\n"
         "  c.data.mixture = ConfigDict({'a': dict(source='synthetic', weight=W),\n"
         "                               'b': dict(source='synthetic', weight=W3)})\n"
         "  return c\n")
  for ints in (True, False):
    (tmp_path / "mix.py").write_text(mix.replace("W3", "3" if ints else "3.0")
                                     .replace("W", "1" if ints else "1.0"))
    proc = run_cli("train", f"--config={tmp_path / 'mix.py'}", f"--workdir={tmp_path}/w",
                   "--config.data.mixture.b.weight=0.5", "--config.train.steps=0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    if ints:
      assert ("Config error in `data.mixture.b.weight`: '0.5' is not a valid int"
              in proc.stderr and "Fix: write the weights as floats in the config file "
              "(weight=3.0), then pass --config.data.mixture.b.weight=0.5." in proc.stderr)
    else:  # parsed: refused by a later check, not the weight's type
      assert "Config error in" in proc.stderr, proc.stderr[-2000:]
      assert "Config error in `data.mixture.b.weight`" not in proc.stderr


def test_fake_cpu_devices_get_one_blas_thread_each(monkeypatch):
  """From a trial: GaLore's refresh (LAPACK QR / SVD on every fake CPU device)
  ran 2x slower with OpenBLAS's own threads per call than with one: where XLA
  splits the CPU into devices, OPENBLAS_NUM_THREADS defaults to 1; a value the
  user set, or a host without split devices, is left alone."""
  from experiment.host import one_blas_thread_per_cpu_device
  for flags, given, want in [
      ("--xla_force_host_platform_device_count=8", None, "1"),
      ("--xla_force_host_platform_device_count=8", "4", "4"),
      ("--xla_backend_optimization_level=0", None, None)]:
    monkeypatch.setenv("XLA_FLAGS", flags)
    if given is None:
      monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    else:
      monkeypatch.setenv("OPENBLAS_NUM_THREADS", given)
    one_blas_thread_per_cpu_device()
    assert os.environ.get("OPENBLAS_NUM_THREADS") == want, (flags, given)
