"""A model's FLOPs per token in the PaLM convention (Chowdhery et al. 2022, App. B):
what MFU (train/metrics.py) and the compile report (aot/compile.py) count."""

from __future__ import annotations

from model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls for one token: every projection and the
  LM head (tied or not); not the embedding lookup, not norm scales.

  An MoE layer counts its *active* parameters: the router, the top_k experts a
  token goes through and the shared expert, not the experts it skips. So 6N stays
  the FLOPs of a token's forward and backward, and MFU is not inflated by idle
  experts. (Capacity padding and dropped pairs are ignored: the count is of useful
  work at the configured top_k.)
  """
  attn = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * cfg.d_model * cfg.d_ff
  moe = cfg.moe
  moe_layers = cfg.num_layers // cfg.unit if moe.num_experts else 0
  active = (cfg.d_model * moe.num_experts + moe.top_k * mlp
            + (mlp if moe.shared_expert else 0))
  return (cfg.num_layers * attn + (cfg.num_layers - moe_layers) * mlp
          + moe_layers * active + cfg.d_model * cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Training FLOPs per token: 6N + 12·L·H·Q·T, the attention term halved for a
  causal mask (only the lower triangle of scores is needed)."""
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6 * matmul_params(cfg) + attention * (0.5 if causal else 1.0)


def decode_flops_per_token(cfg: ModelConfig, cache_len: int) -> float:
  """Forward FLOPs of one new token attending over a cache of `cache_len`
  positions: 2N + 4·L·H·Q·T (scores and weighted values over the whole cache)."""
  return (2 * matmul_params(cfg)
          + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * cache_len)
