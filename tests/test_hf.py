"""HF Llama checkpoints in and out: logits match transformers."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import infer  # noqa: E402
from experiments import base  # noqa: E402
from sharding import ConfigError  # noqa: E402
from train import hf  # noqa: E402


def _hf_model(tied, tmp_path, shard=False):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tied,
      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms start at 1; make them matter
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  path = tmp_path / ("hf_tied" if tied else "hf")
  model.save_pretrained(path, max_shard_size="40KB" if shard else "1GB")
  return model, path


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _import(path, workdir):
  c = base.get_config()
  c.mesh.update(data=2, fsdp=2, tensor=2)
  hf.import_hf(str(path), str(workdir), c)


@pytest.mark.parametrize("tied,shard", [(False, False), (True, True)])
def test_import_then_export_round_trip(tied, shard, tmp_path):
  model, path = _hf_model(tied, tmp_path, shard)
  if shard:
    assert (path / "model.safetensors.index.json").exists()
  tokens = np.random.default_rng(0).integers(0, 97, (2, 24))
  expected = _hf_logits(model, tokens)

  _import(path, tmp_path / "rung")
  rung_model, config = infer.load(str(tmp_path / "rung"))
  assert config.model.num_kv_heads == 2 and config.model.tie_embeddings == tied
  got = np.asarray(jax.jit(lambda m, t: m(t))(rung_model, tokens))
  assert np.max(np.abs(got - expected)) <= 1e-4

  hf.export_hf(str(tmp_path / "rung"), str(tmp_path / "out"))
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert np.max(np.abs(_hf_logits(back, tokens) - expected)) <= 1e-4


def test_unsupported_architecture_refused_by_name(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 4}))
  with pytest.raises(ConfigError, match="architecture Qwen2ForCausalLM is not supported"):
    hf.import_hf(str(tmp_path), str(tmp_path / "w"), base.get_config())


def test_export_refuses_ladder(tmp_path):
  _, path = _hf_model(False, tmp_path)
  _import(path, tmp_path / "rung")
  cfg = json.loads((tmp_path / "rung" / "config.json").read_text())
  cfg["model"]["block"] = "ladder"
  (tmp_path / "rung" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="'ladder' model has no transformers equivalent"):
    hf.export_hf(str(tmp_path / "rung"), str(tmp_path / "out"))


def test_cli_import_finetune_inspect_export(tmp_path):
  from conftest import run_cli
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
  work = tmp_path / "run"
  proc = run_cli("import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={work}",
                 "--config.mesh.data=4", "--config.mesh.tensor=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "at step 0" in proc.stdout
  proc = run_cli("train", f"--config=experiments/saved.py:{work}", f"--workdir={work}",
                 "--config.train.steps=2", "--config.data.source=synthetic",
                 "--config.data.seq_len=16", "--config.train.batch_size=8",
                 "--config.train.eval_every=0", "--config.checkpoint.every_steps=2",
                 "--config.log.peak_flops=1e12")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from step 0" in proc.stdout
  proc = run_cli("inspect", f"--workdir={work}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step        2" in proc.stdout
  assert "layers/attn/k" in proc.stdout and "2x32x2x8" in proc.stdout
  proc = run_cli("export-hf", f"--workdir={work}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
  assert back.config.num_key_value_heads == 2
