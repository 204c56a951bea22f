"""Plots train and eval loss from one or more runs' metrics.jsonl into a PNG.

  python benchmarks/plot_loss.py --out=benchmarks/results/llama_tiny_loss.png runs/tiny
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import run  # noqa: E402

_OUT = define_path("out", None, "PNG to write", required=True, output="file")
_TITLE = flags.DEFINE_string("title", "", "figure title")


def main(argv):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from train.metrics import read_metrics
  workdirs = [os.path.expanduser(w) for w in argv[1:]]
  if not workdirs:
    raise app.UsageError("name at least one run directory (its metrics.jsonl).")
  missing = [w for w in workdirs
             if not os.path.exists(os.path.join(w, "metrics.jsonl"))]
  if missing:
    raise app.UsageError(f"no metrics.jsonl in {', '.join(missing)}.")
  fig, ax = plt.subplots(figsize=(6, 4))
  vocab = set()
  for workdir in workdirs:
    rows = read_metrics(workdir)
    vocab.add(_vocab_size(workdir))
    name = os.path.basename(os.path.normpath(workdir))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    line, = ax.plot(*zip(*train), alpha=0.6, label=f"{name} train")
    ax.plot(*zip(*evals), "o-", color=line.get_color(), label=f"{name} eval")
  if len(vocab) == 1 and None not in vocab:  # uniform over the runs' vocabulary
    v = vocab.pop()
    ax.axhline(math.log(v), color="gray", ls=":", label=f"uniform (ln {v})")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(_TITLE.value)
  ax.legend()
  ax.grid(alpha=0.3)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)
  print(f"wrote {_OUT.value}")


def _vocab_size(workdir: str) -> int | None:
  """The run's model.vocab_size from its config.json (None if absent)."""
  import json
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return int(json.load(f)["model"]["vocab_size"])
  except (OSError, KeyError, ValueError):
    return None


if __name__ == "__main__":
  run(main)
