"""Attention of new tokens over a preallocated KV cache (prefill and decode).

The cache holds every layer: k and v are each [layers, batch, max_len, kv_heads,
head_dim]. A layer writes only its new rows into the stacked arrays (a scatter that
XLA performs in place when the cache is a loop carry or a donated buffer) and then
reads its own slice, so a decode step touches O(new tokens) of cache memory for
writing instead of rebuilding the cache.

With `heads_major` the cache is [layers, batch, kv_heads, max_len, head_dim]
instead: the layout the attention matmuls read without a transpose. The decode loop
holds its private per-layer copy this way (`infer.kv_cache.split_cache`); on
XLA:CPU, the transposes of the position-major layout took 40% of a batch-16 decode
step (benchmarks/README.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write(cache: jax.Array, new: jax.Array, layer: jax.Array, start: jax.Array,
          heads_major: bool = False) -> jax.Array:
  """Writes new [batch, t, kv_heads, head_dim] into cache [layers, batch, max_len,
  kv_heads, head_dim] at `layer`, each row at its own offset start [batch] (rows of
  a batch may be at different lengths). Callers keep writes below max_len
  (`infer.generate` sizes the cache for prompt plus new tokens): the write promises
  XLA in-bounds indices, as a bounds check would add a select over the old cache
  contents on every step."""
  b, t = new.shape[:2]
  rows = jnp.arange(b)[:, None]  # [batch, 1]
  slots = start[:, None] + jnp.arange(t)[None, :]  # [batch, t]
  # Both index forms take `new` as [batch, t, kv_heads, head_dim]: numpy puts the
  # broadcast [batch, t] of separated array indices first.
  at = cache.at[layer, rows, :, slots] if heads_major else cache.at[layer, rows, slots]
  return at.set(new.astype(cache.dtype), mode="promise_in_bounds", unique_indices=True)


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
              q_positions: jax.Array, heads_major: bool = False) -> jax.Array:
  """Causal attention of q over one layer's cache, by absolute position.

  q: [batch, t, heads, head_dim] at positions q_positions [batch, t];
  k_cache, v_cache: [batch, max_len, kv_heads, head_dim], slot s holding position
  s. A query at position p sees slots 0..p: written prompt or earlier tokens. Slots
  past p (unwritten, or padding of a shorter prompt) are masked until overwritten.
  With `heads_major` the caches are [batch, kv_heads, max_len, head_dim].
  """
  b, t, h, d = q.shape
  if heads_major:
    _, kvh, max_len, _ = k_cache.shape
  else:
    _, max_len, kvh, _ = k_cache.shape
  cache_dims = "bksd" if heads_major else "bskd"
  qg = q.reshape(b, t, kvh, h // kvh, d)  # [batch, t, kv_heads, group, head_dim]
  scores = jnp.einsum(f"btkgd,{cache_dims}->bkgts", qg, k_cache,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  visible = jnp.arange(max_len)[None, None, :] <= q_positions[:, :, None]
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum(f"bkgts,{cache_dims}->btkgd", probs, v_cache,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)
