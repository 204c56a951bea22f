"""Ring attention over the `sequence` mesh axis, with zig-zag causal load balancing.

Each of the P devices keeps its query chunk; key/value chunks travel round the ring
with `ppermute` (K and V stacked, so one collective per hop) while the device attends
to the chunk it holds with the flash kernels. Partial outputs merge through their
log-sum-exp. The backward pass (custom_vjp) runs the ring the other way: K/V travel
again, each device adds its dK/dV contribution to an accumulator that travels with
them, and one last hop carries every accumulator home. Forward: P-1 hops of K/V;
backward: P-1 hops of K/V and P hops of dK/dV.

Causal load balance ("zig-zag"): the sequence is cut into 2P chunks and device r
holds chunks r and 2P-1-r, so every device has an early and a late chunk. Then at
every step each device computes the same number of tiles: step 0 is a causal pass
over its own pair; later steps attend either both query chunks to the first visiting
key chunk (the visitor is from earlier in the sequence) or only the late query chunk
to both visiting key chunks (the visitor is from later). The permutation is the
caller's job, once per batch: see `kernels.zigzag`. It is asked for explicitly
(layout="zigzag", `kernels.attention(impl="ring_zigzag")`); the default,
layout="contiguous", is exact on sequences in natural order.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels import block, flash, partition

# What one ring step computes, given the local query chunk(s) and the visiting K/V.
FULL, DIAG, SKIP, KV_FIRST_HALF, Q_SECOND_HALF = range(5)
LAYOUTS = ("zigzag", "contiguous")
WINDOW_ZIGZAG = (
    "a sliding window runs on the contiguous ring only: the zig-zag layout balances "
    "causal work, which a window already bounds per query; use impl='ring' (or "
    "'ulysses')")


@dataclasses.dataclass(frozen=True)
class Ring:
  axis: str
  size: int
  causal: bool
  zigzag: bool
  block_sizes: block.BlockSizes
  backend: str
  window: int | None = None

  def window_steps(self, n: int) -> int:
    """Ring steps a sliding window needs: the own chunk, then each earlier chunk
    of n keys that a query can still reach (W - 1 keys back)."""
    return min(self.size, 1 + block.cdiv(self.window - 1, n))


def step_kinds(ring_causal: bool, zigzag: bool, step) -> tuple[int, int]:
  """(kind when the visiting chunk is from an earlier device, kind when later).

  step may be traced (inside the ring's loop), where it is never 0.
  """
  if not ring_causal:
    return FULL, FULL
  if isinstance(step, int) and step == 0:
    return DIAG, DIAG
  return (KV_FIRST_HALF, Q_SECOND_HALF) if zigzag else (FULL, SKIP)


def step_shape(kind: int, n: int) -> tuple[int, int, bool] | None:
  """(query rows, key rows, causal) that a step of this kind attends; None if none."""
  half = n // 2
  return {FULL: (n, n, False), DIAG: (n, n, True), SKIP: None,
          KV_FIRST_HALF: (n, half, False), Q_SECOND_HALF: (half, n, False)}[kind]


def _by_kind(kinds, later, fn):
  """fn(kind) for this device: a lax.cond only when the two candidates differ."""
  if kinds[0] == kinds[1]:
    return fn(kinds[0])
  return lax.cond(later, lambda: fn(kinds[1]), lambda: fn(kinds[0]))


def _slice(x, start, stop, axis):
  return None if x is None else lax.slice_in_dim(x, start, stop, axis=axis)


def _select(kind, n, q, k, v, q_seg, kv_seg):
  """The inputs a step of `kind` attends, and the first query row they cover."""
  half = n // 2
  if kind == KV_FIRST_HALF:
    k, v, kv_seg = k[:, :, :half], v[:, :, :half], _slice(kv_seg, 0, half, 1)
  if kind == Q_SECOND_HALF:
    return half, q[:, :, half:], k, v, _slice(q_seg, half, n, 1), kv_seg
  return 0, q, k, v, q_seg, kv_seg


def _forward_step(cfg: Ring, kind, q, kv, q_seg, kv_seg):
  """-> (o [b, h, n, d] float32, lse [b, h, n]) of the local queries against kv."""
  b, h, n, d = q.shape
  if kind == SKIP:
    return jnp.zeros((b, h, n, d), jnp.float32), jnp.full((b, h, n), block.NEG)
  row0, q, k, v, q_seg, kv_seg = _select(kind, n, q, kv[0], kv[1], q_seg, kv_seg)
  o, lse = flash.forward(q, k, v, q_seg, kv_seg, causal=kind == DIAG,
                         block_sizes=cfg.block_sizes, out_dtype=jnp.float32,
                         backend=cfg.backend)
  rows = ((0, 0), (0, 0), (row0, 0))  # rows before row0 saw nothing this step
  return jnp.pad(o, rows + ((0, 0),)), jnp.pad(lse, rows, constant_values=block.NEG)


def _backward_step(cfg: Ring, kind, q, kv, q_seg, kv_seg, lse, delta, do):
  """-> float32 (dq [b, h, n, d], dkv [2, b, kvh, n, d]) of this step."""
  n = q.shape[2]
  if kind == SKIP:
    return jnp.zeros(q.shape, jnp.float32), jnp.zeros(kv.shape, jnp.float32)
  row0, qs, k, v, qsg, ksg = _select(kind, n, q, kv[0], kv[1], q_seg, kv_seg)
  rows = slice(row0, n)
  dq, dk, dv = flash.backward(qs, k, v, qsg, ksg, lse[:, :, rows], delta[:, :, rows],
                              do[:, :, rows], causal=kind == DIAG,
                              block_sizes=cfg.block_sizes, backend=cfg.backend)
  dq = jnp.pad(dq, ((0, 0), (0, 0), (row0, 0), (0, 0)))  # zero rows before row0
  dkv = block.pad_axis(jnp.stack([dk, dv]), 3, n)  # zero keys after the first half
  return dq, dkv


def _merge(o, lse, o_step, lse_step):
  """Combines two softmax partials over disjoint key sets through their log-sum-exp."""
  new = jnp.logaddexp(lse, lse_step)
  return (o * jnp.exp(lse - new)[..., None] + o_step * jnp.exp(lse_step - new)[..., None],
          new)


def _shift(cfg: Ring, x, direction: int):
  if x is None:
    return None
  perm = [(i, (i + direction) % cfg.size) for i in range(cfg.size)]
  return lax.ppermute(x, cfg.axis, perm)


def _rotate(cfg: Ring, direction: int, kv, kv_seg, compute, carry):
  """carry = compute(step, kv, kv_seg, carry) for each K/V chunk as it arrives.

  Each hop to the next chunk is issued before computing on the current one, so the
  two can overlap; P-1 hops in all. Steps 1..P-2 run as one rolled loop: unrolled,
  XLA keeps every step's buffers apart and memory grows with P, i.e. O(N) per
  device instead of O(N/P). Step 0 has its own kind (the diagonal) and the last
  step sends nothing, so both sit outside the loop.
  """
  def hop_and_compute(step, state):
    kv, kv_seg, carry = state
    arriving = (_shift(cfg, kv, direction), _shift(cfg, kv_seg, direction))
    return (*arriving, compute(step, kv, kv_seg, carry))

  if cfg.size == 1:
    return compute(0, kv, kv_seg, carry)
  state = hop_and_compute(0, (kv, kv_seg, carry))
  state = lax.fori_loop(1, cfg.size - 1, hop_and_compute, state)
  return compute(cfg.size - 1, *state)


def _ring_forward(cfg: Ring, q, k, v, seg):
  """Kernel layout, per device -> (o [b, h, n, d] float32, lse [b, h, n])."""
  r = lax.axis_index(cfg.axis)

  def compute(step, kv, kv_seg, carry):
    src = (r - step) % cfg.size  # K/V move to the next device each hop
    o_step, lse_step = _by_kind(
        step_kinds(cfg.causal, cfg.zigzag, step), src > r,
        lambda kind: _forward_step(cfg, kind, q, kv, seg, kv_seg))
    return _merge(*carry, o_step, lse_step)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], block.NEG))
  return _rotate(cfg, +1, jnp.stack([k, v]), seg, compute, init)  # kv [2, b, kvh, n, d]


def _ring_backward(cfg: Ring, q, k, v, seg, o, lse, do):
  """Reverse ring -> float32 (dq, dk, dv); dK/dV accumulators travel with K/V."""
  r = lax.axis_index(cfg.axis)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)

  def compute(step, kv, kv_seg, carry):
    dq, dkv = carry
    src = (r + step) % cfg.size  # K/V move to the previous device each hop
    dq_step, dkv_step = _by_kind(
        step_kinds(cfg.causal, cfg.zigzag, step), src > r,
        lambda kind: _backward_step(cfg, kind, q, kv, seg, kv_seg, lse, delta, do))
    # The accumulator follows its chunk; after the last step one hop takes it home.
    return dq + dq_step, _shift(cfg, dkv + dkv_step, -1)

  kv = jnp.stack([k, v])
  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(kv.shape, jnp.float32))
  dq, dkv = _rotate(cfg, -1, kv, seg, compute, init)
  return dq, dkv[0], dkv[1]


def _window_forward(cfg: Ring, q, k, v, seg):
  """Sliding-window ring, kernel layout, per device -> (o float32, lse).

  Natural order only. At step t device r holds the K/V of device r - t: offset
  t*n from its queries, so the flash kernels mask and skip by distance. Only
  `window_steps` steps run: K/V travel t hops, not P - 1, and chunks wrapped round
  from later devices (r < t) are skipped.
  """
  n = q.shape[2]
  r = lax.axis_index(cfg.axis)
  kv, kv_seg = jnp.stack([k, v]), seg  # [2, b, kvh, n, d]
  o, lse = jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], block.NEG)
  for t in range(cfg.window_steps(n)):
    if t:
      kv, kv_seg = _shift(cfg, kv, +1), _shift(cfg, kv_seg, +1)
    o_t, lse_t = lax.cond(
        r >= t,
        lambda kv=kv, kv_seg=kv_seg, t=t: flash.forward(
            q, kv[0], kv[1], seg, kv_seg, causal=True, block_sizes=cfg.block_sizes,
            out_dtype=jnp.float32, backend=cfg.backend, window=cfg.window,
            offset=t * n),
        lambda: (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], block.NEG)))
    o, lse = _merge(o, lse, o_t, lse_t)
  return o, lse


def _window_backward(cfg: Ring, q, k, v, seg, o, lse, do):
  """The windowed ring's gradients: K/V travel forward again, each device adds its
  dK/dV for the visiting chunk to an accumulator travelling with it, and one
  permute of t - 1 hops back takes every accumulator home."""
  n = q.shape[2]
  r = lax.axis_index(cfg.axis)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  kv, kv_seg = jnp.stack([k, v]), seg
  dq, dkv = jnp.zeros(q.shape, jnp.float32), jnp.zeros(kv.shape, jnp.float32)
  steps = cfg.window_steps(n)
  for t in range(steps):
    if t:
      kv, kv_seg, dkv = (_shift(cfg, kv, +1), _shift(cfg, kv_seg, +1),
                         _shift(cfg, dkv, +1))

    def visit(kv=kv, kv_seg=kv_seg, t=t):
      dq_t, dk_t, dv_t = flash.backward(
          q, kv[0], kv[1], seg, kv_seg, lse, delta, do, causal=True,
          block_sizes=cfg.block_sizes, backend=cfg.backend, window=cfg.window,
          offset=t * n)
      return dq_t, jnp.stack([dk_t, dv_t])

    dq_t, dkv_t = lax.cond(r >= t, visit, lambda: (jnp.zeros(q.shape, jnp.float32),
                                                   jnp.zeros(kv.shape, jnp.float32)))
    dq, dkv = dq + dq_t, dkv + dkv_t
  if steps > 1:
    dkv = _shift(cfg, dkv, 1 - steps)
  return dq, dkv[0], dkv[1]


def _to_kernel(x):
  return jnp.swapaxes(x, 1, 2)  # [b, n, heads, d] <-> [b, heads, n, d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: Ring, q, k, v, seg):
  return _ring_fwd(cfg, q, k, v, seg)[0]


def _ring_fwd(cfg: Ring, q, k, v, seg):
  qt, kt, vt = _to_kernel(q), _to_kernel(k), _to_kernel(v)
  forward = _window_forward if cfg.window else _ring_forward
  o, lse = forward(cfg, qt, kt, vt, seg)
  o, lse = flash.name_residuals(o.astype(q.dtype), lse)
  return _to_kernel(o), (qt, kt, vt, seg, o, lse)


def _ring_bwd(cfg: Ring, residuals, do):
  qt, kt, vt, seg, o, lse = residuals
  backward = _window_backward if cfg.window else _ring_backward
  dq, dk, dv = backward(cfg, qt, kt, vt, seg, o, lse, _to_kernel(do))
  return (_to_kernel(dq).astype(qt.dtype), _to_kernel(dk).astype(kt.dtype),
          _to_kernel(dv).astype(vt.dtype), None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def attention(q, k, v, *, causal: bool = True, segment_ids=None, block_sizes=None,
              layout: str = "contiguous", backend: str = "auto",
              axes: partition.Axes = partition.DEFAULT_AXES,
              window: int | None = None):
  """Ring attention over the mesh axis the length is split over (`axes`, from the
  rules; by default `sequence`).

  q [b, l, h, d]; k, v [b, l, kvh, d]; segment_ids [b, l]. layout="contiguous" (the
  default) takes the natural order and, when causal, leaves the last device the most
  work. With layout="zigzag" the length axis must already be in zig-zag order
  (`kernels.zigzag_permute(x, sequence)`), and so must positions and segment ids;
  natural-order input then gives wrong causal results. The output is in the same
  order as the input. A sliding `window` (causal, contiguous layout) visits only
  the chunks within reach of it (`Ring.window_steps`).
  """
  window, block_sizes = flash.check_inputs(q, k, v, segment_ids, causal=causal,
                                           window=window, block_sizes=block_sizes)
  if layout not in LAYOUTS:
    raise ValueError(f"ring layout {layout!r} is not one of {LAYOUTS}")
  if window is not None and layout == "zigzag":
    raise ValueError(WINDOW_ZIGZAG)
  mesh = partition.context_mesh()
  axis = partition.sequence_axis(mesh, axes) if mesh is not None else None
  if axis is None:
    raise ValueError(partition.no_sequence_axis("ring", axes))
  size = partition.sequence_size(mesh, axes)
  zigzag = causal and layout == "zigzag"
  chunks = 2 * size if zigzag else size
  if q.shape[1] % chunks:
    raise ValueError(f"ring attention with {axis}={size} ({layout}) cuts the length "
                     f"into {chunks} chunks, but length={q.shape[1]} is not a multiple "
                     f"of {chunks}")
  cfg = Ring(axis, size, causal, zigzag, block_sizes, backend, window)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  return partition.shard(functools.partial(_ring, cfg), mesh, q, k, v, segment_ids,
                         split_length=True, axes=axes)


def blocks_per_step(size: int, length: int, *, causal: bool, layout: str,
                    block_sizes) -> list[list[int]]:
  """Tiles each device computes at each step: [device][step], per (batch, head).

  Uses the same step rule (`step_kinds`, `step_shape`) the ring executes and the
  flash kernels' causal tile skipping, so it is the ring's real cost model.
  """
  sizes = block.BlockSizes.of(block_sizes)
  n = length // size
  zigzag = causal and layout == "zigzag"
  table = []
  for r in range(size):
    row = []
    for step in range(size):
      src = (r - step) % size
      shape = step_shape(step_kinds(causal, zigzag, step)[int(src > r)], n)
      row.append(0 if shape is None else block.count_blocks(
          shape[0], shape[1], causal=shape[2], block_q=min(sizes.block_q, shape[0]),
          block_kv=min(sizes.block_kv, shape[1])))
    table.append(row)
  return table
