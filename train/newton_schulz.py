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
mesh (`train.matrix_split`), so each device orthogonalises whole matrices of its
share: the momentum moves in once and the result back once. An all-zero padding
matrix orthogonalises to zeros. Numbers are the unsplit program's to float32
rounding: each matrix's iterations run whole on one device. The iterations are
batched matmuls, which the partitioner splits by the batch dimension itself, so
no shard_map is needed.

A stack of layers x experts with the experts split over `expert` is a reshape
the compiler does by gathering the stack; the split still holds for the
iterations (tests/test_newton_schulz.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz

from train import matrices, matrix_split

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz (Jordan 2024)


def orthogonalize(x: jax.Array, d: matrices.Dims, ns_steps: int,
                  coeffs=NS_COEFFS, eps: float = 1e-8) -> jax.Array:
  """Newton-Schulz orthogonalisation (optax.contrib's, Frobenius-normalised) of
  every [in, out] matrix of `x`, grouped as `d` (`train.matrices.dims`: leading
  batch axes, then the reduction axes, then the output axes), split over the
  context mesh (module docstring). Returns `x`'s shape and dtype."""
  count = math.prod(x.shape[a] for a in d.batch)
  fan_in, fan_out = matrices.matrix_shape(x.shape, d)
  stack, axes = matrix_split.split_in(x.reshape(count, fan_in, fan_out))
  out = orthogonalize_via_newton_schulz(  # [matrices, in, out]
      stack, jnp.asarray(coeffs), ns_steps, "frobenius", eps,
      MuonDimensionNumbers(reduction_axis=1, output_axis=2))
  return matrix_split.split_out(out, axes, count).reshape(x.shape)
