"""Sampling and generation arguments at their edges, in the library and the CLI."""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import infer
import sharding
from conftest import run_cli, run_cli_many
from model import Decoder, ModelConfig

LOGITS = jnp.array([[.1, .3, 5., .2, 1.]])  # argmax 2


def _allowed(row: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
  """The tokens sampling may return, and their probabilities, written from the
  definitions (temperature, then top-k, then the smallest nucleus reaching top_p)."""
  z = row / temperature
  keep = np.isfinite(z)
  if top_k and top_k < row.size:
    kth = np.sort(z)[::-1][top_k - 1]
    keep &= z >= kth
  p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
  p /= p.sum()
  if top_p is not None and top_p < 1:
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros_like(keep)
    nucleus[order[(before < top_p) | (np.arange(row.size) == 0)]] = True
    keep &= nucleus
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


def test_sampled_token_is_always_allowed_and_greedy_is_argmax():
  """Property: over random logits (some -inf), temperatures, top_k in
  [0, vocab + 5] and top_p in [0, 1], the token has a finite logit, lies in the
  top-k and in the nucleus; greedy settings return the argmax."""
  rng = np.random.default_rng(0)
  vocab, rows = 7, 16
  for trial in range(60):
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    logits[rng.random((rows, vocab)) < 0.2] = -np.inf
    logits[np.arange(rows), rng.integers(0, vocab, rows)] = rng.normal(0, 3, rows)
    temperature = float(rng.choice([0.0, 1e-4, rng.uniform(0.05, 3.0)]))
    top_k = int(rng.integers(0, vocab + 6))
    top_p = float(rng.choice([0.0, 1.0, rng.uniform(0, 1)]))
    key = jax.random.key(trial)
    tokens = np.asarray(infer.sample(jnp.asarray(logits), key, temperature, top_k,
                                     top_p))
    chosen = logits[np.arange(rows), tokens]
    assert np.all(np.isfinite(chosen)), (temperature, top_k, top_p)
    if temperature == 0 or top_k == 1 or top_p == 0:
      np.testing.assert_array_equal(tokens, logits.argmax(-1))
      continue
    for row, token in zip(logits, tokens):
      assert _allowed(row, temperature, top_k, top_p)[token] > 0, (
          row, token, temperature, top_k, top_p)


def test_sampling_frequencies_match_the_reference_distribution():
  row = np.array([1.0, 0.2, -0.5, 2.0, 0.7, -np.inf], np.float32)
  expected = _allowed(row, 0.7, 4, 0.8)
  n = 20000
  tokens = np.asarray(infer.sample(jnp.tile(jnp.asarray(row), (n, 1)),
                                   jax.random.key(0), 0.7, 4, 0.8))
  freq = np.bincount(tokens, minlength=row.size) / n
  np.testing.assert_allclose(freq, expected, atol=0.015)
  assert expected[5] == 0 and np.count_nonzero(expected) >= 2


def test_top_p_zero_is_the_argmax_for_every_seed():
  for seed in range(8):
    assert int(infer.sample(LOGITS, jax.random.key(seed), 1.0, top_p=0.0)[0]) == 2


@pytest.mark.parametrize("top_k", [0, 5, 6, 100])
def test_top_k_zero_or_at_least_vocab_means_no_truncation(top_k):
  for seed in range(8):
    key = jax.random.key(seed)
    assert int(infer.sample(LOGITS, key, 1.0, top_k=top_k)[0]) == int(
        infer.sample(LOGITS, key, 1.0)[0])


def test_tiny_temperature_is_the_argmax():
  logits = jnp.array([[3.0, 2.9, -1.0, 2.95]])
  for seed in range(4):
    assert int(infer.sample(logits, jax.random.key(seed), 1e-30)[0]) == 0


BAD_ARGS = [
    ("temperature", dict(temperature=-1.0)),
    ("temperature", dict(temperature=math.nan)),
    ("temperature", dict(temperature=math.inf)),
    ("top_k", dict(temperature=1.0, top_k=-1)),
    ("top_k", dict(temperature=1.0, top_k=2.5)),
    ("top_p", dict(temperature=1.0, top_p=-0.1)),
    ("top_p", dict(temperature=1.0, top_p=1.5)),
    ("top_p", dict(temperature=1.0, top_p=math.nan)),
]


@pytest.mark.parametrize("argument,kwargs", BAD_ARGS)
def test_bad_sampling_argument_is_a_value_error_naming_it(argument, kwargs):
  with pytest.raises(ValueError, match=argument) as err:
    infer.sample(LOGITS, jax.random.key(0), **kwargs)
  assert err.value.argument == argument


@pytest.fixture(scope="module")
def tiny_model():
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8, d_ff=32)
  return Decoder(cfg, rngs=nnx.Rngs(0))


def test_zero_new_tokens_returns_empty_rows(tiny_model):
  calls = []
  assert infer.generate(tiny_model, [[1, 2, 3]], max_new_tokens=0) == [[]]
  assert infer.generate(tiny_model, [[1, 2, 3], [4]], max_new_tokens=0,
                        on_token=calls.append) == [[], []]
  assert calls == []


def test_prompts_as_an_array_and_the_mistakes_of_shape(tiny_model):
  """A [batch, length] array of ids generates what the same lists do; one flat
  prompt, or 1-D tokens to the model, is a ValueError that says the shape."""
  import jax.numpy as jnp
  rows = [[1, 2, 3], [4, 5, 6]]
  want = infer.generate(tiny_model, rows, max_new_tokens=3)
  assert infer.generate(tiny_model, np.array(rows), max_new_tokens=3) == want
  assert infer.generate(tiny_model, jnp.array(rows), max_new_tokens=3) == want
  with pytest.raises(ValueError, match=r"one prompt is \[ids\]"):
    infer.generate(tiny_model, [1, 2, 3], max_new_tokens=3)
  with pytest.raises(ValueError, match=r"\[batch, length\].*got shape \(3,\)"):
    tiny_model(jnp.array([1, 2, 3]))


@pytest.mark.parametrize("argument,kwargs", [
    ("max_new_tokens", dict(max_new_tokens=-1)),
    ("max_new_tokens", dict(max_new_tokens=2.0)),
    ("max_new_tokens", dict(max_new_tokens=None)),  # was a raw TypeError
    # a plain ValueError before (a trial's `except SamplingArgumentError` missed it)
    ("seed", dict(max_new_tokens=2, temperature=1.0, seed=None)),
    ("seed", dict(max_new_tokens=2, seed=1.5)),
    ("temperature", dict(max_new_tokens=2, temperature=-0.5)),
    ("top_p", dict(max_new_tokens=2, temperature=1.0, top_p=2.0))])
def test_generate_refuses_bad_arguments(tiny_model, argument, kwargs):
  with pytest.raises(infer.SamplingArgumentError, match=argument) as err:
    infer.generate(tiny_model, [[1, 2, 3]], **kwargs)
  assert err.value.argument == argument


