"""How attention kernels split their inputs over the mesh set with `jax.set_mesh`.

Pallas kernels cannot be auto-partitioned (Mosaic refuses), and ring / Ulysses need
per-device code anyway, so every kernel runs inside `shard_map`. These helpers choose
the PartitionSpecs: batch over the data-parallel axes, heads over `tensor`, length
over `sequence` when the caller asks. A spec that differs from the arrays' actual
sharding costs a reshard, never correctness.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import AxisType, PartitionSpec as P

from sharding import BATCH_AXES

SEQUENCE = "sequence"
TENSOR = "tensor"


def context_mesh():
  """The abstract mesh from `jax.set_mesh`, or None outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _auto_size(mesh, axis: str) -> int:
  """Size of an Auto axis of mesh (1 if absent or already manual)."""
  if mesh is None or axis not in mesh.axis_names:
    return 1
  if mesh.axis_types[mesh.axis_names.index(axis)] != AxisType.Auto:
    return 1
  return mesh.shape[axis]


def sequence_size(mesh) -> int:
  return _auto_size(mesh, SEQUENCE)


def head_axes(mesh, heads: int, kv_heads: int) -> tuple[str, ...]:
  """('tensor',) when both head counts split evenly over it, else ()."""
  t = _auto_size(mesh, TENSOR)
  return (TENSOR,) if t > 1 and heads % t == 0 and kv_heads % t == 0 else ()


def batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The leading data-parallel axes whose product divides the batch."""
  axes, size = [], 1
  for a in BATCH_AXES:
    n = _auto_size(mesh, a)
    if n == 1:
      continue
    if batch % (size * n):
      break
    axes.append(a)
    size *= n
  return tuple(axes)


def specs(mesh, q_shape, kv_heads: int, *, split_length: bool):
  """(spec of q / k / v / output [b, len, heads, d], spec of segment ids [b, len])."""
  b = batch_axes(mesh, q_shape[0]) or None
  length = SEQUENCE if split_length and sequence_size(mesh) > 1 else None
  h = head_axes(mesh, q_shape[2], kv_heads) or None
  return P(b, length, h, None), P(b, length)


def shard(fn, mesh, q, k, v, segment_ids, *, split_length: bool):
  """Runs fn(q, k, v, segment_ids) per device; returns the [b, len, heads, d] output.

  Manual over every mesh axis: Mosaic refuses a shard_map that leaves any axis
  automatic, even one of size 1. check_vma=False because interpret-mode Pallas
  kernels do not carry varying-manual-axes types; its cost is a no-op all-reduce
  (singleton groups) of the input cotangents over the unused size-1 axes.
  """
  x_spec, seg_spec = specs(mesh, q.shape, k.shape[2], split_length=split_length)
  run = functools.partial(jax.shard_map, out_specs=x_spec, check_vma=False)
  if segment_ids is None:
    return run(lambda q, k, v: fn(q, k, v, None), in_specs=(x_spec,) * 3)(q, k, v)
  return run(fn, in_specs=(x_spec,) * 3 + (seg_spec,))(q, k, v, segment_ids)


def is_trivial(mesh) -> bool:
  """True when there is nothing to split over (no mesh, or a single device)."""
  return mesh is None or mesh.size == 1
