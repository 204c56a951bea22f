"""Attention kernels behind one entry point. The model calls only `attention`."""

from __future__ import annotations

from typing import Any

import jax

from kernels import reference

# Implementations that exist in this build; config validation checks against it.
IMPLS = ("reference", "auto")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              segment_ids: jax.Array | None = None, impl: str = "auto",
              block_sizes: Any = None) -> jax.Array:
  """Multi-head attention with GQA.

  q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
  segment_ids: optional [batch, length] ints; tokens attend within their segment.
  impl: one of IMPLS; `auto` picks the best available for backend, shape and mesh.
  """
  del block_sizes  # used by the blockwise kernels
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not available; choose from {IMPLS}")
  return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids)