@pytest.mark.parametrize("prompts,kwargs,message", [
    ("hello", {}, "tokenize first"),
    ([[1, 2.7]], {}, r"prompt 0 holds 2\.7; token ids are integers"),
    (np.array([[1.0, 2.0]]), {}, r"prompt 0 holds 1\.0; token ids are"),
    ([[1], [2, True]], {}, r"prompt 1 holds True"),
    ([[1], [2, 32]], {}, r"prompt 1 holds token id 32, outside .* \[0, 32\)"),
    ([[1]], dict(stop_tokens=7), r"stop_tokens=7 is one id; .* pass \[7\]\.$"),
    ([[1]], dict(stop_tokens=np.int64(7)), r"is one id; .* pass \[7\]\.$"),
    ([[1]], dict(stop_tokens="a"), r"not a str \('a'\); tokenize text first\.$"),
    ([[1]], dict(stop_tokens={3.0}), r"stop_tokens holds 3\.0"),
    ([[1]], dict(stop_tokens=[3.0]), r"stop_tokens holds 3\.0"),
    ([[1]], dict(stop_tokens=[-1]), r"stop_tokens holds token id -1"),
    ([[1]], dict(seed=None), r"seed=None must be an integer"),
    ([[1]], dict(seed=1.5), r"seed=1\.5 must be an integer"),
    # 32-bit keys: seed and seed + 2**32 gave the same samples; 2**64 overflowed
    ([[1]], dict(seed=2 ** 32), r"seed=4294967296 must be an integer in \[0, 2\*\*32\)"),
    ([[1]], dict(seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
    ([[1]], dict(seed=10 ** 20), r"seed=100000000000000000000 must be"),
    # from a Python-API trial: unpacking errors, or -1 taken silently
    ([[1]], dict(pad_to=(2,)), r"pad_to=\(2,\) must be \(rows, prompt length\)"),
    ([[1]], dict(pad_to="x8"), r"pad_to='x8' must be"),
    ([[1]], dict(pad_to=(2.5, 4)), r"pad_to=\(2\.5, 4\) must be"),
    ([[1]], dict(pad_to=(-1, 5)), r"pad_to=\(-1, 5\) must be .* two integers >= 0"),
])
def test_generate_refuses_ids_and_seeds_of_the_wrong_type(tiny_model, prompts, kwargs,
                                                          message):
  """A mistake of type is a ValueError naming the argument and the value, never a
  raw TypeError from deep inside, and never a float id truncated to a wrong one."""
  with pytest.raises(ValueError, match=message):
    infer.generate(tiny_model, prompts, max_new_tokens=2, **kwargs)


def test_generate_takes_ids_of_any_integer_type(tiny_model):
  want = infer.generate(tiny_model, [[1, 2, 3]], max_new_tokens=3, stop_tokens=[5])
  assert infer.generate(tiny_model, [np.array([1, 2, 3], np.int64)], max_new_tokens=3,
                        stop_tokens=np.array([5], np.int32),
                        seed=np.int32(0)) == want


def test_generate_takes_stop_ids_as_a_set_or_none(tiny_model):
  """From a trial: a set of stop ids (a natural spelling) and None were refused
  with "one stop id is [...]", a fix that fails. A set stops as the list of its
  ids; None as no stop ids. The stop id chosen is one the model emits, so the
  stop is seen."""
  free = infer.generate(tiny_model, [[1, 2, 3]], max_new_tokens=6)[0]
  assert infer.generate(tiny_model, [[1, 2, 3]], max_new_tokens=6,
                        stop_tokens=None) == [free]
  stop = free[2]
  want = infer.generate(tiny_model, [[1, 2, 3]], max_new_tokens=6, stop_tokens=[stop])
  assert want[0] == free[:free.index(stop) + 1]
  unseen = next(t for t in range(tiny_model.cfg.vocab_size) if t not in free)
  assert infer.generate(tiny_model, [[1, 2, 3]], max_new_tokens=6,
                        stop_tokens={stop, unseen}) == want


BYTE_RUN_CONTEXT = 24


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
  """A one-step byte-level run to point the generate CLI at."""
  import train
  from conftest import make_tiny_config
  from train.tokenizer import ByteTokenizer
  config = make_tiny_config()
  config.model.vocab_size = ByteTokenizer.vocab_size
  config.model.max_position_embeddings = BYTE_RUN_CONTEXT
  config.train.steps = 1
  workdir = tmp_path_factory.mktemp("byte_run")
  train.train(config, str(workdir), progress=False)
  return workdir


def test_cli_zero_new_tokens_prints_the_prompt(byte_run):
  proc = run_cli("generate", f"--workdir={byte_run}", "--prompt=def f(",
                 "--max_new_tokens=0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout == "def f(\n"
  assert f"generating from step 1 of {byte_run} on mesh " in proc.stderr
  assert "warning" not in proc.stderr


def test_loading_a_run_refuses_what_it_does_not_have(byte_run, tmp_path):
  """infer.load from Python: a misspelt mesh axis or config field, or a directory
  without a run, is a ConfigError naming it, not a silent default."""
  from sharding import ConfigError
  from train import run_config
  with pytest.raises(ConfigError) as err:
    infer.load(str(byte_run), mesh_overrides={"tensr": 2})
  assert err.value.field == "mesh_overrides" and "'tensr' is not a mesh axis" in str(
      err.value)
  for size in ("2", 2.0, True):  # a raw TypeError inside the mesh, before
    with pytest.raises(ConfigError) as err:
      infer.load(str(byte_run), mesh_overrides={"tensor": size})
    assert err.value.field == "mesh_overrides" and (
        f"tensor={size!r} is a {type(size).__name__}; a mesh size is an integer"
        in str(err.value)) and "mesh_overrides={'tensor': 2}" in err.value.fix
  config = run_config.load(str(byte_run))
  with pytest.raises(AttributeError, match='Did you mean "compute_dtype"'):
    config.model.computedtype = "bfloat16"
  with pytest.raises(ConfigError) as err:
    infer.load(str(tmp_path))
  assert err.value.field == "--workdir" and "holds no run" in str(err.value)
  # From a trial: a step's directory, or the checkpoints', names the run above it.
  for inside, step in ((byte_run / "checkpoints" / "1", 1),
                       (byte_run / "checkpoints", None)):
    with pytest.raises(ConfigError) as err:
      infer.load(str(inside))
    assert err.value.field == "--workdir" and err.value.fix == (
        f"pass --workdir={byte_run}" + (
            f" (generate and export-hf read that step with --step={step})"
            if step else "") + ".")
    assert f"of the run in {byte_run}, which holds its config.json" in str(err.value)


def test_cli_warns_when_generation_runs_past_the_models_context(byte_run):
  """Prompt plus new tokens past model.max_position_embeddings (BYTE_RUN_CONTEXT) is
  served, with a warning that names the field; exactly the context is not warned
  about. Bytes: one token per character."""
  fits, past = run_cli_many([
      ("generate", f"--workdir={byte_run}", "--prompt=" + "x" * (BYTE_RUN_CONTEXT - 3),
       f"--max_new_tokens={n}") for n in (3, 4)])
  assert fits.returncode == 0 and past.returncode == 0, past.stderr[-2000:]
  assert "warning" not in fits.stderr, fits.stderr[-2000:]
  assert (f"warning: {BYTE_RUN_CONTEXT - 3} prompt tokens + up to 4 new ones run past "
          f"the model's context of {BYTE_RUN_CONTEXT} positions "
          "(model.max_position_embeddings)" in past.stderr), past.stderr[-2000:]
  assert past.stderr.count("run past the model's context") == 1, past.stderr[-2000:]


def test_python_generate_warns_past_the_models_context(byte_run):
  """From a fresh-user trial: README says generation past the context comes with a
  warning, but only the command line gave one; infer.generate from Python was
  silent. It now warns (PastContextWarning) past the context, not at it."""
  import warnings
  model, _ = infer.load(str(byte_run))
  prompt = [[120] * (BYTE_RUN_CONTEXT - 3)]

  def warned(new_tokens):  # the PastContextWarning messages generate gives
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      infer.generate(model, prompt, max_new_tokens=new_tokens)
    return [str(w.message) for w in caught
            if issubclass(w.category, infer.PastContextWarning)]
  assert warned(3) == []  # exactly the context
  past = warned(4)
  assert len(past) == 1 and past[0].startswith(
      f"{BYTE_RUN_CONTEXT - 3} prompt tokens + up to 4 new ones run past the model's "
      f"context of {BYTE_RUN_CONTEXT} positions"), past


BAD_FLAGS = ["--temperature=-1", "--top_p=1.5", "--top_k=-2", "--max_new_tokens=-1",
             f"--max_new_tokens={10**15}", "--seed=-1", f"--seed={2**64}"]


@pytest.fixture(scope="module")
def bad_flag_runs(byte_run):
  """`generate` with each bad flag, each its own process (conftest.run_cli_many)."""
  return dict(zip(BAD_FLAGS, run_cli_many(
      [("generate", f"--workdir={byte_run}", "--prompt=x", f) for f in BAD_FLAGS])))


@pytest.mark.parametrize("flag", BAD_FLAGS)
def test_cli_bad_generation_flag_exits_2_naming_it(bad_flag_runs, flag):
  proc = bad_flag_runs[flag]
  assert proc.returncode == 2, proc.stderr[-2000:]
  name = flag.split("=")[0]
  assert f"Config error in `{name}`" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout == ""


def test_cli_cache_past_memory_names_the_tokens_that_fit(bad_flag_runs):
  """10**15 new tokens: before the fix, an allocator traceback (or the OOM killer);
  now a config error before the cache is allocated, with a count that fits. The
  byte run serves on data=8, so its one prompt is padded to 8 rows."""
  import re
  err = bad_flag_runs[f"--max_new_tokens={10**15}"].stderr
  assert ("the KV cache for 8 rows (the prompts padded to a multiple of the 8 devices "
          "the batch is split over) of " in err and "GiB free" in err), err[-2000:]
  fits = int(re.search(r"Fix: pass --max_new_tokens=(\d+) or fewer", err).group(1))
  assert 0 < fits < 10**15


class _Accelerator:
  """A device with an allocator limit, as memory_stats reports it on GPU and TPU."""
  platform, id, process_index = "gpu", 0, 0

  def __init__(self, limit, in_use):
    self.stats = {"bytes_limit": limit, "bytes_in_use": in_use}

  def memory_stats(self):
    return self.stats


def test_cache_check_counts_the_bytes_of_one_device():
  """k and v of [layers, batch, length, kv_heads, head_dim] float32: 2 x 2 x 3 x 1 x 8
  x 4 = 384 bytes per position of a 3-row batch, against the allocator's limit less
  what is in use; with the batch split over 4 devices, a device holds one row's
  128 bytes per position."""
  from infer.kv_cache import cache_struct, check_fits
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8, d_ff=32)
  cache = cache_struct(cfg, 3, 10)
  per_position = 2 * 2 * 3 * 1 * 8 * 4
  check_fits(cache, [_Accelerator(10 * per_position + 50, 50)])  # exactly fits
  with pytest.raises(infer.CacheDoesNotFit, match=r"3 rows of 10 positions .*at most "
                     r"9 positions per row fit") as err:
    check_fits(cache, [_Accelerator(10 * per_position + 49, 50)])
  assert err.value.positions == 9
  from jax.sharding import Mesh
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(4, 1), ("data", "tensor"))
  rules = (("batch", ("data",)), ("act_kv_heads", ("tensor",)))
  split = cache_struct(cfg, 4, 10, rules, mesh)  # one row per device
  one_row = per_position // 3
  check_fits(split, [_Accelerator(10 * one_row, 0)])
  with pytest.raises(infer.CacheDoesNotFit) as err:
    check_fits(split, [_Accelerator(10 * one_row - 1, 0)])
  assert err.value.positions == 9
  assert ("the KV cache for 4 rows (the prompts padded to a multiple of the 4 devices "
          "the batch is split over) of 10 positions") in str(err.value)
  with pytest.raises(infer.CacheDoesNotFit, match="the KV cache for 1 row of 10 "):
    check_fits(cache_struct(cfg, 1, 10), [_Accelerator(1, 0)])  # "1 rows" before


def test_generate_holds_one_cache_prefilled_in_its_decode_form(tiny_model,
                                                                monkeypatch):
  """generate prefilled a position-major cache and decoded on a heads-major copy
  of it: two caches alive at once (a trial measured 2x the cache's bytes in peak
  memory; 2.04x here on a 512 MiB cache). The cache is now made in the decode
  form, prefilled in it and written in place by the decode loop (donated): the
  compiled loop aliases its cache input to its output and its temporaries hold
  no copy of it, and generate runs with memory for exactly one cache."""
  from infer import decode, kv_cache
  from infer.generate import _decode_loop
  prompt, new = [1, 2, 3], 5
  one = 2 * 2 * 1 * (len(prompt) + new) * 1 * 8 * 4  # k, v x layers x rows x ...
  monkeypatch.setattr(kv_cache, "_free_bytes", lambda device: one - 1)
  with pytest.raises(infer.CacheDoesNotFit) as err:
    infer.generate(tiny_model, [prompt], max_new_tokens=new)
  assert err.value.positions == len(prompt) + new - 1
  monkeypatch.setattr(kv_cache, "_free_bytes", lambda device: one)
  assert len(infer.generate(tiny_model, [prompt], max_new_tokens=new)[0]) == new
  monkeypatch.undo()

  graphdef, params = nnx.split(tiny_model)
  rows, length = 4, 4096
  cache = decode.init_decode_cache(tiny_model, rows, length)  # 1 MiB
  cache_bytes = sum(c.k.nbytes + c.v.nbytes for c in cache)
  loop = _decode_loop.lower(
      graphdef, params, decode.split(graphdef, params), cache,
      jnp.zeros((rows, 32), jnp.float32), jnp.zeros((rows,), bool), jax.random.key(0),
      8, decode.GREEDY, jnp.asarray(decode.stop_ids([]))).compile().memory_analysis()
  assert loop.alias_size_in_bytes >= cache_bytes
  assert loop.temp_size_in_bytes < cache_bytes / 2, (loop.temp_size_in_bytes,
                                                     cache_bytes)


def _fits(cfg, rows, length, mesh, rules, free) -> bool:
  from infer.kv_cache import cache_struct, check_fits
  try:
    check_fits(cache_struct(cfg, rows, length, rules, mesh), [_Accelerator(free, 0)])
  except infer.CacheDoesNotFit:
    return False
  return True


@pytest.mark.parametrize("split", [1, 2, 4])
def test_a_cache_that_does_not_fit_names_the_largest_batch_and_tokens_that_do(split):
  """For batches, prompt lengths, new tokens and free memory around the limits,
  each fix the refusal offers (--max_new_tokens, --batch_size, or both) fits
  when followed, and one more token or one more row per device does not: the
  fix is the largest that fits. (`--batch_size` halved, as before,
  could still not fit; the prompt's positions came from the unpadded prompt.)"""
  import itertools
  import re

  from infer.kv_cache import cache_struct, check_fits
  from infer.text import _cache_error
  from jax.sharding import Mesh
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8, d_ff=32)
  mesh = Mesh(np.array(jax.devices()[:split]).reshape(split, 1), ("data", "tensor"))
  rules = (("batch", ("data",)), ("act_kv_heads", ("tensor",)))
  per_row_position = 2 * 2 * 1 * 8 * 4  # k and v, layers, kv heads, head_dim, f32
  seen = set()
  for prompts, batch_size, prompt, new, free_positions in itertools.product(
      (1, 3, 16), (1, 2, 8), (5, 40), (1, 30, 200), (20, 41, 64, 150, 300, 600)):
    rows = min(batch_size, prompts)
    padded = -(-rows // split) * split  # as generate pads the batch
    free = free_positions * per_row_position
    fits = functools.partial(_fits, cfg, mesh=mesh, rules=rules, free=free)
    if fits(padded, prompt + new):
      continue
    with pytest.raises(infer.CacheDoesNotFit) as caught:
      check_fits(cache_struct(cfg, padded, prompt + new, rules, mesh),
                 [_Accelerator(free, 0)])
    err = _cache_error(caught.value, new, "--prompts", rows)
    assert err.field == "--max_new_tokens", err
    fixes = [dict(re.findall(r"--(batch_size|max_new_tokens)=(\d+)", part))
             for part in re.split(r", or ", err.fix)]
    fixes = [f for f in fixes if f]
    seen.update(tuple(sorted(f)) for f in fixes or [{}])
    if not fixes:  # not one row per device of the prompt and a token fits
      assert prompt + 1 > free_positions, err.fix
      assert "alone do" in err.fix, err.fix
      continue
    for fix in fixes:
      new2 = int(fix.get("max_new_tokens", new))
      rows2 = min(int(fix.get("batch_size", batch_size)), prompts)
      padded2 = -(-rows2 // split) * split
      assert new2 >= 1 and (new2 < new or padded2 < padded), (fix, err.fix)
      assert fits(padded2, prompt + new2), (fix, err.fix)
      if "max_new_tokens" in fix:  # the most tokens that fit
        assert not fits(padded2, prompt + new2 + 1), fix
      else:  # the most rows that fit
        assert not fits(padded2 + split, prompt + new2), fix
  # every kind of fix came up: tokens, rows, one row with fewer tokens, none
  assert seen == {("max_new_tokens",), ("batch_size",),
                  ("batch_size", "max_new_tokens"), ()}, seen


def test_words_outside_a_flag_and_an_empty_prompt_are_config_errors(byte_run, tmp_path):
  """An unquoted prompt's other words were dropped without a word; an empty
  --prompt was reported as missing."""
  words, empty, train = run_cli_many([
      ("generate", f"--workdir={byte_run}", "--prompt=the", "quick", "fox"),
      ("generate", f"--workdir={byte_run}", "--prompt="),
      ("train", "--config=experiments/llama_tiny.py", f"--workdir={tmp_path}", "x")])
  assert words.returncode == empty.returncode == train.returncode == 2
  assert ("Config error in `command line`: 'quick' 'fox' are not flags; generate "
          "takes --name=value flags only. Fix: quote a value that holds spaces, e.g. "
          '--prompt="the quick fox", or drop the extra words.') in words.stderr
  assert "Config error in `--prompt`: --prompt is empty. Fix: pass --prompt=" \
      in empty.stderr
  assert "Config error in `command line`: 'x' is not a flag; train takes" in train.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_truncation_at_temperature_zero_warns_that_it_does_nothing(tiny_model):
  """top_p / top_k with the default temperature 0 gave the greedy output without a
  word (transformers warns too); with a temperature, or without them, no warning."""
  with pytest.warns(UserWarning, match="top_p=0.9 has no effect at temperature 0"):
    infer.check_sampling(0.0, None, 0.9, warn_ignored=True)
  with pytest.warns(UserWarning, match="top_k=5 and top_p=0.5 has no effect"):
    infer.check_sampling(0.0, 5, 0.5, warn_ignored=True)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    infer.check_sampling(0.7, 5, 0.9, warn_ignored=True)
    infer.check_sampling(0.0, 0, 1.0, warn_ignored=True)
    infer.check_sampling(0.0, 5, 0.9)  # sample() itself: no warning per call
  with pytest.warns(UserWarning, match="top_p=0.9 has no effect"):
    infer.generate(tiny_model, [[1, 2]], max_new_tokens=1, top_p=0.9)


@pytest.mark.parametrize("split", [False, True], ids=["stacked", "decode_form"])
def test_prefill_longer_than_the_cache_is_refused(tiny_model, split):
  """A prompt past the cache's length wrote out of bounds and returned lengths
  beyond it (garbage, silently)."""
  from infer import decode
  cache = (decode.init_decode_cache if split else infer.init_cache)(tiny_model, 1, 3)
  with pytest.raises(ValueError, match="prompts of 4 positions do not fit a KV "
                     "cache of 3"):
    tiny_model.prefill(jnp.array([[1, 2, 3, 4]]), jnp.array([4]), cache)
  _, cache = tiny_model.prefill(jnp.array([[1, 2, 3]]), jnp.array([3]), cache)
  assert [int(c.lengths[0]) for c in (cache if split else [cache])] == [3] * (
      tiny_model.cfg.num_layers if split else 1)


@pytest.mark.parametrize("split", [False, True], ids=["stacked", "decode_form"])
def test_eager_decode_past_the_cache_is_refused(tiny_model, split):
  """Decoding past max_length wrote out of bounds (the writes promise in-bounds
  indices) and returned logits from whatever it read, silently."""
  cache = infer.init_cache(tiny_model, 2, 5)
  _, cache = tiny_model.prefill(jnp.array([[1, 2, 3], [4, 0, 0]]), jnp.array([3, 1]),
                                cache)
  if split:
    cache = cache.for_decoding(tiny_model.cfg.unit)
  logits, cache = tiny_model.decode(jnp.array([[5, 6], [7, 8]]), cache)  # fills 5
  assert logits.shape == (2, 2, 32)
  with pytest.raises(ValueError, match=r"decoding 1 token\(s\) after 5 cached "
                     r"positions runs past the KV cache's 5; make the cache at "
                     r"least 6 long"):
    tiny_model.decode(jnp.array([[1], [2]]), cache)


class _Loaded(Exception):
  """Raised in place of the checkpoint's opening: the checks before it passed."""


def _open_checkpoint(*args, **kwargs):
  raise _Loaded


def test_stop_ids_and_tokenizer_not_the_models_are_refused_before_loading(
    byte_run, tmp_path, monkeypatch):
  """Stop ids or a prompt past the model's vocabulary are config errors raised
  before the weights are loaded (they were checked after), with nothing printed."""
  import io
  import infer.text
  from conftest import write_word_tokenizer
  from sharding import ConfigError
  from train import run_config
  monkeypatch.setattr(infer.text, "load", lambda *a, **k: pytest.fail("loaded"))
  vocab = run_config.load(str(byte_run)).model.vocab_size
  config = run_config.load(str(byte_run))
  config.data.stop_ids = (vocab,)
  out = io.StringIO()
  with pytest.raises(ConfigError, match=rf"stop id {vocab} \(data.stop_ids\) falls "
                     rf"outside the model's vocabulary \[0, {vocab}\)") as err:
    infer.text.generate_text(str(byte_run), config, "ab", max_new_tokens=1, out=out)
  assert err.value.field == "data.stop_ids"
  # A bad data.eos_id is named as such, with a fix that works (the error named
  # data.stop_ids and suggested clearing them, which changed nothing).
  config = run_config.load(str(byte_run))
  config.data.eos_id = -1
  with pytest.raises(ConfigError, match=r"stop id -1 \(data.eos_id\)") as err:
    infer.text.generate_text(str(byte_run), config, "ab", max_new_tokens=1, out=out)
  assert err.value.field == "data.eos_id" and "--config.data.eos_id=0" in str(err.value)
  config.data.eos_id = 0
  monkeypatch.setattr(infer.text, "Checkpointer", _open_checkpoint)
  with pytest.raises(_Loaded):  # past the stop-id checks: the fix works
    infer.text.generate_text(str(byte_run), config, "ab", max_new_tokens=1, out=out)
  config = run_config.load(str(byte_run))
  config.data.tokenizer = write_word_tokenizer(
      tmp_path / "tokenizer.json", ["<|endoftext|>"] + [f"w{i}" for i in range(1, vocab + 2)])
  with pytest.raises(ConfigError, match=rf"encodes to id {vocab + 1}, past the "
                     rf"model's vocabulary of {vocab}") as err:
    infer.text.generate_text(str(byte_run), config, f"w1 w{vocab + 1}",
                             max_new_tokens=1, out=out)
  assert err.value.field == "data.tokenizer" and out.getvalue() == ""


def test_streamed_text_spaces_words_as_the_whole_text_does(tmp_path):
  """A tokenizer.json without a decoder joins ids with spaces: the new ids decoded
  alone printed "the quickbrown fox" for the prompt "the quick"; decoded after
  the prompt's last ids they print " brown fox". A stop id is not printed, and
  bytes of a character split over ids wait for the rest."""
  import io
  from conftest import write_word_tokenizer
  from infer.text import _Printer
  from train.tokenizer import ByteTokenizer, HFTokenizer
  words = ["<|endoftext|>", "the", "quick", "brown", "fox"]
  tok = HFTokenizer(write_word_tokenizer(tmp_path / "tok.json", words))
  out = io.StringIO()
  printer = _Printer(tok, out, "the quick", [1, 2], stops=[0])
  for new in (3, 4, 0, -1):
    printer(np.array([new]))
  printer.close()
  assert out.getvalue() == "the quick brown fox\n"
  assert printer.text() == " brown fox"
  out, byte = io.StringIO(), ByteTokenizer()
  printer = _Printer(byte, out, "a", byte.encode("a").tolist(), stops=[])
  for new in byte.encode("é!").tolist():
    printer(np.array([new]))
    assert "\ufffd" not in out.getvalue()
  printer.close()
  assert out.getvalue() == "aé!\n"


def test_serving_says_when_it_falls_back_from_sequence_parallel_attention(
    byte_run, capsys):
  """model.attention=ring on a mesh whose sequence axis is 1 is served with auto
  (`kernels.serving_impl`); the start line says so, where it said nothing."""
  from infer.text import generate_text
  from train import run_config
  config = run_config.load(str(byte_run))
  config.model.attention = "ring"
  generate_text(str(byte_run), config, "ab", max_new_tokens=1)
  assert ("; attention auto, as model.attention=ring needs the length split over "
          "mesh.sequence") in capsys.readouterr().err
  config.model.attention = "ring_zigzag"  # on a length it splits: the order is why
  config.mesh.update(sequence=2, data=-1)
  generate_text(str(byte_run), config, "ab", max_new_tokens=1)
  assert ("; attention auto, as model.attention=ring_zigzag takes prompts in zig-zag "
          "order") in capsys.readouterr().err
  generate_text(str(byte_run), run_config.load(str(byte_run)), "ab", max_new_tokens=1)
  assert "; attention" not in capsys.readouterr().err


def test_cli_refuses_overrides_generate_does_not_read(byte_run):
  """From a trial: generate ran with --config.optim.learning_rate=1.0, a MoE
  field on a dense model and rope_factor under default RoPE, as if they applied.
  Each is refused naming the field; a field generate reads is not."""
  cases = {"optim.learning_rate=1.0": "generate never reads it",
           "model.remat=full": "generate never reads it",
           "data.path=x.jsonl": "generate never reads it",
           "model.moe.top_k=1": "model.moe.num_experts is 0 (dense)",
           "model.rope_factor=2.0": "default RoPE has no scaling factor"}
  procs = run_cli_many([("generate", f"--workdir={byte_run}", "--prompt=ab",
                         f"--config.{case}") for case in cases])
  for (case, why), proc in zip(cases.items(), procs):
    field = case.split("=")[0]
    assert proc.returncode == 2, (case, proc.stderr[-2000:])
    assert f"Config error in `{field}`: --config.{field} is set but" in proc.stderr
    assert why in proc.stderr, proc.stderr
    # a served checkpoint keeps its architecture: no fix that changes it
    assert "--config.model.moe.num_experts" not in proc.stderr, proc.stderr
  from train import run_config
  from train.unread import unread_by_serving
  assert unread_by_serving(run_config.load(str(byte_run)),
                           ["mesh.tensor", "model.attention", "data.eos_id",
                            "data.stop_ids"]) is None


def test_cli_says_when_the_config_changes_the_models_outputs(byte_run):
  """A --config whose model fields differ from the run's (another run's config of
  the same shapes, or an override) loaded silently; generation now names each
  changed field. The run's own config, or a serving choice (attention), says
  nothing."""
  changed, same = run_cli_many([
      ("generate", f"--workdir={byte_run}", "--prompt=ab", "--max_new_tokens=2",
       f"--config=experiments/saved.py:{byte_run}", "--config.model.sliding_window=4"),
      ("generate", f"--workdir={byte_run}", "--prompt=ab", "--max_new_tokens=2",
       f"--config=experiments/saved.py:{byte_run}", "--config.model.attention=reference")])
  assert changed.returncode == 0 and same.returncode == 0, changed.stderr[-2000:]
  assert ("note: the model config differs from the run's (saved -> now), so the "
          "outputs can differ from the trained model's: model.sliding_window: 0 -> 4"
          in changed.stderr), changed.stderr[-2000:]
  assert "differs from the run's" not in same.stderr, same.stderr[-2000:]


def test_a_file_of_prompts_generates_what_each_prompt_alone_does(byte_run, tmp_path):
  """`generate --prompts`: every prompt of a text or JSONL file (blank lines
  skipped, line numbers kept), batched and padded to the file's longest prompt,
  continues greedily exactly as `infer.generate` continues it alone; the stop id
  ends a completion unprinted. Written to a new file as JSON lines."""
  import json

  import infer.text
  from train import run_config
  from train.hf import stop_tokens
  from train.tokenizer import make_tokenizer
  prompts = ["def f(", "import numpy as np", "x", "class A:\n"[:-1], "# é"]
  text = tmp_path / "prompts.txt"
  text.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")
  jsonl = tmp_path / "prompts.jsonl"
  jsonl.write_text("\n".join(json.dumps(p if i % 2 else {"prompt": p})
                             for i, p in enumerate(prompts)) + "\n")
  config = run_config.load(str(byte_run))
  tokenizer = make_tokenizer(config.data, require_eos=False)
  stops = stop_tokens(config.data, tokenizer)
  model, _ = infer.load(str(byte_run))
  alone = [infer.generate(model, [tokenizer.encode(p)], max_new_tokens=6,
                          stop_tokens=stops)[0] for p in prompts]
  out = tmp_path / "out.jsonl"
  records = infer.text.generate_file(str(byte_run), None, str(text), output=str(out),
                                     batch_size=2, max_new_tokens=6, progress=False)
  assert [r["line"] for r in records] == [1, 3, 4, 5, 6]
  assert [r["prompt"] for r in records] == prompts
  for r, p, new in zip(records, prompts, alone):
    stopped = bool(new) and new[-1] in stops
    assert r["new_tokens"] == len(new) and r["stopped"] == stopped
    assert r["completion"] == infer.text.continuation(
        tokenizer, tokenizer.encode(p), new[:-1] if stopped else new)
  assert [json.loads(line) for line in out.read_text().splitlines()] == records
  from_jsonl = infer.text.generate_file(str(byte_run), None, str(jsonl), batch_size=3,
                                        max_new_tokens=6, progress=False,
                                        out=open(os.devnull, "w"))
  assert [r["completion"] for r in from_jsonl] == [r["completion"] for r in records]
  assert [r["line"] for r in from_jsonl] == [1, 2, 3, 4, 5]


def test_prompt_files_with_a_byte_order_mark_and_output_to_a_device_or_a_pipe(
    byte_run, tmp_path, monkeypatch):
  """From a trial: a UTF-8 byte-order mark (Windows editors write one) became part
  of a .txt file's first prompt and failed a .jsonl's first line; --output_jsonl
  of /dev/null was refused as existing, its fix "delete it first". A file with
  the mark reads as the file without it (standard input too), and a device or a
  pipe (a FIFO here, as a shell's >(gzip > x) gives) takes the records as they
  come, with no settings file beside it and nothing to resume."""
  import io
  import json
  import threading
  import infer.text
  bom = "\ufeff".encode()
  plain = tmp_path / "plain.txt"
  plain.write_text("ab\ncd\n")
  (tmp_path / "m.txt").write_bytes(bom + plain.read_bytes())
  (tmp_path / "m.jsonl").write_bytes(bom + b'{"prompt": "ab"}\n"cd"\n')
  expected = [(1, "ab"), (2, "cd")]
  for name in ("plain.txt", "m.txt", "m.jsonl"):
    assert infer.text.read_prompts(str(tmp_path / name)) == expected, name
  monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(bom + b"ab\ncd\n")))
  assert infer.text.read_prompts("-") == expected
  run = dict(max_new_tokens=3, progress=False)
  records = infer.text.generate_file(str(byte_run), None, str(plain), output=os.devnull,
                                     **run)
  assert [r["prompt"] for r in records] == ["ab", "cd"]
  assert not os.path.exists(infer.text.settings_path(os.devnull))
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  read = []
  reader = threading.Thread(target=lambda: read.append(fifo.read_text()))
  reader.start()
  # were the reader's input ended early, the writer would wait for another
  # reader: this one comes after two minutes, so the test fails instead of hanging
  rescue = threading.Timer(120, fifo.read_text)
  rescue.daemon = True
  rescue.start()
  piped = infer.text.generate_file(str(byte_run), None, str(plain), output=str(fifo),
                                   **run)
  rescue.cancel()
  reader.join(60)
  assert piped == records
  assert [json.loads(line) for line in read[0].splitlines()] == records
  assert not os.path.exists(infer.text.settings_path(str(fifo)))
  with pytest.raises(sharding.ConfigError, match="is a device or a pipe") as err:
    infer.text.generate_file(str(byte_run), None, str(plain), output=os.devnull,
                             resume=True, **run)
  assert err.value.field == "--resume_output"


def test_sampled_batches_of_a_prompt_file_draw_apart_and_repeat(byte_run, tmp_path):
  """Batch b samples from its own seed (SeedSequence([seed, b])): the same prompt
  in two batches of one row draws two different continuations (one seed for every
  batch would give the same), and a rerun gives both again."""
  import infer.text
  path = tmp_path / "same.txt"
  path.write_text("ab\nab\n")
  def run(seed):
    return [r["completion"] for r in infer.text.generate_file(
        str(byte_run), None, str(path), batch_size=1, max_new_tokens=12,
        temperature=1.0, seed=seed, progress=False, out=open(os.devnull, "w"))]
  first = run(0)
  assert first[0] != first[1]
  assert run(0) == first and run(1) != first


def test_cli_prompt_file_writes_json_lines_and_refuses_what_it_cannot_do(
    byte_run, tmp_path):
  import json
  prompts = tmp_path / "p.txt"
  prompts.write_text("def f(\nab\n")
  out = tmp_path / "out.jsonl"
  proc = run_cli("generate", f"--workdir={byte_run}", f"--prompts={prompts}",
                 f"--output_jsonl={out}", "--max_new_tokens=3", "--batch_size=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == [
      "def f(", "ab"]
  assert f"wrote 2 completions to {out}" in proc.stderr and proc.stdout == ""
  piped = run_cli("generate", f"--workdir={byte_run}", "--prompts=-",
                  "--max_new_tokens=3", "--batch_size=2", input="def f(\nab\n")
  assert piped.returncode == 0, piped.stderr[-2000:]  # it read a file named "-"
  assert [json.loads(line) for line in piped.stdout.splitlines()] == [
      json.loads(line) for line in out.read_text().splitlines()]
  before = out.read_text()
  bad_json = tmp_path / "bad.jsonl"
  bad_json.write_text('{"prompt": "a"}\n{"text": "b"}\n')
  cases = {
      (f"--prompts={prompts}", f"--output_jsonl={out}"):
          f"Config error in `--output_jsonl`: {out} exists; nothing is overwritten.",
      (f"--prompts={prompts}", "--resume_output"):
          "Config error in `--resume_output`: continues an --output_jsonl file, and "
          "none is given.",
      ("--prompt=ab", "--resume_output"):
          "Config error in `--resume_output`: --resume_output is read only with "
          "--prompts",
      ("--prompt=ab", "--batch_size=4"):
          "Config error in `--batch_size`: --batch_size is read only with --prompts",
      ("--prompt=ab", f"--prompts={prompts}"):
          "Config error in `--prompts`: is given with --prompt",
      (f"--prompts={bad_json}",):
          f'Config error in `--prompts`: line 2 of {bad_json} holds no "prompt" string',
      (f"--prompts={prompts}", "--batch_size=0"):
          "Config error in `--batch_size`: is 0",
      (f"--prompts={tmp_path / 'missing.txt'}",): "Config error in `--prompts`: cannot read",
      (f"--prompts={prompts}", f"--output_jsonl={tmp_path / 'no' / 'o.jsonl'}"):
          f"Config error in `--output_jsonl`: its directory {tmp_path / 'no'} does not "
          "exist",
      # found before the model loads (a trial's ran a batch, then a traceback)
      (f"--prompts={prompts}", f"--output_jsonl={tmp_path}"):
          f"Config error in `--output_jsonl`: {tmp_path} is a directory. Fix: pass the "
          f"path of a file, e.g. {tmp_path / 'completions.jsonl'}.",
      (f"--prompts={prompts}", f"--output_jsonl={tmp_path}", "--resume_output"):
          f"Config error in `--output_jsonl`: {tmp_path} is a directory.",
      (f"--prompts={prompts}", "--output_jsonl=/proc/rung-test.jsonl"):
          "Config error in `--output_jsonl`: /proc/rung-test.jsonl cannot be written: ",
      ():
          'Config error in `--prompt`: this command needs --prompt. Fix: pass '
          '--prompt="def main(" (or --prompts=FILE, one prompt a line).',
  }
  procs = run_cli_many([("generate", f"--workdir={byte_run}", *flags) for flags in cases]
                       + [("generate", f"--workdir={byte_run}", f"--prompts={prompts}",
                           "--output_jsonl=-", "--max_new_tokens=2", "--top_p=0.5")])
  for (flags, message), proc in zip(cases.items(), procs):
    assert proc.returncode == 2 and message in proc.stderr, (flags, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr
  assert out.read_text() == before
  # "-" is standard output (it wrote a file named "-"), and a sampling argument
  # greedy decoding ignores is one warning line, not Python's warning with its
  # source line
  dash = procs[-1]
  assert dash.returncode == 0, dash.stderr[-1500:]
  assert [json.loads(line)["prompt"] for line in dash.stdout.splitlines()] == [
      "def f(", "ab"]
  assert not os.path.exists("-")
  assert ("warning: top_p=0.5 has no effect at temperature 0, which is greedy; pass a "
          "temperature > 0 to sample.\n") in dash.stderr
  assert "UserWarning" not in dash.stderr


def test_sampling_arguments_may_be_0d_arrays_and_no_prompts_is_named(tiny_model):
  """jnp.float32(0.5) was refused as "not a finite number"; an empty list of
  prompts was reported as a prompt without tokens."""
  as_arrays = infer.generate(
      tiny_model, [[1, 2, 3]], max_new_tokens=jnp.int32(4),
      temperature=jnp.float32(0.5), top_k=np.int64(5), top_p=jnp.float32(0.9),
      seed=jnp.uint32(3))
  assert as_arrays == infer.generate(tiny_model, [[1, 2, 3]], max_new_tokens=4,
                                     temperature=0.5, top_k=5, top_p=0.9, seed=3)
  with pytest.raises(infer.SamplingArgumentError, match="temperature=-1.0 must"):
    infer.generate(tiny_model, [[1]], max_new_tokens=1, temperature=jnp.float32(-1))
  with pytest.raises(ValueError, match="prompts is empty; pass at least one prompt"):
    infer.generate(tiny_model, [], max_new_tokens=3)


def test_prompt_files_split_at_newlines_only(tmp_path, monkeypatch):
  """A trial's prompts split at a form feed (common in Python sources) and at
  U+2028 inside a JSON string (valid JSON, as json.dumps(ensure_ascii=False)
  writes it): lines end at \\n or \\r\\n only, and keep the file's line numbers.
  Standard input (`-`) splits the same."""
  import io
  import json

  from infer.text import read_prompts
  text = tmp_path / "p.txt"
  text.write_bytes("first\nx = 1\x0cy = 2\r\n\nlast \u2028 word\n".encode())
  assert read_prompts(str(text)) == [(1, "first"), (2, "x = 1\x0cy = 2"),
                                     (4, "last \u2028 word")]
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text(json.dumps({"prompt": "a\u2028b\x85c"}, ensure_ascii=False) + "\n"
                   + json.dumps("d") + "\n", encoding="utf-8")
  assert read_prompts(str(jsonl)) == [(1, "a\u2028b\x85c"), (2, "d")]
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.read_bytes())))
  assert read_prompts("-") == read_prompts(str(text))  # --prompts=-: the same lines
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(sharding.ConfigError, match="--prompts=- reads standard input, "
                     "and each of the 2 processes has its own"):
    read_prompts("-")


