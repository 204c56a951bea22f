"""SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

from __future__ import annotations

import jax
from flax import nnx

from model.params import param


class MLP(nnx.Module):

  def __init__(self, d_model: int, d_ff: int, *, init_std: float, dtype,
               param_dtype, constrain, rngs: nnx.Rngs):
    init = nnx.initializers.normal(init_std)
    self.gate = param(rngs, init, (d_model, d_ff), ("embed", "mlp"), param_dtype)
    self.up = param(rngs, init, (d_model, d_ff), ("embed", "mlp"), param_dtype)
    self.down = param(rngs, init, (d_ff, d_model), ("mlp", "embed"), param_dtype)
    self.dtype = dtype
    self.constrain = constrain

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, length, embed] -> [batch, length, embed]."""
    dt = self.dtype
    g = x @ self.gate[...].astype(dt)  # [batch, length, mlp]
    u = x @ self.up[...].astype(dt)
    h = self.constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
    return h @ self.down[...].astype(dt)  # row-parallel: all-reduce over tensor
