"""A transformer layer's modules, and the three residual dataflows that wire them.

Write attention as A and the MLP as M, and r for the residual stream.

- standard: r += A(norm(r)); r += M(norm(r))
- parallel: h = norm(r); r += A(h) + M(h)        (one all-reduce per layer under TP)
- ladder:   each module reads the stream one module late (Ladder Residual), so the
            all-reduce of one module's output overlaps the next module's compute.
            The carry is (r, a, m): r holds everything but the previous layer's
            attention output a and MLP output m, which are still in flight.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from model.attention import Attention
from model.config import ModelConfig
from model.mlp import MLP
from model.norms import RMSNorm


class Block(nnx.Module):
  """One layer's parameters. `parallel` blocks share a single pre-norm."""

  def __init__(self, cfg: ModelConfig, *, constrain, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                           param_dtype=cfg.params_dtype)
    self.attn_norm = norm()
    self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          rope_theta=cfg.rope_theta, init_std=cfg.init_std,
                          impl=cfg.attention, dtype=cfg.dtype,
                          param_dtype=cfg.params_dtype, constrain=constrain,
                          rngs=rngs)
    self.mlp_norm = norm() if cfg.block != "parallel" else None
    self.mlp = MLP(cfg.d_model, cfg.d_ff, init_std=cfg.init_std, dtype=cfg.dtype,
                   param_dtype=cfg.params_dtype, constrain=constrain, rngs=rngs)
    self.constrain = constrain

  def residual(self, x: jax.Array) -> jax.Array:
    return self.constrain(x, ("batch", "length", "act_embed"))


@dataclasses.dataclass(frozen=True)
class Context:
  """Per-call inputs every layer reads: positions and segment ids [batch, length],
  and whether a KV cache is being filled from position 0 (prefill)."""
  positions: jax.Array
  segment_ids: jax.Array | None
  prefill: bool = False


def _attend(block: Block, h: jax.Array, ctx: Context, cache):
  if cache is None:
    return block.attn(h, ctx.positions, ctx.segment_ids), None
  return block.attn(h, ctx.positions, ctx.segment_ids, cache, ctx.prefill)


# Each dataflow: (block, carry, cache, ctx) -> (carry, cache), where cache is None
# or ((k, v) for all layers, this layer's index) and comes back as the new (k, v).

def standard(block: Block, x: jax.Array, cache, ctx: Context):
  """x: [batch, length, embed] -> same."""
  a, cache = _attend(block, block.attn_norm(x), ctx, cache)
  x = block.residual(x + a)
  return block.residual(x + block.mlp(block.mlp_norm(x))), cache


def parallel(block: Block, x: jax.Array, cache, ctx: Context):
  h = block.attn_norm(x)
  a, cache = _attend(block, h, ctx, cache)
  return block.residual(x + a + block.mlp(h)), cache


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
  m = block.mlp(block.mlp_norm(r), after=a)
  return (r, a, m), cache


RESIDUAL = {"standard": standard, "parallel": parallel, "ladder": ladder}