def _interrupted_at(call: int):
  """infer.text.generate that raises KeyboardInterrupt (Ctrl-C) at its `call`-th
  call, for monkeypatching."""
  import infer.text
  calls, real = [], infer.text.generate

  def generate(*args, **kwargs):
    calls.append(1)
    if len(calls) == call:
      raise KeyboardInterrupt
    return real(*args, **kwargs)
  return generate


def test_an_interrupted_prompt_file_keeps_the_finished_batches(byte_run, tmp_path,
                                                              monkeypatch, capsys):
  """Ctrl-C in the second batch: the first batch's lines are in the file, whole,
  and the run says how far it got (it ended in a bare KeyboardInterrupt
  traceback)."""
  import json

  import infer.text
  prompts = tmp_path / "p.txt"
  prompts.write_text("ab\ncd\nef\n")
  monkeypatch.setattr(infer.text, "generate", _interrupted_at(2))
  out = tmp_path / "out.jsonl"
  with pytest.raises(KeyboardInterrupt):
    infer.text.generate_file(str(byte_run), None, str(prompts), output=str(out),
                             batch_size=2, max_new_tokens=2, progress=False)
  assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == [
      "ab", "cd"]
  assert (f"interrupted after 2 of 3 prompts; {out} holds the finished ones "
          "(--resume_output continues it).") in capsys.readouterr().err


