"""Rotary variants against transformers' own rope init functions (numbers only)."""

import numpy as np
import pytest

from model.rotary import Rotary

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# (rung Rotary fields, HF rope_parameters) for one head_dim; values away from the
# defaults so a fallback cannot pass.
CASES = [
    (dict(type="linear", theta=50000.0, factor=3.0),
     dict(rope_type="linear", rope_theta=50000.0, factor=3.0)),
    (dict(type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0,
          high_freq_factor=4.0, original_max_positions=8192),
     dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (dict(type="llama3", theta=20000.0, factor=4.0, low_freq_factor=2.0,
          high_freq_factor=8.0, original_max_positions=256),
     dict(rope_type="llama3", rope_theta=20000.0, factor=4.0, low_freq_factor=2.0,
          high_freq_factor=8.0, original_max_position_embeddings=256)),
    (dict(type="yarn", theta=1e6, factor=4.0, original_max_positions=32768),
     dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
          original_max_position_embeddings=32768)),
    (dict(type="yarn", theta=20000.0, factor=6.0, original_max_positions=64,
          beta_fast=16.0, beta_slow=2.0, attention_factor=1.3),
     dict(rope_type="yarn", rope_theta=20000.0, factor=6.0, beta_fast=16.0,
          beta_slow=2.0, attention_factor=1.3, original_max_position_embeddings=64)),
]


@pytest.mark.parametrize("head_dim", [12, 128])
@pytest.mark.parametrize("ours,theirs", CASES,
                         ids=[f"{c[1]['rope_type']}{i}" for i, c in enumerate(CASES)])
def test_inv_freq_and_scale_match_transformers(ours, theirs, head_dim):
  config = transformers.LlamaConfig(
      hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
      max_position_embeddings=4 * theirs.get("original_max_position_embeddings", 64),
      rope_parameters=theirs)
  inv_freq, scale = ROPE_INIT_FUNCTIONS[theirs["rope_type"]](config, "cpu")
  rope = Rotary(**ours)
  np.testing.assert_allclose(rope.inv_freq(head_dim), inv_freq.numpy(), rtol=1e-6)
  assert rope.scale == pytest.approx(float(scale), rel=1e-9)


def test_default_matches_transformers():
  config = transformers.LlamaConfig(hidden_size=48, num_attention_heads=4,
                                    rope_parameters=dict(rope_type="default",
                                                         rope_theta=30000.0))
  rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
  inv_freq, scale = rotary.compute_default_rope_parameters(config=config, device="cpu")
  np.testing.assert_allclose(Rotary(theta=30000.0).inv_freq(12), inv_freq.numpy(),
                             rtol=1e-6)
  assert scale == 1.0 and Rotary(theta=30000.0).scale == 1.0
