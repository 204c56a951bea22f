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
               segment_ids: jax.Array | None, cache=None, prefill: bool = False,
               heads_major: bool = False):
    """Without `cache`: [batch, length, embed] -> same.

    With cache = ((k, v), layer), k and v each [layers, batch, max_len, kv_heads,
    head_dim] and `layer` this layer's index: the new tokens' K/V are written at
    their positions (contiguous per row) and the result is (output, (k, v)). With
    `prefill` the tokens are a whole prompt from position 0 and attend over their
    own K/V with the configured kernel; otherwise (decode) they attend over the
    cache. `heads_major`: the caches are [layers, batch, kv_heads, max_len,
    head_dim] (`kernels.cached`).
    """
    q, k, v = self.project_qkv(x, positions)
    if cache is None:
      o = kernels.attention(q, k, v, causal=True, segment_ids=segment_ids,
                            impl=self.impl)  # [batch, length, heads, head_dim]
      return self.project_out(o)
    (k_cache, v_cache), layer = cache
    k_cache = cached.write(k_cache, k, layer, positions[:, 0], heads_major)
    v_cache = cached.write(v_cache, v, layer, positions[:, 0], heads_major)
    if prefill:
      o = kernels.attention(q, k, v, causal=True, segment_ids=segment_ids,
                            impl=self.impl)
    else:
      o = cached.attention(q, k_cache[layer], v_cache[layer], positions,
                           heads_major)
    return self.project_out(o), (k_cache, v_cache)
