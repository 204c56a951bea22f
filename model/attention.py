"""Grouped-query self-attention with rotary positions; the kernel comes from kernels/."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from kernels import cached
from model.linear import dense
from model.params import ones, param, zeros
from model.rotary import Rotary, apply_rotary


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x [..., head_dim] / rms over head_dim * scale [head_dim], in float32 (as
  transformers' Qwen3RMSNorm), returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               *, rope: Rotary | float, init_std: float, impl: str, dtype, param_dtype,
               constrain, rngs: nnx.Rngs, qkv_bias: bool = False, qk_norm: bool = False,
               norm_eps: float = 1e-6, window: int | None = None,
               block_sizes: tuple[int | None, int | None] = (None, None)):
    """rope: the rotary variant (or a plain theta); qkv_bias: biases q_bias
    [heads, head_dim], k_bias and v_bias [kv_heads, head_dim] added after the
    projections (Qwen2); qk_norm: RMSNorm of each q and k head over head_dim with
    scales q_norm, k_norm [head_dim] and epsilon norm_eps, before rotary (Qwen3);
    window: a sliding window of that many keys per query (Mistral), None for full
    causal attention -- in training, prefill and decoding alike. block_sizes:
    (block_q, block_kv) flash tiles, None for the backend's default."""
    init = nnx.initializers.normal(init_std)
    self.q = param(rngs, init, (d_model, num_heads, head_dim),
                   ("embed", "heads", "head_dim"), param_dtype)
    self.k = param(rngs, init, (d_model, num_kv_heads, head_dim),
                   ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v = param(rngs, init, (d_model, num_kv_heads, head_dim),
                   ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o = param(rngs, init, (num_heads, head_dim, d_model),
                   ("heads", "head_dim", "embed"), param_dtype)
    # (None when off; assigned once: NNX fixes an attribute's data/static kind.)
    # Bias logical axes follow each projection's output axes.
    bias = lambda heads, name: (zeros((heads, head_dim), (name, "head_dim"), param_dtype)
                                if qkv_bias else None)
    self.q_bias = bias(num_heads, "heads")  # [heads, head_dim]
    self.k_bias = bias(num_kv_heads, "kv_heads")  # [kv_heads, head_dim]
    self.v_bias = bias(num_kv_heads, "kv_heads")
    norm = lambda: ones((head_dim,), ("head_dim",), param_dtype) if qk_norm else None
    self.q_norm = norm()  # [head_dim]
    self.k_norm = norm()
    self.norm_eps = norm_eps
    self.rope = rope
    self.impl = impl
    self.window = window
    self.block_sizes = block_sizes
    self.dtype = dtype
    self.constrain = constrain

  def project_qkv(self, x: jax.Array, positions: jax.Array):
    """x: [batch, length, embed] -> q [b, l, heads, hd], k and v [b, l, kv_heads, hd]."""
    dt = self.dtype
    q = dense(x, self.q[...].astype(dt))  # [batch, length, heads, head_dim]
    k = dense(x, self.k[...].astype(dt))  # [batch, length, kv_heads, head_dim]
    v = dense(x, self.v[...].astype(dt))
    if self.q_bias is not None:
      q = q + self.q_bias[...].astype(dt)  # [heads, head_dim] broadcast
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if self.q_norm is not None:
      q = _rms_norm(q, self.q_norm[...], self.norm_eps)
      k = _rms_norm(k, self.k_norm[...], self.norm_eps)
    q = self.constrain(q, ("batch", "length", "act_heads", None))
    k = self.constrain(k, ("batch", "length", "act_kv_heads", None))
    v = self.constrain(v, ("batch", "length", "act_kv_heads", None))
    q = apply_rotary(q, positions, self.rope)
    k = apply_rotary(k, positions, self.rope)
    return q, k, v

  def project_out(self, o: jax.Array) -> jax.Array:
    """o: [batch, length, heads, head_dim] -> [batch, length, embed] (row-parallel)."""
    return dense(o, self.o[...].astype(self.dtype), contract=2)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
    """[batch, length, embed] -> same: causal self-attention (within segments)."""
    q, k, v = self.project_qkv(x, positions)
    o = kernels.attention(q, k, v, causal=True, segment_ids=segment_ids,
                          impl=self.impl, rules=self.constrain.rules,
                          window=self.window, block_sizes=self.block_sizes)
    # o: [batch, length, heads, head_dim]
    return self.project_out(o)

  def cached(self, x: jax.Array, positions: jax.Array, cache: cached.KVCache,
             layer: jax.Array, prefill: bool):
    """x [batch, t, embed] at positions [batch, t] (contiguous per row) with a KV
    cache: writes the new tokens' K/V into `layer` of the cache and returns
    (output [batch, t, embed], cache). A prefill is a whole prompt from position 0:
    it attends over its own K/V with the configured kernel, or with `auto` where
    that kernel cannot take prompts in natural order (`kernels.serving_impl`: a
    model trained with `ring_zigzag`). A decode step attends over the cache
    (`kernels.cached`, in the cache's own layout)."""
    q, k, v = self.project_qkv(x, positions)
    cache = cache.write(layer, k, v, positions[:, 0])
    if prefill:
      impl = kernels.serving_impl(self.impl, rules=self.constrain.rules)
      o = kernels.attention(q, k, v, causal=True, impl=impl,
                            rules=self.constrain.rules, window=self.window,
                            block_sizes=self.block_sizes)
    else:
      o = cached.attention(q, cache, layer, positions, window=self.window)
    return self.project_out(o), cache
