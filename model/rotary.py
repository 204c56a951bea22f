"""Rotary position embeddings, rotate-half layout (the layout HF Llama uses)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (i, i + head_dim/2) of x by position-dependent angles.

  x: [batch, length, heads, head_dim]; positions: [batch, length] ints.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, half]
  sin = jnp.sin(angles)[:, :, None, :]  # [batch, length, 1, half]
  cos = jnp.cos(angles)[:, :, None, :]
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
