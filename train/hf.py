"""Llama-family weights in and out of the Hugging Face layout (safetensors).

rung stores a linear layer as [inputs..., outputs...] with layers stacked on a
leading axis; HF stores each layer's `nn.Linear` weight as [outputs, inputs]. Both
use the rotate-half rotary layout, so q and k need no permutation. One table below
maps every parameter; import and export both read it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import sharding
from model import ModelConfig
from sharding import ConfigError
from train import run_config
from train.checkpoint import Checkpointer
from train.optimizer import make_optimizer
from train.state import init_state, model_spec, param_shardings

SUPPORTED = ("LlamaForCausalLM",)

# rung path -> (HF name, with {i} for the layer; number of input dims in rung's
# layout, or 0 for a tensor copied as is).
TABLE = {
    ("embed", "table"): ("model.embed_tokens.weight", 0),
    ("final_norm", "scale"): ("model.norm.weight", 0),
    ("head",): ("lm_head.weight", 1),
    ("layers", "attn", "q"): ("model.layers.{i}.self_attn.q_proj.weight", 1),
    ("layers", "attn", "k"): ("model.layers.{i}.self_attn.k_proj.weight", 1),
    ("layers", "attn", "v"): ("model.layers.{i}.self_attn.v_proj.weight", 1),
    ("layers", "attn", "o"): ("model.layers.{i}.self_attn.o_proj.weight", 2),
    ("layers", "mlp", "gate"): ("model.layers.{i}.mlp.gate_proj.weight", 1),
    ("layers", "mlp", "up"): ("model.layers.{i}.mlp.up_proj.weight", 1),
    ("layers", "mlp", "down"): ("model.layers.{i}.mlp.down_proj.weight", 1),
    ("layers", "attn_norm", "scale"): ("model.layers.{i}.input_layernorm.weight", 0),
    ("layers", "mlp_norm", "scale"):
        ("model.layers.{i}.post_attention_layernorm.weight", 0),
}


def _to_rung(w: np.ndarray, n_in: int, shape: tuple[int, ...]) -> np.ndarray:
  return w if n_in == 0 else w.T.reshape(shape)


def _to_hf(p: np.ndarray, n_in: int) -> np.ndarray:
  if n_in == 0:
    return p
  return p.reshape(math.prod(p.shape[:n_in]), -1).T


def _get(tree: dict, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------- configs

def model_fields_from_hf(hf: dict) -> dict:
  """config.model fields from an HF config.json; refuses what rung cannot run."""
  arch = (hf.get("architectures") or ["?"])[0]
  field = "--hf_dir"
  if arch not in SUPPORTED:
    raise ConfigError(field, f"architecture {arch} is not supported.",
                      f"import one of {SUPPORTED}.")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ConfigError(field, f"{arch} with {key}=true is not supported.",
                        "import a model without biases.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(field, f"hidden_act={hf['hidden_act']} is not supported.",
                      "rung's MLP is SwiGLU (silu).")
  scaling = hf.get("rope_scaling") or {}
  if scaling.get("rope_type", scaling.get("type", "default")) != "default":
    raise ConfigError(field, f"rope_scaling {scaling} is not supported.",
                      "import a model with plain rotary embeddings.")
  heads = hf["num_attention_heads"]
  return dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      d_ff=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings")),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def hf_config(cfg: ModelConfig, eos_id: int | None) -> dict:
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 8192,
      "torch_dtype": "float32", "eos_token_id": eos_id, "bos_token_id": None,
  }


# ---------------------------------------------------------------------- weights

def _read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  out = {}
  for name in files:
    # framework="flax" reads bfloat16 too; converted to float32 numpy here.
    with safe_open(os.path.join(hf_dir, name), framework="flax") as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
  return out


def params_from_hf(weights: dict[str, np.ndarray], spec) -> dict:
  """HF tensors -> rung's nested params (numpy), checked against the model's shapes."""
  cfg = spec.cfg
  params: dict = {}
  for path, (name, n_in) in TABLE.items():
    try:
      target = _get(spec.abstract_params, path)
    except KeyError:
      continue  # e.g. no `head` with tied embeddings
    if path[0] == "layers":
      per_layer = target.shape[1:]
      value = np.stack([_to_rung(weights.pop(name.format(i=i)), n_in, per_layer)
                        for i in range(cfg.num_layers)])
    else:
      value = _to_rung(weights.pop(name), n_in, target.shape)
    if value.shape != target.shape:
      raise ValueError(f"{name}: shape {value.shape} does not fit rung's "
                       f"{'/'.join(path)} {target.shape}")
    _set(params, path, value.astype(target.dtype))
  weights.pop("lm_head.weight", None)  # tied checkpoints may still carry it
  if weights:
    raise ValueError(f"unused tensors in the HF checkpoint: {sorted(weights)[:5]}")
  return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  out = {}
  for path, (name, n_in) in TABLE.items():
    try:
      value = np.asarray(_get(params, path))
    except KeyError:
      continue
    if path[0] == "layers":
      for i in range(cfg.num_layers):
        out[name.format(i=i)] = np.ascontiguousarray(_to_hf(value[i], n_in))
    else:
      out[name] = np.ascontiguousarray(_to_hf(value, n_in))
  return out


# ---------------------------------------------------------------------- commands

def import_hf(hf_dir: str, workdir: str, config) -> None:
  """A local HF Llama checkpoint -> a rung workdir (config.json + step 0).

  Train it with --config=experiments/saved.py:WORKDIR --workdir=WORKDIR.
  """
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf = json.load(f)
  config.model.update(**model_fields_from_hf(hf))
  tokenizer = os.path.join(hf_dir, "tokenizer.json")
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(tokenizer):
    shutil.copy(tokenizer, os.path.join(workdir, "tokenizer.json"))
    config.data.tokenizer = os.path.abspath(os.path.join(workdir, "tokenizer.json"))
  eos = hf.get("eos_token_id")
  if isinstance(eos, int):
    config.data.eos_id = eos
  import model as model_lib
  model_lib.validate(config.model)
  sharding.validate_plan(config, len(jax.devices()))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.normalize_rules(config.mesh.rules)
  spec = model_spec(ModelConfig.from_config(config.model), rules)
  params = params_from_hf(_read_safetensors(hf_dir), spec)
  tx = make_optimizer(config.optim, config.train.steps)
  params = jax.device_put(params, param_shardings(spec, mesh))
  state = init_state(spec, tx, mesh, 0, params=params)
  config_dict = json.loads(config.to_json())
  run_config.write(workdir, config_dict)
  ckpt = Checkpointer(workdir, config.checkpoint)
  ckpt.save(state, None, config_dict, force=True)
  ckpt.wait()
  ckpt.close()
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"imported {hf.get('architectures', ['?'])[0]} ({n / 1e6:.1f}M parameters) "
        f"from {hf_dir} into {workdir} at step 0.\n"
        f"fine-tune: python -m experiment train --config=experiments/saved.py:"
        f"{workdir} --workdir={workdir}")


def export_hf(workdir: str, out: str, step: int | None = None) -> None:
  """A rung workdir's parameters -> safetensors + config.json that transformers loads."""
  from safetensors.numpy import save_file
  config = run_config.load(workdir)
  cfg = ModelConfig.from_config(config.model)
  if cfg.block != "standard":
    raise ConfigError("model.block", f"a {cfg.block!r} model has no transformers "
                      "equivalent (LlamaForCausalLM is a standard block).",
                      "export a run with block=standard.")
  if cfg.moe.num_experts:
    raise ConfigError("model.moe.num_experts", f"a mixture-of-experts model "
                      f"({cfg.moe.num_experts} experts) has no LlamaForCausalLM "
                      "equivalent, and exporting to an HF MoE architecture is not "
                      "supported.", "export a dense run (moe.num_experts=0).")
  spec = model_spec(cfg, sharding.normalize_rules(config.mesh.rules))
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step = ckpt.latest_step() if step is None else step
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        spec.abstract_params)
  params = jax.device_get(ckpt.restore_params(target, step))
  ckpt.close()
  os.makedirs(out, exist_ok=True)
  save_file(params_to_hf(params, cfg), os.path.join(out, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_config(cfg, config.data.eos_id), f, indent=2)
  if config.data.tokenizer and os.path.exists(str(config.data.tokenizer)):
    shutil.copy(config.data.tokenizer, os.path.join(out, "tokenizer.json"))
  logging.info("exported step %s of %s to %s", step, workdir, out)
  print(f"exported step {step} of {workdir} to {out}")
