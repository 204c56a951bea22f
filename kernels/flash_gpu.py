"""Flash attention as Pallas kernels in the GPU (Triton) style.

Each program owns one output tile and walks the other length with a `fori_loop`, as a
Triton kernel does (GPU grid programs run concurrently, so nothing may be accumulated
across grid steps). Three kernels: forward (grid batch x heads x q-blocks), dQ (same
grid) and dK/dV (grid batch x kv-heads x kv-blocks, looping over the query heads of
the group, so GQA never repeats K/V). Lengths are padded to the tile sizes; padded
keys are masked. Triton blocks must be powers of two, so a head_dim that is not one
(80, 96, 112, 192) is zero-padded to the next (at least 16, the smallest `tl.dot`):
zero columns add nothing to q.k or to the output, the caller's softmax scale (from
the real head_dim) is used as given, and outputs and gradients are sliced back.
Requested tile sizes are rounded down to powers of two. This module is traced on
every platform (`lax.platform_dependent` traces all branches), so nothing here may
refuse a shape that another backend accepts. With `interpret=True` the same kernels
run on CPU for the tests. Layout as in blockwise: q [b, heads, len, d], k and v
[b, kv_heads, len, d].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import block

DEFAULT = block.BlockSizes(64, 64)
_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=2)


MIN_DIM = 16  # smallest tile side Triton's tl.dot takes


def _pow2_at_least(n: int, floor: int = MIN_DIM) -> int:
  return max(floor, pl.next_power_of_2(n))


def _pow2_at_most(n: int, floor: int = MIN_DIM) -> int:
  return max(floor, 1 << (int(n).bit_length() - 1))


def head_dim(d: int) -> int:
  """The head_dim the kernels run at: d zero-padded to a power of two (>= 16)."""
  return _pow2_at_least(d)


def _plan(q, k, sizes: block.BlockSizes):
  """Tile sizes (powers of two, as Triton requires) and padded lengths."""
  q_len, kv_len = q.shape[2], k.shape[2]
  bq = min(_pow2_at_most(sizes.block_q), _pow2_at_least(q_len))
  bk = min(_pow2_at_most(sizes.block_kv), _pow2_at_least(kv_len))
  return bq, bk, block.round_up(q_len, bq), block.round_up(kv_len, bk)


def _pad_head(*xs, d: int):
  """Zero-pads the last (head_dim) axis of each array to d."""
  return [block.pad_axis(x, x.ndim - 1, d) for x in xs]


def _call(kernel, grid, inputs, in_specs, out_shape, out_specs, interpret):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret,
                        compiler_params=_PARAMS)(*inputs)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, span, scale, bq, bk, kv_len, segmented):
  qs_ref, ks_ref, o_ref, lse_ref = refs if segmented else (None, None, *refs)
  i = pl.program_id(2)
  q = q_ref[...]  # [bq, d]
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = qs_ref[...][:, None] if segmented else None

  def kv_step(j, state):
    start = pl.multiple_of(j * bk, bk)
    kv_idx = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    kv_seg = ks_ref[pl.ds(start, bk)][None, :] if segmented else None
    m = block.mask(q_idx, kv_idx, span=span, kv_len=kv_len, q_seg=q_seg,
                   kv_seg=kv_seg)
    s = block.scores(q, k_ref[pl.ds(start, bk), :], scale)
    return block.forward_step(state, s, m, v_ref[pl.ds(start, bk), :])

  num_kv = k_ref.shape[0] // bk
  lo, hi = span.kv_range(i, block_q=bq, block_kv=bk, num_kv=num_kv)
  state = lax.fori_loop(lo, hi, kv_step, block.init_state((bq,), q.shape[-1]))
  o, lse = block.finish(state)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, span, scale,
               bq, bk, kv_len, segmented):
  qs_ref, ks_ref, dq_ref = refs if segmented else (None, None, *refs)
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = qs_ref[...][:, None] if segmented else None

  def kv_step(j, dq):
    start = pl.multiple_of(j * bk, bk)
    kv_idx = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    kv_seg = ks_ref[pl.ds(start, bk)][None, :] if segmented else None
    m = block.mask(q_idx, kv_idx, span=span, kv_len=kv_len, q_seg=q_seg,
                   kv_seg=kv_seg)
    k = k_ref[pl.ds(start, bk), :]
    _, ds = block.backward_tile(q, k, v_ref[pl.ds(start, bk), :], do, lse, delta, m,
                                scale)
    return dq + block.matmul_rows(ds, k) * scale

  num_kv = k_ref.shape[0] // bk
  lo, hi = span.kv_range(i, block_q=bq, block_kv=bk, num_kv=num_kv)
  dq_ref[...] = lax.fori_loop(lo, hi, kv_step, jnp.zeros(q.shape, jnp.float32))


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, span, scale,
                bq, bk, kv_len, segmented):
  qs_ref, ks_ref, dk_ref, dv_ref = refs if segmented else (None, None, *refs)
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]  # [bk, d]
  kv_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  kv_seg = ks_ref[...][None, :] if segmented else None
  group, q_len = q_ref.shape[0], q_ref.shape[1]

  def q_step(head, i, carry):
    dk, dv = carry
    start = pl.multiple_of(i * bq, bq)
    rows = pl.ds(start, bq)
    q, do = q_ref[head, rows, :], do_ref[head, rows, :]
    q_idx = start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = qs_ref[rows][:, None] if segmented else None
    m = block.mask(q_idx, kv_idx, span=span, kv_len=kv_len, q_seg=q_seg,
                   kv_seg=kv_seg)
    p, ds = block.backward_tile(q, k, v, do, lse_ref[head, rows][:, None],
                                delta_ref[head, rows][:, None], m, scale)
    return dk + block.matmul_cols(ds, q) * scale, dv + block.matmul_cols(p, do)

  # Every query head of the group, over the query blocks that see key block j.
  lo, hi = span.q_range(j, block_q=bq, block_kv=bk, num_q=q_len // bq)

  def head_step(head, carry):
    return lax.fori_loop(lo, hi, functools.partial(q_step, head), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_step, (zeros, zeros))
  dk_ref[...], dv_ref[...] = dk, dv


def forward(q, k, v, q_seg, kv_seg, *, causal: bool, block_sizes: block.BlockSizes,
            scale: float, out_dtype, interpret: bool = False,
            window: int | None = None, offset: int = 0):
  """-> (o [b, h, q_len, d] in out_dtype, lse [b, h, q_len] float32).

  scale multiplies q.k: the caller derives it from the real head_dim. causal,
  window and offset as in `block.Span`.
  """
  d = q.shape[-1]
  if head_dim(d) != d:
    q, k, v = _pad_head(q, k, v, d=head_dim(d))
    o, lse = forward(q, k, v, q_seg, kv_seg, causal=causal, block_sizes=block_sizes,
                     scale=scale, out_dtype=out_dtype, interpret=interpret,
                     window=window, offset=offset)
    return o[..., :d], lse
  b, h, q_len, d = q.shape
  kvh, kv_len = k.shape[1], k.shape[2]
  group = h // kvh
  bq, bk, lq, lk = _plan(q, k, block_sizes)
  segmented = q_seg is not None
  inputs = [block.pad_axis(q, 2, lq), block.pad_axis(k, 2, lk), block.pad_axis(v, 2, lk)]
  all_kv = pl.BlockSpec((None, None, lk, d), lambda b_, h_, i: (b_, h_ // group, 0, 0))
  in_specs = [pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0)),
              all_kv, all_kv]
  if segmented:
    inputs += [block.pad_axis(q_seg, 1, lq), block.pad_axis(kv_seg, 1, lk)]
    in_specs += [pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                 pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0))]
  kernel = functools.partial(_fwd_kernel, span=block.Span(causal, window, offset),
                             scale=scale, bq=bq, bk=bk,
                             kv_len=kv_len if lk != kv_len else None, segmented=segmented)
  o, lse = _call(
      kernel, (b, h, lq // bq), inputs, in_specs,
      [jax.ShapeDtypeStruct((b, h, lq, d), out_dtype),
       jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
      [pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0)),
       pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))], interpret)
  return o[:, :, :q_len], lse[:, :, :q_len]


def backward(q, k, v, q_seg, kv_seg, lse, delta, do, *, causal: bool,
             block_sizes: block.BlockSizes, scale: float, interpret: bool = False,
             window: int | None = None, offset: int = 0):
  """-> (dq [b, h, q_len, d], dk, dv [b, kvh, kv_len, d]), all float32.

  delta = rowsum(dO * O) is unchanged by zero head_dim padding, so it is taken as
  given; the padded columns of dq, dk, dv (zero) are sliced off.
  """
  d = q.shape[-1]
  if head_dim(d) != d:
    q, k, v, do = _pad_head(q, k, v, do, d=head_dim(d))
    grads = backward(q, k, v, q_seg, kv_seg, lse, delta, do, causal=causal,
                     block_sizes=block_sizes, scale=scale, interpret=interpret,
                     window=window, offset=offset)
    return tuple(g[..., :d] for g in grads)
  b, h, q_len, d = q.shape
  kvh, kv_len = k.shape[1], k.shape[2]
  group = h // kvh
  bq, bk, lq, lk = _plan(q, k, block_sizes)
  segmented = q_seg is not None
  q, do = block.pad_axis(q, 2, lq), block.pad_axis(do, 2, lq)
  lse, delta = block.pad_axis(lse, 2, lq), block.pad_axis(delta, 2, lq)
  k, v = block.pad_axis(k, 2, lk), block.pad_axis(v, 2, lk)
  segs = ([block.pad_axis(q_seg, 1, lq), block.pad_axis(kv_seg, 1, lk)]
          if segmented else [])
  opts = dict(span=block.Span(causal, window, offset), scale=scale, bq=bq, bk=bk,
              kv_len=kv_len if lk != kv_len else None, segmented=segmented)

  row_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0))
  row_stat = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
  all_kv = pl.BlockSpec((None, None, lk, d), lambda b_, h_, i: (b_, h_ // group, 0, 0))
  seg_specs = [pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
               pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0))] if segmented else []
  dq = _call(functools.partial(_dq_kernel, **opts), (b, h, lq // bq),
             [q, do, lse, delta, k, v, *segs],
             [row_tile, row_tile, row_stat, row_stat, all_kv, all_kv, *seg_specs],
             jax.ShapeDtypeStruct((b, h, lq, d), jnp.float32), row_tile, interpret)

  kv_tile = pl.BlockSpec((None, None, bk, d), lambda b_, g_, j: (b_, g_, j, 0))
  group_rows = pl.BlockSpec((None, group, lq, d), lambda b_, g_, j: (b_, g_, 0, 0))
  group_stat = pl.BlockSpec((None, group, lq), lambda b_, g_, j: (b_, g_, 0))
  seg_specs = [pl.BlockSpec((None, lq), lambda b_, g_, j: (b_, 0)),
               pl.BlockSpec((None, bk), lambda b_, g_, j: (b_, j))] if segmented else []
  kv_out = jax.ShapeDtypeStruct((b, kvh, lk, d), jnp.float32)
  dk, dv = _call(functools.partial(_dkv_kernel, **opts), (b, kvh, lk // bk),
                 [k, v, q, do, lse, delta, *segs],
                 [kv_tile, kv_tile, group_rows, group_rows, group_stat, group_stat,
                  *seg_specs], [kv_out, kv_out], [kv_tile, kv_tile], interpret)
  return dq[:, :, :q_len], dk[:, :, :kv_len], dv[:, :, :kv_len]
