"""Rotary position embeddings, rotate-half layout (the layout HF Llama uses), with
the frequency scalings released checkpoints use.

RoPE (Su et al. 2021, arXiv 2104.09864) rotates the pair (i, i + d/2) of each
head's d = head_dim features by the angle `position * inv_freq[i]`, where
inv_freq[i] = theta^(-2i/d), i in [0, d/2). The variants below change only
`inv_freq` (and, for yarn, scale cos/sin):

- `default`: inv_freq as above.
- `linear`: position interpolation (Chen et al. 2023, arXiv 2306.15595): positions
  are divided by `factor`, i.e. inv_freq / factor.
- `llama3`: Meta's Llama 3.1 frequency-dependent scaling. With wavelength
  w = 2π / inv_freq and L = original_max_positions: w < L / high_freq_factor (high
  frequencies) is kept, w > L / low_freq_factor (low frequencies) is divided by
  `factor`, and in between inv_freq is interpolated, (1 - s) inv_freq / factor +
  s inv_freq with s = (L / w - low_freq_factor) / (high_freq_factor -
  low_freq_factor).
- `yarn`: YaRN (Peng et al. 2023, arXiv 2309.00071), "NTK-by-parts"
  interpolation: dimension i is interpolated (inv_freq / factor) below a ramp and
  extrapolated (kept) above it. The ramp runs linearly between dims
  low = floor(D(beta_fast)) and high = ceil(D(beta_slow)) (clipped to [0, d-1]),
  where D(r) = d ln(L / (2π r)) / (2 ln theta) is the dimension that turns r times
  over the original context L. Attention is sharpened by multiplying cos and sin by
  `attention_factor` (so q·k by its square); unset, it is the paper's
  0.1 ln(factor) + 1 (eq. 22's sqrt(1/t)), which is also what transformers uses.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class Rotary:
  """One rotary variant (`config.model.rope_*`). Hashable: a static module field.

  theta: base; type: one of ROPE_TYPES; factor: context extension factor (linear,
  llama3, yarn); low_freq_factor / high_freq_factor: llama3's wavelength band
  edges as fractions of original_max_positions (tokens); beta_fast / beta_slow:
  yarn's ramp bounds in rotations over original_max_positions; attention_factor:
  yarn's cos/sin multiplier (None: 0.1 ln(factor) + 1).
  """
  theta: float = 10000.0
  type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """[head_dim // 2] float32 angular frequencies (radians per position)."""
    return inv_frequencies(self, head_dim)

  @property
  def scale(self) -> float:
    """Multiplier of cos and sin: yarn's attention factor, else 1."""
    if self.type != "yarn":
      return 1.0
    if self.attention_factor is not None:
      return float(self.attention_factor)
    return yarn_attention_factor(self.factor)


def yarn_attention_factor(factor: float, mscale: float = 1.0) -> float:
  """YaRN's sqrt(1/t) = 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(rope: Rotary, head_dim: int) -> np.ndarray:
  """inv_freq [head_dim // 2] float32 for `rope` (module docstring: formulas)."""
  d = head_dim
  base = rope.theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
  if rope.type == "default":
    out = base
  elif rope.type == "linear":
    out = base / rope.factor
  elif rope.type == "llama3":
    length = float(rope.original_max_positions)
    wavelen = 2 * np.pi / base  # [d/2] positions per turn
    high_wavelen = length / rope.high_freq_factor  # shorter: kept
    low_wavelen = length / rope.low_freq_factor  # longer: divided by factor
    s = (length / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)  # 0 at low edge, 1 at high
    mid = (1 - s) * base / rope.factor + s * base
    out = np.where(wavelen < high_wavelen, base,
                   np.where(wavelen > low_wavelen, base / rope.factor, mid))
  elif rope.type == "yarn":
    length = float(rope.original_max_positions)

    def dim_of(rotations):  # the (fractional) dim that turns `rotations` times
      return d * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(dim_of(rope.beta_fast)), 0)
    high = min(math.ceil(dim_of(rope.beta_slow)), d - 1)
    if low == high:
      high += 0.001  # a step, not a division by zero
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    out = base / rope.factor * (1 - keep) + base * keep
  else:
    raise ValueError(f"unknown rope type {rope.type!r}; one of {ROPE_TYPES}")
  return out.astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array,
                 rope: Rotary | float) -> jax.Array:
  """Rotates pairs (i, i + head_dim/2) of x by position-dependent angles.

  x: [batch, length, heads, head_dim]; positions: [batch, length] ints; rope: a
  Rotary, or a plain theta (default RoPE). cos and sin are multiplied by
  `rope.scale` (yarn), as transformers does, so q·k scales by its square.
  """
  if not isinstance(rope, Rotary):
    rope = Rotary(theta=float(rope))
  half = x.shape[-1] // 2
  inv_freq = jnp.asarray(rope.inv_freq(x.shape[-1]))  # [half]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, half]
  sin = jnp.sin(angles)[:, :, None, :]  # [batch, length, 1, half]
  cos = jnp.cos(angles)[:, :, None, :]
  if rope.scale != 1.0:
    sin, cos = sin * rope.scale, cos * rope.scale
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
