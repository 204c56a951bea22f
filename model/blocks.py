"""A transformer layer's modules, and the three residual dataflows that wire them.

Write attention as A and the MLP as M, and r for the residual stream.

- standard: r += A(norm(r)); r += M(norm(r))
- parallel: h = norm(r); r += A(h) + M(h)        (one all-reduce per layer under TP)
- ladder:   each module reads the stream one module late (Ladder Residual), so the
            all-reduce of one module's output overlaps the next module's compute.
            The carry is (r, a, m): r holds everything but the previous layer's
            attention output a and MLP output m, which are still in flight.

In a mixture-of-experts model M is an MoE layer (model/moe.py) in every
`moe.every_k_layers`-th layer; the dataflows do not change. With k > 1 a `Unit`
(k-1 dense blocks, then one MoE block) is what the decoder stacks and scans.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from model.attention import Attention
from model.config import ModelConfig
from model.mlp import MLP
from model.moe import MoE
from model.norms import RMSNorm


class Block(nnx.Module):
  """One layer's parameters. `parallel` blocks share a single pre-norm; with
  `moe` the MLP is a mixture of experts."""

  def __init__(self, cfg: ModelConfig, *, constrain, rngs: nnx.Rngs,
               moe: bool = False):
    norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                           param_dtype=cfg.params_dtype)
    self.attn_norm = norm()
    self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          rope=cfg.rotary, init_std=cfg.init_std,
                          impl=cfg.attention, dtype=cfg.dtype,
                          param_dtype=cfg.params_dtype, constrain=constrain,
                          rngs=rngs, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                          norm_eps=cfg.norm_eps, window=cfg.sliding_window or None,
                          block_sizes=cfg.attention_block_sizes)
    self.mlp_norm = norm() if cfg.block != "parallel" else None
    self.mlp = MoE(cfg, constrain=constrain, rngs=rngs) if moe else MLP(
        cfg.d_model, cfg.d_ff, init_std=cfg.init_std, dtype=cfg.dtype,
        param_dtype=cfg.params_dtype, constrain=constrain, rngs=rngs)
    self.constrain = constrain

  def residual(self, x: jax.Array) -> jax.Array:
    return self.constrain(x, ("batch", "length", "act_embed"))


@dataclasses.dataclass(frozen=True)
class Context:
  """Per-call inputs every layer reads: positions and segment ids [batch, length],
  whether a KV cache is being filled from position 0 (prefill), and the token mask
  [batch, length] (False at padding; MoE layers route only the other tokens) or
  None."""
  positions: jax.Array
  segment_ids: jax.Array | None
  prefill: bool = False
  mask: jax.Array | None = None


def _attend(block: Block, h: jax.Array, ctx: Context, cache):
  if cache is None:
    return block.attn(h, ctx.positions, ctx.segment_ids), None
  kv, layer = cache
  return block.attn.cached(h, ctx.positions, kv, layer, ctx.prefill)


def _mlp(block: Block, h: jax.Array, ctx: Context, after=None) -> jax.Array:
  if isinstance(block.mlp, MoE):
    return block.mlp(h, after, mask=ctx.mask)
  return block.mlp(h, after)


# Each dataflow: (block, carry, cache, ctx) -> (carry, cache), where cache is None
# or (the KVCache of all layers, this layer's index) and comes back as the new
# KVCache.

def standard(block: Block, x: jax.Array, cache, ctx: Context):
  """x: [batch, length, embed] -> same."""
  a, cache = _attend(block, block.attn_norm(x), ctx, cache)
  x = block.residual(x + a)
  return block.residual(x + _mlp(block, block.mlp_norm(x), ctx)), cache


def parallel(block: Block, x: jax.Array, cache, ctx: Context):
  h = block.attn_norm(x)
  a, cache = _attend(block, h, ctx, cache)
  return block.residual(x + a + _mlp(block, h, ctx)), cache


def ladder(block: Block, carry, cache, ctx: Context):
  """carry (r, a_prev, m_prev) -> (r', a, m); each is [batch, length, embed].

  Attention of this layer sees attention outputs up to the previous layer and MLP
  outputs up to the one before; the MLP sees every earlier output except this
  layer's attention. `a_prev` and `m_prev` are first consumed here, one module
  after they were produced, which is what lets their all-reduces overlap.
  """
  r, a_prev, m_prev = carry
  r = block.residual(r + a_prev)
  a, cache = _attend(block, block.attn_norm(r), ctx, cache)
  a = block.residual(a)  # reduced here (not left partial), so `after` orders it
  r = block.residual(r + m_prev)
  m = _mlp(block, block.mlp_norm(r), ctx, after=a)
  return (r, a, m), cache


RESIDUAL = {"standard": standard, "parallel": parallel, "ladder": ladder}


class Unit(nnx.Module):
  """cfg.unit consecutive layers of an MoE model with every_k_layers = k > 1: k-1
  dense blocks (stacked on a leading axis) and then one MoE block. The decoder
  scans units, so every scanned step has the same parameter structure."""

  def __init__(self, cfg: ModelConfig, *, constrain, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=cfg.unit - 1)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def dense(rngs):
      return Block(cfg, constrain=constrain, rngs=rngs)

    self.dense = dense(rngs)
    self.moe = Block(cfg, constrain=constrain, rngs=rngs, moe=True)
    self.size = cfg.unit


def through_unit(dataflow, unit: Unit, carry, cache, ctx: Context):
  """Runs `dataflow` through a unit's layers in order. cache is None or (kv, u)
  for unit u, whose layers are u * size + j."""
  graphdef, state = nnx.split(unit.dense)
  layers = [nnx.merge(graphdef, jax.tree.map(lambda p, j=j: p[j], state))
            for j in range(unit.size - 1)] + [unit.moe]
  for j, block in enumerate(layers):
    layer_cache = None if cache is None else (cache[0], cache[1] * unit.size + j)
    carry, kv = dataflow(block, carry, layer_cache, ctx)
    cache = None if cache is None else (kv, cache[1])
  return carry, None if cache is None else cache[0]


def moe_stats(layer) -> dict | None:
  """The router statistics a scanned step (Block or Unit) recorded, if it has an
  MoE layer."""
  mlp = (layer.moe if isinstance(layer, Unit) else layer).mlp
  return mlp.stats.get_value() if isinstance(mlp, MoE) else None
