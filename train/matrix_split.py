"""Stacks of per-layer matrices split over the mesh, whole matrices per device.

Matrix-aware optimizers run a per-matrix computation on every layer's (and
expert's) matrix: Muon's and NorMuon's Newton-Schulz iterations, GaLore's
projector refresh (a QR-based subspace iteration or an SVD). Left to the
compiler, that work follows the gradient's sharding: under data parallelism every
replica runs every matrix, and a matrix split over `fsdp` or `tensor` is gathered
or reduced inside each iteration.

Here a stack [matrices, ...] is split along `matrices` over the axes of the mesh
set with `jax.set_mesh` (`split_axes`), so each device runs whole matrices of its
share, ceil(matrices / split) of them. The stack is zero-padded to a multiple of
the split (the padding's results are cut off after) and moved in, and the
result moved back, one mesh axis at a time: each move is one all-to-all, where
moving several axes at once made XLA gather the stack whole.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

# DiLoCo's replicas each run their own inner optimizer (vmapped over this axis).
_NOT_SPLIT = ("diloco",)


def split_axes(count: int, mesh: jax.sharding.AbstractMesh | None) -> tuple[str, ...]:
  """The mesh axes a stack of `count` matrices is split over: `stage` first (it
  already splits the layers, so a stage keeps its own), then the mesh's other
  Auto axes of size > 1 in order but `diloco` (each replica updates its own
  state), each kept while it lowers the matrices per device,
  ceil(count / split). () without a mesh."""
  if mesh is None or mesh.empty:
    return ()
  auto = [a for a, t in zip(mesh.axis_names, mesh.axis_types)
          if t == AxisType.Auto and mesh.shape[a] > 1 and a not in _NOT_SPLIT]
  axes, split = [], 1
  for a in sorted(auto, key=lambda a: a != "stage"):
    if -(-count // (split * mesh.shape[a])) < -(-count // split):
      axes.append(a)
      split *= mesh.shape[a]
  return tuple(axes)


def split_in(stack: jax.Array) -> tuple[jax.Array, tuple[str, ...]]:
  """`stack` [matrices, ...] zero-padded to the split and moved onto it ->
  (the moved stack, the axes its first dimension is split over). The stack
  itself and () without a mesh, or where no axis lowers the matrices per
  device."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = split_axes(stack.shape[0], mesh)
  if not axes:
    return stack, axes
  split = math.prod(mesh.shape[a] for a in axes)
  stack = jnp.pad(stack, [(0, -stack.shape[0] % split)] + [(0, 0)] * (stack.ndim - 1))
  # One axis at a time, the others left where they are: each step is one
  # all-to-all (several axes moved at once, XLA gathers the stack whole).
  free = (P.UNCONSTRAINED,) * (stack.ndim - 1)
  for i in range(1, len(axes)):
    stack = jax.lax.with_sharding_constraint(stack, P(axes[:i], *free))
  return jax.lax.with_sharding_constraint(stack, P(axes)), axes


def split_out(out: jax.Array, axes: tuple[str, ...], count: int) -> jax.Array:
  """`split_in`'s inverse for a result `out` [padded matrices, ...]: moved back
  one axis at a time, to wherever the caller needs it, and cut to `count`."""
  if axes:
    free = (P.UNCONSTRAINED,) * (out.ndim - 1)
    out = jax.lax.with_sharding_constraint(out, P(axes))
    for i in range(len(axes) - 1, 0, -1):
      out = jax.lax.with_sharding_constraint(out, P(axes[:i], *free))
  return out[:count]


def map_split(fn: Callable[[jax.Array], jax.Array], stack: jax.Array) -> jax.Array:
  """fn(share) on each device's share of `stack` [matrices, ...] (`split_in`),
  in a shard_map over the split axes, so whole matrices run on one device even
  through operations the partitioner would not split by their batch dimension
  (a QR or SVD is a custom call). `fn` maps a share [k, ...] to [k, ...], matrix
  by matrix. Returns fn's result for the whole stack, as `split_out` places it."""
  count = stack.shape[0]
  moved, axes = split_in(stack)
  if not axes:
    return fn(stack)
  # Manual over every mesh axis (the share is whole on the others): under
  # DiLoCo's vmap over `diloco` (spmd_axis_name) a shard_map manual over the
  # split axes alone lowered to mismatched local shapes. fn runs no collective,
  # so there is nothing for the varying-axes check to catch; and jax's own TPU
  # lowering of a QR fails it (a loop carry it does not mark as varying).
  out = jax.shard_map(fn, in_specs=P(axes), out_specs=P(axes),
                      check_vma=False)(moved)
  return split_out(out, axes, count)
