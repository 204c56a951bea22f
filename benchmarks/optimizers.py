"""AdamW, momentum SGD, Muon, NorMuon and GaLore on llama_tiny: best eval loss.

  python benchmarks/optimizers.py [--steps=400] [--root=runs/optimizers]
      [--only=normuon,muon] [--write_rows=benchmarks/results/optimizers.jsonl]

Trains experiments/llama_tiny.py (the Python stdlib bytes) for --steps with each
optimizer at three learning rates around its paper's default (same seed, data and
schedule), evaluating every --eval_every steps. One JSON line per run (best eval
loss, step time) and per optimizer (its best run), then the eval-loss curve of each
optimizer's best run to benchmarks/results/optimizers.png. Muon uses rung's
default `optim.muon_rms=0.2` (RMS matched to AdamW), so it sweeps AdamW's range.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks.common import emit, write_rows_to  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 400, "training steps per run")
_EVAL = flags.DEFINE_integer("eval_every", 50, "steps between evaluations")
_ROOT = flags.DEFINE_string("root", "runs/optimizers", "run directories")
_ONLY = flags.DEFINE_list("only", [], "optimizers to run (default: all)")
_LRS = flags.DEFINE_integer("num_lrs", 3, "learning rates per optimizer (1-3)")
_ROWS = flags.DEFINE_string("write_rows", None, "also append JSON rows here")
_PLOT = flags.DEFINE_string("plot", "benchmarks/results/optimizers.png", "")

# name -> (learning rates, extra optim fields); the middle rate is the default.
SWEEP = {
    "adamw": ([1e-3, 3e-3, 1e-2], {}),
    "sgd": ([0.1, 0.3, 1.0], {"momentum": 0.9}),
    "muon": ([1e-3, 3e-3, 1e-2], {}),
    "normuon": ([1e-3, 3e-3, 1e-2], {}),
    "galore": ([3e-3, 1e-2, 3e-2], {"galore_rank": 64, "galore_update_proj_gap": 200}),
}


def _lrs(lrs: list[float], n: int) -> list[float]:
  return [lrs[1]] if n == 1 else lrs[:1] + lrs[1:2] + lrs[2:][:n - 2]


def main(argv):
  del argv
  import jax
  import train
  from experiments import llama_tiny

  write_rows_to(_ROWS.value)
  emit(what="environment", date=time.strftime("%Y-%m-%d"), steps=_STEPS.value,
       jax=jax.__version__, devices=f"{len(jax.devices())} x "
       f"{jax.devices()[0].device_kind}")
  best = {}
  for name, (lrs, extra) in SWEEP.items():
    if _ONLY.value and name not in _ONLY.value:
      continue
    for lr in _lrs(lrs, _LRS.value):
      c = llama_tiny.get_config()
      c.train.update(steps=_STEPS.value, eval_every=_EVAL.value)
      c.optim.update(name=name, learning_rate=lr, **extra)
      c.checkpoint.every_steps = 0
      c.log.every_steps = max(1, min(10, _STEPS.value // 3))  # step times to median
      start = time.perf_counter()
      rows = train.train(c, os.path.join(_ROOT.value, f"{name}_lr{lr:g}"),
                         progress=False)
      wall = time.perf_counter() - start
      evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
      times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
      row = emit(what="run", optimizer=name, lr=lr,
                 best_eval_loss=min(e for _, e in evals),
                 final_eval_loss=evals[-1][1],
                 step_time_s=sorted(times)[len(times) // 2] if times else None,
                 wall_s=round(wall, 1))
      if name not in best or row["best_eval_loss"] < best[name][0]["best_eval_loss"]:
        best[name] = (row, evals)
  for name, (row, _) in best.items():
    emit(what="best", optimizer=name, lr=row["lr"],
         best_eval_loss=row["best_eval_loss"], step_time_s=row["step_time_s"])
  _plot(best)


def _plot(best) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (row, evals) in best.items():
    ax.plot(*zip(*evals), marker="o", label=f"{name} (lr {row['lr']:g})")
  ax.set_xlabel("step")
  ax.set_ylabel("eval loss (nats/byte)")
  ax.set_title(f"llama_tiny, {_STEPS.value} steps, best of the lr sweep")
  ax.legend()
  os.makedirs(os.path.dirname(os.path.abspath(_PLOT.value)), exist_ok=True)
  fig.savefig(_PLOT.value, dpi=120, bbox_inches="tight")
  emit(what="plot", path=_PLOT.value)


if __name__ == "__main__":
  app.run(main)
