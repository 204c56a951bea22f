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


# (attention, mesh, tiles, what the run's model line adds: None for nothing)
MODEL_LINE_CASES = [
    ("flash", dict(data=4, sequence=2), 0, "gathers the length the mesh splits 2 ways"),
    ("reference", dict(data=2, sequence=4), 0, "gathers the length the mesh splits 4"),
    ("ring", dict(data=4, sequence=2), 0, None),
    ("auto", dict(data=4, sequence=2), 0, None),  # -> ulysses
    ("auto", dict(data=8), 16, "model.attention_block_q/kv unused: reference has no"),
    ("auto", dict(data=8), 0, None),
    ("flash", dict(data=8), 16, None),
]


@pytest.mark.parametrize("attention,mesh,tiles,added", MODEL_LINE_CASES)
def test_the_model_line_names_attention_work_the_mesh_or_tiles_do_not_get(
    attention, mesh, tiles, added):
  """From a fresh-user trial: flash (or the reference) on a mesh that splits the
  length gathered it silently, so every `sequence` device computed the whole
  attention; and `auto` resolving to the reference (short sequences on CPU)
  dropped the tile sizes silently. The run's `model:` line now says so, and
  says nothing extra where the kernel uses the split and the tiles."""
  import jax
  import sharding
  from conftest import make_tiny_config
  from model import ModelConfig
  from train.loop import _architecture
  from train.state import model_spec
  c = make_tiny_config()
  c.model.update(attention=attention, attention_block_q=tiles)
  c.mesh.update(**mesh)
  rules = sharding.normalize_rules(c.mesh.rules)
  spec = model_spec(ModelConfig.from_config(c.model), rules)
  line = _architecture(spec, sharding.make_mesh(c.mesh, jax.devices()), rules, 8, 16)
  if added is None:
    assert "(it gathers" not in line and "unused" not in line, line
  else:
    assert added in line, line
