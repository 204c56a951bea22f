"""Training end to end with each attention kernel reaches the reference's loss."""

import numpy as np
import pytest

import train
from experiments import llama_tiny


def _losses(attention, **mesh):
  c = llama_tiny.get_config()
  c.model.attention = attention
  c.data.seq_len = 32
  c.train.update(steps=20, batch_size=4, eval_every=0)
  c.optim.update(warmup_steps=5)
  c.checkpoint.every_steps = 0
  c.log.update(every_steps=1, tensorboard=False, peak_flops=1e12)
  c.mesh.update(**{"data": -1, **mesh})
  import tempfile
  with tempfile.TemporaryDirectory() as work:
    rows = train.train(c, work, progress=False)
  return np.array([r["loss"] for r in rows if "loss" in r])


@pytest.fixture(scope="module")
def reference():
  return _losses("reference", data=2, sequence=4)


# ring_zigzag trains on batches the loop permutes to zig-zag order (kernels.uses_zigzag).
@pytest.mark.parametrize("attention", ["flash", "ring_zigzag", "ulysses"])
def test_training_matches_reference(attention, reference):
  losses = _losses(attention, data=2, sequence=4)
  assert len(losses) == 20 and losses[-1] < losses[0] - 1.0  # it learns
  np.testing.assert_allclose(losses, reference, rtol=1e-4)


def test_ring_zigzag_needs_seq_len_multiple_of_twice_sequence():
  """ring_zigzag cuts sequences into 2 x sequence chunks; ring into sequence chunks."""
  from sharding import ConfigError
  c = llama_tiny.get_config()
  c.model.attention = "ring_zigzag"
  c.data.seq_len = 68
  c.mesh.update(data=2, sequence=4)
  with pytest.raises(ConfigError, match="multiple of 8"):
    train.validate_config(c, 8)
  c.model.attention = "ring"
  assert train.validate_config(c, 8)["sequence"] == 4
