"""The arithmetic of flash attention on one (query block, key block) tile.

The pure-JAX blockwise loops, the Mosaic (TPU) kernels and the Triton (GPU) kernels
all call these functions, so the numerics are written once and checked once. Tiles
keep query rows second to last: scores are [..., bq, bk], row statistics [..., bq, 1].
Softmax statistics and every accumulator are float32 whatever the input dtype.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# A finite stand-in for -inf: masked scores and empty rows never produce inf - inf.
NEG = -1e30


class BlockSizes(NamedTuple):
  """Tile sizes along the query and key/value length; None takes the backend default.
  Each backend adapts a size to what it runs (TPU: up to a multiple of 128; GPU:
  down to a power of two, at least 16; none past the padded length)."""
  block_q: int | None = None
  block_kv: int | None = None

  @classmethod
  def of(cls, value) -> "BlockSizes":
    """Accepts None, a positive int (both sizes), a (block_q, block_kv) pair of
    positive ints or None, or a BlockSizes; NumPy integers count as ints. Raises
    ValueError for anything else (a bool, a float, a size below 1, a pair of
    another length), the same on every backend."""
    bad = ValueError(f"block_sizes must be None, a positive int or a (block_q, "
                     f"block_kv) pair of positive ints or None; got {value!r}")

    def size(x):
      if x is None:
        return None
      if isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1:
        return int(x)
      raise bad
    if value is None or isinstance(value, numbers.Integral):
      return cls(size(value), size(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
      return cls(*map(size, value))
    raise bad

  def resolve(self, default: "BlockSizes") -> "BlockSizes":
    return BlockSizes(self.block_q or default.block_q, self.block_kv or default.block_kv)


def cdiv(a, b):
  return (a + b - 1) // b


def round_up(n: int, multiple: int) -> int:
  return cdiv(n, multiple) * multiple


def pad_axis(x: jax.Array | None, axis: int, size: int, value=0) -> jax.Array | None:
  """Pads `axis` of x at the end to `size` (no-op when already that long)."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _lo(a, b):
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _hi(a, b):
  return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


