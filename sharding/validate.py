"""Checks that a parallelism plan fits the model and the devices, before compiling."""

from __future__ import annotations

from typing import Any

from sharding.errors import ConfigError
from sharding.mesh import AXES, BATCH_AXES, resolve_shape
from sharding.rules import normalize_rules


def validate_plan(config: Any, num_devices: int) -> dict[str, int]:
  """Raises ConfigError for a plan that cannot run; returns the resolved mesh sizes."""
  sizes = resolve_shape({a: config.mesh[a] for a in AXES}, num_devices)
  rules = dict(normalize_rules(config.mesh.rules))  # ConfigError for a bad axis
  m, t = config.model, sizes["tensor"]
  for field in ("num_heads", "num_kv_heads"):
    if m[field] % t:
      raise ConfigError(
          f"model.{field}",
          f"{m[field]} {field.replace('num_', '').replace('_', ' ')} cannot be "
          f"split over mesh.tensor={t}.",
          f"choose mesh.tensor dividing {m[field]} (e.g. "
          f"--config.mesh.tensor={_largest_divisor(m[field], t)}), or change "
          f"model.{field}.")
  # mesh.expert > 1 with a dense model (moe.num_experts = 0) is allowed: `batch`
  # is split over `expert` too, so it is plain data parallelism.
  experts, e = m.moe.num_experts if "moe" in m else 0, sizes["expert"]
  if experts and experts % e:
    raise ConfigError(
        "model.moe.num_experts",
        f"{experts} experts cannot be split over mesh.expert={e}.",
        f"choose mesh.expert dividing {experts} (e.g. --config.mesh.expert="
        f"{_largest_divisor(experts, e)}), or a multiple of {e} experts.")
  if experts:
    shared = [a for a in rules.get("mlp", ()) if a in rules.get("batch", ())
              and sizes[a] > 1]
    if shared:
      raise ConfigError(
          "mesh.rules.mlp",
          f"the experts' hidden dimension (`mlp`) and the batch are both split "
          f"over mesh axes {shared}: expert parallelism sums partial expert outputs "
          "over the `mlp` axes, which would add up different tokens.",
          "map `mlp` and `batch` to disjoint mesh axes (the default maps mlp to "
          "tensor and batch to data, fsdp, expert).")
  if config.data.seq_len % sizes["sequence"]:
    raise ConfigError(
        "data.seq_len",
        f"seq_len={config.data.seq_len} cannot be split over "
        f"mesh.sequence={sizes['sequence']}.",
        f"make data.seq_len a multiple of {sizes['sequence']} or change "
        "mesh.sequence.")
  dp = 1
  for a in BATCH_AXES:
    dp *= sizes[a]
  if config.train.batch_size % dp:
    raise ConfigError(
        "train.batch_size",
        f"global batch_size={config.train.batch_size} does not split over the "
        f"data-parallel size {dp} (mesh.data*mesh.fsdp*mesh.expert = "
        f"{'*'.join(str(sizes[a]) for a in BATCH_AXES)}).",
        f"use a batch_size that is a multiple of {dp}, e.g. "
        f"--config.train.batch_size={max(dp, config.train.batch_size // dp * dp)}.")
  accum = config.train.grad_accum_steps
  if (config.train.batch_size // dp) % accum:
    raise ConfigError(
        "train.grad_accum_steps",
        f"each of the {dp} data-parallel shards gets "
        f"{config.train.batch_size // dp} sequences, which do not split into "
        f"{accum} micro-batches.",
        "make train.batch_size a multiple of data-parallel size x grad_accum_steps.")
  return sizes


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, at_most + 1) if n % d == 0)
