"""The config a run saved in its workdir, so the run can be continued or changed.

  python -m experiment train --config=experiments/saved.py:runs/imported \
      --workdir=runs/imported --config.train.steps=200

`train` writes <workdir>/config.json at start, and `import-hf` writes one derived
from the HF config.json. Fields are laid over experiments/base.py, so every field
stays typed and overridable.
"""

import json
import os

from ml_collections import ConfigDict

from experiments import base


def overlay(config: ConfigDict, saved: dict) -> ConfigDict:
  """Writes `saved` values into `config`; lists become tuples where base has tuples."""
  for key, value in saved.items():
    if key not in config:
      raise KeyError(f"saved config has field {key!r}, which this version of rung "
                     "does not know")
    current = config[key]
    if isinstance(current, ConfigDict) and isinstance(value, dict):
      if key == "rules":  # a table, replaced whole
        config[key] = ConfigDict({k: tuple(v) for k, v in value.items()})
      else:
        overlay(current, value)
    elif isinstance(current, tuple) and isinstance(value, list):
      config[key] = tuple(value)
    elif isinstance(current, float) and isinstance(value, int):
      config[key] = float(value)
    else:
      config[key] = value
  return config


def get_config(arg=None) -> ConfigDict:
  if not arg:
    raise ValueError("use --config=experiments/saved.py:WORKDIR")
  with open(os.path.join(arg, "config.json")) as f:
    return overlay(base.get_config(), json.load(f))