def test_an_interrupted_prompt_file_resumes_to_an_uninterrupted_run_s_file(
    byte_run, tmp_path, monkeypatch, capsys):
  """A file of prompts interrupted in its third batch could only be run again from
  the start (its --output_jsonl existed). With resume the whole batches written
  are kept and the rest generated from the batch after them: sampled, the file
  equals an uninterrupted run's byte for byte, also after a kill left a line cut
  short or half a batch. A file written for other prompts is refused, unchanged."""
  import infer.text
  prompts = tmp_path / "p.txt"
  prompts.write_text("ab\ncd\nef\ngh\nij\n")
  run = functools.partial(infer.text.generate_file, str(byte_run), None, str(prompts),
                          batch_size=2, max_new_tokens=5, temperature=1.0, seed=3,
                          progress=False)
  whole = tmp_path / "whole.jsonl"
  run(output=str(whole))
  expected = whole.read_text()
  out = tmp_path / "out.jsonl"
  with monkeypatch.context() as m:
    m.setattr(infer.text, "generate", _interrupted_at(3))
    with pytest.raises(KeyboardInterrupt):
      run(output=str(out))
  assert "(--resume_output continues it)" in capsys.readouterr().err
  assert out.read_text() == "".join(expected.splitlines(True)[:4])
  with pytest.raises(sharding.ConfigError, match="exists; nothing is overwritten"):
    run(output=str(out))
  records = run(output=str(out), resume=True)
  assert out.read_text() == expected and len(records) == 5
  assert "continuing" in capsys.readouterr().err
  lines = expected.splitlines(True)
  for cut in ("".join(lines[:3]),  # half of the second batch
              "".join(lines[:4]) + lines[4][:7],  # a line cut short
              expected + '{"li'):  # every prompt done, then a cut line
    out.write_text(cut)
    run(output=str(out), resume=True)
    assert out.read_text() == expected, cut
  other = tmp_path / "other.txt"
  other.write_text("ab\nzz\n")
  out.write_text("".join(lines[:3]))
  with pytest.raises(sharding.ConfigError, match=r"line 2 of .* is not the completion "
                     r"of prompt 2 \(line 2\) of --prompts") as err:
    infer.text.generate_file(str(byte_run), None, str(other), output=str(out),
                             batch_size=2, max_new_tokens=5, resume=True,
                             progress=False)
  assert err.value.field == "--output_jsonl"
  assert out.read_text() == "".join(lines[:3])


