"""Whole-config validation, run before anything is compiled."""

from __future__ import annotations

import model
import sharding
from sharding import ConfigError
from train import data


def _positive(config, fields: list[str], minimum: float = 1) -> None:
  for path in fields:
    group, name = path.split(".")
    value = config[group][name]
    if value < minimum:
      raise ConfigError(path, f"must be at least {minimum}, got {value}.",
                        f"set --config.{path} to a value >= {minimum}.")


def validate_config(config, num_devices: int) -> dict[str, int]:
  """Raises ConfigError naming the field, the numbers and the fix. Returns the
  resolved mesh sizes."""
  model.validate(config.model)
  data.validate(config)
  _positive(config, ["train.steps", "train.batch_size", "train.grad_accum_steps",
                     "log.every_steps", "data.seq_len"])
  _positive(config, ["optim.warmup_steps", "train.eval_every", "train.eval_steps",
                     "optim.weight_decay", "optim.clip_norm", "train.z_loss"], 0)
  if config.optim.learning_rate <= 0:
    raise ConfigError("optim.learning_rate",
                      f"must be positive, got {config.optim.learning_rate}.",
                      "set e.g. --config.optim.learning_rate=3e-4.")
  return sharding.validate_plan(config, num_devices)
