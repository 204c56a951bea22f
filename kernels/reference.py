"""Attention in plain XLA: the numerical reference every kernel is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import block


def mask(q_len: int, kv_len: int, *, causal: bool,
         q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
         window: int | None = None) -> jax.Array | None:
  """Boolean [batch or 1, q_len, kv_len] mask (True = attend), or None for 'all'.

  window W (causal only): query i sees keys i - W < j <= i (`block.Span`).
  """
  out = None
  if causal:
    distance = jnp.arange(q_len)[:, None] - jnp.arange(kv_len)[None, :]
    out = distance >= 0
    if window is not None:
      out = out & (distance < window)
    out = out[None]
  if q_segment_ids is not None:
    seg = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    out = seg if out is None else out & seg
  return out


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              segment_ids: jax.Array | None = None,
              window: int | None = None) -> jax.Array:
  """Softmax attention with GQA, causal and segment masks; float32 softmax.

  q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim];
  segment_ids: [batch, length] int (tokens attend only within their segment).
  Returns [batch, length, heads, head_dim] in q's dtype. Raises ValueError for
  inputs no kernel takes (`block.check_shapes`, `block.check_window`).
  """
  block.check_shapes(q, k, v, segment_ids)
  window = block.check_window(window, causal)
  b, lq, h, d = q.shape
  kvh = k.shape[2]
  g = h // kvh
  qg = q.reshape(b, lq, kvh, g, d)  # [batch, q_len, kv_heads, group, head_dim]
  scores = block.einsum_f32("bqkgd,bskd->bkgqs", qg, k) * (d ** -0.5)
  m = mask(lq, k.shape[1], causal=causal, window=window, q_segment_ids=segment_ids,
           kv_segment_ids=segment_ids)
  if m is not None:
    scores = jnp.where(m[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  # A row with nothing to attend to (only possible with segment ids) gives zeros.
  probs = jnp.where(jnp.isnan(probs), 0.0, probs)
  out = block.einsum_f32("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)
  return out.reshape(b, lq, h, d).astype(q.dtype)
