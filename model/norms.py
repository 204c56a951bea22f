"""RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.params import ones


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32, returned in `dtype`."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.scale = ones((dim,), ("embed",), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)
