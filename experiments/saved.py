"""The config a run saved in its workdir, so the run can be continued or changed.

  python -m experiment train --config=experiments/saved.py:runs/imported \
      --workdir=runs/imported --config.train.steps=200

`train` writes <workdir>/config.json at start, and `import-hf` writes one derived
from the HF config.json (`train.run_config`). Fields are laid over
experiments/base.py, so every field stays typed and overridable.

`checkpoint.init_from` is set to that run: trained in its own workdir the run
resumes (init_from only applies to a workdir without checkpoints); trained into
a new --workdir it starts from the run's latest parameters, as a fine-tune of
it. An empty `--config.checkpoint.init_from=` starts from fresh parameters instead.
"""

import os

from experiments import base
from sharding import ConfigError
from train import run_config


def get_config(arg=None):
  if not arg:
    raise ConfigError("--config", "experiments/saved.py reads the config of a run, "
                      "and no run directory was given.",
                      "pass --config=experiments/saved.py:WORKDIR.")
  arg = os.path.expanduser(arg)
  missing = run_config.no_run(arg, then="--config=experiments/saved.py:runs/NAME")
  if missing:
    raise ConfigError("--config", missing.problem, missing.fix
                      if run_config.hf_model_in(arg) else
                      "pass --config=experiments/saved.py:WORKDIR with the directory "
                      "of a trained or imported run.")
  c = run_config.load(arg, base.get_config())
  c.checkpoint.init_from = os.path.abspath(arg)
  return c
