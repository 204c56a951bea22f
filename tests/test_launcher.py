"""The launcher's help, its refusal of flags a command does not read, and the config
errors it gives for malformed command lines."""

import os
import re

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


def test_an_unknown_flag_or_config_file_is_a_config_error_that_says_what_exists():
  """A misspelt flag names itself and the flag meant; a --config path that is not a
  file names the shipped configs, and the suggested one exists."""
  misspelt, missing = run_cli_many([
      ("train", "--config=experiments/llama_tiny.py", "--workdri=runs/x"),
      ("train", "--config=experiments/llama_tiyn.py", "--workdir=runs/x")])
  assert misspelt.returncode == missing.returncode == 2
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