def _least_free(monkeypatch, model, rows, length, new) -> int:
  """The fewest free bytes `infer.generate.check_batch` passes with (bisection
  on the free memory it is told)."""
  from infer import kv_cache
  from infer.generate import check_batch
  low, high = 0, 2 ** 40  # refused at low, passes at high

  def passes(free):
    monkeypatch.setattr(kv_cache, "_free_bytes", lambda device: free)
    try:
      check_batch(model, rows, length, new)
    except infer.CacheDoesNotFit:
      return False
    return True
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (low, mid) if passes(mid) else (mid, high)
  monkeypatch.undo()
  return high


def test_a_prompt_file_pads_each_batch_to_its_own_length_bucket(
    byte_run, tmp_path, monkeypatch):
  """Every batch was padded to the file's longest prompt, and a decode step reads
  the whole cache: one long line made every batch as slow as it (a trial: 6.3 s
  -> 114 s). Each batch now pads to the next power of two of its own longest
  prompt (at least 16, at most the file's longest), with the completions of
  padding to the file's longest, greedy and sampled. The largest cache of the
  batches left is checked before the first batch runs: a file whose long line
  does not fit is refused with nothing written, and one whose long batch a
  resume keeps runs in the memory of the short ones."""
  import json

  import infer.text
  lengths = [2, 2, 20, 2, 40, 1, 2]  # batches of 2: longest 2, 20, 40, 2
  prompts = tmp_path / "p.txt"
  prompts.write_text("".join(chr(97 + i) * n + "\n" for i, n in enumerate(lengths)))

  def bucket(n):  # the next power of two, at least 16, at most the longest
    size = 16
    while size < n:
      size *= 2
    return min(size, max(lengths))
  real, padded = infer.text.generate, []

  def spy(*args, **kwargs):
    padded.append(kwargs["pad_to"])
    return real(*args, **kwargs)
  monkeypatch.setattr(infer.text, "generate", spy)
  run = functools.partial(infer.text.generate_file, str(byte_run), None, str(prompts),
                          batch_size=2, max_new_tokens=4, progress=False,
                          out=open(os.devnull, "w"))
  for sampling in (dict(), dict(temperature=1.0, seed=5)):
    padded.clear()
    records = run(**sampling)
    assert padded == [(2, bucket(max(lengths[i:i + 2])))
                      for i in range(0, len(lengths), 2)] == [(2, 16), (2, 32),
                                                             (2, 40), (2, 16)]
    with monkeypatch.context() as m:  # the old padding: the file's longest
      m.setattr(infer.text, "prompt_bucket", lambda length, longest: longest)
      assert run(**sampling) == records
  monkeypatch.undo()

  model, _ = infer.load(str(byte_run))
  short = _least_free(monkeypatch, model, 2, 32, 4)  # every batch but the third
  room = _least_free(monkeypatch, model, 2, 38, 4)  # 42 positions a row
  assert short < room < _least_free(monkeypatch, model, 2, 40, 4)
  from infer import kv_cache
  out = tmp_path / "out.jsonl"
  file = functools.partial(infer.text.generate_file, str(byte_run), None,
                           str(prompts), output=str(out), batch_size=2, progress=False)
  monkeypatch.setattr(kv_cache, "_free_bytes", lambda device: short)
  with pytest.raises(sharding.ConfigError, match=" of 44 positions ") as err:
    file(max_new_tokens=4)
  assert not out.exists()  # refused before the first batch
  assert err.value.fix == (f"line 5 of {prompts} alone (40 positions as the cache "
                           "holds it) does not fit even one row per device; shorten "
                           "it or leave it out of --prompts.")
  # memory for 42 positions a row: the fix names the new tokens that fit, and works
  monkeypatch.setattr(kv_cache, "_free_bytes", lambda device: room)
  with pytest.raises(sharding.ConfigError) as err:
    file(max_new_tokens=4)
  assert err.value.fix == "pass --max_new_tokens=2 or fewer."
  assert len(file(max_new_tokens=2)) == len(lengths)
  out.unlink()
  os.remove(infer.text.settings_path(str(out)))
  monkeypatch.undo()
  whole = infer.text.generate_file(str(byte_run), None, str(prompts), batch_size=2,
                                   max_new_tokens=4, progress=False,
                                   out=open(os.devnull, "w"))
  out.write_text("".join(json.dumps(r) + "\n" for r in whole[:6]))  # 3 batches kept
  monkeypatch.setattr(kv_cache, "_free_bytes", lambda device: short)
  assert infer.text.generate_file(str(byte_run), None, str(prompts), output=str(out),
                                  batch_size=2, max_new_tokens=4, progress=False,
                                  resume=True) == whole


