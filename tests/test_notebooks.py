"""Every notebook runs top to bottom on CPU (nbclient), each within 3 minutes, and
is committed with its outputs cleared; it sets up the devices its meshes need
itself (a fresh runtime has one), and each of its cells can be run again."""

from __future__ import annotations

import copy
import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
  assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "sharding", "checkpoints",
                                         "ladder"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  book = nbformat.read(path, as_version=4)
  for cell in book.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name}: clear outputs before committing (jupyter nbconvert "
          "--clear-output --inplace notebooks/*.ipynb)")
  # The kernel inherits the suite's environment less its 8 CPU devices, as a
  # fresh runtime with one device: a notebook whose meshes need more asks for them
  # itself. It starts in notebooks/, as Jupyter would. Its $HOME is the test's, so
  # the token cache (~/.cache/rung/tokens) is not the user's.
  monkeypatch.setenv("HOME", str(tmp_path))
  # The notebooks train for tens of steps, where unoptimized XLA:CPU code costs
  # more than its faster compiles save (quickstart: 37 s at level 0, 26 s without).
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      f for f in os.environ["XLA_FLAGS"].split()
      if not f.startswith(("--xla_backend_optimization_level",
                           "--xla_force_host_platform_device_count"))))
  # Users run a cell again (after editing a knob, or by mistake): each code cell
  # runs twice in a row, and the second run must work as the first did.
  book.cells = [run for cell in book.cells
                for run in ([cell, copy.deepcopy(cell)] if cell.cell_type == "code"
                            else [cell])]
  client = NotebookClient(book, timeout=180, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  start = time.perf_counter()
  client.execute()
  seconds = time.perf_counter() - start
  errors = [o for c in book.cells for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  # a notebook demonstrates what a run should do: no resume that leaves the
  # uninterrupted run's trajectory (checkpoints.ipynb's did, raising train.steps)
  text = "".join(o.get("text", "") for c in book.cells for o in c.get("outputs", []))
  assert "will not match an uninterrupted run" not in text, text[-3000:]
  assert seconds < 180, f"{path.name} took {seconds:.0f} s; the budget is 3 minutes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_install_cell_clones_once_installs_a_checkout_and_says_what_is_missing(
    path, tmp_path, monkeypatch):
  """The first code cell where rung is not importable (a fresh Colab runtime), run
  with git and pip stood in for: a git URL (https, ssh, file) is cloned once and
  installed from the clone however often the cell runs; a path is installed as it
  is; without RUNG_REPO, from a folder that is no checkout, it says to set it."""
  import importlib.util
  import subprocess
  import sys
  cell = next(c for c in nbformat.read(path, as_version=4).cells
              if c.cell_type == "code").source
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                      if name == "experiments" else find_spec(name, *a))
  calls = []

  def run(cmd, check):
    calls.append(cmd)
    if cmd[:2] == ["git", "clone"]:  # what a clone leaves
      (pathlib.Path(cmd[-1]) / ".git").mkdir(parents=True)
      (pathlib.Path(cmd[-1]) / "setup.cfg").write_text("")
  monkeypatch.setattr(subprocess, "run", run)
  monkeypatch.setattr(sys, "path", list(sys.path))
  extras = "[tpu]" if path.stem == "sharding" else ""  # for its TPU compile cell
  for url in ("https://example.org/rung.git", "ssh://git@example.org/rung",
              "file:///srv/rung"):
    where = tmp_path / url.split(":")[0]
    where.mkdir()
    monkeypatch.chdir(where)
    monkeypatch.setenv("RUNG_REPO", url)
    calls.clear()
    for _ in range(2):
      exec(cell, {})
    assert calls == [["git", "clone", "-q", url, "rung"]] + 2 * [
        [sys.executable, "-m", "pip", "install", "-q", "-e", f"{where}/rung{extras}"]]
  checkout = tmp_path / "checkout"
  (checkout / "notebooks").mkdir(parents=True)
  (checkout / "setup.cfg").write_text("")
  monkeypatch.chdir(checkout / "notebooks")
  monkeypatch.delenv("RUNG_REPO")
  calls.clear()
  exec(cell, {})  # a clone's notebooks/ folder: the default ".." is the checkout
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e",
                    f"{checkout}{extras}"]]
  monkeypatch.chdir(tmp_path)
  with pytest.raises(RuntimeError, match=r"rung is not installed and \S+ is not a rung "
                     r"checkout: set os.environ\[\"RUNG_REPO\"\] to its git URL or path"):
    exec(cell, {})
