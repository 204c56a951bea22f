"""Grouped-query self-attention with rotary positions; the kernel comes from kernels/."""

from __future__ import annotations

import jax
from flax import nnx

import kernels
from kernels import cached
from model.linear import dense
from model.params import param
from model.rotary import apply_rotary


class Attention(nnx.Module):

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               *, rope_theta: float, init_std: float, impl: str, dtype, param_dtype,
               constrain, rngs: nnx.Rngs):
    init = nnx.initializers.normal(init_std)
    self.q = param(rngs, init, (d_model, num_heads, head_dim),
                   ("embed", "heads", "head_dim"), param_dtype)
    self.k = param(rngs, init, (d_model, num_kv_heads, head_dim),
                   ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v = param(rngs, init, (d_model, num_kv_heads, head_dim),
                   ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o = param(rngs, init, (num_heads, head_dim, d_model),
                   ("heads", "head_dim", "embed"), param_dtype)
    self.rope_theta = rope_theta
    self.impl = impl
    self.dtype = dtype
    self.constrain = constrain

  def project_qkv(self, x: jax.Array, positions: jax.Array):
    """x: [batch, length, embed] -> q [b, l, heads, hd], k and v [b, l, kv_heads, hd]."""
    dt = self.dtype
    q = dense(x, self.q[...].astype(dt))  # [batch, length, heads, head_dim]
    k = dense(x, self.k[...].astype(dt))  # [batch, length, kv_heads, head_dim]
    v = dense(x, self.v[...].astype(dt))
    q = self.constrain(q, ("batch", "length", "act_heads", None))
    k = self.constrain(k, ("batch", "length", "act_kv_heads", None))
    v = self.constrain(v, ("batch", "length", "act_kv_heads", None))
    q = apply_rotary(q, positions, self.rope_theta)
    k = apply_rotary(k, positions, self.rope_theta)
    return q, k, v

  def project_out(self, o: jax.Array) -> jax.Array:
    """o: [batch, length, heads, head_dim] -> [batch, length, embed] (row-parallel)."""
    return dense(o, self.o[...].astype(self.dtype), contract=2)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
    """[batch, length, embed] -> same: causal self-attention (within segments)."""
    q, k, v = self.project_qkv(x, positions)
    o = kernels.attention(q, k, v, causal=True, segment_ids=segment_ids,
                          impl=self.impl, rules=self.constrain.rules)
    # o: [batch, length, heads, head_dim]
    return self.project_out(o)

  def cached(self, x: jax.Array, positions: jax.Array, cache: cached.KVCache,
             layer: jax.Array, prefill: bool):
    """x [batch, t, embed] at positions [batch, t] (contiguous per row) with a KV
    cache: writes the new tokens' K/V into `layer` of the cache and returns
    (output [batch, t, embed], cache). A prefill is a whole prompt from position 0:
    it attends over its own K/V with the configured kernel. A decode step attends
    over the cache (`kernels.cached`, in the cache's own layout)."""
    q, k, v = self.project_qkv(x, positions)
    cache = cache.write(layer, k, v, positions[:, 0])
    if prefill:
      o = kernels.attention(q, k, v, causal=True, impl=self.impl,
                            rules=self.constrain.rules)
    else:
      o = cached.attention(q, cache, layer, positions)
    return self.project_out(o), cache
