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


def _split_size(mesh, axis: str) -> int:
  """Size of a mesh axis a kernel can split over, Auto or Explicit (1 if absent,
  or already manual inside an enclosing shard_map)."""
  if mesh is None or axis not in mesh.axis_names:
    return 1
  if mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Manual:
    return 1
  return mesh.shape[axis]


def sequence_axis(mesh, axes: Axes = DEFAULT_AXES) -> str | None:
  """The one mesh axis (of size > 1) the length is split over, or None. Raises
  ValueError when the rules split the length over several such axes: ring and
  Ulysses exchange over one."""
  used = [a for a in axes.length if _split_size(mesh, a) > 1]
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
  return 1 if axis is None else _split_size(mesh, axis)


@dataclasses.dataclass(frozen=True)
class HeadSplit:
  """How an attention call splits the heads over the mesh (`split_heads`).

  The query heads split over `axes`. The K/V heads split over them too where
  their count allows (`kv_axes == axes`); where the query heads split further than
  the K/V heads can (Q ways, Q a multiple of kv_heads: multi-query, or GQA with
  more tensor-parallel devices than K/V heads), every device's query heads share
  one K/V head, so K/V stay whole on each device (`kv_axes == ()`) and each device
  takes its own head (`select`): no device computes another's heads."""
  axes: tuple[str, ...]     # mesh axes splitting the query heads and the output
  kv_axes: tuple[str, ...]  # mesh axes splitting the K/V heads: `axes` or ()
  heads: int                # query heads per device
  kv_heads: int             # K/V heads each device attends with

  @property
  def select(self) -> bool:
    """Whether each device slices its one K/V head out of all of them."""
    return self.axes != self.kv_axes


def split_heads(mesh, heads: int, kv_heads: int, axes: Axes = DEFAULT_AXES,
                regroup: int = 1) -> HeadSplit:
  """The leading head axes (size > 1) whose product Q divides the query heads and
  divides or is a multiple of the K/V heads (`HeadSplit`). `regroup`: the ways
  each device's heads split again over the length axis (Ulysses' all-to-all); an
  axis is taken only while the query heads per device stay a multiple of it and
  the K/V heads per device divide it or are a multiple of it."""
  out, size = [], 1
  for a in axes.heads:
    n = _split_size(mesh, a)
    if n == 1:
      continue
    q = size * n
    if heads % q or (kv_heads % q and q % kv_heads):
      break
    kv = kv_heads // q if kv_heads % q == 0 else 1
    if (heads // q) % regroup or (kv % regroup and regroup % kv):
      break
    out.append(a)
    size = q
  if kv_heads % size:  # Q > kv_heads: one K/V head per device, selected
    return HeadSplit(tuple(out), (), heads // size, 1)
  return HeadSplit(tuple(out), tuple(out), heads // size, kv_heads // size)


def batch_axes(mesh, batch: int, axes: Axes = DEFAULT_AXES) -> tuple[str, ...]:
  """The leading batch axes whose product divides the batch."""
  out, size = [], 1
  for a in axes.batch:
    n = _split_size(mesh, a)
    if n == 1:
      continue
    if batch % (size * n):
      break
    out.append(a)
    size *= n
  return tuple(out)


def specs(mesh, batch: int, split: HeadSplit, *, split_length: bool,
          axes: Axes = DEFAULT_AXES):
  """(spec of q / output [b, len, heads, d], of k / v [b, len, kv_heads, d], of
  segment ids [b, len]) for `batch` rows and the heads as `split`."""
  b = batch_axes(mesh, batch, axes) or None
  length = sequence_axis(mesh, axes) if split_length else None
  return (P(b, length, split.axes or None, None),
          P(b, length, split.kv_axes or None, None), P(b, length))


def shard(fn, mesh, q, k, v, segment_ids, *, split_length: bool,
          axes: Axes = DEFAULT_AXES, regroup: int = 1):
  """Runs fn(q, k, v, segment_ids) per device; returns the [b, len, heads, d] output.

  The heads split as `split_heads` says (`regroup` for Ulysses); where each
  device selects its one K/V head, fn gets that head alone ([b, len, 1, d]).

  Manual over every mesh axis: Mosaic refuses a shard_map that leaves any axis
  automatic, even one of size 1. check_vma=False because interpret-mode Pallas
  kernels do not carry varying-manual-axes types. Its cost: the cotangent of an
  input is all-reduced over every mesh axis its spec does not split; over size-1
  axes that is a no-op (singleton groups), and over the head axes of selected K/V
  heads it sums dk and dv [b, len, kv_heads, d] (each device's holds its own
  head's), the one real reduction.
  """
  split = split_heads(mesh, q.shape[2], k.shape[2], axes, regroup)
  q_spec, kv_spec, seg_spec = specs(mesh, q.shape[0], split, axes=axes,
                                    split_length=split_length)
  if split.select:
    group = q.shape[2] // k.shape[2]  # query heads per K/V head

    def local(q, k, v, seg, fn=fn):
      first = jax.lax.axis_index(split.axes) * split.heads  # its first query head
      k, v = (jax.lax.dynamic_slice_in_dim(x, first // group, 1, axis=2) for x in (k, v))
      return fn(q, k, v, seg)  # k, v: [b, len, 1, d]
    fn = local
  if segment_ids is None:
    return shard_map(lambda q, k, v: fn(q, k, v, None), mesh, (q_spec, kv_spec, kv_spec),
                     q_spec, q, k, v)
  return shard_map(fn, mesh, (q_spec, kv_spec, kv_spec, seg_spec), q_spec,
                   q, k, v, segment_ids)


def shard_map(fn, mesh, in_specs, out_spec, *args):
  """`jax.shard_map(fn)(*args)` (check_vma off) that also takes a mesh with
  Explicit axes (`jax.make_mesh`'s default): there the inputs' types carry a
  sharding that must equal `in_specs`, so each input is resharded to its spec
  first and the output back to the first input's sharding, as an op on
  explicitly sharded arrays returns. On Auto axes (`sharding.make_mesh`) the
  compiler places the arrays and nothing is added."""
  explicit = AxisType.Explicit in mesh.axis_types
  if explicit:
    given = jax.typeof(args[0]).sharding.spec
    args = [jax.sharding.reshard(x, s) for x, s in zip(args, in_specs)]
  out = jax.shard_map(fn, in_specs=tuple(in_specs), out_specs=out_spec,
                      check_vma=False)(*args)
  return jax.sharding.reshard(out, given) if explicit else out


def is_trivial(mesh) -> bool:
  """True when there is nothing to split over (no mesh, or a single device)."""
  return mesh is None or mesh.size == 1
