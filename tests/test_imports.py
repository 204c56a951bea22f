"""Imports flow one way (DESIGN.md, Layout): experiment -> aot | train | infer ->
model -> kernels; sharding is used by all and imports none of them; aot may import
train and infer, neither imports aot, and train never imports infer; no library
package imports the config files (experiments) or the launcher (experiment)."""

import ast
import os

from conftest import REPO

LIBRARY = ("aot", "train", "infer", "model", "kernels", "sharding")
# package -> rung packages it may import
ALLOWED = {
    "experiment": {"experiments", *LIBRARY},
    "aot": {"train", "infer", "model", "kernels", "sharding"},
    "train": {"model", "kernels", "sharding"},
    "infer": {"train", "model", "kernels", "sharding"},
    "model": {"kernels", "sharding"},
    "kernels": {"sharding"},
    "sharding": set(),
}
RUNG = set(ALLOWED) | {"experiments"}


def backward_imports(root: str) -> list[str]:
  """'file:line: package imports other' for every import (module level or inside a
  function) from one rung package of another that ALLOWED does not list."""
  found = []
  for package, allowed in ALLOWED.items():
    for directory, _, files in os.walk(os.path.join(root, package)):
      for name in sorted(f for f in files if f.endswith(".py")):
        path = os.path.join(directory, name)
        with open(path) as f:
          tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
          elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module]
          else:
            continue
          for target in targets:
            top = target.split(".")[0]
            if top in RUNG and top != package and top not in allowed:
              found.append(f"{os.path.relpath(path, root)}:{node.lineno}: "
                           f"{package} imports {target}")
  return found


def test_no_import_runs_backwards():
  assert backward_imports(REPO) == []


def test_a_backward_import_is_found(tmp_path):
  """The checker itself: a train module importing infer inside a function, a model
  module importing train, sharding importing kernels and infer importing a config
  file are each reported."""
  files = {"train/x.py": "def f():\n  from infer import generate\n",
           "model/y.py": "import train.loop\n",
           "sharding/z.py": "from kernels import attention\n",
           "infer/w.py": "from experiments import saved\n",
           "aot/ok.py": "import train\nimport infer\n"}
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
  assert sorted(backward_imports(str(tmp_path))) == [
      "infer/w.py:1: infer imports experiments",
      "model/y.py:1: model imports train.loop",
      "sharding/z.py:1: sharding imports kernels",
      "train/x.py:2: train imports infer"]
