"""HF checkpoints in and out (Llama 3 with llama3 rope, Qwen2, Qwen3, Mistral with a
sliding window, Mixtral; transformers 4 and 5 config layouts): logits, greedy
generation and exported configs match transformers."""

import glob
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

import infer  # noqa: E402
import sharding  # noqa: E402
from experiments import base  # noqa: E402
from model import ModelConfig  # noqa: E402
from sharding import ConfigError  # noqa: E402
from train import hf, run_config  # noqa: E402

PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38],
           [8, 32, 79, 50, 28, 84, 19, 71, 69, 39, 93, 75, 10]]
NEW_TOKENS = 12
COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              rms_norm_eps=1e-5)
# One tiny model per family, odd sizes: hidden 48 (not a power of two), GQA, and a
# head_dim that is not hidden/heads where the family has the field.
FAMILIES = {
    "llama3": ("LlamaForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=12,
        tie_word_embeddings=False, max_position_embeddings=512, bos_token_id=1,
        rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=256))),
    "qwen2": ("Qwen2ForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=1024,
        rope_parameters=dict(rope_type="default", rope_theta=200000.0))),
    "qwen3": ("Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=False, max_position_embeddings=256,
        rope_parameters=dict(rope_type="yarn", rope_theta=20000.0, factor=4.0,
                             original_max_position_embeddings=64))),
    # A window of 4 keys: the 9- and 13-token prompts are 2-3 windows long.
    "mistral": ("MistralForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, sliding_window=4,
        tie_word_embeddings=False, max_position_embeddings=512,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Top-2 of 4 experts, renormalised gates; full attention (sliding_window null).
    "mixtral": ("MixtralForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}


def _hf_model(arch, kwargs, path, stops=1, shard=False):
  """A random `arch` model saved to `path`; its eos ids (`stops` of them) are tokens
  its greedy continuations produce, so generation really stops on them."""
  torch.manual_seed(0)
  config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(
      **COMMON, **kwargs)
  model = getattr(transformers, arch)(config).eval()
  with torch.no_grad():  # norms start at 1 and biases at 0; make them matter
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.5)
  if stops:
    model.generation_config.eos_token_id = None
    eos = []  # a token first produced at step >= 3 of some continuation
    for c in (_hf_generate(model, p) for p in PROMPTS):
      new = [t for j, t in enumerate(c) if j >= 3 and t not in c[:j] and t not in eos]
      eos += new[:1]
    eos = eos[:stops] or [c[0]]  # (tiny random models repeat themselves)
    eos = eos[0] if stops == 1 else eos
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
  # sampling defaults and a pad id, which an export keeps (they were dropped)
  model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9,
                                 pad_token_id=0)
  model.save_pretrained(path, max_shard_size="40KB" if shard else "1GB")
  return model


def _hf_generate(model, prompt):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def _hf_logits(model, prompts=PROMPTS):
  """Each prompt alone: [len(p), vocab] float32 numpy arrays."""
  with torch.no_grad():
    return [model(torch.tensor([p])).logits[0].numpy() for p in prompts]


def _rung_logits(rung_model, prompts=PROMPTS):
  """One right-padded batch (causal: padding does not reach the real positions)."""
  tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  out = np.asarray(jax.jit(lambda m, t: m(t))(rung_model, tokens))
  return [out[i, :len(p)] for i, p in enumerate(prompts)]


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _import(path, workdir, **mesh):
  c = base.get_config()
  c.mesh.update(**(mesh or dict(data=2, fsdp=2, tensor=2)))
  hf.import_hf(str(path), str(workdir), c)


def _rope(config):
  """(rope_type, theta, inv_freq, attention scale) as transformers computes them."""
  params = config.rope_parameters
  kind = params["rope_type"]
  if kind == "default":
    return kind, params["rope_theta"], None, 1.0
  inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
  return kind, params["rope_theta"], inv_freq.numpy(), float(scale)


