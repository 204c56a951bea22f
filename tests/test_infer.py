"""KV-cache generation against full forwards, HF and other meshes."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import infer
import sharding
from model import Decoder, ModelConfig, MoEConfig
from train import run_config

CFG = dict(vocab_size=61, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2,
           head_dim=8, d_ff=48)
BLOCKS = {"standard": dict(block="standard"), "parallel": dict(block="parallel"),
          "ladder": dict(block="ladder"),
          "hybrid": dict(block="ladder", ladder_layers="upper:2"),
          # units of (dense, MoE) layers, standard then ladder. Capacity drops
          # depend on how many tokens a call routes (a prompt vs one token), so
          # dispatch is dropless here.
          "moe": dict(block="ladder", ladder_layers="upper:2", moe=MoEConfig(
              num_experts=4, every_k_layers=2, dispatch="dropless")),
          # bf16 weights, activations and cache: every cache layout's dots must run
          # on XLA:CPU too (its bf16 x bf16 -> f32 dot is missing for some layouts).
          "bfloat16": dict(block="ladder", compute_dtype="bfloat16",
                           param_dtype="bfloat16"),
          # Mistral's sliding window, shorter than both prompts: prefill through the
          # kernels, decode steps through the cache, one window.
          "window": dict(block="standard", sliding_window=3)}


@pytest.mark.parametrize("block", BLOCKS)
def test_cached_decode_equals_full_forward(block):
  m = Decoder(ModelConfig(**CFG, **BLOCKS[block]), rngs=nnx.Rngs(0))
  tol = 3e-2 if block == "bfloat16" else 1e-5  # bf16: op order differs by mode
  lengths, new = [5, 9], 6
  seqs = np.asarray(jax.random.randint(jax.random.key(1), (2, 9 + new), 0, 61))
  forward = jax.jit(lambda m, t: m(t))
  full = [np.asarray(forward(m, seqs[r:r + 1]))[0] for r in range(2)]  # [T, vocab]
  prompts = np.zeros((2, 9), np.int32)
  for r, n in enumerate(lengths):
    prompts[r, :n] = seqs[r, :n]
  cache = infer.init_cache(m, 2, 9 + new)
  prefill = jax.jit(lambda m, t, n, c: m.prefill(t, n, c))
  logits, cache = prefill(m, jnp.asarray(prompts), jnp.asarray(lengths), cache)
  for r, n in enumerate(lengths):
    np.testing.assert_allclose(logits[r, :n], full[r][:n], rtol=tol, atol=tol)
  # The scanned model over the stacked cache, and the generation loop's form:
  # unrolled per-layer weights over the split, heads-major cache.
  stacked = jax.jit(lambda m, t, c: m.decode(t, c))
  unrolled = jax.jit(lambda m, t, c: m.decode(t, c, layers=m.split_layers()))
  split = cache.for_decoding(m.cfg.unit)
  for step, c in ((stacked, cache), (unrolled, split)):
    for j in range(new):
      pos = np.array([n + j for n in lengths])
      tok = seqs[np.arange(2), pos]
      logits, c = step(m, tok[:, None], c)
      for r in range(2):
        np.testing.assert_allclose(logits[r, 0], full[r][pos[r]], rtol=tol,
                                   atol=tol)


def _greedy_by_full_forward(m, prompt, n):
  """Greedy tokens by a full causal forward per step, over a zero-padded sequence of
  fixed length (one compile): position i's logits see only tokens 0..i."""
  forward = jax.jit(lambda m, t: m(t))
  seq = np.zeros((1, len(prompt) + n), np.int32)
  seq[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    seq[0, i] = int(np.argmax(np.asarray(forward(m, seq))[0, i - 1]))
  return seq[0, len(prompt):].tolist()


def test_generate_greedy_matches_recomputation_and_streams():
  m = Decoder(ModelConfig(**CFG, block="ladder"), rngs=nnx.Rngs(3))
  prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13]]
  out = infer.generate(m, prompts, max_new_tokens=5)
  assert out == [_greedy_by_full_forward(m, p, 5) for p in prompts]
  streamed = []
  out2 = infer.generate(m, prompts, max_new_tokens=5, on_token=streamed.append)
  assert out2 == out and len(streamed) == 5


