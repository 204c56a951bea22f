"""The preallocated KV cache (`kernels.cached.KVCache`), sharded by the model's own
logical rules."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

import sharding
from sharding.report import count
from kernels.cached import KVCache
from model import Decoder, ModelConfig

# [layers, batch, max_length, kv_heads, head_dim]
CACHE_AXES = ("layers", "batch", None, "act_kv_heads", None)


def mesh_of(model: Decoder):
  """The mesh the model's parameters live on, or None (single device)."""
  s = getattr(model.embed.table[...], "sharding", None)
  return s.mesh if isinstance(s, NamedSharding) else None


def split_size(model: Decoder, name: str) -> int:
  """The product of the mesh axes the model's rules split the logical axis `name`
  over (1 without a mesh): a dimension of a multiple of it splits evenly. Read
  from the rules, so a plan that maps `batch` or `length` elsewhere needs no change
  here."""
  mesh = mesh_of(model)
  if mesh is None:
    return 1
  spec = sharding.logical_to_spec((name,), model.constrain.rules, mesh)
  axes = spec[0] if len(spec) else None
  return 1 if axes is None else sharding.axis_size(mesh, axes)


def cache_struct(cfg: ModelConfig, batch: int, max_length: int, rules=(),
                 mesh=None) -> KVCache:
  """The abstract cache (ShapeDtypeStructs, sharded with a mesh): k and v
  [layers, batch, max_length, kv_heads, head_dim] position-major in the compute
  dtype, batch and kv_heads split as the rules say; lengths [batch] int32."""
  shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
  if mesh is None:
    kv = jax.ShapeDtypeStruct(shape, cfg.dtype)
    return KVCache(kv, kv, jax.ShapeDtypeStruct((batch,), jnp.int32))
  spec = sharding.logical_to_spec(CACHE_AXES, rules, mesh, shape)
  rows = sharding.logical_to_spec(("batch",), rules, mesh, (batch,))
  kv = jax.ShapeDtypeStruct(shape, cfg.dtype, sharding=NamedSharding(mesh, spec))
  return KVCache(kv, kv, jax.ShapeDtypeStruct((batch,), jnp.int32,
                                              sharding=NamedSharding(mesh, rows)))


class CacheDoesNotFit(ValueError):
  """The cache asked for is larger than the memory free to hold it.

  `length`: the positions per row asked for. `positions`: the most positions per
  row that fit with the rows asked for (0 when not even one does). `rows`: the
  most rows of `length` positions that fit, a multiple of `split`, the devices
  the batch is split over (0 when not even one row per device does).
  `positions_alone`: the most positions per row with one row per device."""

  def __init__(self, message: str, *, length: int, positions: int, rows: int,
               split: int, positions_alone: int):
    self.length, self.positions, self.rows = length, positions, rows
    self.split, self.positions_alone = split, positions_alone
    super().__init__(message)


def init_cache(model: Decoder, batch: int, max_length: int) -> KVCache:
  """An empty stacked cache (zeros, lengths 0), laid out as `cache_struct` says,
  on the model's mesh (`infer.decode.init_decode_cache` makes generate's, in
  the decode form). Raises CacheDoesNotFit (a ValueError) before allocating a cache larger
  than the memory its devices have free."""
  s = check_cache(model, batch, max_length)
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), s)


def check_cache(model: Decoder, batch: int, max_length: int) -> KVCache:
  """The abstract cache `init_cache` would make, after `check_fits` on the model's
  devices: raises CacheDoesNotFit where it would, allocating nothing."""
  mesh = mesh_of(model)
  s = cache_struct(model.cfg, batch, max_length, model.constrain.rules, mesh)
  check_fits(s, jax.devices()[:1] if mesh is None else list(mesh.devices.flat))
  return s


def check_fits(cache: KVCache, devices) -> None:
  """Raises CacheDoesNotFit when k and v of the abstract `cache` need
  more bytes per device than this process's first device of `devices` has free
  (its allocator's limit less what is in use; CPU devices share the host's
  available memory, so there the bytes of each of this process's devices count).
  Says nothing where the free memory is unknown."""
  kv = cache.k
  shard = kv.sharding.shard_shape(kv.shape) if kv.sharding is not None else kv.shape
  per_device = 2 * math.prod(shard) * jnp.dtype(kv.dtype).itemsize  # k, v
  local = [d for d in devices if d.process_index == jax.process_index()]
  if not local:
    return
  device = local[0]
  free, holders = _free_bytes(device), len(local) if device.platform == "cpu" else 1
  if free is None or per_device * holders <= free:
    return
  layers, batch, length, heads, head_dim = kv.shape
  per_row = shard[1]  # rows one device holds
  split = batch // per_row  # devices the rows are split over
  capacity = int(free / holders // (per_device / (length * per_row)))  # row-positions
  positions = capacity // per_row
  fitting_rows = capacity // length * split
  rows = count(batch, "row") + (
      f" (the prompts padded to a multiple of the {split} devices the batch is "
      "split over)" if split > 1 else "")
  raise CacheDoesNotFit(
      f"the KV cache for {rows} of {count(length, 'position')} ({count(layers, 'layer')}"
      f" x {heads} kv heads x {head_dim} x k and v in {jnp.dtype(kv.dtype).name}"
      f") takes {per_device * holders / 2**30:.2f} GiB on {device.platform} "
      f"{'host memory' if holders > 1 else 'device ' + str(device.id)}, which has "
      f"{free / 2**30:.2f} GiB free: at most {count(positions, 'position')} per row fit"
      + (f", or {count(fitting_rows, 'row')} of {length}"
         if fitting_rows else "")
      + "; ask for fewer new tokens or fewer rows.", length=length,
      positions=positions, rows=fitting_rows, split=split, positions_alone=capacity)


def _free_bytes(device) -> int | None:
  """Bytes free on `device`: its allocator's limit less what is in use, or for a
  CPU device the host's available memory; None where neither is known."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends do not implement it
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform != "cpu":
    return None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None