def test_a_streamed_prompt_reports_its_decode_speed(byte_run, monkeypatch, capsys):
  """--prompt said nothing of speed. After the text, stderr counts the new ids
  and their rate after the first (which waits for prefill and compilation):
  with ids 0.25 s apart, 4.0 tokens/s whatever the count."""
  import itertools
  import types

  import infer.text
  from train import run_config
  from train.hf import stop_tokens
  from train.tokenizer import make_tokenizer
  config = run_config.load(str(byte_run))
  tokenizer = make_tokenizer(config.data, require_eos=False)
  model, _ = infer.load(str(byte_run))
  for new in (1, 6):
    ids = infer.generate(model, [tokenizer.encode("def f(")], max_new_tokens=new,
                         stop_tokens=stop_tokens(config.data, tokenizer))[0]
    clock = itertools.count(start=100.0, step=0.25)
    monkeypatch.setattr(infer.text, "time",  # infer.text's clock alone
                        types.SimpleNamespace(perf_counter=lambda: next(clock)))
    infer.text.generate_text(str(byte_run), None, "def f(", max_new_tokens=new,
                             out=open(os.devnull, "w"))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.endswith(f"{len(ids)} new token{'s' * (len(ids) != 1)}"
                        + (", 4.0 tokens/s after the first (prefill and compilation "
                           "excluded)" if len(ids) > 1 else "") + "\n"), err


