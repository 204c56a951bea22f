"""Attention of new tokens over a preallocated KV cache (prefill and decode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes new [batch, t, kv_heads, head_dim] into cache [batch, max_len, ...] at
  each row's own offset start [batch] (rows of a batch may be at different lengths)."""
  return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (s, 0, 0)))(
      cache, new.astype(cache.dtype), start)


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
              q_positions: jax.Array) -> jax.Array:
  """Causal attention of q over the cache, by absolute position.

  q: [batch, t, heads, head_dim] at positions q_positions [batch, t];
  k_cache, v_cache: [batch, max_len, kv_heads, head_dim], slot s holding position
  s. A query at position p sees slots 0..p: written prompt or earlier tokens. Slots
  past p (unwritten, or padding of a shorter prompt) are masked until overwritten.
  """
  b, t, h, d = q.shape
  kvh = k_cache.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, d)  # [batch, t, kv_heads, group, head_dim]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  visible = jnp.arange(k_cache.shape[1])[None, None, :] <= q_positions[:, :, None]
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)