def _assert_same_config(original_dir, exported_dir):
  """The config.json fields that change what the model computes or emits."""
  a = transformers.AutoConfig.from_pretrained(original_dir)
  b = transformers.AutoConfig.from_pretrained(exported_dir)
  for key in ("architectures", "model_type", "vocab_size", "hidden_size",
              "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "rms_norm_eps",
              "tie_word_embeddings", "max_position_embeddings", "eos_token_id",
              "bos_token_id", "attention_bias", "mlp_bias", "use_sliding_window",
              "sliding_window", "num_local_experts", "num_experts_per_tok"):
    assert getattr(a, key, None) == getattr(b, key, None), key
  head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  assert head_dim(a) == head_dim(b)
  (ka, ta, fa, sa), (kb, tb, fb, sb) = _rope(a), _rope(b)
  assert (ka, ta, sa) == (kb, tb, pytest.approx(sb, rel=1e-12))
  if fa is not None:
    np.testing.assert_array_equal(fa, fb)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_generation_and_round_trip(family, tmp_path):
  arch, kwargs = FAMILIES[family]
  shard = family == "qwen2"
  model = _hf_model(arch, kwargs, tmp_path / "hf", stops=1 if shard else 2,
                    shard=shard)
  if shard:
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  expected = _hf_logits(model)

  _import(tmp_path / "hf", tmp_path / "rung")
  rung_model, config = infer.load(str(tmp_path / "rung"))
  assert config.model.qkv_bias == (family == "qwen2")
  assert config.model.qk_norm == (family == "qwen3")
  assert config.model.sliding_window == kwargs.get("sliding_window", 0)
  assert config.model.moe.num_experts == kwargs.get("num_local_experts", 0)
  assert config.model.rope_type == kwargs["rope_parameters"]["rope_type"]
  stops = hf.stop_tokens(config.data)
  eos = model.config.eos_token_id
  assert stops == ([eos] if isinstance(eos, int) else eos)
  assert _max_diff(_rung_logits(rung_model), expected) <= 1e-4

  want = [_hf_generate(model, p) for p in PROMPTS]
  assert any(len(w) < NEW_TOKENS for w in want)  # some stop on an eos
  got = infer.generate(rung_model, PROMPTS, max_new_tokens=NEW_TOKENS,
                       stop_tokens=stops)
  assert got == want

  hf.export_hf(str(tmp_path / "rung"), str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(back).__name__ == arch
  assert _max_diff(_hf_logits(back), expected) <= 1e-4
  _assert_same_config(tmp_path / "hf", tmp_path / "out")
  assert _generation_fields(tmp_path / "out") == _generation_fields(tmp_path / "hf")


def _generation_fields(path) -> dict:
  """generation_config.json as transformers reads it, less its version stamp."""
  return {k: v for k, v in transformers.GenerationConfig.from_pretrained(
      path).to_diff_dict().items() if k != "transformers_version"}


# transformers 4 wrote rotary settings as top-level rope_theta + rope_scaling
# (older files name the variant `type`).
T4_SCALINGS = {
    "linear": {"type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
             "beta_fast": 16, "beta_slow": 2},
}


@pytest.fixture(scope="module")
def t5_llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("t5_llama")
  arch, kwargs = FAMILIES["llama3"]
  _hf_model(arch, {**kwargs, "tie_word_embeddings": True}, path, stops=0)
  return path


@pytest.mark.parametrize("scaling", list(T4_SCALINGS))
def test_transformers4_config_layout(scaling, t5_llama, tmp_path):
  src = tmp_path / "hf"
  shutil.copytree(t5_llama, src)
  cfg = json.loads((src / "config.json").read_text())
  cfg.pop("rope_parameters")
  cfg.update(rope_theta=30000.0, rope_scaling=T4_SCALINGS[scaling],
             eos_token_id=[5, 7], torch_dtype="float32")
  cfg.pop("dtype", None)
  (src / "config.json").write_text(json.dumps(cfg))
  (src / "generation_config.json").unlink(missing_ok=True)
  reference = transformers.LlamaForCausalLM.from_pretrained(src).eval()
  assert reference.config.rope_parameters["rope_theta"] == 30000.0
  expected = _hf_logits(reference)

  _import(src, tmp_path / "rung", data=8)
  rung_model, config = infer.load(str(tmp_path / "rung"))
  assert (config.model.rope_type, config.model.rope_theta) == (scaling, 30000.0)
  assert hf.stop_tokens(config.data) == [5, 7]
  assert _max_diff(_rung_logits(rung_model), expected) <= 1e-4

  hf.export_hf(str(tmp_path / "rung"), str(tmp_path / "out"))
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert _max_diff(_hf_logits(back), expected) <= 1e-4
  _assert_same_config(src, tmp_path / "out")


def test_export_writes_the_transformers4_layout():
  from model import ModelConfig
  cfg = ModelConfig(rope_type="linear", rope_factor=2.0, rope_theta=30000.0,
                    max_position_embeddings=4096)
  old = hf.hf_config(cfg, [5, 7], 1, major=4)
  assert "rope_parameters" not in old and old["rope_theta"] == 30000.0
  assert old["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
  assert old["max_position_embeddings"] == 4096 and old["eos_token_id"] == [5, 7]
  fields = hf.model_fields_from_hf({**old, "num_attention_heads": 8})
  assert (fields["rope_type"], fields["rope_factor"]) == ("linear", 2.0)


@pytest.mark.parametrize("change,named", [
    ({"architectures": ["GPTNeoXForCausalLM"]}, "architecture GPTNeoXForCausalLM"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "rope_parameters.rope_type='longrope'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},  # the key the file has
     "rope_scaling.type='dynamic'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_scaling.rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "rope_parameters.low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
     "use_sliding_window=True"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
])
def test_unsupported_refused_by_name(change, named):
  config = {"architectures": ["LlamaForCausalLM"], **COMMON, "num_attention_heads": 4,
            **change}
  with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
    hf.model_fields_from_hf(config)


def test_cli_refuses_longrope(tmp_path):
  from conftest import run_cli
  (tmp_path / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], **COMMON, "num_attention_heads": 4,
      "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                          "short_factor": [1.0], "long_factor": [1.0]}}))
  proc = run_cli("import-hf", f"--hf_dir={tmp_path}", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "rope_type='longrope'" in proc.stderr


def test_import_refuses_overrides_config_json_decides(t5_llama, tmp_path):
  """--config.model.* fields config.json sets were dropped silently (num_layers,
  vocab_size, rope_theta) or blamed on the checkpoint (experts on a dense model);
  now each is a config error naming it, before anything is written. Fields it
  does not set (param_dtype) apply; block=ladder applies and is announced."""
  from conftest import run_cli_many
  cases = {"model.num_layers": ["--config.model.num_layers=3"],
           "model.rope_theta": ["--config.model.rope_theta=123.0"],
           "model.moe.num_experts": ["--config.model.moe.num_experts=4"],
           "ok": ["--config.model.param_dtype=bfloat16", "--config.model.block=ladder",
                  "--config.model.num_layers=2"]}  # the checkpoint's own value
  runs = dict(zip(cases, run_cli_many([
      ("import-hf", f"--hf_dir={t5_llama}", f"--workdir={tmp_path / name}", *flags)
      for name, flags in cases.items()])))
  for name, proc in runs.items():
    if name == "ok":
      continue
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"Config error in `{name}`" in proc.stderr, proc.stderr[-2000:]
    assert f"drop --config.{name} from the import" in proc.stderr
    assert not (tmp_path / name).exists()
  ok = runs["ok"]
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "block: ladder: the imported weights run with another residual" in ok.stdout
  saved = json.loads((tmp_path / "ok" / "config.json").read_text())["model"]
  assert (saved["param_dtype"], saved["block"], saved["num_layers"]) == (
      "bfloat16", "ladder", 2)


def test_export_refuses_ladder(t5_llama, tmp_path):
  """A ladder model has no transformers equivalent; a ladder block whose
  ladder_layers pick none is a standard model (a ladder trial found it refused)
  and exports the same weights and logits."""
  _import(t5_llama, tmp_path / "rung", data=8)
  hf.export_hf(str(tmp_path / "rung"), str(tmp_path / "standard"))
  cfg = json.loads((tmp_path / "rung" / "config.json").read_text())
  for layers, exports in (("all", False), ("upper:1", False), ("none", True)):
    cfg["model"].update(block="ladder", ladder_layers=layers)
    (tmp_path / "rung" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / f"out_{layers.replace(':', '')}"
    if exports:
      hf.export_hf(str(tmp_path / "rung"), str(out))
      a, b = (transformers.AutoModelForCausalLM.from_pretrained(p).eval()
              for p in (tmp_path / "standard", out))
      assert _max_diff(_hf_logits(a), _hf_logits(b)) == 0
      continue
    with pytest.raises(ConfigError, match="a ladder block.* model has no transformers "
                       "equivalent") as err:
      hf.export_hf(str(tmp_path / "rung"), str(out))
    assert "only runs trained with --config.model.block=standard export" in err.value.fix
    assert not os.path.exists(out)


def test_a_capacity_dispatch_moe_export_says_transformers_drops_nothing(
    tmp_path, capsys):
  """From a trial: a capacity-dispatch MoE run exported as Mixtral silently, and
  transformers' logits differed from rung's (0.04) where rung's capacity dropped
  experts. The export says so, and what it says holds: rung under capacity 0.5
  differs from the export's logits, rung dropless matches them."""
  arch, kwargs = FAMILIES["mixtral"]
  _hf_model(arch, kwargs, tmp_path / "hf")
  _import(tmp_path / "hf", tmp_path / "rung", data=8)
  path = tmp_path / "rung" / "config.json"
  cfg = json.loads(path.read_text())
  cfg["model"]["moe"].update(dispatch="capacity", capacity_factor=0.5)
  path.write_text(json.dumps(cfg))
  capsys.readouterr()
  hf.export_hf(str(tmp_path / "rung"), str(tmp_path / "out"))
  out = capsys.readouterr().out
  assert ("note: the run routes with capacity dispatch (model.moe.capacity_factor=0.5)"
          in out and "--config.model.moe.dispatch=dropless" in out), out
  exported = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out").eval())
  capacity, _ = infer.load(str(tmp_path / "rung"))
  assert _max_diff(_rung_logits(capacity), exported) > 1e-2
  config = run_config.load(str(tmp_path / "rung"))
  config.model.moe.dispatch = "dropless"
  dropless, _ = infer.load(str(tmp_path / "rung"), config=config)
  assert _max_diff(_rung_logits(dropless), exported) <= 1e-4


def test_a_moe_model_hf_cannot_hold_names_every_field_at_once():
  """A top-1 MoE with every_k_layers=2, a shared expert and no renormalisation
  was refused one field at a time (each fix met the next refusal)."""
  from model import ModelConfig
  cfg = ModelConfig(num_layers=2, moe=dict(num_experts=4, top_k=1, every_k_layers=2,
                                           shared_expert=True, renormalize=False))
  with pytest.raises(ConfigError) as err:
    hf.family_of(cfg)
  assert err.value.fix == ("export a run with renormalize=true and every_k_layers=1 "
                           "and shared_expert=false.")


def test_inspect_names_the_block_and_the_expert_layout():
  """From a trial: inspect printed "LlamaForCausalLM layout" for ladder, hybrid
  and parallel runs (which export refuses), and no block at all."""
  from train.inspect_run import _describe_model

  data = {"tokenizer": "byte", "eos_id": None, "stop_ids": []}

  def line(**model):
    return _describe_model({"model": dict(num_layers=4, **model), "data": data})[0]

  assert line().startswith("model: standard block, LlamaForCausalLM layout, 4 layers")
  assert line(block="ladder").startswith("model: ladder block, no transformers family")
  assert line(block="ladder", ladder_layers="upper:2").startswith(
      "model: ladder block in layers 2,3 (standard elsewhere), no transformers family")
  assert line(block="parallel").startswith("model: parallel block, no transformers")
  experts = _describe_model({"model": dict(num_layers=4, moe=dict(
      num_experts=4, every_k_layers=2, shared_expert=True)), "data": data})[1]
  assert experts.endswith("experts: top-2 of 4, dispatch capacity, every 2 layers, "
                          "shared expert"), experts


def test_cli_import_finetune_inspect_export(tmp_path):
  from conftest import run_cli
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      eos_token_id=[2, 9])
  transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(
      tmp_path / "hf")
  work = tmp_path / "run"
  # As a user runs it, JAX_PLATFORMS unset: on a host without accelerators the
  # launcher uses the CPU without starting libtpu (no TPU warnings).
  proc = run_cli("import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={work}",
                 "--config.mesh.data=4", "--config.mesh.tensor=2",
                 unset=("JAX_PLATFORMS",))
  assert proc.returncode == 0, proc.stderr[-3000:]
  if not any(glob.glob(p) for p in sharding.chips.TPU_DEVICE_FILES):
    assert "TPU" not in proc.stderr, proc.stderr[-3000:]
  assert "at step 0" in proc.stdout
  # bfloat16 weights are held in the run's float32 unless asked: said at import.
  assert ("weights: bfloat16 in the checkpoint, held (and exported) as float32, "
          "model.param_dtype (twice the memory; --config.model.param_dtype=bfloat16 "
          "at import keeps them in 16 bits)") in proc.stdout
  assert ("has no tokenizer.json, so text is read and written as byte ids 0-255 of "
          "the model's 300; give the model's own with --config.data.tokenizer=") \
      in proc.stdout
  proc = run_cli("train", f"--config=experiments/saved.py:{work}", f"--workdir={work}",
                 "--config.train.steps=2", "--config.data.source=synthetic",
                 "--config.data.seq_len=16", "--config.train.batch_size=8",
                 "--config.train.eval_every=0", "--config.checkpoint.every_steps=2",
                 "--config.log.peak_flops=1e12", "--config.optim.name=sgd")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The import saved AdamW's (empty) state; fine-tuning with SGD takes the step-0
  # parameters and starts SGD's state fresh.
  assert "starting sgd from the step-0 parameters" in proc.stdout
  # Importing again into the run is refused before anything is written.
  saved = (work / "config.json").read_bytes()
  proc = run_cli("import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={work}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert (f"Config error in `--workdir`: {work} already holds a run (config.json and "
          "checkpoints); import-hf writes a new run at step 0 and would overwrite it. "
          "Fix: pass a new --workdir") in proc.stderr
  assert (work / "config.json").read_bytes() == saved
  # Its config trained into a new workdir fine-tunes it: the run's latest
  # parameters, not fresh ones (evaluated at step 0 against a fresh start).
  losses = {}
  for start in ("tuned", "fresh"):
    more = [] if start == "tuned" else ["--config.checkpoint.init_from="]
    proc = run_cli("train", f"--config=experiments/saved.py:{work}",
                   f"--workdir={tmp_path / start}", "--config.train.steps=1",
                   "--config.data.source=synthetic", "--config.data.seq_len=16",
                   "--config.train.batch_size=8", "--config.train.eval_every=1",
                   "--config.train.eval_steps=1", "--config.log.peak_flops=1e12",
                   *more)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"initialised parameters from {work}" in proc.stdout) == (start == "tuned")
    losses[start] = float(proc.stdout.split("step 0: eval_loss ")[1].split()[0])
  assert losses["tuned"] != losses["fresh"]
  proc = run_cli("inspect", f"--workdir={work}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step        2" in proc.stdout
  assert "layers/attn/k" in proc.stdout and "2x32x2x8" in proc.stdout
  assert "model: standard block, LlamaForCausalLM layout" in proc.stdout
  assert "rope: default (theta 10000), max_position_embeddings 64" in proc.stdout
  assert "stop tokens: [2, 9]" in proc.stdout
  proc = run_cli("export-hf", f"--workdir={work}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
  assert back.config.num_key_value_heads == 2
  assert back.config.max_position_embeddings == 64
  assert back.config.eos_token_id == [2, 9]
  # the weights are as readable as the config next to them (safetensors writes 0600)
  modes = {f: (tmp_path / "out" / f).stat().st_mode & 0o777
           for f in ("model.safetensors", "config.json")}
  assert modes["model.safetensors"] == modes["config.json"], modes


def test_generate_command_stops_on_eos_and_every_stop_id():
  """One definition for generate and export-hf: data.eos_id, else the tokenizer's
  end-of-text id (the byte tokenizer's 0), then data.stop_ids."""

  class Tokenizer:
    eos_id = 5

  c = base.get_config()
  assert hf.stop_tokens(c.data) == [0]  # byte tokenizer, eos_id unset
  c.data.stop_ids = (7, 5, 9)
  assert hf.stop_tokens(c.data, Tokenizer) == [5, 7, 9]
  assert hf.stop_tokens(dict(eos_id=5, stop_ids=[7, 5, 9])) == [5, 7, 9]
  assert hf.stop_tokens(dict(eos_id=2, stop_ids=[9]), Tokenizer) == [2, 9]
  assert hf.stop_ids_from_hf({"eos_token_id": [128001, 128009]},
                             {"eos_token_id": [128001, 128008]}) == [128001, 128009,
                                                                     128008]


def test_mistral_window_through_prefill_and_32_decode_steps(tmp_path):
  """A 5-key window under a 15-token prompt (3 windows): prefill, then 32 greedy
  steps where every new token sees only the last 5 positions, as transformers."""
  arch, kwargs = FAMILIES["mistral"]
  model = _hf_model(arch, dict(kwargs, sliding_window=5), tmp_path / "hf", stops=0)
  prompt = [int(t) for t in np.random.default_rng(5).integers(0, 97, 15)]
  with torch.no_grad():
    want = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, pad_token_id=0)[0, 15:].tolist()
  _import(tmp_path / "hf", tmp_path / "rung")
  rung_model, config = infer.load(str(tmp_path / "rung"))
  assert config.model.sliding_window == 5
  assert infer.generate(rung_model, [prompt], max_new_tokens=32) == [want]
  from train import inspect_run
  assert "attention: sliding window of 5 keys" in inspect_run.describe_run(
      str(tmp_path / "rung"))


def test_mixtral_on_expert4_data2_equals_transformers(tmp_path):
  """Mixtral's experts on one device, and split over expert=4 (tokens reach them
  by all-to-all, the dropless path), give transformers' logits."""
  arch, kwargs = FAMILIES["mixtral"]
  model = _hf_model(arch, kwargs, tmp_path / "hf", stops=0)
  _import(tmp_path / "hf", tmp_path / "rung", expert=4, data=2)
  expected = _hf_logits(model)
  rung_model, config = infer.load(str(tmp_path / "rung"))
  assert config.mesh.expert == 4
  assert config.model.moe.dispatch == "dropless" and config.model.moe.renormalize
  assert _max_diff(_rung_logits(rung_model), expected) <= 1e-4
  one, _ = infer.load(str(tmp_path / "rung"), devices=jax.devices()[:1],
                      mesh_overrides=dict(data=1, fsdp=1, expert=1, tensor=1))
  assert _max_diff(_rung_logits(one), expected) <= 1e-4


def test_import_names_unused_missing_and_misshapen_tensors(t5_llama, tmp_path):
  """The streaming reader hands out each tensor once: a tensor no parameter asks
  for, one whose size does not fit its parameter, or one the config.json's model
  needs and the checkpoint lacks, is a config error naming --hf_dir (they were
  tracebacks); no run directory is made (the tokenizer was copied into one before
  the weights were read)."""
  from conftest import write_word_tokenizer
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(t5_llama / "model.safetensors"))
  layers = json.loads((t5_llama / "config.json").read_text())["num_hidden_layers"]
  cases = {
      # (older checkpoints' per-layer rotary buffers are not weights: not named)
      "extra": (lambda t: {**t, "model.extra.weight": t["model.norm.weight"], **{
          f"model.layers.{i}.self_attn.rotary_emb.inv_freq": t["model.norm.weight"][:4]
          for i in range(layers)}}, {},
                r"holds tensors the model does not use: \['model.extra.weight'\]\."),
      "shape": (lambda t: {**t, "model.norm.weight": t["model.norm.weight"][:-1]}, {},
                r"model.norm.weight has shape \(47,\), which does not fit rung's "
                r"final_norm/scale \(48,\)\."),
      "layers": (dict, {"num_hidden_layers": layers + 1},
                 rf"has no tensor 'model.layers.{layers}.self_attn.q_proj.weight'"),
      "untied": (dict, {"tie_word_embeddings": False}, "has no tensor 'lm_head.weight'"),
  }
  for name, (change, fields, message) in cases.items():
    path = tmp_path / name
    path.mkdir()
    hf_config = json.loads((t5_llama / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf_config, **fields}))
    save_file(change(dict(tensors)), str(path / "model.safetensors"))
    write_word_tokenizer(path / "tokenizer.json", ["</s>", "a"])
    with pytest.raises(ConfigError, match="weights do not match its config.json: .*"
                       + message) as err:
      _import(path, tmp_path / f"rung_{name}")
    assert err.value.field == "--hf_dir"
    assert not (tmp_path / f"rung_{name}").exists()


def test_import_reads_as_transformers_does(t5_llama, tmp_path, capsys):
  """model.safetensors before an index of shards (an index was read first: stale
  shards beside a newer single file were imported); a config.json without
  `architectures` by its model_type; a tokenizer larger than the model, with a
  warning."""
  from conftest import write_word_tokenizer
  from safetensors.numpy import load_file, save_file
  src = tmp_path / "hf"
  shutil.copytree(t5_llama, src)
  tensors = load_file(str(src / "model.safetensors"))
  save_file({k: np.zeros_like(v) for k, v in tensors.items()},
            str(src / "model-00001-of-00001.safetensors"))
  (src / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}))
  cfg = json.loads((src / "config.json").read_text())
  assert cfg.pop("architectures") == ["LlamaForCausalLM"]
  (src / "config.json").write_text(json.dumps(cfg))
  vocab = cfg["vocab_size"]
  write_word_tokenizer(src / "tokenizer.json", ["</s>"] + [f"w{i}" for i in range(vocab)])
  _import(src, tmp_path / "rung", data=8)
  out = capsys.readouterr().out
  assert (f"warning: it has {vocab + 1} ids, more than the model's vocab_size of "
          f"{vocab}") in out
  assert "imported LlamaForCausalLM (" in out and "the same model as" not in out
  # a Mistral without a window is a Llama: the line names both (it said Llama)
  (src / "config.json").write_text(json.dumps(
      {**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
       "sliding_window": None}))
  _import(src, tmp_path / "mistral", data=8)
  assert ("imported MistralForCausalLM (the same model as a LlamaForCausalLM, as "
          "which it exports)") in capsys.readouterr().out
  model, config = infer.load(str(tmp_path / "rung"))
  np.testing.assert_array_equal(np.asarray(model.embed.table[...]),
                                tensors["model.embed_tokens.weight"])
  assert hf.family_of(ModelConfig.from_config(config.model)) == "LlamaForCausalLM"


def test_a_tied_config_with_its_own_head_imports_as_transformers_loads_it(
    t5_llama, tmp_path, capsys):
  """From an HF trial: config.json tying the embeddings beside an lm_head.weight
  that differs from the embedding was imported tied, the head dropped silently
  (logits 9.0 off transformers', which keeps the head). Such a head is kept,
  untied, and said; a head that equals the embedding (a tied checkpoint's copy)
  is dropped as before, the model staying tied."""
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(t5_llama / "model.safetensors"))
  embed = tensors["model.embed_tokens.weight"]
  head = np.random.default_rng(0).normal(0, 0.2, embed.shape).astype(embed.dtype)
  for name, lm_head, tied in (("own_head", head, False), ("copy", embed.copy(), True)):
    src = tmp_path / name
    shutil.copytree(t5_llama, src)
    save_file({**tensors, "lm_head.weight": lm_head}, str(src / "model.safetensors"))
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"]
    original = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    _import(src, tmp_path / f"rung_{name}", data=8)
    said = capsys.readouterr().out
    assert ("head: untied: config.json ties the embeddings" in said) == (not tied)
    model, config = infer.load(str(tmp_path / f"rung_{name}"))
    assert config.model.tie_embeddings == tied
    assert _max_diff(_rung_logits(model), _hf_logits(original)) < 1e-4, name
    if not tied:
      out = tmp_path / f"export_{name}"
      hf.export_hf(str(tmp_path / f"rung_{name}"), str(out))
      assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
      exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
      assert _max_diff(_hf_logits(exported), _hf_logits(original)) < 1e-5


