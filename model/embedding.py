"""Token embedding table; also the LM head when embeddings are tied."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.linear import dense
from model.params import param


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, init_std: float, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.table = param(rngs, nnx.initializers.normal(init_std), (vocab_size, dim),
                       ("vocab", "embed"), param_dtype)
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: [batch, length] -> [batch, length, embed]."""
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied LM head. x: [batch, length, embed] -> [batch, length, vocab]."""
    return dense(x, self.table[...].T.astype(self.dtype))