def test_stop_tokens_end_a_row():
  m = Decoder(ModelConfig(**CFG), rngs=nnx.Rngs(3))
  prompts = [[1, 2, 3], [4, 5]]
  free = infer.generate(m, prompts, max_new_tokens=8)
  stop = free[0][2]
  out = infer.generate(m, prompts, max_new_tokens=8, stop_tokens=[stop])
  assert out[0] == free[0][:free[0].index(stop) + 1]
  assert out[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_sampling_modes():
  m = Decoder(ModelConfig(**CFG), rngs=nnx.Rngs(3))
  prompts = [[1, 2, 3]]
  greedy = infer.generate(m, prompts, max_new_tokens=6)
  assert infer.generate(m, prompts, max_new_tokens=6, temperature=1.0, top_k=1) == greedy
  assert infer.generate(m, prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6) == greedy
  a = infer.generate(m, prompts, max_new_tokens=6, temperature=2.0, seed=1)
  assert a == infer.generate(m, prompts, max_new_tokens=6, temperature=2.0, seed=1)
  others = [infer.generate(m, prompts, max_new_tokens=6, temperature=2.0, seed=s)
            for s in range(2, 6)]
  assert any(o != a for o in others)


def test_top_k_and_top_p_keep_only_allowed_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 200)
  top2 = {int(infer.sample(logits, k, 1.0, top_k=2)[0]) for k in keys}
  assert top2 == {0, 1}
  nucleus = {int(infer.sample(logits, k, 1.0, top_p=0.7)[0]) for k in keys}
  assert nucleus == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7


@pytest.fixture(scope="module")
def imported_hf(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from experiments import base
  from train import hf
  root = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
      eos_token_id=None, bos_token_id=None, pad_token_id=None)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(root / "hf")
  c = base.get_config()
  hf.import_hf(str(root / "hf"), str(root / "rung"), c)
  return model, str(root / "rung")


PROMPTS = [[5, 17, 99, 3], [8, 1, 2, 44, 45, 46, 100, 7, 7], [120]]


def test_a_step_that_is_not_an_integer_is_named_so(imported_hf):
  """From a Python-API trial: infer.load(step="0") said "0 is not a saved step
  (saved: 0)", and step=0.0 passed the saved-step test, then failed as an
  unreadable step, pointing at the step before it. A step that is not an integer
  is refused as such; a NumPy integer is one."""
  _, workdir = imported_hf
  for step in ("0", 0.0, True):
    with pytest.raises(sharding.ConfigError, match=rf"{step!r} is a "
                       rf"{type(step).__name__}; a step is an integer \(saved: 0\)"):
      infer.load(workdir, step=step)
  model, _ = infer.load(workdir, step=np.int64(0))
  assert model.cfg.num_layers == 2


def test_a_mesh_error_of_load_is_fixed_in_mesh_overrides(imported_hf, tmp_path):
  """From a Python-API trial: README's infer.load(run, mesh_overrides={"tensor":
  2}) on a run saved with data=8 was refused with the fix "pass
  --config.mesh.data=-1", which load cannot take. From mesh_overrides the fix is
  that argument with the caller's sizes, and followed as given it loads; a mesh
  smaller than the devices is also offered `devices=`."""
  import ast
  import re
  import shutil
  _, workdir = imported_hf
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  saved = json.loads((run / "config.json").read_text())
  saved["mesh"]["data"] = 8
  (run / "config.json").write_text(json.dumps(saved))
  for asked, devices in (({"fsdp": 2}, None), ({"data": 2}, 2)):
    with pytest.raises(sharding.ConfigError) as err:
      infer.load(str(run), mesh_overrides=asked)
    assert "--config.mesh" not in err.value.fix, err.value.fix
    given = ast.literal_eval(re.search(r"mesh_overrides=(\{[^}]*\})", err.value.fix)[1])
    assert given.items() >= asked.items() or devices, given
    _, config = infer.load(str(run), mesh_overrides=given)  # the fix, as given
    assert math.prod(config.mesh[a] for a in sharding.AXES) == len(jax.devices())
    if devices:
      assert f"devices=jax.devices()[:{devices}]" in err.value.fix
      _, config = infer.load(str(run), mesh_overrides=asked,
                             devices=jax.devices()[:devices])
      assert config.mesh.data == devices


