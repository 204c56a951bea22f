"""The preallocated KV cache, sharded by the model's own logical rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

import sharding
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
                 mesh=None) -> jax.ShapeDtypeStruct:
  """Shape, dtype and (with a mesh) sharding of the K or the V cache:
  [layers, batch, max_length, kv_heads, head_dim] in the compute dtype, batch over
  the data axes and kv_heads over `tensor`."""
  shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
  if mesh is None:
    return jax.ShapeDtypeStruct(shape, cfg.dtype)
  spec = sharding.logical_to_spec(CACHE_AXES, rules, mesh, shape)
  return jax.ShapeDtypeStruct(shape, cfg.dtype, sharding=NamedSharding(mesh, spec))


def init_cache(model: Decoder, batch: int, max_length: int):
  """Zeroed (k, v), laid out as `cache_struct` says, on the model's mesh."""
  s = cache_struct(model.cfg, batch, max_length, model.constrain.rules,
                   mesh_of(model))
  zeros = lambda: jnp.zeros(s.shape, s.dtype, device=s.sharding)
  return zeros(), zeros()


def split_cache(cache, unit: int = 1) -> list:
  """The decode loop's private form of a stacked (k, v): one (k, v) per scanned
  step of `unit` layers, each [unit, batch, kv_heads, max_len, head_dim], the
  cache `Decoder(..., layers=...)` takes. Made once per generation, before the
  token loop (kernels/cached.py says why heads-major)."""
  k, v = (jnp.swapaxes(c, 2, 3) for c in cache)
  return [(k[i:i + unit], v[i:i + unit]) for i in range(0, k.shape[0], unit)]