def test_a_run_passed_as_hf_dir_is_named_a_run(tmp_path):
  """From an HF trial: a rung run as --hf_dir was "architecture model_type None
  is not supported"; it is named a run, with where it goes instead (the reverse
  mistake, an HF model as --workdir, was already named)."""
  from train import run_config
  run = tmp_path / "run"
  run_config.write(str(run), base.get_config())
  with pytest.raises(ConfigError, match=f"{run} holds a rung run, not a Hugging Face "
                     "model") as err:
    _import(run, tmp_path / "new")
  assert err.value.field == "--hf_dir"
  assert f"--workdir=runs/NEW --config.checkpoint.init_from={run}" in err.value.fix
  assert not (tmp_path / "new").exists()


def test_export_refuses_an_out_directory_that_holds_files(t5_llama, tmp_path):
  """export-hf wrote into a directory holding another checkpoint's shards and
  tokenizer, silently, leaving a mix that transformers and import-hf read wrongly."""
  _import(t5_llama, tmp_path / "rung", data=8)
  out = tmp_path / "out"
  out.mkdir()
  (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
  with pytest.raises(ConfigError) as err:
    hf.export_hf(str(tmp_path / "rung"), str(out))
  assert err.value.field == "--out"
  assert (f"{out} already holds model-00001-of-00002.safetensors; export-hf writes a "
          "whole checkpoint there") in str(err.value)
  assert os.listdir(out) == ["model-00001-of-00002.safetensors"]
  (tmp_path / "empty").mkdir()  # an empty directory, or a new one, is written
  hf.export_hf(str(tmp_path / "rung"), str(tmp_path / "empty"))
  assert (tmp_path / "empty" / "model.safetensors").exists()
  (tmp_path / "a_file").write_text("x")  # its fix said "remove that directory"
  with pytest.raises(ConfigError, match=r"a_file already exists as a file; export-hf "
                     r"writes a whole checkpoint there \(a directory\)\..*remove that "
                     r"file first"):
    hf.export_hf(str(tmp_path / "rung"), str(tmp_path / "a_file"))
  # under a file, or where nothing can be made: refused before the weights are read
  for out, why in ((tmp_path / "a_file" / "out", "a_file is a file, so"),
                   ("/proc/rung-test", "/proc/rung-test cannot be written")):
    with pytest.raises(ConfigError, match=why) as err:
      hf.export_hf(str(tmp_path / "rung"), str(out))
    assert err.value.field == "--out"


@pytest.mark.parametrize("with_config", [False, True])
def test_export_gives_autotokenizer_its_special_tokens(with_config, tmp_path):
  """The HF checkpoint's tokenizer files go into the run and back out; without a
  tokenizer_config.json, export writes one naming config.json's bos and eos, so
  AutoTokenizer knows them (it had eos None)."""
  from conftest import write_word_tokenizer
  words = ["[UNK]", "<s>", "</s>", *[f"w{i}" for i in range(13)]]
  config = transformers.LlamaConfig(
      vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
      bos_token_id=1, eos_token_id=2)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
  write_word_tokenizer(tmp_path / "hf" / "tokenizer.json", words)
  template = "{{ messages[0]['content'] }}"
  if with_config:
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
         "chat_template": template}))
  hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), base.get_config())
  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2)
  assert tok.chat_template == (template if with_config else None)
  if not with_config:
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", 1)
  assert tok("w3 w4")["input_ids"][-2:] == [6, 7]