def test_greedy_equals_transformers_generate(imported_hf):
  import torch
  hf_model, workdir = imported_hf
  model, _ = infer.load(workdir)
  ours = infer.generate(model, PROMPTS, max_new_tokens=32)
  for prompt, got in zip(PROMPTS, ours):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32,
                              do_sample=False, min_new_tokens=32)
    assert got == ref[0, len(prompt):].tolist()


def test_bf16_greedy_equals_transformers_in_bf16(imported_hf):
  """bfloat16 weights, activations and KV cache (what `generate
  --config.model.compute_dtype=bfloat16 --config.model.param_dtype=bfloat16`
  loads) against transformers with the model cast to bfloat16: the same 32 greedy
  tokens for each prompt, generated as one batch of 3 (the heads-major cache)."""
  import copy

  import torch

  hf_model, workdir = imported_hf
  config = run_config.load(workdir)
  config.model.update(compute_dtype="bfloat16", param_dtype="bfloat16")
  model, _ = infer.load(workdir, config=config)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
      jnp.dtype(jnp.bfloat16)}
  ours = infer.generate(model, PROMPTS, max_new_tokens=32)
  hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
  for prompt, got in zip(PROMPTS, ours):
    with torch.no_grad():
      ref = hf_bf16.generate(torch.tensor([prompt]), max_new_tokens=32,
                             do_sample=False, min_new_tokens=32)
    assert got == ref[0, len(prompt):].tolist()


def test_generation_same_on_tensor4_data2_as_one_device(imported_hf):
  _, workdir = imported_hf
  one, _ = infer.load(workdir, mesh_overrides=dict(data=1, fsdp=1),
                      devices=jax.devices()[:1])
  saved = run_config.load(workdir)
  saved.train.batch_size = 3  # data=2 does not split it: serving does not ask
  # Trained sequence parallel; served where nothing splits the length: auto.
  saved.model.attention = "ring"
  sharded, config = infer.load(workdir, mesh_overrides=dict(data=2, fsdp=1, tensor=4),
                               config=saved)
  assert config.mesh.tensor == 4 and config.model.attention == "auto"
  q = sharded.layers.attn.q[...]
  assert "tensor" in str(q.sharding.spec)
  expected = infer.generate(one, PROMPTS[:2], max_new_tokens=12)
  assert infer.generate(sharded, PROMPTS[:2], max_new_tokens=12) == expected
  # under a caller's own mesh, generate still runs on the model's (its cache was
  # made under the caller's: an AssertionError inside JAX), streaming too
  with jax.set_mesh(jax.make_mesh((2, 4), ("data", "fsdp"))):
    assert infer.generate(sharded, PROMPTS[:2], max_new_tokens=12) == expected
    assert infer.generate(sharded, PROMPTS[:2], max_new_tokens=12,
                          on_token=lambda ids: None) == expected


