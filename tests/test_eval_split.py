"""A held-out split smaller than one batch is evaluated (padded rows of weight 0),
and configs that would average over nothing are refused (issue #14, item 8)."""

import math

import jax
import numpy as np
import pytest

import sharding
import train
from model import ModelConfig
from train import data as data_lib
from train.checkpoint import Checkpointer
from train.optimizer import make_optimizer
from train.state import abstract_state, model_spec
from train.step import batch_sharding, loss_fn
from train.validate import validate_config


def _text_config(config, tmp_path, num_bytes=599):
  """One 599-byte file + eos = 600 byte tokens; eval_fraction 0.1 holds out 60:
  (60 - 1) // 16 = 3 eval windows of 17, and 33 training windows."""
  (tmp_path / "doc.py").write_text("x = 1\n" * (num_bytes // 6) + "#" * (num_bytes % 6))
  config.data.update(source="text", path=str(tmp_path / "*.py"), seq_len=16,
                     eval_fraction=0.1)
  config.model.vocab_size = 256
  return config


def _make(config, devices=None):
  mesh = sharding.make_mesh(config.mesh, devices)
  sh = batch_sharding(mesh, sharding.normalize_rules(None), config.train.batch_size,
                      config.data.seq_len)
  return data_lib.make_data(config, sh)


def test_eval_batches_pad_a_partial_batch_with_weight_zero(tiny_config, tmp_path):
  d = _make(_text_config(tiny_config, tmp_path))
  assert len(d.eval_source) == 3
  batches = list(d.eval_batches(8))
  assert len(batches) == 1
  (b,) = batches
  assert b["inputs"].shape == b["weights"].shape == (8, 16)
  np.testing.assert_array_equal(b["weights"].sum(axis=1), [16] * 3 + [0] * 5)
  for i in range(3):
    np.testing.assert_array_equal(b["inputs"][i], d.eval_source[i]["inputs"])


def test_eval_batches_full_then_partial(tiny_config, tmp_path):
  c = _text_config(tiny_config, tmp_path, num_bytes=1889)  # 190 held out: 11 windows
  d = _make(c)
  assert len(d.eval_source) == 11
  weights = [b["weights"].sum(axis=1) for b in d.eval_batches(8)]
  np.testing.assert_array_equal(np.concatenate(weights), [16] * 11 + [0] * 5)
  assert len(list(d.eval_batches(1))) == 1  # eval_steps still caps the count


def test_train_evaluates_a_split_smaller_than_one_batch(tiny_config, tmp_path):
  c = _text_config(tiny_config, tmp_path)
  c.train.update(eval_every=3, eval_steps=8)
  rows = train.train(c, str(tmp_path / "run"), progress=False)
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 3]
  assert all(math.isfinite(r["eval_loss"]) for r in evals), evals
  # The mean NLL of the final parameters over the 3 real windows, on one device.
  devices = jax.devices()[:1]
  c.mesh.update(data=1)
  mesh = sharding.make_mesh(c.mesh, devices)
  spec = model_spec(ModelConfig.from_config(c.model), sharding.normalize_rules(None))
  ckpt = Checkpointer(str(tmp_path / "run"), c.checkpoint, read_only=True)
  state = ckpt.restore(abstract_state(spec, make_optimizer(c.optim, 3), mesh), step=3)
  ckpt.close()
  windows = _make(c, devices).eval_source
  batch = {k: np.stack([windows[i][k] for i in range(3)]) for k in windows[0]}
  with jax.set_mesh(mesh):
    nll = float(loss_fn(spec, 0.0)(state.params, batch)[1])
  assert evals[-1]["eval_loss"] == pytest.approx(nll, rel=1e-5)


def test_no_held_out_window_is_a_config_error_naming_eval_fraction(tiny_config,
                                                                   tmp_path):
  c = _text_config(tiny_config, tmp_path)
  c.data.eval_fraction = 0.02  # 12 held-out tokens: less than one window of 17
  c.train.eval_every = 10
  with pytest.raises(sharding.ConfigError, match=r"12 held-out tokens, less than one "
                     r"window of data.seq_len \+ 1 = 17") as err:
    _make(c)
  assert err.value.field == "data.eval_fraction"
  c.train.eval_every = 0  # no evaluation: nothing to refuse
  assert next(_make(c).train)["inputs"].shape == (8, 16)


def test_fewer_training_windows_than_a_batch_is_a_config_error(tiny_config, tmp_path):
  c = _text_config(tiny_config, tmp_path, num_bytes=40)
  with pytest.raises(sharding.ConfigError, match="fewer than one batch of "
                     "train.batch_size=8") as err:
    _make(c)
  assert err.value.field == "data.path"  # 40 bytes: no useful length fills a batch of 8


@pytest.mark.parametrize("seq_len,attention,mesh,shorter", [
    (1024, "auto", {}, 256),
    (1023, "ring", dict(data=2, sequence=3), 336),  # no power of two splits over 3
    (1024, "ring_zigzag", dict(data=2, sequence=4), 256)])
def test_a_window_too_long_for_the_corpus_names_seq_len_with_a_length_that_fits(
    tiny_config, tmp_path, seq_len, attention, mesh, shorter):
  """A corpus that fills batches at a shorter length: the error names data.seq_len
  and the longest length that fills a batch and that the mesh and attention
  split (powers of two first); with it the config validates and trains."""
  import re
  c = _text_config(tiny_config, tmp_path, num_bytes=3000)
  c.data.seq_len = seq_len
  c.model.attention = attention
  c.mesh.update(**mesh)
  devices = jax.devices()[:8 if not mesh else mesh["data"] * mesh["sequence"]]
  validate_config(c, len(devices))
  with pytest.raises(sharding.ConfigError, match="fewer than one batch") as err:
    _make(c, devices)
  assert err.value.field == "data.seq_len", str(err.value)
  c.data.seq_len = int(re.search(r"--config.data.seq_len=(\d+)", err.value.fix).group(1))
  assert c.data.seq_len == shorter
  validate_config(c, len(devices))
  assert next(_make(c, devices).train)["inputs"].shape == (8, c.data.seq_len)


def test_eval_with_zero_steps_is_a_config_error(tiny_config):
  tiny_config.train.update(eval_every=10, eval_steps=0)
  with pytest.raises(sharding.ConfigError, match="average no batches") as err:
    validate_config(tiny_config, 8)
  assert err.value.field == "train.eval_steps"
  tiny_config.train.eval_every = 0
  validate_config(tiny_config, 8)


# (corpus tokens, data.seq_len, data.eval_fraction, train.eval_every, the field
# the error names); train.batch_size 8.
_TOO_SMALL = [
    (11176, 4096, 0.02, 5, "data.seq_len"),   # the trial's: 224 held-out tokens
    (11176, 2048, 0.02, 5, "data.seq_len"),
    (11176, 2048, 0.02, 0, "data.seq_len"),   # no evaluation: no held-out window needed
    (11176, 64, 0.99, 5, "data.eval_fraction"),  # holds out the training data
    (11176, 64, 0.99, 0, "data.eval_fraction"),
    (3000, 512, 0.6, 5, "data.seq_len"),      # no fraction fits at 512
    (3000, 256, 0.7, 5, "data.eval_fraction"),
    (5000, 512, 0.1, 5, "data.eval_fraction"),  # holding out more fits 512
    (600, 16, 0.02, 5, "data.eval_fraction"),   # 12 held-out tokens: raise it
    (600, 64, 0.02, 5, "data.eval_fraction"),
    (2000, 16, 0.001, 5, "data.eval_fraction"),
    (30, 16, 0.1, 5, "data.path"),            # 1 training window, nothing fits
    (40, 16, 0.1, 0, "data.path"),
]


@pytest.mark.parametrize("tokens,seq_len,fraction,eval_every,field", _TOO_SMALL)
def test_every_fix_for_a_corpus_too_small_can_be_followed(
    tiny_config, tmp_path, tokens, seq_len, fraction, eval_every, field):
  """The data.seq_len fix for a corpus too small ignored evaluation: following it
  gave "less than one window" of held-out tokens next. And a data.eval_fraction
  that held out the training data was blamed on data.seq_len. Every fix offered
  (a length, a fraction, no evaluation) now validates and loads when followed;
  the field named is the one at fault."""
  from conftest import assert_followed_fix_validates, fix_alternatives
  c = _text_config(tiny_config, tmp_path, num_bytes=tokens - 1)
  c.data.update(seq_len=seq_len, eval_fraction=fraction)
  c.train.eval_every = eval_every
  validate_config(c, 8)
  with pytest.raises(sharding.ConfigError) as err:
    _make(c)
  err = err.value
  assert err.field == field, str(err)
  assert "training windows of" not in err.problem or "1 training windows" not in (
      err.problem)
  followed = fix_alternatives(err.fix)
  if field == "data.path":
    assert followed == [], err.fix
    assert "1 training window of" in err.problem or tokens != 30
  else:
    wanted = {"data.seq_len", "data.eval_fraction"}
    assert {f[0].split("=")[0].removeprefix("--config.") for f in followed} & wanted
  for flags_given in followed:
    fixed = assert_followed_fix_validates(c, flags_given, 8, err)
    d = _make(fixed)
    assert next(d.train)["inputs"].shape == (8, fixed.data.seq_len)
    if fixed.train.eval_every:
      assert len(d.eval_source) >= 1, flags_given
