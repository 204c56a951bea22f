"""SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

from __future__ import annotations

import jax
from flax import nnx

from model.linear import dense
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

  def __call__(self, x: jax.Array, after: jax.Array | None = None) -> jax.Array:
    """x: [batch, length, embed] -> [batch, length, embed].

    `after` [batch, length, embed]: a value the down projection (and so this MLP's
    all-reduce) must wait for. Ladder blocks pass the same layer's attention
    output, which keeps XLA's all-reduce combiner from merging the two modules'
    all-reduces into one that would wait for both; gate and up still overlap the
    attention all-reduce. The dependency is real data (0 * one column of `after`,
    which XLA may not fold for floats): optimization barriers are expanded away
    before the combiner runs.
    """
    dt = self.dtype
    g = dense(x, self.gate[...].astype(dt))  # [batch, length, mlp]
    u = dense(x, self.up[...].astype(dt))
    h = self.constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
    if after is not None:
      h = h + 0.0 * after[..., :1].astype(h.dtype)
    return dense(h, self.down[...].astype(dt))  # row-parallel: all-reduce over tensor