def test_a_resumed_prompt_file_refuses_other_settings_than_wrote_it(
    byte_run, tmp_path, monkeypatch, capsys):
  """--resume_output continued a file whatever the sampling flags or checkpoint,
  so a resume with another --seed silently mixed two runs in one file. The
  settings that decide the completions are written next to it, and a resume with
  others is refused, naming the flags that continue it; following them continues
  it as an uninterrupted run's. Greedy files ignore the sampling flags."""
  import json

  import infer.text
  prompts = tmp_path / "p.txt"
  prompts.write_text("ab\ncd\nef\n")
  sampled = dict(batch_size=2, max_new_tokens=4, temperature=1.0, seed=3)
  run = functools.partial(infer.text.generate_file, str(byte_run), None, str(prompts),
                          progress=False)
  whole = tmp_path / "whole.jsonl"
  run(output=str(whole), **sampled)
  out = tmp_path / "out.jsonl"
  with monkeypatch.context() as m:
    m.setattr(infer.text, "generate", _interrupted_at(2))
    with pytest.raises(KeyboardInterrupt):
      run(output=str(out), **sampled)
  settings = infer.text.settings_path(str(out))
  assert json.loads(open(settings).read()) == dict(
      step=1, max_new_tokens=4, temperature=1.0, top_k=None, top_p=None, seed=3,
      batch_size=2)
  half = out.read_text()
  cases = [(dict(seed=4), "--seed=3", "--seed=4", "pass --seed=3 to continue it"),
           (dict(batch_size=1), "--batch_size=2", "--batch_size=1",
            "pass --batch_size=2 to continue it"),
           (dict(top_k=5), "no --top_k", "--top_k=5", "drop --top_k to continue it"),
           (dict(max_new_tokens=6, temperature=0.5),
            "--max_new_tokens=4 --temperature=1.0", "--max_new_tokens=6 "
            "--temperature=0.5", "pass --max_new_tokens=4 --temperature=1.0 to")]
  for change, was, now, fix in cases:
    with pytest.raises(sharding.ConfigError) as err:
      run(output=str(out), resume=True, **{**sampled, **change})
    assert err.value.field == "--resume_output"
    assert f"{out} was written with {was} ({settings}), and this run has {now}" in str(
        err.value), str(err.value)
    assert err.value.fix.startswith(fix), err.value.fix
    assert out.read_text() == half  # nothing written
  run(output=str(out), resume=True, **sampled)  # the flags that wrote it
  assert out.read_text() == whole.read_text()

  json.dump(dict(json.loads(open(settings).read()), step=7), open(settings, "w"))
  with pytest.raises(sharding.ConfigError, match=r"with --step=7 .* has --step=1"):
    run(output=str(out), resume=True, **sampled)
  open(settings, "w").write("{")
  with pytest.raises(sharding.ConfigError, match="cannot be read") as err:
    run(output=str(out), resume=True, **sampled)
  assert err.value.fix.startswith(f"delete {settings} to continue")
  os.remove(settings)  # a file from before settings were kept: continued, unchecked
  out.write_text(half)
  capsys.readouterr()
  run(output=str(out), resume=True, **sampled)
  assert f"note: {settings} is missing" in capsys.readouterr().err
  assert out.read_text() == whole.read_text() and os.path.exists(settings)

  greedy = tmp_path / "greedy.jsonl"
  run(output=str(greedy), batch_size=2, max_new_tokens=4)
  assert json.loads(open(infer.text.settings_path(str(greedy))).read()) == dict(
      step=1, max_new_tokens=4, temperature=0.0, top_k=None, top_p=None, seed=0,
      batch_size=2)
  run(output=str(greedy), resume=True, batch_size=1, max_new_tokens=4, seed=9)
  with pytest.raises(sharding.ConfigError, match="with --max_new_tokens=4 "):
    run(output=str(greedy), resume=True, batch_size=2, max_new_tokens=5)
  with pytest.raises(sharding.ConfigError) as err:  # greedy, then sampled
    run(output=str(greedy), resume=True, batch_size=2, max_new_tokens=4,
        temperature=1.0)
  assert err.value.fix == ("pass --temperature=0.0 to continue it, or pass a new "
                           "--output_jsonl.")



