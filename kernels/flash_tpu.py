"""Flash attention as Pallas kernels in the TPU (Mosaic) style.

The grid's last axis walks the reduction (key blocks for the forward and dQ, query
blocks of every head in the group for dK/dV) and runs in order on one core, so the
running statistics live in VMEM scratch across grid steps; the other axes are
parallel. Causally invisible tiles are skipped twice: the body is guarded by
`pl.when`, and the index map repeats the last useful block so Pallas issues no DMA.

Mosaic wants the last two dims of a tile to be (8k, 128m) or the full array dims.
Per-row values (lse, delta, segment ids) therefore travel as rows, [b, (h,) 1, len],
tiled (1, block): compact in HBM, and one small transpose per tile turns a row into
the column the softmax needs. Tiles span the whole head_dim, so any head size (80,
96, 112, 192 as well as 64 and 128) is taken as it is, unpadded: the deviceless v5e
compile in tests/test_kernels_backends.py checks 64, 80, 96 and 128. Layout as in
blockwise: q [b, heads, len, d], k and v [b, kv_heads, len, d].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import block

DEFAULT = block.BlockSizes(512, 512)
LANES = 128
_PARAMS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _plan(q_len: int, kv_len: int, sizes: block.BlockSizes):
  """Tile sizes (multiples of 128) and padded lengths."""
  bq = min(block.round_up(sizes.block_q, LANES), block.round_up(q_len, LANES))
  bk = min(block.round_up(sizes.block_kv, LANES), block.round_up(kv_len, LANES))
  return bq, bk, block.round_up(q_len, bq), block.round_up(kv_len, bk)


def _rows(x, length: int):
  """[..., n] -> [..., 1, length] (padded): per-row values laid out along lanes."""
  return block.pad_axis(x, x.ndim - 1, length)[..., None, :]


def _to_col(row):
  """(1, n) -> (n, 1) through a lane-dense (128, n) transpose."""
  return jnp.transpose(jnp.broadcast_to(row, (LANES, row.shape[1])))[:, :1]


def _to_row(col):
  """(n, 1) -> (1, n), the inverse of _to_col."""
  return jnp.transpose(jnp.broadcast_to(col, (col.shape[0], LANES)))[:1, :]


def _when(cond):
  """pl.when that also accepts a static True (no causal mask: always run)."""
  return (lambda f: f()) if cond is True else pl.when(cond)


def _tile_mask(i, j, qs_ref, ks_ref, *, span, bq, bk, kv_len):
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  kv_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  q_seg = None if qs_ref is None else _to_col(qs_ref[...])
  kv_seg = None if ks_ref is None else ks_ref[...]
  return block.mask(q_idx, kv_idx, span=span, kv_len=kv_len, q_seg=q_seg,
                    kv_seg=kv_seg)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, span, scale, bq, bk, kv_len, segmented):
  if not segmented:
    refs = (None, None, *refs)
  qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, block.NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @_when(span.tile_visible(i, j, block_q=bq, block_kv=bk))
  def _step():
    m = _tile_mask(i, j, qs_ref, ks_ref, span=span, bq=bq, bk=bk, kv_len=kv_len)
    s = block.scores(q_ref[...], k_ref[...], scale)
    state = (m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...])
    m_new, l_new, acc = block.forward_step(state, s, m, v_ref[...])
    m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
    l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)
    acc_sc[...] = acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o, lse = block.finish((m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...]))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = _to_row(lse)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, span, scale,
               bq, bk, kv_len, segmented):
  if not segmented:
    refs = (None, None, *refs)
  qs_ref, ks_ref, dq_ref, dq_sc = refs
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @_when(span.tile_visible(i, j, block_q=bq, block_kv=bk))
  def _step():
    m = _tile_mask(i, j, qs_ref, ks_ref, span=span, bq=bq, bk=bk, kv_len=kv_len)
    k = k_ref[...]
    _, ds = block.backward_tile(q_ref[...], k, v_ref[...], do_ref[...],
                                _to_col(lse_ref[...]), _to_col(delta_ref[...]), m, scale)
    dq_sc[...] += block.matmul_rows(ds, k) * scale

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_sc[...]


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, span, scale,
                bq, bk, kv_len, segmented, nq):
  if not segmented:
    refs = (None, None, *refs)
  qs_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
  j, t = pl.program_id(2), pl.program_id(3)
  i = t % nq  # t walks (query head of the group, query block)

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @_when(span.tile_visible(i, j, block_q=bq, block_kv=bk))
  def _step():
    m = _tile_mask(i, j, qs_ref, ks_ref, span=span, bq=bq, bk=bk, kv_len=kv_len)
    q, do = q_ref[...], do_ref[...]
    p, ds = block.backward_tile(q, k_ref[...], v_ref[...], do, _to_col(lse_ref[...]),
                                _to_col(delta_ref[...]), m, scale)
    dk_sc[...] += block.matmul_cols(ds, q) * scale
    dv_sc[...] += block.matmul_cols(p, do)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_sc[...]
    dv_ref[...] = dv_sc[...]


def _call(kernel, grid, inputs, in_specs, out_shape, out_specs, scratch, interpret,
          cost: pl.CostEstimate):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, scratch_shapes=scratch,
                        interpret=interpret, compiler_params=_PARAMS,
                        cost_estimate=cost)(*inputs)


def _cost(tiles: int, *, heads: int, bq: int, bk: int, d: int, matmuls: int,
          nbytes: float) -> pl.CostEstimate:
  """What one kernel call executes, for XLA's scheduler and rung's step estimate
  (aot/schedule.py): `matmuls` [bq, bk, d] products and one exp per score on each
  of the `tiles` visible tiles of each of `heads` (batch x heads) heads, and
  `nbytes` moved between HBM and VMEM. Skipped tiles cost nothing; the diagonal
  tiles count whole, as the kernel computes them."""
  n = tiles * heads
  return pl.CostEstimate(flops=2 * matmuls * bq * bk * d * n,
                         transcendentals=bq * bk * n, bytes_accessed=int(nbytes))


def _size(*shapes_and_dtypes) -> int:
  """Bytes of arrays given as (shape, dtype) pairs."""
  return sum(math.prod(shape) * jnp.dtype(dtype).itemsize
             for shape, dtype in shapes_and_dtypes)




def _clamp(x, lo_hi, n: int):
  """x clamped into the half-open range [lo, hi) (lo when it is empty), and always
  to a real block index 0..n-1."""
  lo, hi = lo_hi
  return jnp.clip(jnp.maximum(jnp.minimum(x, hi - 1), lo), 0, n - 1)


def forward(q, k, v, q_seg, kv_seg, *, causal: bool, block_sizes: block.BlockSizes,
            scale: float, out_dtype, interpret: bool = False,
            window: int | None = None, offset: int = 0):
  """-> (o [b, h, q_len, d] in out_dtype, lse [b, h, q_len] float32); causal,
  window and offset as in `block.Span`."""
  b, h, q_len, d = q.shape
  kvh, kv_len = k.shape[1], k.shape[2]
  group = h // kvh
  bq, bk, lq, lk = _plan(q_len, kv_len, block_sizes)
  segmented = q_seg is not None
  span = block.Span(causal, window, offset)

  def kv_index(b_, h_, i, j):  # repeat a visible block: no DMA for skipped tiles
    if causal:
      j = _clamp(j, span.kv_range(i, block_q=bq, block_kv=bk, num_kv=lk // bk), lk // bk)
    return b_, h_ // group, j, 0

  inputs = [block.pad_axis(q, 2, lq), block.pad_axis(k, 2, lk), block.pad_axis(v, 2, lk)]
  in_specs = [pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
              pl.BlockSpec((None, None, bk, d), kv_index),
              pl.BlockSpec((None, None, bk, d), kv_index)]
  if segmented:
    inputs += [_rows(q_seg, lq), _rows(kv_seg, lk)]  # [b, 1, len]
    in_specs += [pl.BlockSpec((None, 1, bq), lambda b_, h_, i, j: (b_, 0, i)),
                 pl.BlockSpec((None, 1, bk),
                              lambda b_, h_, i, j: (b_, 0, kv_index(b_, h_, i, j)[2]))]
  kernel = functools.partial(_fwd_kernel, span=span, scale=scale, bq=bq, bk=bk,
                             kv_len=kv_len if lk != kv_len else None, segmented=segmented)
  tiles = block.count_blocks(lq, lk, causal=causal, block_q=bq, block_kv=bk,
                             window=window, offset=offset)
  # q read and o, lse written once; a K and a V tile read per visible tile.
  nbytes = (_size(((b, h, lq, d), q.dtype), ((b, h, lq, d), out_dtype),
                  ((b, h, lq), jnp.float32))
            + 2 * b * h * tiles * _size(((bk, d), k.dtype)))
  o, lse = _call(
      kernel, (b, h, lq // bq, lk // bk), inputs, in_specs,
      [jax.ShapeDtypeStruct((b, h, lq, d), out_dtype),
       jax.ShapeDtypeStruct((b, h, 1, lq), jnp.float32)],
      [pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
       pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i))],
      [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
       pltpu.VMEM((bq, d), jnp.float32)], interpret,
      _cost(tiles, heads=b * h, bq=bq, bk=bk, d=d, matmuls=2, nbytes=nbytes))
  return o[:, :, :q_len], lse[:, :, 0, :q_len]


def backward(q, k, v, q_seg, kv_seg, lse, delta, do, *, causal: bool,
             block_sizes: block.BlockSizes, scale: float, interpret: bool = False,
             window: int | None = None, offset: int = 0):
  """-> (dq [b, h, q_len, d], dk, dv [b, kvh, kv_len, d]), all float32."""
  b, h, q_len, d = q.shape
  kvh, kv_len = k.shape[1], k.shape[2]
  group = h // kvh
  bq, bk, lq, lk = _plan(q_len, kv_len, block_sizes)
  nq, nk = lq // bq, lk // bk
  segmented = q_seg is not None
  q, do = block.pad_axis(q, 2, lq), block.pad_axis(do, 2, lq)
  lse, delta = _rows(lse, lq), _rows(delta, lq)  # [b, h, 1, lq]
  k, v = block.pad_axis(k, 2, lk), block.pad_axis(v, 2, lk)
  segs = [_rows(q_seg, lq), _rows(kv_seg, lk)] if segmented else []  # [b, 1, len]
  span = block.Span(causal, window, offset)
  opts = dict(span=span, scale=scale, bq=bq, bk=bk,
              kv_len=kv_len if lk != kv_len else None, segmented=segmented)
  tiles = block.count_blocks(lq, lk, causal=causal, block_q=bq, block_kv=bk,
                             window=window, offset=offset)
  n = b * h * tiles  # visible tiles over every head
  row_bytes = _size(((b, h, lq, d), q.dtype), ((b, h, lq, d), do.dtype),
                    ((b, h, 2, lq), jnp.float32))  # q, dO, lse and delta
  kv_bytes = _size(((b, kvh, lk, d), k.dtype), ((b, kvh, lk, d), v.dtype))
  # dQ: scores again, dP = dO V^T, dQ += dS K; the query side read once, a K and a
  # V tile per visible tile. dK/dV: scores again, dP, dK += dS^T Q, dV += P^T dO; K
  # and V read once, the query side per visible tile.
  dq_cost = _cost(tiles, heads=b * h, bq=bq, bk=bk, d=d, matmuls=3,
                  nbytes=row_bytes + n * _size(((2, bk, d), k.dtype))
                  + _size(((b, h, lq, d), jnp.float32)))
  dkv_cost = _cost(tiles, heads=b * h, bq=bq, bk=bk, d=d, matmuls=4,
                   nbytes=kv_bytes + n * (_size(((bq, d), q.dtype), ((bq, d), do.dtype),
                                                ((2, bq), jnp.float32)))
                   + 2 * _size(((b, kvh, lk, d), jnp.float32)))

  # dQ: grid (batch, head, q block, kv block).
  def kv_index(b_, h_, i, j):
    if causal:
      j = _clamp(j, span.kv_range(i, block_q=bq, block_kv=bk, num_kv=nk), nk)
    return b_, h_ // group, j, 0

  row = lambda b_, h_, i, j: (b_, h_, i, 0)  # noqa: E731
  stat = lambda b_, h_, i, j: (b_, h_, 0, i)  # noqa: E731
  seg_specs = [pl.BlockSpec((None, 1, bq), lambda b_, h_, i, j: (b_, 0, i)),
               pl.BlockSpec((None, 1, bk),
                            lambda b_, h_, i, j: (b_, 0, kv_index(b_, h_, i, j)[2]))]
  dq = _call(
      functools.partial(_dq_kernel, **opts), (b, h, nq, nk),
      [q, do, lse, delta, k, v, *segs],
      [pl.BlockSpec((None, None, bq, d), row), pl.BlockSpec((None, None, bq, d), row),
       pl.BlockSpec((None, None, 1, bq), stat),
       pl.BlockSpec((None, None, 1, bq), stat),
       pl.BlockSpec((None, None, bk, d), kv_index),
       pl.BlockSpec((None, None, bk, d), kv_index), *seg_specs[:len(segs)]],
      jax.ShapeDtypeStruct((b, h, lq, d), jnp.float32),
      pl.BlockSpec((None, None, bq, d), row), [pltpu.VMEM((bq, d), jnp.float32)],
      interpret, dq_cost)

  # dK/dV: grid (batch, kv head, kv block, (query head in group, q block)).
  def q_block(j, t):
    i = t % nq
    return _clamp(i, span.q_range(j, block_q=bq, block_kv=bk, num_q=nq), nq) if causal \
        else i

  def q_index(b_, g_, j, t):
    return b_, g_ * group + t // nq, q_block(j, t), 0

  def stat_index(b_, g_, j, t):
    return b_, g_ * group + t // nq, 0, q_block(j, t)

  kv_tile = lambda b_, g_, j, t: (b_, g_, j, 0)  # noqa: E731
  seg_specs = [pl.BlockSpec((None, 1, bq), lambda b_, g_, j, t: (b_, 0, q_block(j, t))),
               pl.BlockSpec((None, 1, bk), lambda b_, g_, j, t: (b_, 0, j))]
  kv_out = jax.ShapeDtypeStruct((b, kvh, lk, d), jnp.float32)
  dk, dv = _call(
      functools.partial(_dkv_kernel, nq=nq, **opts), (b, kvh, nk, group * nq),
      [k, v, q, do, lse, delta, *segs],
      [pl.BlockSpec((None, None, bk, d), kv_tile),
       pl.BlockSpec((None, None, bk, d), kv_tile),
       pl.BlockSpec((None, None, bq, d), q_index),
       pl.BlockSpec((None, None, bq, d), q_index),
       pl.BlockSpec((None, None, 1, bq), stat_index),
       pl.BlockSpec((None, None, 1, bq), stat_index), *seg_specs[:len(segs)]],
      [kv_out, kv_out],
      [pl.BlockSpec((None, None, bk, d), kv_tile),
       pl.BlockSpec((None, None, bk, d), kv_tile)],
      [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)], interpret,
      dkv_cost)
  return dq[:, :, :q_len], dk[:, :, :kv_len], dv[:, :, :kv_len]