def test_a_moved_run_keeps_its_tokenizer_and_a_run_without_eos_serves(tmp_path,
                                                                        monkeypatch):
  """A tokenizer given at import (the HF directory has none) is copied into the
  run, whose config.json names it relative to the run: after the run directory
  moves, generate and export-hf find it (both failed: the config held the old
  absolute path). The model names no eos and neither does its tokenizer:
  import says so, generate runs to --max_new_tokens saying why, and export writes
  eos_token_id null (it refused, after writing the weights, with a fix the
  command could not take). data.tokenizer=none on generate is a config error,
  not a traceback."""
  from conftest import run_cli_many, write_word_tokenizer
  from train import run_config
  words = ["[UNK]", "<|eot_id|>", *[f"w{i}" for i in range(14)]]  # no known eos name
  config = transformers.LlamaConfig(
      vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
      bos_token_id=None, eos_token_id=None)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
  tok = write_word_tokenizer(tmp_path / "tok.json", words)
  c = base.get_config()
  c.data.tokenizer = tok
  hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), c)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["data"][
      "tokenizer"] == "tokenizer.json"
  os.remove(tok)  # the run holds its own copy
  shutil.move(tmp_path / "run", tmp_path / "moved")
  moved = str(tmp_path / "moved")
  assert run_config.read(moved)["data"]["tokenizer"] == os.path.join(moved,
                                                                     "tokenizer.json")
  out = str(tmp_path / "out")
  gen, export, ids = run_cli_many([
      ("generate", f"--workdir={moved}", "--prompt=w3 w4", "--max_new_tokens=5"),
      ("export-hf", f"--workdir={moved}", f"--out={out}"),
      ("generate", f"--workdir={moved}", "--prompt=w3",
       f"--config=experiments/saved.py:{moved}", "--config.data.tokenizer=none")])
  assert gen.returncode == 0, gen.stderr[-2000:]
  assert "no stop token" in gen.stderr and "generating all --max_new_tokens" in gen.stderr
  assert len(gen.stdout.split()) == 2 + 5, gen.stdout  # the prompt and 5 words
  assert export.returncode == 0, export.stderr[-2000:]
  assert "eos_token_id none" in export.stdout
  assert json.loads(open(os.path.join(out, "config.json")).read())["eos_token_id"] is None
  assert transformers.AutoTokenizer.from_pretrained(out)("w3 w4")["input_ids"] == [5, 6]
  assert ids.returncode == 2 and "Traceback" not in ids.stderr, ids.stderr[-2000:]
  assert "Config error in `data.tokenizer`" in ids.stderr
  assert "cannot encode a text --prompt" in ids.stderr
  # A relative path outside the run is written absolute (it was kept relative to
  # whatever directory the run was started from).
  monkeypatch.chdir(tmp_path)
  run_config.write(str(tmp_path / "other"), {"data": {"tokenizer": "tok.json"}})
  assert json.loads((tmp_path / "other" / "config.json").read_text())["data"][
      "tokenizer"] == str(tmp_path / "tok.json")


