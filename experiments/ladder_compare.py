"""Standard, parallel and ladder blocks at equal size on the default data.

  python -m experiment train --config=experiments/ladder_compare.py:ladder --workdir=runs/ladder
  python -m experiment train --config=experiments/ladder_compare.py:standard --workdir=runs/standard
  python -m experiment train --config=experiments/ladder_compare.py:parallel --workdir=runs/parallel
  # convert a trained standard model, upper half ladder, and retrain briefly:
  python -m experiment train --config=experiments/ladder_compare.py:hybrid --workdir=runs/hybrid \
      --config.checkpoint.init_from=runs/standard

The three share every parameter shape (parallel drops one norm scale per layer),
optimizer and data order; only the residual dataflow differs. Expected, as in the
Ladder Residual paper at 1B: ladder within a few percent of standard in eval loss,
parallel slightly behind. `benchmarks/ladder_quality.py` runs all of it and plots
the curves; measured figures are in benchmarks/README.md.
"""

from experiments import base, llama_tiny

VARIANTS = {"standard": dict(block="standard"), "parallel": dict(block="parallel"),
            "ladder": dict(block="ladder", ladder_layers="all"),
            "hybrid": dict(block="ladder", ladder_layers="upper:2")}


def get_config(arg=None):
  if arg not in VARIANTS:
    raise base.unknown_variant("experiments/ladder_compare.py", arg, tuple(VARIANTS))
  c = llama_tiny.get_config()
  c.model.update(**VARIANTS[arg])
  c.train.update(steps=200, eval_every=25)
  return c
