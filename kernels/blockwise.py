"""Flash attention in pure JAX: the Pallas kernels' tiled algorithm, as lax loops.

This is what `flash` runs on CPU: memory stays linear in length (no [length, length]
scores), causal tiles above the diagonal are never computed, and GQA groups share
their key/value tile instead of repeating it. Layout ("kernel layout"):
q [batch, heads, q_len, head_dim], k and v [batch, kv_heads, kv_len, head_dim].
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels import block

DEFAULT = block.BlockSizes(512, 512)


def _tiles(q_len: int, kv_len: int, sizes: block.BlockSizes):
  bq, bk = min(sizes.block_q, q_len), min(sizes.block_kv, kv_len)
  return bq, bk, block.cdiv(q_len, bq), block.cdiv(kv_len, bk)


def _q_tile(x, i, group: int, block_q: int):
  """Rows of q block i from x [b, kvh, g, nq, bq, ...] -> [b, kvh, g*bq, ...].

  The g query heads of a KV group are stacked as rows so one matmul serves the group.
  """
  t = lax.dynamic_index_in_dim(x, i, axis=3, keepdims=False)
  return t.reshape(t.shape[0], t.shape[1], group * block_q, *t.shape[4:])


def _row_info(i, q_seg, group: int, block_q: int):
  """Positions [g*bq, 1] of the stacked rows of q block i, and their segment ids."""
  q_idx = (i * block_q + jnp.tile(jnp.arange(block_q), group))[:, None]
  if q_seg is None:
    return q_idx, None
  seg = lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q, axis=1)  # [b, bq]
  return q_idx, jnp.tile(seg, (1, group))[:, None, :, None]  # [b, 1, g*bq, 1]


def _kv_tile(x, j, block_kv: int):
  return lax.dynamic_slice_in_dim(x, j * block_kv, block_kv, axis=2)


def _col_info(j, kv_seg, block_kv: int):
  kv_idx = (j * block_kv + jnp.arange(block_kv))[None, :]
  if kv_seg is None:
    return kv_idx, None
  seg = lax.dynamic_slice_in_dim(kv_seg, j * block_kv, block_kv, axis=1)
  return kv_idx, seg[:, None, None, :]  # [b, 1, 1, bk]


def forward(q, k, v, q_seg, kv_seg, *, causal: bool, block_sizes: block.BlockSizes,
            scale: float, out_dtype, window: int | None = None, offset: int = 0):
  """-> (o [b, h, q_len, d] in out_dtype, lse [b, h, q_len] float32).

  q_seg [b, q_len] / kv_seg [b, kv_len] are optional int segment ids; causal,
  window and offset as in `block.Span`. Only the key blocks a query block sees are
  visited.
  """
  span = block.Span(causal, window, offset)
  b, h, q_len, d = q.shape
  kvh, kv_len = k.shape[1], k.shape[2]
  g = h // kvh
  bq, bk, nq, nk = _tiles(q_len, kv_len, block_sizes)
  kv_valid = kv_len if kv_len % bk else None
  qb = block.pad_axis(q, 2, nq * bq).reshape(b, kvh, g, nq, bq, d)
  k, v = block.pad_axis(k, 2, nk * bk), block.pad_axis(v, 2, nk * bk)
  q_seg = block.pad_axis(q_seg, 1, nq * bq)
  kv_seg = block.pad_axis(kv_seg, 1, nk * bk)

  def q_block(i):
    qi = _q_tile(qb, i, g, bq)  # [b, kvh, g*bq, d]
    q_idx, qs = _row_info(i, q_seg, g, bq)

    def kv_step(j, state):
      kv_idx, ks = _col_info(j, kv_seg, bk)
      m = block.mask(q_idx, kv_idx, span=span, kv_len=kv_valid, q_seg=qs, kv_seg=ks)
      s = block.scores(qi, _kv_tile(k, j, bk), scale)
      return block.forward_step(state, s, m, _kv_tile(v, j, bk))

    lo, hi = span.kv_range(i, block_q=bq, block_kv=bk, num_kv=nk)
    state = lax.fori_loop(lo, hi, kv_step, block.init_state((b, kvh, g * bq), d))
    o, lse = block.finish(state)
    return o.astype(out_dtype).reshape(b, kvh, g, bq, d), lse.reshape(b, kvh, g, bq)

  o, lse = lax.map(q_block, jnp.arange(nq))  # [nq, b, kvh, g, bq, (d)]
  o = jnp.moveaxis(o, 0, 3).reshape(b, h, nq * bq, d)[:, :, :q_len]
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, h, nq * bq)[:, :, :q_len]
  return o, lse


def backward(q, k, v, q_seg, kv_seg, lse, delta, do, *, causal: bool,
             block_sizes: block.BlockSizes, scale: float, window: int | None = None,
             offset: int = 0):
  """-> (dq [b, h, q_len, d], dk, dv [b, kvh, kv_len, d]), all float32.

  lse and delta = rowsum(dO * O) are [b, h, q_len] float32. One pass over key blocks:
  each accumulates its own dK/dV over the query blocks that see it, while dQ is a
  float32 carry updated in place, so nothing is recomputed twice.
  """
  span = block.Span(causal, window, offset)
  b, h, q_len, d = q.shape
  kvh, kv_len = k.shape[1], k.shape[2]
  g = h // kvh
  bq, bk, nq, nk = _tiles(q_len, kv_len, block_sizes)
  kv_valid = kv_len if kv_len % bk else None
  # Padded query rows have dO = 0, so they add nothing to dK or dV.
  qb = block.pad_axis(q, 2, nq * bq).reshape(b, kvh, g, nq, bq, d)
  dob = block.pad_axis(do, 2, nq * bq).reshape(b, kvh, g, nq, bq, d)
  lseb = block.pad_axis(lse, 2, nq * bq).reshape(b, kvh, g, nq, bq, 1)
  deltab = block.pad_axis(delta, 2, nq * bq).reshape(b, kvh, g, nq, bq, 1)
  k, v = block.pad_axis(k, 2, nk * bk), block.pad_axis(v, 2, nk * bk)
  q_seg = block.pad_axis(q_seg, 1, nq * bq)
  kv_seg = block.pad_axis(kv_seg, 1, nk * bk)

  def kv_block(dq, j):
    kj, vj = _kv_tile(k, j, bk), _kv_tile(v, j, bk)  # [b, kvh, bk, d]
    kv_idx, ks = _col_info(j, kv_seg, bk)

    def q_step(i, carry):
      dq, dk, dv = carry
      qi, doi = _q_tile(qb, i, g, bq), _q_tile(dob, i, g, bq)
      q_idx, qs = _row_info(i, q_seg, g, bq)
      m = block.mask(q_idx, kv_idx, span=span, kv_len=kv_valid, q_seg=qs, kv_seg=ks)
      p, ds = block.backward_tile(qi, kj, vj, doi, _q_tile(lseb, i, g, bq),
                                  _q_tile(deltab, i, g, bq), m, scale)
      dqi = (block.matmul_rows(ds, kj) * scale).reshape(b, kvh, g, 1, bq, d)
      dq = lax.dynamic_update_slice_in_dim(
          dq, lax.dynamic_slice_in_dim(dq, i, 1, axis=3) + dqi, i, axis=3)
      return (dq, dk + block.matmul_cols(ds, qi) * scale, dv + block.matmul_cols(p, doi))

    zeros = jnp.zeros((b, kvh, bk, d), jnp.float32)
    lo, hi = span.q_range(j, block_q=bq, block_kv=bk, num_q=nq)
    dq, dk, dv = lax.fori_loop(lo, hi, q_step, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq0 = jnp.zeros((b, kvh, g, nq, bq, d), jnp.float32)
  dq, (dk, dv) = lax.scan(kv_block, dq0, jnp.arange(nk))
  dq = dq.reshape(b, h, nq * bq, d)[:, :, :q_len]
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, kvh, nk * bk, d)[:, :, :kv_len]
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, kvh, nk * bk, d)[:, :, :kv_len]
  return dq, dk, dv