class Span(NamedTuple):
  """Which keys a query sees, by the distance d = (q_idx + offset) - kv_idx of their
  indices within the call.

  causal: d >= 0. window W (with causal only): also d < W, so each query sees
  itself and the W - 1 keys before it -- Mistral's sliding window (Jiang et al.
  2023, arXiv 2310.06825; transformers masks kv_idx > q_idx - W). offset: the
  index of query row 0 minus that of key row 0 when q and k are different chunks
  of one sequence (a windowed ring step), 0 otherwise. Every method accepts block
  indices that are Python ints or traced scalars.
  """
  causal: bool
  window: int | None = None
  offset: int = 0

  def kv_range(self, i, *, block_q: int, block_kv: int, num_kv: int):
    """[lo, hi): the key blocks that query block i sees."""
    if not self.causal:
      return 0, num_kv
    hi = _hi(num_kv, _lo(0, (i * block_q + block_q - 1 + self.offset) // block_kv + 1))
    if self.window is None:
      return 0, hi
    lo = _lo(0, (i * block_q + self.offset - self.window + 1) // block_kv)
    return _hi(lo, hi), hi

  def q_range(self, j, *, block_q: int, block_kv: int, num_q: int):
    """[lo, hi): the query blocks that see key block j."""
    if not self.causal:
      return 0, num_q
    lo = _hi(num_q, _lo(0, (j * block_kv - self.offset) // block_q))
    if self.window is None:
      return lo, num_q
    hi = _hi(num_q, _lo(0, (j * block_kv + block_kv - 2 - self.offset + self.window)
                        // block_q + 1))
    return lo, _lo(lo, hi)

  def tile_visible(self, i, j, *, block_q: int, block_kv: int):
    """Whether query block i sees any key of block j (True when not causal)."""
    if not self.causal:
      return True
    nearest = i * block_q + block_q - 1 + self.offset - j * block_kv  # largest d
    if self.window is None:
      return nearest >= 0
    farthest = i * block_q + self.offset - (j * block_kv + block_kv - 1)  # smallest d
    return (nearest >= 0) & (farthest < self.window)


def count_blocks(q_len: int, kv_len: int, *, causal: bool, block_q: int,
                 block_kv: int, window: int | None = None, offset: int = 0) -> int:
  """Tiles the forward pass computes for one head: the cost model of tile skipping.
  A traced `offset` (unknown when tracing) counts every tile."""
  nq, nk = cdiv(q_len, block_q), cdiv(kv_len, block_kv)
  if not isinstance(offset, int):
    return nq * nk
  span = Span(causal, window, offset)
  total = 0
  for i in range(nq):
    lo, hi = span.kv_range(i, block_q=block_q, block_kv=block_kv, num_kv=nk)
    total += hi - lo
  return total


def mask(q_idx, kv_idx, *, span: Span, kv_len: int | None, q_seg=None, kv_seg=None):
  """Boolean [..., bq, bk] tile mask (True = attend), or None when nothing is masked.

  q_idx [..., bq, 1] and kv_idx [..., 1, bk] are indices within the call, compared
  through `span`; kv_len masks padding keys; q_seg / kv_seg are segment-id tiles
  shaped like q_idx / kv_idx.
  """
  out = None

  def both(a, b):
    return b if a is None else a & b

  if span.causal:
    distance = q_idx + span.offset - kv_idx
    out = both(out, distance >= 0)
    if span.window is not None:
      out = both(out, distance < span.window)
  if kv_len is not None:
    out = both(out, kv_idx < kv_len)
  if q_seg is not None:
    out = both(out, q_seg == kv_seg)
  return out


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """float32-accumulating einsum. Narrow (bf16) operands always take the native MXU
  pass: a global 'highest' matmul precision would ask Mosaic for an fp32 contraction
  of bf16 tiles, which it rejects. float32 operands follow the global setting."""
  precision = None if b.dtype == jnp.float32 else lax.Precision.DEFAULT
  return jnp.einsum(spec, a.astype(b.dtype), b, precision=precision,
                    preferred_element_type=jnp.float32)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """float32-accumulating einsum that every backend can run, for plain-JAX code
  (not Pallas kernel bodies, which `_dot` serves).

  XLA:CPU has no kernel for some bf16 x bf16 -> f32 dots (e.g. the decode cache's
  heads-major probabilities-times-values product at batch > 1 fails at run time
  with "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"), so on
  CPU the operands are widened first -- exact in float32, the same products.
  Accelerators keep narrow operands (their matrix units) with float32 accumulation;
  the choice is made when the program is lowered, so a deviceless TPU compile from
  a CPU process still gets the narrow dot.
  """
  def native(a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return native(a, b)
  wide = lambda a, b: native(a.astype(jnp.float32), b.astype(jnp.float32))  # noqa: E731
  return lax.platform_dependent(a, b, cpu=wide, default=native)


def scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """q [..., bq, D], k [..., bk, D] -> float32 scores [..., bq, bk]."""
  return _dot("...qd,...kd->...qk", q, k) * scale


def init_state(rows_shape, head_dim: int):
  """Online-softmax state (running max, running sum, output accumulator)."""
  return (jnp.full((*rows_shape, 1), NEG, jnp.float32),
          jnp.zeros((*rows_shape, 1), jnp.float32),
          jnp.zeros((*rows_shape, head_dim), jnp.float32))


def forward_step(state, s: jax.Array, tile_mask, v: jax.Array):
  """Folds one key block into the online softmax.

  state: (m [..., bq, 1], l [..., bq, 1], acc [..., bq, D]) float32; s: scores
  [..., bq, bk]; v: [..., bk, D]. Probabilities are cast to v's dtype for the matmul
  and accumulated in float32.
  """
  m, l, acc = state
  if tile_mask is not None:
    s = jnp.where(tile_mask, s, NEG)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m_new)
  if tile_mask is not None:  # a fully masked row would otherwise count exp(0) = 1
    p = jnp.where(tile_mask, p, 0.0)
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  return m_new, l, alpha * acc + matmul_rows(p, v)


def finish(state):
  """-> (output [..., bq, D] float32, log-sum-exp [..., bq, 1]).

  A row that saw no key gets output 0 and log-sum-exp NEG, which merges as 'empty'.
  """
  m, l, acc = state
  safe = jnp.where(l == 0.0, 1.0, l)
  return acc / safe, m + jnp.log(safe)


def backward_tile(q, k, v, do, lse, delta, tile_mask, scale: float):
  """Recomputes one tile's probabilities and returns (p, ds), both float32 [..., bq, bk].

  lse and delta ([..., bq, 1]) are the saved log-sum-exp and rowsum(dO * O). Then
  dV += p^T dO, dK += scale * ds^T Q, dQ += scale * ds K.
  """
  p = jnp.exp(scores(q, k, scale) - lse)
  if tile_mask is not None:
    p = jnp.where(tile_mask, p, 0.0)
  dp = _dot("...qd,...kd->...qk", do, v)
  return p, p * (dp - delta)


def matmul_rows(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [..., bq, bk] @ b [..., bk, D] -> [..., bq, D] float32 (a cast to b's dtype)."""
  return _dot("...qk,...kd->...qd", a, b)


def matmul_cols(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T: [..., bq, bk]^T @ b [..., bq, D] -> [..., bk, D] float32."""
  return _dot("...qk,...qd->...kd", a, b)


def check_shapes(q, k, v, segment_ids=None):
  """Raises ValueError unless q [b, l, h, d], k = v [b, l, kvh, d] (the same
  length l >= 1: the causal mask aligns query i with key i), h % kvh == 0."""
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"expected q [b, l, h, d] and k, v [b, l, kvh, d]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
  if q.shape[1] != k.shape[1] or q.shape[1] < 1:
    raise ValueError(f"q {q.shape} and k {k.shape} must have one length of at least "
                     "1 (self-attention; a cached decode step is kernels.cached's)")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids {segment_ids.shape} must be [batch, length] "
                     f"= {q.shape[:2]}")


def check_window(window, causal: bool) -> int | None:
  """`window` as an int (NumPy integers count), or None; raises ValueError
  unless it is None or a positive integer with causal."""
  if window is None:
    return None
  if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1:
    raise ValueError(f"window must be a positive int (keys per query), got {window!r}")
  if not causal:
    raise ValueError("a sliding window needs causal=True")
  return int(window)