def test_a_saved_model_whose_heads_do_not_split_is_the_meshs_error(byte_run):
  """A saved model's head counts are its checkpoint's: a mesh that does not split
  them (4 kv heads over mesh.tensor=8) is refused as the mesh's error, and the
  fix changes only the mesh (it suggested changing model.num_kv_heads, which no
  checkpoint can take). Each alternative of the fix, followed, loads."""
  import conftest
  from sharding import ConfigError
  overrides = dict(tensor=8, data=1, fsdp=1)
  with pytest.raises(ConfigError) as err:
    infer.load(str(byte_run), mesh_overrides=overrides)
  assert err.value.field == "mesh.tensor", err.value
  assert "4 kv heads cannot be split over mesh.tensor=8" in str(err.value)
  assert "model." not in err.value.fix, err.value.fix
  alternatives = conftest.fix_alternatives(err.value.fix)
  assert alternatives, err.value.fix
  for flags_given in alternatives:
    fixed, rules = dict(overrides), None
    for flag in flags_given:
      name, value = flag.removeprefix("--config.mesh.").split("=")
      if name.startswith("rules."):
        continue  # leaving the heads unsplit: a mesh.rules override, below
      fixed[name] = int(value)
    if any(f.startswith("--config.mesh.rules.") for f in flags_given):
      from train import run_config
      config = run_config.load(str(byte_run))
      config.mesh.update(**fixed)
      config.mesh.rules = {f.split("=")[0].removeprefix("--config.mesh.rules."): ()
                           for f in flags_given if "rules." in f}
      rules = config
    model, config = infer.load(str(byte_run), config=rules,
                               mesh_overrides=None if rules else fixed)
    assert model(np.zeros((1, 4), np.int32)).shape[-1] == config.model.vocab_size
