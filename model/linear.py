"""Projections as one 2-D matmul over flattened tokens."""

from __future__ import annotations

import math

import jax


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """Contracts the last `contract` dims of x with the first `contract` dims of w.

  x: [*tokens, *in], w: [*in, *out] -> [*tokens, *out], computed as
  [tokens, in] @ [in, out]. Same math as the einsum, but the weight gradient then
  contracts a single token dimension: with [batch, length] left separate, XLA:CPU
  lays the backward out with transposed copies of every [tokens, features]
  activation gradient, which cost more than the matmuls they feed (measured on the
  21M model: the MLP's fwd+bwd went from 55 to 93 GFLOP per CPU-second; see
  benchmarks/README.md). The reshapes are free (row-major bitcasts) and keep
  sharding: merged dimensions are split over the same mesh axes, in order.
  """
  lead = x.shape[:x.ndim - contract]
  k = math.prod(w.shape[:contract])
  out = w.shape[contract:]
  y = x.reshape(-1, k) @ w.reshape(k, -1)  # [tokens, out...]
  return y.reshape(*lead, *out)
