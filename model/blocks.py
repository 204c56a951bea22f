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


def standard(block: Block, x: jax.Array, positions, segment_ids) -> jax.Array:
  """x: [batch, length, embed] -> same."""
  x = block.residual(x + block.attn(block.attn_norm(x), positions, segment_ids))
  return block.residual(x + block.mlp(block.mlp_norm(x)))


def parallel(block: Block, x: jax.Array, positions, segment_ids) -> jax.Array:
  h = block.attn_norm(x)
  return block.residual(x + block.attn(h, positions, segment_ids) + block.mlp(h))


def ladder(block: Block, carry, positions, segment_ids):
  """carry (r, a_prev, m_prev) -> (r', a, m); each is [batch, length, embed].

  Attention of this layer sees attention outputs up to the previous layer and MLP
  outputs up to the one before; the MLP sees every earlier output except this
  layer's attention. `a_prev` and `m_prev` are first consumed here, one module
  after they were produced, which is what lets their all-reduces overlap.
  """
  r, a_prev, m_prev = carry
  r = block.residual(r + a_prev)
  a = block.attn(block.attn_norm(r), positions, segment_ids)
  r = block.residual(r + m_prev)
  m = block.mlp(block.mlp_norm(r))
  return r, a, m


RESIDUAL = {"standard": standard, "parallel": parallel, "ladder": ladder}
