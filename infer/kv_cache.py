"""The preallocated KV cache (`kernels.cached.KVCache`), sharded by the model's own
logical rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

import sharding
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


def init_cache(model: Decoder, batch: int, max_length: int) -> KVCache:
  """An empty cache (zeros, lengths 0), laid out as `cache_struct` says, on the
  model's mesh."""
  s = cache_struct(model.cfg, batch, max_length, model.constrain.rules,
                   mesh_of(model))
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), s)
