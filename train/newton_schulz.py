"""Newton-Schulz orthogonalisation of stacked matrices, split over the mesh.

Muon and NorMuon orthogonalise every layer's (and expert's) matrix on its own:
five quintic Newton-Schulz iterations, each three matmuls on the whole matrix
(Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024).
Left to the compiler, that work follows the momentum's sharding: under data
parallelism every replica runs every matrix's iterations, and under FSDP each
iteration's matmuls are split over the matrix's sharded dimensions, with
operands gathered and partial products reduced in every iteration (on llama_1b
over fsdp=8 the iterations added 11.41 GB of all-gathers and 1.51 GB of
all-reduces per step, benchmarks/README). Moonlight's Distributed Muon gathers
each matrix within the data-parallel group (Liu et al., "Muon is Scalable for LLM
Training", arXiv 2502.16982, Algorithm 1).

Here the stack of matrices [matrices, in, out] is split along `matrices` over the
mesh set with `jax.set_mesh` (`split_axes`), so each device orthogonalises whole
matrices of its share, ceil(matrices / split) of them: the momentum moves in once
and the result back once, one mesh axis at a time (each move an all-to-all). The
stack is zero-padded to a multiple of the split (an all-zero matrix
orthogonalises to zeros) and cut back after. Numbers are the unsplit program's
to float32 rounding: each matrix's iterations run whole on one device.

A stack of layers x experts with the experts split over `expert` is a reshape
the compiler does by gathering the stack; the split still holds for the
iterations (tests/test_newton_schulz.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz

from train import matrices

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz (Jordan 2024)
# DiLoCo's replicas each run their own inner optimizer (vmapped over this axis).
_NOT_SPLIT = ("diloco",)


def split_axes(count: int, mesh: jax.sharding.AbstractMesh | None) -> tuple[str, ...]:
  """The mesh axes a stack of `count` matrices is split over: `stage` first (it
  already splits the layers, so a stage keeps its own), then the mesh's other
  Auto axes of size > 1 in order but `diloco` (each replica orthogonalises its own
  momentum), each kept while it lowers the matrices per device,
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


def orthogonalize(x: jax.Array, d: matrices.Dims, ns_steps: int,
                  coeffs=NS_COEFFS, eps: float = 1e-8) -> jax.Array:
  """Newton-Schulz orthogonalisation (optax.contrib's, Frobenius-normalised) of
  every [in, out] matrix of `x`, grouped as `d` (`train.matrices.dims`: leading
  batch axes, then the reduction axes, then the output axes), split over the
  context mesh (module docstring). Returns `x`'s shape and dtype."""
  count = math.prod(x.shape[a] for a in d.batch)
  fan_in, fan_out = matrices.matrix_shape(x.shape, d)
  stack = x.reshape(count, fan_in, fan_out)  # [matrices, in, out]
  mesh = jax.sharding.get_abstract_mesh()
  axes = split_axes(count, mesh)
  if axes:
    split = math.prod(mesh.shape[a] for a in axes)
    stack = jnp.pad(stack, ((0, -count % split), (0, 0), (0, 0)))
    # One axis at a time, the others left where they are: each step is one
    # all-to-all (several axes moved at once, XLA gathers the stack whole);
    # then whole matrices on each device.
    free = P.UNCONSTRAINED
    for i in range(1, len(axes)):
      stack = jax.lax.with_sharding_constraint(stack, P(axes[:i], free, free))
    stack = jax.lax.with_sharding_constraint(stack, P(axes))
  out = orthogonalize_via_newton_schulz(  # [matrices, in, out]
      stack, jnp.asarray(coeffs), ns_steps, "frobenius", eps,
      MuonDimensionNumbers(reduction_axis=1, output_axis=2))
  if axes:  # and back, one axis at a time, to wherever the caller needs it
    out = jax.lax.with_sharding_constraint(out, P(axes))
    for i in range(len(axes) - 1, 0, -1):
      out = jax.lax.with_sharding_constraint(out, P(axes[:i], free, free))
  return out[:count].reshape(x.shape)
