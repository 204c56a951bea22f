"""The zig-zag sequence order that balances causal ring attention.

The length axis is cut into 2P chunks (P = size of the `sequence` mesh axis) and
reordered 0, 2P-1, 1, 2P-2, ..., P-1, P, so that after sharding over `sequence`
device r holds chunks r and 2P-1-r. Apply it once per batch to every per-token array
(inputs, targets, positions, segment ids, loss weights), never per layer; attention
with causal masking then stays exact because positions and segment ids moved too.
"""

from __future__ import annotations

import jax
import numpy as np


def order(num_shards: int) -> np.ndarray:
  """Chunk order [2P]: position t of the permuted sequence holds chunk order[t]."""
  pairs = [(r, 2 * num_shards - 1 - r) for r in range(num_shards)]
  return np.array([c for pair in pairs for c in pair])


def _reorder(x, num_shards: int, axis: int, chunk_order):
  n = x.shape[axis]
  chunks = 2 * num_shards
  if n % chunks:
    raise ValueError(f"length {n} is not a multiple of 2 * sequence = {chunks}")
  shape = x.shape[:axis] + (chunks, n // chunks) + x.shape[axis + 1:]
  y = x.reshape(shape)  # [..., chunks, chunk, ...]
  if _explicitly_sharded(y):  # the gather's output sharding must be named
    index = (slice(None),) * axis + (np.asarray(chunk_order),)
    y = y.at[index].get(out_sharding=jax.typeof(y).sharding.spec)
  else:
    y = y.take(chunk_order, axis=axis)
  return y.reshape(x.shape)


def _explicitly_sharded(x) -> bool:
  """Whether `x` is a jax array typed with a mesh that has Explicit axes."""
  if not isinstance(x, jax.Array):
    return False
  mesh = getattr(jax.typeof(x).sharding, "mesh", None)
  return mesh is not None and jax.sharding.AxisType.Explicit in mesh.axis_types


def permute(x, num_shards: int, axis: int = 1):
  """Natural -> zig-zag order along `axis` (numpy or jax arrays)."""
  return _reorder(x, num_shards, axis, order(num_shards))


def unpermute(x, num_shards: int, axis: int = 1):
  """Zig-zag -> natural order along `axis`; inverse of `permute`."""
  return _reorder(x, num_shards, axis, np.argsort(order(num_shards)))
