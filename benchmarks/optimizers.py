"""AdamW, momentum SGD, Muon, NorMuon and GaLore on llama_tiny: best eval loss.

  python benchmarks/optimizers.py [--steps=400] [--root=runs/optimizers]
      [--only=normuon,muon] [--lrs=0,1,2] [--write_rows=benchmarks/results/optimizers.jsonl]
  python benchmarks/optimizers.py --summarize=benchmarks/results/optimizers.jsonl \
      --plot=benchmarks/results/optimizers.png

Trains experiments/llama_tiny.py (the Python stdlib bytes) for --steps with each
optimizer at three learning rates around its paper's default (same seed, data and
schedule), evaluating every --eval_every steps. One JSON line per run (best eval
loss, step time, its eval curve), then per optimizer its best run, and with
--plot the eval-loss curve of each optimizer's best run (the committed one:
--plot=benchmarks/results/optimizers.png).
`--lrs` picks which of the three rates to run (0 low, 1 the default, 2 high), so a
sweep can be run in passes into one rows file; `--summarize` reads such a file and
gives the best runs (and the plot) without training. GaLore runs with
`--galore_projector` (rows without the field ran the exact SVD). Muon uses rung's default
`optim.muon_rms=0.2` (RMS matched to AdamW), so it sweeps AdamW's range.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import run, emit, processor, write_rows_to  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 400, "training steps per run", lower_bound=1)
_EVAL = flags.DEFINE_integer("eval_every", 50, "steps between evaluations",
                             lower_bound=1)
_ROOT = define_path("root", "runs/optimizers", "run directories", output="directory")
OPTIMIZERS = ("adamw", "sgd", "muon", "normuon", "galore")
_ONLY = flags.DEFINE_list("only", [], f"optimizers to run, of {', '.join(OPTIMIZERS)} "
                          "(default: all)")
_LRS = flags.DEFINE_list("lrs", ["0", "1", "2"],
                         "which learning rates of each sweep: 0 low, 1 default, 2 high")
_ROWS = define_path("write_rows", None, "also append JSON rows here", output="file")
_SUMMARIZE = define_path("summarize", None,
                                 "rows file of earlier runs: best runs and plot only")
_PLOT = define_path("plot", None, "write the eval-loss curve of each "
                            "optimizer's best run to this PNG (default: no plot)", output="file")
_PROJECTOR = flags.DEFINE_enum("galore_projector", "randomized", ["randomized", "svd"],
                               "GaLore's projector refresh (optim.galore_projector)")
flags.register_validator("only", lambda v: set(v) <= set(OPTIMIZERS),
                         f"must name optimizers of {', '.join(OPTIMIZERS)}")
flags.register_validator("lrs", lambda v: bool(v) and set(v) <= {"0", "1", "2"},
                         "must be indices into each sweep's 3 rates: 0, 1 or 2")
flags.register_validator("summarize", lambda v: v is None or os.path.isfile(v),
                         "must be an existing rows file (JSON lines)")

# name -> (learning rates, extra optim fields); the middle rate is the default.
SWEEP = {
    "adamw": ([1e-3, 3e-3, 1e-2], {}),
    "sgd": ([0.1, 0.3, 1.0], {"momentum": 0.9}),
    "muon": ([1e-3, 3e-3, 1e-2], {}),
    "normuon": ([1e-3, 3e-3, 1e-2], {}),
    "galore": ([3e-3, 1e-2, 3e-2], {"galore_rank": 64, "galore_update_proj_gap": 200}),
}


def _label(row: dict) -> str:
  """The optimizer, and GaLore's projector (rows without one ran the SVD)."""
  if row["optimizer"] != "galore":
    return row["optimizer"]
  return f"galore-{row.get('galore_projector', 'svd')}"


def main(argv):
  del argv
  if _SUMMARIZE.value:
    with open(_SUMMARIZE.value) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    _summarize([r for r in rows if r.get("what") == "run"])
    return
  import jax
  import train
  from experiments import llama_tiny

  write_rows_to(_ROWS.value)
  emit(what="environment", date=time.strftime("%Y-%m-%d"), steps=_STEPS.value,
       jax=jax.__version__, devices=f"{len(jax.devices())} x "
       f"{jax.devices()[0].device_kind}", processor=processor())
  runs = []
  assert tuple(SWEEP) == OPTIMIZERS
  for name, (lrs, extra) in SWEEP.items():
    if _ONLY.value and name not in _ONLY.value:
      continue
    for lr in [lrs[int(i)] for i in _LRS.value]:
      c = llama_tiny.get_config()
      c.train.update(steps=_STEPS.value, eval_every=_EVAL.value)
      c.optim.update(name=name, learning_rate=lr, **extra)
      if name == "galore":
        c.optim.galore_projector = _PROJECTOR.value
      c.checkpoint.every_steps = 0
      c.log.every_steps = max(1, min(10, _STEPS.value // 3))  # step times to median
      start = time.perf_counter()
      rows = train.train(c, os.path.join(_ROOT.value, f"{name}_lr{lr:g}"),
                         progress=False)
      wall = time.perf_counter() - start
      evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
      times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
      runs.append(emit(
          what="run", optimizer=name, lr=lr, steps=_STEPS.value,
          best_eval_loss=min(e for _, e in evals), final_eval_loss=evals[-1][1],
          step_time_s=sorted(times)[len(times) // 2] if times else None,
          wall_s=round(wall, 1), evals=evals,
          **({"galore_projector": _PROJECTOR.value} if name == "galore" else {})))
  _summarize(runs)


def _summarize(runs: list[dict]) -> None:
  """Each optimizer's best run (lowest best eval loss): a row each, and the plot."""
  best = {}
  for row in runs:
    name = _label(row)
    if name not in best or row["best_eval_loss"] < best[name]["best_eval_loss"]:
      best[name] = row
  for name, row in best.items():
    emit(what="best", optimizer=name, lr=row["lr"],
         best_eval_loss=row["best_eval_loss"], step_time_s=row["step_time_s"],
         runs=sum(_label(r) == name for r in runs))
  if _PLOT.value and best:
    _plot(best)


def _plot(best: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, row in best.items():
    ax.plot(*zip(*row["evals"]), marker="o", label=f"{name} (lr {row['lr']:g})")
  ax.set_xlabel("step")
  ax.set_ylabel("eval loss (nats/byte)")
  steps = max(row["steps"] for row in best.values())
  ax.set_title(f"llama_tiny, {steps} steps, best of the lr sweep")
  ax.legend()
  os.makedirs(os.path.dirname(os.path.abspath(_PLOT.value)), exist_ok=True)
  fig.savefig(_PLOT.value, dpi=120, bbox_inches="tight")
  emit(what="plot", path=_PLOT.value)


if __name__ == "__main__":
  run(main)