def test_cli_generate_streams_what_the_library_generates(tiny_config, tmp_path):
  """`python -m experiment generate` on a tensor=2 mesh prints the prompt and the
  same greedy continuation as `infer.generate` on one device."""
  import train
  from conftest import run_cli
  from train.tokenizer import ByteTokenizer
  tiny_config.model.vocab_size = ByteTokenizer.vocab_size
  train.train(tiny_config, str(tmp_path), progress=False)
  model, _ = infer.load(str(tmp_path), devices=jax.devices()[:1])
  tok = ByteTokenizer()
  # A prompt whose greedy continuation has something to compare before any eos
  # (what a 3-step model says first depends on its training).
  prompts = ["def ", "import ", "class A", "x = 1", "for i in", "# a", "print(", "if "]
  outs = infer.generate(model, [tok.encode(p).tolist() for p in prompts],
                        max_new_tokens=12, stop_tokens=[tok.eos_id])
  prompt, new = next(((p, o) for p, o in zip(prompts, outs)
                      if len(o) >= 4 and tok.eos_id not in o[:3]), (None, outs))
  assert prompt is not None, new
  proc = run_cli("generate", f"--workdir={tmp_path}", f"--prompt={prompt}",
                 "--max_new_tokens=12", "--config.mesh.tensor=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  shown = new[:-1] if new[-1] == tok.eos_id else new
  assert proc.stdout == prompt + tok.decode(shown) + "\n"
  # A stop id ends the output unprinted: stopping at the third new token prints two.
  proc = run_cli("generate", f"--workdir={tmp_path}", f"--prompt={prompt}",
                 "--max_new_tokens=12", f"--config.data.stop_ids=({new[2]},)")
  assert proc.returncode == 0, proc.stderr[-2000:]
  cut = new.index(new[2])  # the first occurrence stops it
  assert proc.stdout == prompt + tok.decode(new[:cut]) + "\n"


# ------------------------------------------- a row's result is its own (issue #14)

# Weights large enough (init_std 0.5) that routing, and so capacity drops, decide
# the logits and the greedy path.
ROW_CFG = dict(CFG, num_layers=1, init_std=0.5)
ROW_MOE = {d: MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, dispatch=d)
           for d in ("capacity", "dropless")}


def _prefill_logits(m, prompts, new):
  """The logits at each prompt's last token, as infer.generate's prefill gives
  them (right-padded, with its masks; its cache for `new` tokens, so the compiled
  prefill is generate's)."""
  from infer import decode
  from infer.generate import _prefill
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
  graphdef, params = nnx.split(m)
  cache = decode.init_decode_cache(m, len(prompts), int(lengths.max()) + new)
  return np.asarray(_prefill(graphdef, params, decode.split(graphdef, params), tokens,
                             cache, lengths)[0])


