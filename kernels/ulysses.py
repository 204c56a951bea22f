"""DeepSpeed-Ulysses sequence parallelism over the `sequence` mesh axis.

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


def local_heads(mesh, heads: int, kv_heads: int) -> tuple[int, int]:
  """Heads and KV heads per device before the all-to-all (after tensor sharding)."""
  t = 1
  for a in partition.head_axes(mesh, heads, kv_heads):
    t *= mesh.shape[a]
  return heads // t, kv_heads // t


def check(mesh, heads: int, kv_heads: int) -> str | None:
  """None if Ulysses can split these heads over the sequence axis, else the reason."""
  size = partition.sequence_size(mesh)
  h, kvh = local_heads(mesh, heads, kv_heads)
  if h % size:
    return (f"ulysses splits heads over the sequence axis, but heads per device "
            f"({h} = heads {heads} / tensor) is not a multiple of sequence={size}; "
            f"use attention='ring' or a sequence size that divides {h}")
  if kvh % size and size % kvh:
    return (f"ulysses cannot share kv_heads per device ({kvh}) over sequence={size}: "
            f"one must divide the other")
  return None


def _local(q, k, v, seg, *, size: int, causal: bool, block_sizes, backend: str):
  """Per device: [b, n, h, d] chunks -> all-to-all -> local flash -> all-to-all."""
  axis = partition.SEQUENCE
  if k.shape[2] % size:  # e.g. 2 KV heads on 4 devices: each device needs one
    k = jnp.repeat(k, size // k.shape[2], axis=2)
    v = jnp.repeat(v, size // v.shape[2], axis=2)
  to_heads = functools.partial(lax.all_to_all, axis_name=axis, split_axis=2,
                               concat_axis=1, tiled=True)
  q, k, v = to_heads(q), to_heads(k), to_heads(v)  # [b, n*P, h/P, d]
  if seg is not None:
    seg = lax.all_gather(seg, axis, axis=1, tiled=True)  # [b, n*P]
  o = flash.attention(q, k, v, causal=causal, segment_ids=seg, block_sizes=block_sizes,
                      backend=backend)
  return lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)


def attention(q, k, v, *, causal: bool = True, segment_ids=None, block_sizes=None,
              backend: str = "auto"):
  """Ulysses attention over the context mesh's `sequence` axis (natural order).

  q [b, l, h, d]; k, v [b, l, kvh, d]; segment_ids [b, l] -> [b, l, h, d].
  """
  flash.check_shapes(q, k, v, segment_ids)
  mesh = partition.context_mesh()
  if mesh is None or partition.SEQUENCE not in mesh.axis_names:
    raise ValueError("ulysses attention needs a mesh with a 'sequence' axis set with "
                     "jax.set_mesh(...)")
  problem = check(mesh, q.shape[2], k.shape[2])
  if problem:
    raise ValueError(problem)
  size = partition.sequence_size(mesh)
  if q.shape[1] % size:
    raise ValueError(f"length={q.shape[1]} is not a multiple of sequence={size}")
  fn = functools.partial(_local, size=size, causal=causal, block_sizes=block_sizes,
                         backend=backend)
  return partition.shard(fn, mesh, q, k, v, segment_ids, split_length=True)
