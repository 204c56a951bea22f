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
