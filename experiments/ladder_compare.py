"""Standard, parallel and ladder blocks at equal size on the default data.

  python -m experiment train --config=experiments/ladder_compare.py:ladder --workdir=runs/ladder
  python -m experiment train --config=experiments/ladder_compare.py:standard --workdir=runs/standard
  python -m experiment train --config=experiments/ladder_compare.py:parallel --workdir=runs/parallel
  # convert a trained standard model, upper half ladder, and retrain briefly
  # (40 steps at learning rate 1e-3):
  python -m experiment train --config=experiments/ladder_compare.py:hybrid --workdir=runs/hybrid \
      --config.checkpoint.init_from=runs/standard

The three share every parameter shape (parallel drops one norm scale per layer),
optimizer and data order; only the residual dataflow differs. The Ladder Residual
paper finds ladder within 1% of standard in perplexity at 1B. Measured here
(`benchmarks/ladder_quality.py --steps=150`, which runs all of it and plots the
curves; benchmarks/README.md): after 150 of these 200 steps, eval loss 2.046
standard, 1.954 parallel, 1.907 ladder (one seed: no quality cost visible, not
an advantage); the hybrid converted from standard, 2.074 before retraining and
1.998 after its 40 steps.
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
  if arg == "hybrid":  # a brief retraining of a converted model
    c.train.update(steps=40, eval_every=20)
    c.optim.update(learning_rate=1e-3, warmup_steps=5)
  return c
