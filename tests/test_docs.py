"""The configuration reference documents every field of experiments/base.py."""

import os
import re

from conftest import REPO
from experiments import base


def _fields(config, prefix=""):
  for key, value in config.items():
    if key == "rules":
      yield prefix + "rules.<name>"
    elif key == "mixture":  # data.mixture: name -> entry, empty by default
      yield prefix + "mixture.<name>"
    elif hasattr(value, "items"):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_every_field_is_documented():
  with open(os.path.join(REPO, "docs", "configuration.md")) as f:
    documented = set(re.findall(r"^\| `([\w.<>]+)` \|", f.read(), re.M))
  missing = sorted(set(_fields(base.get_config())) - documented)
  assert not missing, f"fields missing from docs/configuration.md: {missing}"


def test_readme_rules_table_names_every_default_rule():
  """README's table of the default rules lists every logical name with its mesh
  axes (it lacked act_kv_heads, act_embed and head_dim, which errors name)."""
  import sharding
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  table = text[text.index("| logical | mesh |"):]
  table = table[:table.index("\n\n")]
  listed = {}
  for row in table.splitlines()[2:]:
    cells = [c.strip() for c in row.strip("|").split("|")]
    for names, axes in ((cells[0], cells[1]), (cells[3], cells[4])):
      for name in filter(None, (n.strip() for n in names.split(","))):
        listed[name] = () if axes == "(none)" else tuple(
            a.strip() for a in axes.split(","))
  assert listed == dict(sharding.DEFAULT_RULES)


def test_readme_links_the_reference_and_benchmarks():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert "docs/configuration.md" in readme
  assert "benchmarks/README.md" in readme


def _doc_commands():
  """Every `python -m experiment ...` command line (not a mention in prose) in the
  README, docs/, the experiment configs and the notebooks' code cells, backslash
  continuations joined: (where, text)."""
  import glob
  import json
  paths = [os.path.join(REPO, "README.md")] + sorted(
      glob.glob(os.path.join(REPO, "docs", "*.md"))
      + glob.glob(os.path.join(REPO, "experiments", "*.py"))
      + glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
  line = re.compile(r"^[ \t]*(?:[!$] ?)?(?:[A-Z_]+=\S+ )*(python -m experiment "
                    r"[^\n`\"#]*)", re.M)
  for path in paths:
    with open(path) as f:
      text = f.read()
    if path.endswith(".ipynb"):
      text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"]
                       if c["cell_type"] == "code")
    text = text.replace("\\\n", " ")
    for m in line.finditer(text):
      yield os.path.relpath(path, REPO), m.group(1).strip()


def test_documented_commands_use_real_flags_and_fields():
  """Each documented command names a command the launcher has, only flags it
  defines for it, a --workdir where the command needs one, and --config.* fields that
  exist: a command pasted from the docs does not fail on its spelling."""
  from experiment.__main__ import COMMANDS
  fields = set(_fields(base.get_config()))
  needs_workdir = {"train", "import-hf", "export-hf", "generate", "inspect"}
  seen, problems = 0, []
  for where, cmd in _doc_commands():
    words = cmd.split()
    command = words[3] if len(words) > 3 else ""
    if command.startswith(("[", "<")) or command == "...":
      continue
    seen += 1
    if command not in COMMANDS:
      problems.append((where, cmd, f"no command {command!r}"))
      continue
    flags = set(COMMANDS[command].flags)
    given = re.findall(r"--([\w.]+)", cmd)
    for flag in given:
      if flag.startswith("config."):
        field = flag.removeprefix("config.")
        field = re.sub(r"^mesh\.rules\.\w+$", "mesh.rules.<name>", field)
        field = re.sub(r"^data\.mixture\.\w+\.\w+$", "data.mixture.<name>", field)
        if field not in fields:
          problems.append((where, cmd, f"no config field {field}"))
      elif flag not in flags and not flag.startswith("xla_"):
        problems.append((where, cmd, f"--{flag} is not a flag of {command}"))
    if command in needs_workdir and "workdir" not in given and "..." not in cmd:
      problems.append((where, cmd, "no --workdir"))
  assert seen > 20
  assert not problems, "\n".join(map(str, problems))


def test_documented_config_files_load_with_each_of_their_variants(tmp_path):
  """From a fresh-user trial: the README's example experiment passed its `arg` on to
  base.get_config, which has no variants, so the `:local` it documents was a config
  error. Every config file the docs show (a python block opening with
  `# experiments/NAME.py`) is written out and loaded as --config would load it,
  bare and with each variant it tests for (`arg == "X"`)."""
  import glob
  import textwrap

  from experiment.config_errors import load_config
  shown = 0
  for path in [os.path.join(REPO, "README.md")] + sorted(
      glob.glob(os.path.join(REPO, "docs", "*.md"))):
    with open(path) as f:
      text = f.read()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
      block = textwrap.dedent(block)  # a block inside a list item is indented
      name = re.match(r"\s*# experiments/(\w+\.py)", block)
      if not name:
        continue
      shown += 1
      file = tmp_path / name.group(1)
      file.write_text(block)
      for variant in [None, *re.findall(r'arg == "(\w+)"', block)]:
        flag = f"--config={file}" + (f":{variant}" if variant else "")
        assert load_config(["experiment", "train", flag]).model.d_model > 0, (path, flag)
  assert shown >= 2  # my_run.py (README) and my_mix.py
