"""How attention kernels split their inputs over the mesh set with `jax.set_mesh`.

Pallas kernels cannot be auto-partitioned (Mosaic refuses), and ring / Ulysses need
per-device code anyway, so every kernel runs inside `shard_map`. These helpers choose
the PartitionSpecs from `Axes`, the mesh axes the logical rules map the batch, the
length and the heads to (`Axes.from_rules`; by default data/fsdp/expert, sequence
and tensor). A spec that differs from the arrays' actual sharding costs a reshard,
never correctness.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.sharding import AxisType, PartitionSpec as P

import sharding


@dataclasses.dataclass(frozen=True)
class Axes:
  """Mesh axes an attention call splits over, read from the logical rules: the
  batch (`batch`), the length (`length`: sequence parallelism; ring and Ulysses
  need it on one mesh axis) and the heads (`act_heads`, which K/V heads follow).
  A mesh axis splits one dimension, the first that names it in the order of q's
  dimensions (batch, length, heads), as in `sharding.logical_to_spec`: the model's
  activations carry the same split."""
  batch: tuple[str, ...]
  length: tuple[str, ...]
  heads: tuple[str, ...]

  @classmethod
  def from_rules(cls, rules: sharding.Rules = ()) -> "Axes":
    """From a normalized rules table; () means `sharding.DEFAULT_RULES`."""
    table = dict(rules or sharding.normalize_rules(None))
    used: list[str] = []
    dims = []
    for name in ("batch", "length", "act_heads"):  # first dimension wins
      dims.append(tuple(a for a in table.get(name, ()) if a not in used))
      used += dims[-1]
    return cls(*dims)


DEFAULT_AXES = Axes.from_rules()


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


def sequence_axis(mesh, axes: Axes = DEFAULT_AXES) -> str | None:
  """The one mesh axis (of size > 1) the length is split over, or None. Raises
  ValueError when the rules split the length over several such axes: ring and
  Ulysses exchange over one."""
  used = [a for a in axes.length if _auto_size(mesh, a) > 1]
  if len(used) > 1:
    raise ValueError(f"sequence-parallel attention runs over one mesh axis, but the "
                     f"rules split `length` over {used}")
  return used[0] if used else None


def no_sequence_axis(impl: str, axes: Axes) -> str:
  """The ValueError text of a sequence-parallel impl called without a length axis."""
  return (f"{impl} attention needs a mesh (set with jax.set_mesh(...)) whose length "
          f"axes {axes.length} have a size above 1 (the rules' `length` axes less "
          f"those the batch already splits)")


def sequence_size(mesh, axes: Axes = DEFAULT_AXES) -> int:
  axis = sequence_axis(mesh, axes)
  return 1 if axis is None else _auto_size(mesh, axis)


def head_axes(mesh, heads: int, kv_heads: int,
              axes: Axes = DEFAULT_AXES) -> tuple[str, ...]:
  """The leading head axes (size > 1) whose product divides both head counts."""
  out, size = [], 1
  for a in axes.heads:
    n = _auto_size(mesh, a)
    if n == 1:
      continue
    if heads % (size * n) or kv_heads % (size * n):
      break
    out.append(a)
    size *= n
  return tuple(out)


def head_split(mesh, heads: int, kv_heads: int, axes: Axes = DEFAULT_AXES) -> int:
  """How many ways the heads are split (the product of `head_axes`)."""
  return math.prod(mesh.shape[a] for a in head_axes(mesh, heads, kv_heads, axes))


def batch_axes(mesh, batch: int, axes: Axes = DEFAULT_AXES) -> tuple[str, ...]:
  """The leading batch axes whose product divides the batch."""
  out, size = [], 1
  for a in axes.batch:
    n = _auto_size(mesh, a)
    if n == 1:
      continue
    if batch % (size * n):
      break
    out.append(a)
    size *= n
  return tuple(out)


def specs(mesh, q_shape, kv_heads: int, *, split_length: bool,
          axes: Axes = DEFAULT_AXES):
  """(spec of q / k / v / output [b, len, heads, d], spec of segment ids [b, len])."""
  b = batch_axes(mesh, q_shape[0], axes) or None
  length = sequence_axis(mesh, axes) if split_length else None
  h = head_axes(mesh, q_shape[2], kv_heads, axes) or None
  return P(b, length, h, None), P(b, length)


def shard(fn, mesh, q, k, v, segment_ids, *, split_length: bool,
          axes: Axes = DEFAULT_AXES):
  """Runs fn(q, k, v, segment_ids) per device; returns the [b, len, heads, d] output.

  Manual over every mesh axis: Mosaic refuses a shard_map that leaves any axis
  automatic, even one of size 1. check_vma=False because interpret-mode Pallas
  kernels do not carry varying-manual-axes types; its cost is a no-op all-reduce
  (singleton groups) of the input cotangents over the unused size-1 axes.
  """
  x_spec, seg_spec = specs(mesh, q.shape, k.shape[2], split_length=split_length,
                           axes=axes)
  run = functools.partial(jax.shard_map, out_specs=x_spec, check_vma=False)
  if segment_ids is None:
    return run(lambda q, k, v: fn(q, k, v, None), in_specs=(x_spec,) * 3)(q, k, v)
  return run(fn, in_specs=(x_spec,) * 3 + (seg_spec,))(q, k, v, segment_ids)


def is_trivial(mesh) -> bool:
  """True when there is nothing to split over (no mesh, or a single device)."""
  return mesh is None or mesh.size == 1
