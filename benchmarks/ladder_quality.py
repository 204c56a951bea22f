"""Ladder Residual's quality cost, and converting a trained standard model.

  python benchmarks/ladder_quality.py [--steps=200] [--retrain_steps=40]
      [--root=runs/ladder_quality] [--out=benchmarks/results]

Trains experiments/ladder_compare.py's standard, parallel and ladder variants for
--steps each on the default data (the Python stdlib bytes), then loads the trained
standard checkpoint as a hybrid (upper half of the layers ladder), measures its
eval loss unchanged, and retrains it for --retrain_steps. One JSON line per
result. With --out=DIR, also plots the eval-loss curves to DIR/ladder_quality.png
and writes the numbers to DIR/ladder_quality.json (which notebooks/ladder.ipynb
plots from benchmarks/results).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import run  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 200, "training steps per block type",
                              lower_bound=1)
# The hybrid's run evaluates every retrain_steps // 2 steps: its evaluations before
# (step 0) and after retraining need that > 0, so retrain_steps >= 2.
_RETRAIN = flags.DEFINE_integer("retrain_steps", 40, "hybrid retraining steps (>= 2: "
                                "it is evaluated every retrain_steps // 2 steps)",
                                lower_bound=2)
_ROOT = define_path("root", "runs/ladder_quality", "run directories", output="directory")
_OUT = define_path(
    "out", None, "write ladder_quality.json (the eval-loss curves, which "
    "notebooks/ladder.ipynb plots) and ladder_quality.png into this directory "
    "(default: neither is written; the committed ones: --out=benchmarks/results)",
    output="directory")


def emit(**row):
  print(json.dumps(row), flush=True)


def main(argv):
  del argv
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  import train
  from experiments import ladder_compare

  emit(what="environment", date=time.strftime("%Y-%m-%d"), steps=_STEPS.value)
  curves = {}
  for block in ("standard", "parallel", "ladder"):
    c = ladder_compare.get_config(block)
    c.train.steps = _STEPS.value
    start = time.perf_counter()
    rows = train.train(c, os.path.join(_ROOT.value, block))
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    curves[block] = evals
    emit(block=block, final_eval_loss=evals[-1][1], minutes=(time.perf_counter() - start) / 60)
  base = curves["standard"][-1][1]
  for block in ("parallel", "ladder"):
    emit(block=block, final_eval_loss_over_standard=curves[block][-1][1] / base)

  c = ladder_compare.get_config("hybrid")  # learning rate 1e-3, warm-up 5
  c.train.update(steps=_RETRAIN.value, eval_every=_RETRAIN.value // 2)
  c.checkpoint.init_from = os.path.join(_ROOT.value, "standard")
  rows = train.train(c, os.path.join(_ROOT.value, "hybrid"))
  evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  emit(conversion="standard -> hybrid ladder (upper 2 of 4 layers)",
       standard_eval_loss=base, converted_before_retrain=evals[0][1],
       converted_after_retrain=evals[-1][1], retrain_steps=_RETRAIN.value)
  if not _OUT.value:
    return
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "ladder_quality.json"), "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d"), "eval_loss": curves,
               "hybrid_from_standard": evals}, f, indent=1)

  fig, ax = plt.subplots(figsize=(6, 4))
  for block, evals in curves.items():
    ax.plot(*zip(*evals), "o-", label=block, markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel("eval loss (nats/byte)")
  ax.set_title("Block types at equal size (llama_tiny shape, stdlib bytes)")
  ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "ladder_quality.png"), dpi=120)
  emit(what="written", paths=[os.path.join(_OUT.value, name) for name in
                              ("ladder_quality.json", "ladder_quality.png")])


if __name__ == "__main__":
  run(main)