@pytest.mark.parametrize("dispatch", ROW_MOE)
def test_row_does_not_depend_on_its_batch_mates(dispatch):
  """Each of three prompts (lengths 6, 40, 1) gives the same prefill logits and
  greedy continuation alone as in one batch with the other two: padding takes
  no expert capacity and is not routed, and capacity counts a row's own tokens,
  not the padded length. The first prompt repeats one token, so alone it
  overflows its experts (capacity 3 of 12 pairs): capacity from the padded
  length (20) would keep what its own length drops."""
  m = Decoder(ModelConfig(**ROW_CFG, moe=ROW_MOE[dispatch]), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompts = [[7] * 6, rng.integers(0, 61, 40).tolist(), [3]]
  new = 6
  together = _prefill_logits(m, prompts, new)
  batch_out = infer.generate(m, prompts, max_new_tokens=new)
  for r, p in enumerate(prompts):
    np.testing.assert_allclose(together[r], _prefill_logits(m, [p], new)[0],
                               rtol=1e-4, atol=1e-4, err_msg=f"row {r}")
    assert batch_out[r] == infer.generate(m, [p], max_new_tokens=new)[0], r


# ------------------------------------- any batch size on any mesh (issue #14)

# (model, mesh, whether to stream too)
SERVE_CASES = {
    "moe_capacity_expert4": (dict(moe=ROW_MOE["capacity"]), dict(expert=4), True),
    "moe_dropless_expert4": (dict(moe=ROW_MOE["dropless"]), dict(expert=4), False),
    "dense_fsdp4": ({}, dict(fsdp=4), False),
    # prompts of odd lengths on sequence=2: padded to even lengths
    "dense_fsdp2_sequence2": ({}, dict(fsdp=2, sequence=2), False),
    # trained zig-zag balanced: prompts come in natural order, so the prefill
    # takes `auto` (it ran the zig-zag ring on them and gave other tokens)
    "ring_zigzag_sequence2": (dict(attention="ring_zigzag"), dict(fsdp=2, sequence=2), True),
}


@pytest.mark.parametrize("case", SERVE_CASES)
def test_any_batch_size_serves_on_any_mesh(case):
  """Batches of 1, 2 and 3 prompts on a 4-device mesh that splits the batch (the
  expert exchange needs whole shards; generate pads the batch) or the length
  (sequence parallel attention needs whole shards; generate pads the prompts)
  give what one device gives, greedy; the streaming path reports only the real
  rows (one case: each costs compiles)."""
  from jax.sharding import NamedSharding
  import sharding
  from train.state import model_spec, param_shardings
  model, sizes, stream = SERVE_CASES[case]
  cfg = ModelConfig(**ROW_CFG, **model)
  one = Decoder(dataclasses.replace(cfg, attention="auto"), rngs=nnx.Rngs(0))
  spec = model_spec(cfg, sharding.normalize_rules(None))
  mesh = sharding.make_mesh({**dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                             **sizes}, jax.devices()[:4])
  params = jax.device_put(nnx.to_pure_dict(nnx.state(one, nnx.Param)),
                          param_shardings(spec, mesh))
  sharded = spec.model(params)
  assert isinstance(sharded.embed.table[...].sharding, NamedSharding)
  # The longest first: every batch pads to the same prefill shape (one compile).
  prompts = [[5, 17, 9, 3, 44, 2, 8, 8, 1, 30, 12], [8, 1, 2, 44, 45, 46], [20]]
  reference = infer.generate(one, prompts, max_new_tokens=5)
  for n in (1, 2, 3):
    assert infer.generate(sharded, prompts[:n], max_new_tokens=5) == reference[:n], n
  if not stream:
    return
  columns = []
  streamed = infer.generate(sharded, prompts[:1], max_new_tokens=5,
                            on_token=columns.append)
  assert streamed == reference[:1]
  assert [c.shape for c in columns] == [(1,)] * 5
  assert [int(c[0]) for c in columns] == reference[0]


def test_generation_prefill_applies_the_head_at_the_last_tokens_only():
  """infer.generate's prefill (`Decoder.prefill_last`) gives `prefill`'s logits at
  each prompt's last token, and never makes the others: with a 16384-token
  vocabulary, 2 prompts of 512 tokens have 64 MiB of float32 logits, and the
  compiled prefill's temporaries stay under half of that (16 MiB, what a 61-token
  vocabulary needs; a prefill that makes them all and picks the last takes
  64 MiB)."""
  from infer import decode
  from infer.generate import _prefill
  vocab = 16384
  m = Decoder(ModelConfig(**{**CFG, "vocab_size": vocab, "num_layers": 1}),
              rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(m)
  tokens = jax.random.randint(jax.random.key(7), (2, 512), 0, vocab)
  lengths = jnp.asarray([512, 100])
  full, _ = jax.jit(lambda m, t, n, c: m.prefill(t, n, c))(
      m, tokens, lengths, infer.init_cache(m, 2, 512))
  layers = decode.split(graphdef, params)
  last, _ = _prefill(graphdef, params, layers, tokens, decode.init_decode_cache(m, 2, 512),
                     lengths)
  np.testing.assert_allclose(last, np.asarray(full)[[0, 1], [511, 99]], rtol=1e-5,
                             atol=1e-6)
  compiled = _prefill.lower(graphdef, params, layers, tokens,
                            decode.init_decode_cache(m, 2, 512), lengths).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 2 * 512 * vocab * 4 / 2
