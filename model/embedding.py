"""Token embedding table; also the LM head when embeddings are tied."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.linear import dense
from model.params import param
from sharding import LogicalConstraint

LOOKUPS = ("gather", "one_hot")


class Embed(nnx.Module):
  """The [vocab, embed] table and its lookup.

  `lookup`: 'gather' takes each token's row (`jnp.take`); 'one_hot' multiplies
  the tokens' one-hot vectors by the table (MaxText's `use_iota_embed`). Under
  FSDP the two move different data: the partitioner serves a gather from the
  table's shards, with the whole global batch's rows gathered (and their
  gradient scattered) in float32 over the `fsdp` axis, while the matmul gathers
  the table like any other FSDP weight and keeps the batch sharded. The matmul
  costs 2 * vocab * embed FLOPs per token (0.3% of a 32B model's).
  """

  def __init__(self, vocab_size: int, dim: int, *, init_std: float, dtype,
               param_dtype, rngs: nnx.Rngs, lookup: str = "gather",
               constrain: LogicalConstraint = LogicalConstraint()):
    self.table = param(rngs, nnx.initializers.normal(init_std), (vocab_size, dim),
                       ("vocab", "embed"), param_dtype)
    self.dtype = dtype
    self.lookup = lookup
    self.constrain = constrain

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: [batch, length] -> [batch, length, embed]."""
    if self.lookup == "one_hot":
      hot = self.constrain(jax.nn.one_hot(tokens, self.table.shape[0], dtype=self.dtype),
                           ("batch", "length", "act_vocab"))  # [batch, length, vocab]
      return dense(hot, self.table[...].astype(self.dtype))
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied LM head. x: [batch, length, embed] -> [batch, length, vocab]."""
    return dense(x, self.table[...].T.astype(self.dtype))
