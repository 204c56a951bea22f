"""Parameter creation with logical axis names, and reading those names back."""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import nnx

# Metadata key under which flax NNX keeps a Variable's per-dimension names.
_NAMES = "out_sharding"


def param(rngs: nnx.Rngs, init: Any, shape: Sequence[int], names: Sequence[str],
          dtype: Any) -> nnx.Param:
  """An nnx.Param annotated with logical names (sharding applied later by rules)."""
  assert len(shape) == len(names), (shape, names)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(names), eager_sharding=False)


def ones(shape: Sequence[int], names: Sequence[str], dtype: Any) -> nnx.Param:
  return nnx.Param(jnp.ones(tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False)


def zeros(shape: Sequence[int], names: Sequence[str], dtype: Any) -> nnx.Param:
  return nnx.Param(jnp.zeros(tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False)


def logical_axes(state: nnx.State) -> dict:
  """Nested dict of per-dimension logical names matching `nnx.to_pure_dict(state)`."""
  out: dict = {}
  for path, var in nnx.to_flat_state(state):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(var.get_metadata().get(_NAMES) or (None,) * var.ndim)
  return out
