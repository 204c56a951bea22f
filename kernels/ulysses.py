"""DeepSpeed-Ulysses sequence parallelism over the mesh axis the length is split
over (`sequence` by default).

Each device holds a length chunk of every head. One all-to-all per input regroups
that into the full length of heads/P heads; attention is then purely local (flash),
and one all-to-all takes the output back to length chunks. Forward: four
all-to-alls (q, k, v, o); the backward pass is their transpose, four more. Heads per
device must divide by the sequence size; K/V heads that are fewer than the sequence
size are repeated just enough that each device receives the one its query heads use.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from kernels import flash, partition


def check(mesh, heads: int, kv_heads: int,
          axes: partition.Axes = partition.DEFAULT_AXES) -> str | None:
  """None if Ulysses can move the query and K/V heads each device holds (as
  `partition.split_heads` splits them over the head axes) over the mesh's
  sequence axis, else the reason. The one statement of the rule: the kernel and
  config validation (`train/validate.py`) both ask it."""
  size = partition.sequence_size(mesh, axes)
  split = partition.split_heads(mesh, heads, kv_heads, axes, size)
  h, kvh = split.heads, split.kv_heads
  if h % size:
    return (f"ulysses splits heads over the sequence axis, but heads per device "
            f"({h} = heads {heads} / {heads // h}) is not a multiple of "
            f"sequence={size}")
  if kvh % size and size % kvh:
    return (f"ulysses cannot share kv_heads per device ({kvh}) over sequence={size}: "
            f"one must divide the other")
  return None


def _local(q, k, v, seg, *, axis: str, size: int, causal: bool, block_sizes,
           backend: str, window: int | None):
  """Per device: [b, n, h, d] chunks -> all-to-all -> local flash -> all-to-all."""
  if k.shape[2] % size:  # e.g. 2 KV heads on 4 devices: each device needs one
    k = jnp.repeat(k, size // k.shape[2], axis=2)
    v = jnp.repeat(v, size // v.shape[2], axis=2)
  to_heads = functools.partial(lax.all_to_all, axis_name=axis, split_axis=2,
                               concat_axis=1, tiled=True)
  q, k, v = to_heads(q), to_heads(k), to_heads(v)  # [b, n*P, h/P, d]
  if seg is not None:
    seg = lax.all_gather(seg, axis, axis=1, tiled=True)  # [b, n*P]
  o = flash.attention(q, k, v, causal=causal, segment_ids=seg, block_sizes=block_sizes,
                      backend=backend, window=window)
  return lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)


def attention(q, k, v, *, causal: bool = True, segment_ids=None, block_sizes=None,
              backend: str = "auto", axes: partition.Axes = partition.DEFAULT_AXES,
              window: int | None = None):
  """Ulysses attention over the mesh axis the length is split over (natural order;
  `axes` from the rules, by default `sequence`).

  q [b, l, h, d]; k, v [b, l, kvh, d]; segment_ids [b, l] -> [b, l, h, d]. Each
  device attends over the whole length for its heads, so a sliding `window` is the
  local flash kernel's.
  """
  window, block_sizes = flash.check_inputs(q, k, v, segment_ids, causal=causal,
                                           window=window, block_sizes=block_sizes)
  mesh = partition.context_mesh()
  axis = partition.sequence_axis(mesh, axes) if mesh is not None else None
  if axis is None:
    raise ValueError(partition.no_sequence_axis("ulysses", axes))
  problem = check(mesh, q.shape[2], k.shape[2], axes)
  if problem:
    raise ValueError(f"{problem}; use attention='ring' or another sequence size")
  size = partition.sequence_size(mesh, axes)
  if q.shape[1] % size:
    raise ValueError(f"length={q.shape[1]} is not a multiple of {axis}={size}")
  fn = functools.partial(_local, axis=axis, size=size, causal=causal,
                         block_sizes=block_sizes, backend=backend, window=window)
  return partition.shard(fn, mesh, q, k, v, segment_ids, split_length=True,
                         axes=axes, regroup=size)