def test_a_model_without_eos_or_tokenizer_has_no_stop_token(tmp_path, capsys):
  """From an HF trial: a model declaring no eos_token_id, imported without a
  tokenizer.json, was said to have no stop token, but generation stopped on the
  byte tokenizer's 0 (an ordinary id of the model), inspect said [0] and the
  export declared eos_token_id 0 where the original had null. Now none anywhere,
  as transformers runs it; --config.data.eos_id still gives one."""
  from train import inspect_run
  config = transformers.LlamaConfig(
      vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
      bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  original = transformers.LlamaForCausalLM(config).eval()
  original.save_pretrained(tmp_path / "hf")
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] is None
  _import(tmp_path / "hf", tmp_path / "run", data=8)
  assert "stop tokens: none" in capsys.readouterr().out
  model, run = infer.load(str(tmp_path / "run"))
  assert hf.stop_tokens(run.data) == []
  assert "stop tokens: []" in inspect_run.describe_run(str(tmp_path / "run"))
  prompt = [[3, 0, 7]]  # id 0 is a token like any other of this model
  with torch.no_grad():
    want = original.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=1)[0, 3:].tolist()
  assert infer.generate(model, prompt, max_new_tokens=12,
                        stop_tokens=hf.stop_tokens(run.data)) == [want]
  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  for name in ("config.json", "generation_config.json"):
    assert json.loads((tmp_path / "out" / name).read_text())["eos_token_id"] is None
  run.data.eos_id = 5  # the override the fix names
  assert hf.stop_tokens(run.data) == [5]
  c = base.get_config()  # given at import, it is said as what the run stops on
  c.mesh.data, c.data.eos_id = 8, 5
  hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "run5"), c, ("data.eos_id",))
  assert "stop tokens: [5] (data.eos_id)" in capsys.readouterr().out


