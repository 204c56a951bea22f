"""A run's own config, `<workdir>/config.json`: written by `train` and `import-hf`,
read back by `generate`, `export-hf`, `infer.load` and resumes.

The file holds every field of the config the run was started with, as JSON. Read
back on its own it is a complete config; laid over the current defaults
(`experiments/saved.py` passes experiments/base.py) it also gets fields this
version added since, and placeholders keep their declared types for command-line
overrides.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ml_collections import ConfigDict

FILE = "config.json"


def path(workdir: str) -> str:
  return os.path.join(workdir, FILE)


def write(workdir: str, config: ConfigDict | dict) -> None:
  """Writes the config as `<workdir>/config.json` (atomically: a crash leaves the old
  file or the new one, never half of one)."""
  data = json.loads(config.to_json()) if isinstance(config, ConfigDict) else config
  os.makedirs(workdir, exist_ok=True)
  tmp = path(workdir) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path(workdir))


def read(workdir: str) -> dict[str, Any]:
  """The saved config as plain JSON data. Raises FileNotFoundError if the run has
  none."""
  with open(path(workdir)) as f:
    return json.load(f)


def overlay(config: ConfigDict, saved: dict) -> ConfigDict:
  """Writes `saved` values into `config`; lists become tuples where `config` has
  tuples, and `mesh.rules` is replaced whole. Raises KeyError for a saved field
  `config` does not have."""
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


def load(workdir: str, defaults: ConfigDict | None = None) -> ConfigDict:
  """The run's config as a ConfigDict: laid over `defaults` when given, else as
  saved (lists as tuples)."""
  saved = read(workdir)
  if defaults is not None:
    return overlay(defaults, saved)
  return ConfigDict(_tuples(saved))


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value
