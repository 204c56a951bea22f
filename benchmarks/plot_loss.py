"""Plots train and eval loss from one or more runs' metrics.jsonl into a PNG.

  python benchmarks/plot_loss.py --out=benchmarks/results/llama_tiny_loss.png runs/tiny
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "PNG to write", required=True)
_TITLE = flags.DEFINE_string("title", "", "figure title")


def main(argv):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from train.metrics import read_metrics
  fig, ax = plt.subplots(figsize=(6, 4))
  for workdir in argv[1:]:
    rows = read_metrics(workdir)
    name = os.path.basename(os.path.normpath(workdir))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    line, = ax.plot(*zip(*train), alpha=0.6, label=f"{name} train")
    ax.plot(*zip(*evals), "o-", color=line.get_color(), label=f"{name} eval")
  ax.axhline(5.545, color="gray", ls=":", label="uniform over bytes (ln 256)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(_TITLE.value)
  ax.legend()
  ax.grid(alpha=0.3)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)


if __name__ == "__main__":
  app.run(main)
