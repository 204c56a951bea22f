"""The preallocated KV cache, sharded by the model's own logical rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

import sharding
from model import Decoder

# [layers, batch, max_length, kv_heads, head_dim]
CACHE_AXES = ("layers", "batch", None, "act_kv_heads", None)


def mesh_of(model: Decoder):
  """The mesh the model's parameters live on, or None (single device)."""
  s = getattr(model.embed.table[...], "sharding", None)
  return s.mesh if isinstance(s, NamedSharding) else None


def init_cache(model: Decoder, batch: int, max_length: int):
  """Zeroed (k, v), each [layers, batch, max_length, kv_heads, head_dim] in the
  compute dtype: batch over the data axes and kv_heads over `tensor`."""
  cfg = model.cfg
  shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
  mesh = mesh_of(model)
  if mesh is None:
    make = lambda: jnp.zeros(shape, cfg.dtype)
    return make(), make()
  spec = sharding.logical_to_spec(CACHE_AXES, model.constrain.rules, mesh, shape)
  make = jax.jit(lambda: jnp.zeros(shape, cfg.dtype),
                 out_shardings=NamedSharding(mesh, spec))
  return make(), make()
