"""Attention of new tokens over a preallocated KV cache (prefill and decode).

The cache holds every layer: k and v are each [layers, batch, max_len, kv_heads,
head_dim]. A layer writes only its new rows into the stacked arrays (a scatter that
XLA performs in place when the cache is a loop carry or a donated buffer) and then
reads its own slice, so a decode step touches O(new tokens) of cache memory for
writing instead of rebuilding the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write(cache: jax.Array, new: jax.Array, layer: jax.Array,
          start: jax.Array) -> jax.Array:
  """Writes new [batch, t, kv_heads, head_dim] into cache [layers, batch, max_len,
  kv_heads, head_dim] at `layer`, each row at its own offset start [batch] (rows of
  a batch may be at different lengths). Writes past max_len are dropped."""
  b, t = new.shape[:2]
  rows = jnp.arange(b)[:, None]  # [batch, 1]
  slots = start[:, None] + jnp.arange(t)[None, :]  # [batch, t]
  return cache.at[layer, rows, slots].set(
      new.astype(cache.dtype), mode="drop", unique_indices=True)


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
              q_positions: jax.Array) -> jax.Array:
  """Causal attention of q over one layer's cache, by absolute position.

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