def test_a_broken_tokenizer_json_is_a_config_error_naming_it(tmp_path):
  """import-hf reads the vocabulary size of --hf_dir's tokenizer.json; a file
  `tokenizers` cannot read was a bare Exception without the path."""
  from sharding import ConfigError
  from train import hf
  broken = tmp_path / "tokenizer.json"
  broken.write_text('{"version": "1.0", "model": ')
  with pytest.raises(ConfigError, match="tokenizer.json is not a tokenizer file") as err:
    hf._tokenizer_size(str(broken))
  assert err.value.field == "data.tokenizer"


def _sharded_copy(src, dst):
  """`src`'s single-file checkpoint as two shards and an index, as save_pretrained
  writes a large model."""
  from safetensors.numpy import load_file, save_file
  dst.mkdir()
  for name in ("config.json", "generation_config.json", "tokenizer.json"):
    if (src / name).exists():
      (dst / name).write_bytes((src / name).read_bytes())
  tensors = load_file(str(src / "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(dst / file))
  (dst / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))


def _truncate(path, keep):
  data = path.read_bytes()
  path.write_bytes(data[:keep(len(data))])


@pytest.mark.parametrize("damage,file", [
    ("missing shard", "model-00002-of-00002.safetensors"),
    ("truncated shard", "model-00001-of-00002.safetensors"),
    ("truncated file", "model.safetensors"),
    ("overwritten header", "model.safetensors"),
    ("truncated config", "config.json"),
    ("config not an object", "config.json"),
    ("truncated index", "model.safetensors.index.json"),
    ("index without weight_map", "model.safetensors.index.json"),
    ("truncated generation config", "generation_config.json"),
])
def test_an_unreadable_file_of_the_model_is_a_config_error_naming_it(
    damage, file, t5_llama, tmp_path):
  """A file of --hf_dir that is missing, cut short or not what its name says was
  a traceback (FileNotFoundError, safetensors' SafetensorError, JSONDecodeError)
  naming neither --hf_dir nor, for the JSON files, the file; no run is written."""
  src = tmp_path / "hf"
  if "shard" in damage or "index" in damage:
    _sharded_copy(t5_llama, src)
  else:
    src.mkdir()
    for p in t5_llama.iterdir():
      (src / p.name).write_bytes(p.read_bytes())
  if damage == "truncated generation config" and not (src / file).exists():
    (src / file).write_text('{"eos_token_id": 2}')
  target = src / file
  if damage.startswith("missing"):
    target.unlink()
  elif damage.startswith("truncated"):
    _truncate(target, lambda n: n // 2)
  elif damage == "overwritten header":
    target.write_bytes(b"garbage!" + target.read_bytes()[8:])
  elif damage == "config not an object":
    target.write_text("[1, 2]")
  elif damage == "index without weight_map":
    target.write_text('{"metadata": {}}')
  with pytest.raises(ConfigError, match=f"{re.escape(str(target))} cannot be read: "
                     ) as err:
    _import(src, tmp_path / "run")
  assert err.value.field == "--hf_dir"
  assert "save_pretrained" in str(err.value)
  assert not (tmp_path / "run").exists()


def test_a_run_config_json_edited_into_bad_json_names_it_and_the_copy_to_restore(
    t5_llama, tmp_path):
  """generate, export-hf, inspect and a resume read the run's config.json; JSON
  broken by hand was a JSONDecodeError traceback. The error names the file and
  the checkpoint's copy of the config; copying that over restores the run."""
  run = tmp_path / "run"
  _import(t5_llama, run)
  good = run_config.read(str(run))
  text = (run / "config.json").read_text()
  (run / "config.json").write_text(text[:len(text) // 2])
  with pytest.raises(ConfigError, match=r"config.json, the config the run was "
                     r"started with, is not a JSON object") as err:
    run_config.load(str(run))
  assert err.value.field == "--workdir"
  copy = re.search(r"in (\S+); copy", str(err.value)).group(1)
  assert copy == str(run / "checkpoints" / "STEP" / "config" / "metadata")
  shutil.copy(copy.replace("STEP", "0"), run / "config.json")
  assert run_config.read(str(run)) == good
  # the generation_config.json import-hf keeps for the export: the same kind
  kept = run / "generation_config.json"
  text = kept.read_text()
  kept.write_text(text[:len(text) // 2])
  with pytest.raises(ConfigError, match=f"{kept} cannot be read: .* Fix: restore the "
                     "file from the model imported, or remove it") as err:
    hf.export_hf(str(run), str(tmp_path / "out"))
  assert err.value.field == "--workdir" and not (tmp_path / "out").exists()
  kept.unlink()  # the fix, followed
  hf.export_hf(str(run), str(tmp_path / "out"))
  assert set(json.loads((tmp_path / "out" / "generation_config.json").read_text())) == {
      "bos_token_id", "eos_token_id"}
