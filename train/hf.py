"""Llama-family weights in and out of the Hugging Face layout (safetensors).

rung stores a linear layer as [inputs..., outputs...] with layers stacked on a
leading axis; HF stores each layer's `nn.Linear` weight as [outputs, inputs]. Both
use the rotate-half rotary layout, so q and k need no permutation. One table below
maps every parameter; import and export both read it.

Families (`FAMILIES`) are configs of the one decoder: an HF architecture is a set
of `config.model` fields (qkv_bias, qk_norm, rope_*) plus the table rows of the
parameters those fields create. Config files of transformers 4 (top-level
`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) are both read; export writes
the layout of the installed transformers (5 when none is installed). Anything rung
cannot run is a ConfigError naming the HF key and its value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

import sharding
from model import ModelConfig
from model.rotary import ROPE_TYPES, yarn_attention_factor
from sharding import ConfigError
from train import output_path, run_config, staged
from train.checkpoint import Checkpointer, checkpoint_dir, prepare_workdir
from train.state import TrainState, model_spec, param_shardings
from train.tokenizer import TOKENIZER_EXTRAS, copy_extras, make_tokenizer, tokenizer_file


@dataclasses.dataclass(frozen=True)
class Family:
  """An HF architecture as rung model fields. `defaults`: values transformers'
  config class assumes for keys a config.json leaves out. `sliding_window`: the
  config's `sliding_window` key is read (None = full attention); `moe`: the MLPs
  are Mixtral experts (`MOE_TABLE`)."""
  model_type: str
  qkv_bias: bool = False
  qk_norm: bool = False
  defaults: tuple[tuple[str, Any], ...] = ()
  sliding_window: bool = False
  moe: bool = False


FAMILIES = {
    "LlamaForCausalLM": Family("llama", defaults=(("max_position_embeddings", 2048),)),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True,
                               defaults=(("max_position_embeddings", 32768),)),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True,
                               defaults=(("max_position_embeddings", 32768),
                                         ("head_dim", 128))),
    "MistralForCausalLM": Family("mistral", sliding_window=True,
                                 defaults=(("max_position_embeddings", 131072),)),
    "MixtralForCausalLM": Family("mixtral", sliding_window=True, moe=True,
                                 defaults=(("max_position_embeddings", 131072),)),
}
SUPPORTED = tuple(FAMILIES)

# rung path -> (HF name, with {i} for the layer; number of input dims in rung's
# layout, 0 for a tensor copied as is, or -1 for a bias: [heads, head_dim] in rung,
# flat in HF). Rows whose parameter a model lacks (head with tied embeddings, biases
# and q/k norms of other families) are skipped.
TABLE = {
    ("embed", "table"): ("model.embed_tokens.weight", 0),
    ("final_norm", "scale"): ("model.norm.weight", 0),
    ("head",): ("lm_head.weight", 1),
    ("layers", "attn", "q"): ("model.layers.{i}.self_attn.q_proj.weight", 1),
    ("layers", "attn", "k"): ("model.layers.{i}.self_attn.k_proj.weight", 1),
    ("layers", "attn", "v"): ("model.layers.{i}.self_attn.v_proj.weight", 1),
    ("layers", "attn", "o"): ("model.layers.{i}.self_attn.o_proj.weight", 2),
    ("layers", "attn", "q_bias"): ("model.layers.{i}.self_attn.q_proj.bias", -1),
    ("layers", "attn", "k_bias"): ("model.layers.{i}.self_attn.k_proj.bias", -1),
    ("layers", "attn", "v_bias"): ("model.layers.{i}.self_attn.v_proj.bias", -1),
    ("layers", "attn", "q_norm"): ("model.layers.{i}.self_attn.q_norm.weight", 0),
    ("layers", "attn", "k_norm"): ("model.layers.{i}.self_attn.k_norm.weight", 0),
    ("layers", "mlp", "gate"): ("model.layers.{i}.mlp.gate_proj.weight", 1),
    ("layers", "mlp", "up"): ("model.layers.{i}.mlp.up_proj.weight", 1),
    ("layers", "mlp", "down"): ("model.layers.{i}.mlp.down_proj.weight", 1),
    ("layers", "attn_norm", "scale"): ("model.layers.{i}.input_layernorm.weight", 0),
    ("layers", "mlp_norm", "scale"):
        ("model.layers.{i}.post_attention_layernorm.weight", 0),
}


# Mixtral's MoE layers (every layer): the router and each expert's SwiGLU, {j} the
# expert. They replace the dense MLP rows of TABLE.
MOE_TABLE = {
    ("layers", "mlp", "router"): ("model.layers.{i}.block_sparse_moe.gate.weight", 1),
    ("layers", "mlp", "gate"):
        ("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", 1),
    ("layers", "mlp", "up"):
        ("model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", 1),
    ("layers", "mlp", "down"):
        ("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", 1),
}


def table(cfg: ModelConfig) -> dict:
  """The weight table of `cfg`'s family: TABLE, with MOE_TABLE's rows for MoE."""
  return {**TABLE, **MOE_TABLE} if cfg.moe.num_experts else TABLE


def _to_rung(w: np.ndarray, n_in: int, shape: tuple[int, ...]) -> np.ndarray:
  if n_in <= 0:
    return w.reshape(shape) if n_in < 0 else w
  return w.T.reshape(shape)


def _to_hf(p: np.ndarray, n_in: int) -> np.ndarray:
  if n_in <= 0:
    return p.reshape(-1) if n_in < 0 else p
  return p.reshape(math.prod(p.shape[:n_in]), -1).T


def _get(tree: dict, path: tuple) -> Any:
  for k in path:
    if not isinstance(tree, dict) or tree.get(k) is None:
      raise KeyError(path)
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------- configs

_FIELD = "--hf_dir"


def _refuse(key: str, value: Any, why: str, fix: str) -> ConfigError:
  return ConfigError(_FIELD, f"config.json {key}={value!r}: {why}", fix)


def rope_fields_from_hf(hf: dict, family: Family) -> dict:
  """config.model rope_* fields from either layout: transformers 5's
  `rope_parameters` {rope_type, rope_theta, factor, ...} or transformers 4's
  top-level `rope_theta` plus `rope_scaling` {type | rope_type, factor, ...}."""
  params = hf.get("rope_parameters")
  key = "rope_parameters"
  if params is None:
    params = dict(hf.get("rope_scaling") or {})
    key = "rope_scaling"
    if "rope_theta" in hf:
      params.setdefault("rope_theta", hf["rope_theta"])
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise _refuse(key, params, "per-layer-type rotary parameters are not supported.",
                  "import a model with one rotary setting for all layers.")
  type_key = "rope_type" if "rope_type" in params or "type" not in params else "type"
  rope_type = params.get(type_key) or "default"
  if rope_type not in ROPE_TYPES:
    raise _refuse(f"{key}.{type_key}", rope_type, "this rotary variant is not "
                  f"supported (rung runs {ROPE_TYPES}).",
                  "import a model with one of those rotary variants.")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise _refuse("partial_rotary_factor", partial, "rung rotates the whole head.",
                  "import a model with partial_rotary_factor=1.")
  max_positions = int(hf.get("max_position_embeddings")
                      or dict(family.defaults)["max_position_embeddings"])
  out = dict(rope_type=rope_type,
             rope_theta=float(params.get("rope_theta") or 10000.0),
             max_position_embeddings=max_positions)

  def need(name):
    if params.get(name) is None:
      raise _refuse(f"{key}.{name}", None, f"rope_type={rope_type} needs it.",
                    f"add {name} to {key} in config.json.")
    return params[name]

  if rope_type != "default":
    if rope_type != "yarn" or params.get("factor") is not None:
      out["rope_factor"] = float(need("factor"))
  if rope_type == "llama3":
    out.update(rope_low_freq_factor=float(need("low_freq_factor")),
               rope_high_freq_factor=float(need("high_freq_factor")),
               rope_original_max_positions=int(need("original_max_position_embeddings")))
  elif rope_type == "yarn":
    original = int(params.get("original_max_position_embeddings") or max_positions)
    factor = out.get("rope_factor", max_positions / original)
    if params.get("truncate") is False:
      raise _refuse(f"{key}.truncate", False, "rung's yarn rounds the ramp bounds to "
                    "whole dimensions (truncate=true).", "import with truncate=true.")
    attention = params.get("attention_factor")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None and mscale and mscale_all:  # DeepSeek's form
      attention = (yarn_attention_factor(factor, mscale)
                   / yarn_attention_factor(factor, mscale_all))
    out.update(rope_factor=float(factor), rope_original_max_positions=original,
               rope_beta_fast=float(params.get("beta_fast") or 32.0),
               rope_beta_slow=float(params.get("beta_slow") or 1.0),
               rope_attention_factor=None if attention is None else float(attention))
  return out


def model_fields_from_hf(hf: dict) -> dict:
  """config.model fields from an HF config.json; refuses what rung cannot run."""
  arch = (hf.get("architectures") or [None])[0]
  if arch is None:  # transformers' AutoModelForCausalLM goes by model_type then
    kind = hf.get("model_type")
    arch = next((a for a, f in FAMILIES.items() if f.model_type == kind),
                f"model_type {kind}")
  if arch not in FAMILIES:
    raise ConfigError(_FIELD, f"architecture {arch} is not supported.",
                      f"import one of {SUPPORTED}.")
  family = FAMILIES[arch]
  if hf.get("mlp_bias"):
    raise _refuse("mlp_bias", True, f"{arch} with MLP biases is not supported.",
                  "import a model without MLP biases.")
  if hf.get("attention_bias") and arch != "Qwen2ForCausalLM":
    raise _refuse("attention_bias", True, f"{arch} with attention biases (q, k, v "
                  "and o) is not supported.", "import a model without them.")
  if not family.sliding_window and (
      hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ())):
    raise _refuse("use_sliding_window", True, f"{arch} with sliding-window "
                  "attention is not supported (Mistral's and Mixtral's are).",
                  "import a model without it.")
  window = hf.get("sliding_window") if family.sliding_window else None
  if window is not None and (not isinstance(window, int) or window < 1):
    raise _refuse("sliding_window", window, "a window is a positive number of keys.",
                  "set sliding_window to an integer or null.")
  extra: dict[str, Any] = {"sliding_window": window or 0}
  if family.moe:
    if hf.get("router_jitter_noise"):
      logging.info("router_jitter_noise=%s (training-time noise) is not imported",
                   hf["router_jitter_noise"])
    # Mixtral renormalises its top-k gates and drops nothing.
    extra["moe"] = dict(num_experts=int(hf.get("num_local_experts", 8)),
                        top_k=int(hf.get("num_experts_per_tok", 2)), every_k_layers=1,
                        renormalize=True, dispatch="dropless", shared_expert=False)
  if hf.get("hidden_act", "silu") != "silu":
    raise _refuse("hidden_act", hf["hidden_act"], "rung's MLP is SwiGLU (silu).",
                  "import a model with hidden_act=silu.")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or dict(family.defaults).get(
      "head_dim", hf["hidden_size"] // heads)
  return dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      d_ff=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings")),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=family.qkv_bias, qk_norm=family.qk_norm,
      **rope_fields_from_hf(hf, family), **extra)


def stop_ids_from_hf(hf: dict, generation: dict | None = None) -> list[int]:
  """Every `eos_token_id` of config.json then generation_config.json (each an int
  or a list), in order, without repeats."""
  out: list[int] = []
  for source in (hf, generation or {}):
    eos = source.get("eos_token_id")
    for i in ([eos] if isinstance(eos, int) else list(eos or [])):
      if int(i) not in out:
        out.append(int(i))
  return out


def stop_tokens(data_cfg, tokenizer=None) -> list[int]:
  """Generation stop ids of a run (what `generate` stops on and `export-hf` writes
  as eos_token_id): data.eos_id, or when unset its tokenizer's end-of-text id
  (`tokenizer`, else made from `data_cfg`: the byte tokenizer's is 0, a
  tokenizer.json's its eos token, none if it names none), then every id of
  data.stop_ids. Empty: generation runs to its length. `data.eos_stops` false
  (import-hf's for a model that declares no eos and brings no tokenizer: the byte
  tokenizer's 0 is not its end of text) leaves the tokenizer's out."""
  eos = data_cfg.get("eos_id")
  if eos is None and data_cfg.get("eos_stops", True):
    eos = (tokenizer or make_tokenizer(ConfigDict(dict(data_cfg)),
                                       require_eos=False)).eos_id
  out = [] if eos is None else [int(eos)]
  return out + [int(i) for i in data_cfg.get("stop_ids") or () if int(i) not in out]


def family_of(cfg: ModelConfig) -> str:
  """The HF architecture a model's fields make: experts -> Mixtral, qk_norm ->
  Qwen3, qkv_bias -> Qwen2, a sliding window -> Mistral, none -> Llama. ConfigError
  (naming the field) for combinations no family has."""
  m = cfg.moe
  if m.num_experts:
    problems = {"model.moe.renormalize": (not m.renormalize, "renormalize=true"),
                "model.moe.every_k_layers": (m.every_k_layers != 1, "every_k_layers=1"),
                "model.moe.shared_expert": (m.shared_expert, "shared_expert=false"),
                "model.qkv_bias": (cfg.qkv_bias or cfg.qk_norm, "no q/k biases or norms")}
    bad = [(field, need) for field, (wrong, need) in problems.items() if wrong]
    if bad:  # every one at once: fixing the first alone would meet the next
      needs = " and ".join(need for _, need in bad)
      raise ConfigError(bad[0][0], "a mixture-of-experts model exports as "
                        f"MixtralForCausalLM, which needs {needs} (this run differs "
                        "in " + ", ".join(f for f, _ in bad) + ").",
                        f"export a run with {needs}.")
    return "MixtralForCausalLM"
  if cfg.qk_norm and cfg.qkv_bias:
    raise ConfigError("model.qkv_bias", "no transformers architecture has both q/k "
                      "biases and q/k norms.", "export a model with one of them.")
  if cfg.sliding_window and (cfg.qk_norm or cfg.qkv_bias):
    raise ConfigError("model.sliding_window", "rung exports sliding windows as "
                      "Mistral or Mixtral, which have no q/k biases or norms.",
                      "export a run with model.sliding_window=0.")
  if cfg.qk_norm:
    return "Qwen3ForCausalLM"
  if cfg.qkv_bias:
    return "Qwen2ForCausalLM"
  return "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"


def dispatch_note(cfg: ModelConfig) -> str:
  """What an export says of a capacity-dispatch MoE model: transformers' Mixtral
  computes every token's experts (dropless), so its logits equal rung's only
  where rung's capacity dropped nothing. Empty for dense and dropless models."""
  m = cfg.moe
  if not m.num_experts or m.dispatch != "capacity":
    return ""
  return ("note: the run routes with capacity dispatch (model.moe.capacity_factor="
          f"{m.capacity_factor:g}), which drops a token's expert once the expert is "
          "full; transformers' Mixtral drops nothing, so its logits match rung's only "
          "where no expert overflows (rung computes what transformers does with "
          "--config.model.moe.dispatch=dropless)")


def rope_description(cfg: ModelConfig) -> str:
  """One line naming the rotary variant and the parameters it uses."""
  r = cfg.rotary
  text = f"{r.type} (theta {r.theta:g}"
  if r.type != "default":
    text += f", factor {r.factor:g}"
  if r.type == "llama3":
    text += (f", low_freq_factor {r.low_freq_factor:g}, high_freq_factor "
             f"{r.high_freq_factor:g}, original context {r.original_max_positions}")
  if r.type == "yarn":
    text += (f", beta_fast {r.beta_fast:g}, beta_slow {r.beta_slow:g}, original "
             f"context {r.original_max_positions}, attention factor {r.scale:.4g}")
  return text + f"), max_position_embeddings {cfg.max_position_embeddings}"


def _transformers_major() -> int:
  from importlib import metadata
  try:
    return int(metadata.version("transformers").split(".")[0])
  except (metadata.PackageNotFoundError, ValueError):
    return 5


def _rope_params(cfg: ModelConfig) -> dict:
  r = cfg.rotary
  out: dict[str, Any] = {"rope_type": r.type, "rope_theta": r.theta}
  if r.type != "default":
    out["factor"] = r.factor
  if r.type == "llama3":
    out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
               original_max_position_embeddings=r.original_max_positions)
  if r.type == "yarn":
    out.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow,
               original_max_position_embeddings=r.original_max_positions)
    if r.attention_factor is not None:
      out["attention_factor"] = r.attention_factor
  return out


def hf_config(cfg: ModelConfig, eos_ids: int | list[int] | None,
              bos_id: int | None = None, major: int | None = None) -> dict:
  """config.json for `cfg`'s family, in transformers `major`'s layout (default: the
  installed one's): 5 writes `rope_parameters`, 4 `rope_theta` and `rope_scaling`."""
  arch = family_of(cfg)
  major = _transformers_major() if major is None else major
  if isinstance(eos_ids, (list, tuple)):
    eos_ids = (list(eos_ids) if len(eos_ids) > 1
               else (eos_ids[0] if eos_ids else None))
  out = {
      "architectures": [arch], "model_type": FAMILIES[arch].model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "eos_token_id": eos_ids, "bos_token_id": bos_id,
  }
  if arch == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  elif FAMILIES[arch].sliding_window:
    out.update(sliding_window=cfg.sliding_window or None)
    if arch == "MixtralForCausalLM":
      out.update(num_local_experts=cfg.moe.num_experts,
                 num_experts_per_tok=cfg.moe.top_k, router_jitter_noise=0.0)
  else:
    out.update(use_sliding_window=False)
    if arch == "Qwen3ForCausalLM":
      out.update(attention_bias=False)
  rope = _rope_params(cfg)
  if major >= 5:
    out.update(rope_parameters=rope, dtype=cfg.param_dtype)
  else:
    theta = rope.pop("rope_theta")
    out.update(rope_theta=theta, torch_dtype=cfg.param_dtype,
               rope_scaling=None if rope["rope_type"] == "default" else rope)
  return out


# ---------------------------------------------------------------------- weights

class WeightsMismatch(ValueError):
  """An HF checkpoint's tensors do not fit the model its config.json describes
  (a tensor missing, left over, or of another size)."""


class SafetensorsReader:
  """The tensors of an HF checkpoint directory (`model.safetensors`, or else the
  shards `model.safetensors.index.json` lists: transformers' order), read one at a
  time on request, memory-mapped, in their stored dtype (bfloat16 through
  ml_dtypes). `pop` reads a tensor and marks it used; `unused()` names what
  nothing asked for."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(os.path.join(hf_dir, "model.safetensors")):
      files = ["model.safetensors"]
    elif os.path.exists(index):
      weight_map = _read_hf_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise _unreadable(index, "it has no weight_map of tensor names to files")
      files = sorted(set(weight_map.values()))
    else:
      raise ConfigError("--hf_dir", f"{hf_dir} holds neither model.safetensors nor "
                        "model.safetensors.index.json.",
                        "point it at a directory saved with save_pretrained "
                        "(safe_serialization, the default).")
    self._files = [_open_safetensors(os.path.join(hf_dir, name)) for name in files]
    self._where = {key: f for f in self._files for key in f.keys()}

  def pop(self, name: str, *default):
    if name not in self._where:
      if default:
        return default[0]
      raise WeightsMismatch(f"the checkpoint has no tensor {name!r}")
    return self._where.pop(name).get_tensor(name)

  def peek(self, name: str):
    """The tensor `name`, or None where there is none; not marked used."""
    return self._where[name].get_tensor(name) if name in self._where else None

  def unused(self) -> list[str]:
    return sorted(self._where)


def _unreadable(path: str, why: str) -> ConfigError:
  shard = ("; a sharded checkpoint needs every file its "
           "model.safetensors.index.json lists" if path.endswith(".safetensors") else "")
  return ConfigError("--hf_dir", f"{path} cannot be read: {why}.",
                     f"re-save the model with save_pretrained (or copy the file "
                     f"again){shard}.")


def _read_hf_json(path: str) -> dict:
  """A JSON file of a Hugging Face model directory (config.json, its shard
  index, generation_config.json). Raises ConfigError naming the file when it
  cannot be read or is not a JSON object."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, bad UTF-8
    raise _unreadable(path, str(err)) from None
  if not isinstance(data, dict):
    raise _unreadable(path, f"it holds a JSON {type(data).__name__}, not an object")
  return data


def _open_safetensors(path: str):
  """safetensors' memory-mapped reader of one file; ConfigError naming it when it
  is missing, truncated or not safetensors (its header is checked on opening)."""
  from safetensors import SafetensorError, safe_open
  try:
    return safe_open(path, framework="np")
  except (OSError, SafetensorError) as err:
    raise _unreadable(path, str(err)) from None


def params_from_hf(weights, spec, place=None) -> dict:
  """HF tensors -> rung's nested params, checked against the model's shapes.

  weights: a SafetensorsReader (or a dict name -> array); each rung parameter is
  assembled from its tensors (stacked over layers and experts) in the parameter's
  dtype, then handed to `place(path, array)` -- e.g. a device_put onto its
  sharding -- before the next is read, so the host holds one parameter at a time.
  Without `place` the numpy arrays are returned.
  """
  cfg = spec.cfg
  params: dict = {}

  def read(name, n_in, shape, dtype, path):
    w = np.asarray(weights.pop(name))
    if math.prod(w.shape) != math.prod(shape):
      raise WeightsMismatch(
          f"{name} has shape {w.shape}, which does not fit rung's {'/'.join(path)} "
          f"{shape}" + (" (per layer)" if path[0] == "layers" else ""))
    return _to_rung(w, n_in, shape).astype(dtype)

  for path, (name, n_in) in table(cfg).items():
    try:
      target = _get(spec.abstract_params, path)
    except KeyError:
      continue  # e.g. no `head` with tied embeddings
    value = np.empty(target.shape, target.dtype)
    if "{j}" in name:  # [layers, experts, ...]: one HF tensor per layer and expert
      for i in range(cfg.num_layers):
        for j in range(target.shape[1]):
          value[i, j] = read(name.format(i=i, j=j), n_in, target.shape[2:],
                             target.dtype, path)
    elif path[0] == "layers":
      for i in range(cfg.num_layers):
        value[i] = read(name.format(i=i), n_in, target.shape[1:], target.dtype, path)
    else:
      value[...] = read(name, n_in, target.shape, target.dtype, path)
    _set(params, path, value if place is None else place(path, value))
    del value
  weights.pop("lm_head.weight", None)  # tied checkpoints may still carry it
  unused = weights.unused() if hasattr(weights, "unused") else sorted(weights)
  # Older Llama checkpoints saved each layer's rotary frequencies, a buffer the
  # config determines (transformers recomputes it too): not a weight.
  unused = [n for n in unused if not n.endswith(".rotary_emb.inv_freq")]
  if unused:
    raise WeightsMismatch(f"the checkpoint holds tensors the model does not use: "
                          f"{unused[:5]}")
  return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  out = {}
  for path, (name, n_in) in table(cfg).items():
    try:
      value = np.asarray(_get(params, path))
    except KeyError:
      continue
    if "{j}" in name:
      for i in range(cfg.num_layers):
        for j in range(value.shape[1]):
          out[name.format(i=i, j=j)] = np.ascontiguousarray(_to_hf(value[i, j], n_in))
    elif path[0] == "layers":
      for i in range(cfg.num_layers):
        out[name.format(i=i)] = np.ascontiguousarray(_to_hf(value[i], n_in))
    else:
      out[name] = np.ascontiguousarray(_to_hf(value, n_in))
  return out


# ---------------------------------------------------------------------- commands

GENERATION_CONFIG = "generation_config.json"


def import_hf(hf_dir: str, workdir: str, config, set_fields: Sequence[str] = ()) -> None:
  """A local HF checkpoint of a family in FAMILIES -> a rung workdir (config.json
  + step 0). Every eos_token_id of config.json and generation_config.json becomes
  a stop token: the first is data.eos_id, the rest data.stop_ids.

  Train it with --config=experiments/saved.py:WORKDIR --workdir=WORKDIR.
  Raises ConfigError, before anything is written, when `workdir` already holds
  a run (its config.json or checkpoints), or when a field in `set_fields` (the
  dotted config fields the caller set, e.g. "model.num_layers") is one that
  config.json determines and `config` gives it another value.
  """
  held = [name for name in (run_config.FILE, os.path.basename(checkpoint_dir(workdir)))
          if os.path.exists(os.path.join(workdir, name))]
  # Process 0's view: a slower process may already see what this import wrote.
  if sharding.distributed.process_0_says(bool(held)):
    hf_model = run_config.hf_model_error(  # e.g. --workdir=--hf_dir: removing it
        workdir, "not a rung run; import-hf writes the new run into --workdir.",
        f"pass a new --workdir for the run, e.g. --workdir=runs/"
        f"{os.path.basename(os.path.normpath(hf_dir)) or 'model'} (--hf_dir stays "
        "as it is).")
    if hf_model:
      raise hf_model
    raise ConfigError(
        "--workdir", f"{workdir} already holds a run ({' and '.join(held)}); "
        "import-hf writes a new run at step 0 and would overwrite it.",
        "pass a new --workdir (or remove that directory first).")
  prepare_workdir(workdir, make=False)  # a file in its place: before any read
  hf = _read_hf_json(os.path.join(hf_dir, "config.json"))
  if isinstance(hf.get("model"), dict):  # a run's config.json: it has a model group
    raise ConfigError(
        "--hf_dir", f"{hf_dir} holds a rung run, not a Hugging Face model.",
        "pass it as --workdir to train, generate or export-hf it; a new run from its "
        "weights: python -m experiment train "
        f"{run_config.saved_config_flag(hf_dir)} --workdir=runs/NEW "
        f"{sharding.flag('config.checkpoint.init_from', hf_dir)}.")
  generation = None
  if os.path.exists(os.path.join(hf_dir, GENERATION_CONFIG)):
    generation = _read_hf_json(os.path.join(hf_dir, GENERATION_CONFIG))
  fields = model_fields_from_hf(hf)
  reader = SafetensorsReader(hf_dir)
  untied = fields["tie_embeddings"] and _head_differs(reader)
  if untied:  # transformers loads these untied too (and warns)
    fields["tie_embeddings"] = False
  _refuse_conflicting(config, fields, set_fields, hf_dir)
  moe = fields.pop("moe", None)
  config.model.update(**fields)
  if moe:
    config.model.moe.update(**moe)
  tokenizer, copied = os.path.join(hf_dir, "tokenizer.json"), []
  given = tokenizer_file(config.data.tokenizer)
  if given:  # --config.data.tokenizer=PATH: the run keeps its own copy too
    tokenizer = given
    if not os.path.isfile(tokenizer):
      raise ConfigError("data.tokenizer", f"there is no tokenizer file at {tokenizer}.",
                        "pass the path of the model's tokenizer.json.")
  if os.path.exists(tokenizer):
    # Copied once the weights are read: a failed import leaves no half-made run
    # (to <workdir>/tokenizer.json, which the run's config.json names relative to
    # the run, so the run can be moved).
    config.data.tokenizer = os.path.abspath(os.path.join(workdir, "tokenizer.json"))
    beside = os.path.dirname(os.path.abspath(tokenizer))  # its special tokens, template
    copied = [(tokenizer, "tokenizer.json")] + [
        (os.path.join(beside, name), name) for name in TOKENIZER_EXTRAS
        if os.path.isfile(os.path.join(beside, name))]
    tokens = f"{', '.join(name for _, name in copied)}, copied into the run"
    size = _tokenizer_size(tokenizer)
    if size > config.model.vocab_size:
      tokens += (f"; warning: it has {size} ids, more than the model's vocab_size of "
                 f"{config.model.vocab_size}: training refuses it (model.vocab_size) "
                 "and generation cannot take its ids past the embedding")
  elif config.data.tokenizer == "byte":
    tokens = (f"bytes: {hf_dir} has no tokenizer.json, so text is read and written "
              f"as byte ids 0-255 of the model's {config.model.vocab_size}; give "
              "the model's own with --config.data.tokenizer=PATH/tokenizer.json")
  else:  # none: token ids
    tokens = str(config.data.tokenizer)
  stops = stop_ids_from_hf(hf, generation)
  if stops:
    config.data.eos_id = stops[0]
    config.data.stop_ids = tuple(stops[1:])
  elif not copied and config.data.eos_id is None:  # no eos, as transformers runs it
    config.data.eos_stops = False
  if isinstance(hf.get("bos_token_id"), int):
    config.data.bos_id = hf["bos_token_id"]
  import model as model_lib
  model_lib.validate(config.model)
  sharding.validate_serving_plan(config, len(jax.devices()), saved_model=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.normalize_rules(config.mesh.rules)
  spec = model_spec(ModelConfig.from_config(config.model), rules)
  shardings = param_shardings(spec, mesh)
  try:
    params = params_from_hf(
        reader, spec,
        place=lambda path, x: jax.device_put(x, _get(shardings, path)))
  except WeightsMismatch as err:
    raise ConfigError(
        "--hf_dir", f"{hf_dir}'s weights do not match its config.json: {err}.",
        "check that config.json belongs to these weights (num_hidden_layers, "
        "vocab_size, hidden_size, tie_word_embeddings, ...).") from None
  # Parameters only: a step-0 optimizer state is a fresh one, which fine-tuning
  # makes for whichever optimizer it runs (AdamW's zero moments tripled the disk).
  state = TrainState(step=jax.device_put(np.int32(0), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec())), params=params, opt_state=None)
  config_dict = json.loads(config.to_json())
  # Every file is written into a staging directory and moved into the workdir
  # once all are (config.json last): an interrupted import leaves no run.
  writer = jax.process_index() == 0
  with staged.staged(workdir, "import-hf", writer=writer,
                     barrier=_barrier if jax.process_count() > 1 else None) as stage:
    if writer:
      for source, name in copied:
        shutil.copy(source, os.path.join(stage, name))
      if generation is not None:  # its sampling defaults and pad id, for export-hf
        shutil.copy(os.path.join(hf_dir, GENERATION_CONFIG),
                    os.path.join(stage, GENERATION_CONFIG))
      run_config.write(stage, config_dict, home=workdir)
    ckpt = Checkpointer(stage, config.checkpoint)
    ckpt.save(state, None, config_dict, force=True)
    ckpt.wait()
    ckpt.close()
  n = sum(x.size for x in jax.tree.leaves(params))
  cfg = spec.cfg
  stored = hf.get("dtype") or hf.get("torch_dtype")
  weights = (f"{stored} in the checkpoint, held (and exported) as {cfg.param_dtype}, "
             "model.param_dtype" if stored and stored != cfg.param_dtype else
             cfg.param_dtype)
  if stored == "bfloat16" and cfg.param_dtype == "float32":
    weights += (" (twice the memory; --config.model.param_dtype=bfloat16 at import "
                "keeps them in 16 bits)")
  elif stored == "float16" and cfg.param_dtype == "float32":
    weights += (" (twice the memory, exactly: rung holds no float16 parameters, "
                "and --config.model.param_dtype=bfloat16 would round their 10-bit "
                "mantissas to 7)")
  family = family_of(cfg)
  given = (hf.get("architectures") or [family])[0]
  print(f"imported {given}" + (f" (the same model as a {family}, as which it exports)"
                               if given != family else "")
        + f" ({n / 1e6:.1f}M parameters) "
        f"from {hf_dir} into {workdir} at step 0.\n"
        f"rope: {rope_description(cfg)}; stop tokens: "
        f"{_stops_line(config.data, stops, copied, cfg.vocab_size)}\n"
        f"weights: {weights}\n"
        f"tokenizer: {tokens}\n"
        + ("head: untied: config.json ties the embeddings (tie_word_embeddings), but "
           "the checkpoint's lm_head.weight differs from model.embed_tokens.weight, so "
           "it is kept, as transformers loads it (export-hf writes "
           "tie_word_embeddings false)\n" if untied else "")
        + (f"block: {cfg.block}: the imported weights run with another residual "
           "wiring than the checkpoint's model, so its outputs differ until it is "
           "fine-tuned (export-hf takes standard blocks only)\n"
           if not cfg.standard_wiring() else "") +
        f"fine-tune: python -m experiment train {run_config.saved_config_flag(workdir)} "
        f"{sharding.flag('workdir', workdir)}")


def _head_differs(reader: SafetensorsReader) -> bool:
  """Whether a checkpoint whose config.json ties the embeddings holds an
  lm_head.weight that is not model.embed_tokens.weight (a tied checkpoint may
  carry a copy of it, which is dropped)."""
  head = reader.peek("lm_head.weight")
  if head is None:
    return False
  embed = reader.peek("model.embed_tokens.weight")
  return embed is None or head.shape != embed.shape or not np.array_equal(head, embed)


def _barrier(name: str) -> None:
  """Every process waits here for the others (several processes only)."""
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(f"rung: {name}")


def _refuse_conflicting(config, fields: dict, set_fields: Sequence[str],
                        hf_dir: str) -> None:
  """ConfigError for the first field of `set_fields` that the HF config.json
  determines (`fields`, from model_fields_from_hf) and `config` sets otherwise:
  import-hf took config.json's value silently, or blamed the checkpoint."""
  from_hf = {f"model.{k}": v for k, v in fields.items() if k != "moe"}
  if "model.moe.num_experts" in set_fields or fields.get("moe"):
    moe = fields.get("moe") or {"num_experts": 0}
    from_hf.update({f"model.moe.{k}": v for k, v in moe.items()})
  for name in set_fields:
    if name not in from_hf:
      continue
    value = config
    for part in name.split("."):
      value = value[part]
    if value != from_hf[name]:
      raise ConfigError(
          name, f"is {value!r}, but {hf_dir}/config.json makes it {from_hf[name]!r}; "
          "import-hf builds the model config.json describes.",
          f"drop --config.{name} from the import; to train the imported model with "
          f"another value, pass it to `train --config=experiments/saved.py:RUN`.")


def _stops_line(data_cfg, stops: list[int], copied: list[tuple[str, str]],
                vocab_size: int) -> str:
  """What import-hf says the run stops on: config.json's eos ids (with a warning
  for any the model's vocabulary does not hold), else what `stop_tokens` finds
  (data.eos_id given, or the end-of-text token of the tokenizer being copied),
  else none."""
  if stops:
    past = [i for i in stops if i >= vocab_size]
    return str(stops) + (
        f" (warning: {', '.join(map(str, past))} past the model's vocab_size of "
        f"{vocab_size}: the model cannot emit {'it' if len(past) == 1 else 'them'}, "
        "and generate refuses such stop ids until they are dropped with "
        "--config.data.eos_id / --config.data.stop_ids)" if past else "")
  from train.tokenizer import HFTokenizer
  found = stop_tokens(data_cfg, HFTokenizer(copied[0][0], require_eos=False)
                      if copied else None)
  if found:
    return f"{found} (" + ("data.eos_id" if data_cfg.get("eos_id") is not None else
                           "the tokenizer's end-of-text token") + ")"
  return ("none (generation runs to --max_new_tokens; --config.data.eos_id=ID "
          "sets one)")


def _tokenizer_size(path: str) -> int:
  """The tokenizer file's vocabulary size; a file `tokenizers` cannot read is a
  ConfigError naming data.tokenizer (it was a bare Exception without the path)."""
  from train.tokenizer import HFTokenizer, UnreadableTokenizer
  try:
    return HFTokenizer(path, require_eos=False).vocab_size
  except UnreadableTokenizer as err:
    raise ConfigError("data.tokenizer", f"{err}.", "pass the model's tokenizer.json "
                      "with --config.data.tokenizer=PATH (or remove the broken one "
                      "from --hf_dir).") from None


def _honour_umask(path: str) -> None:
  """safetensors writes through a private temporary file (mode 0600); give the
  weights the permissions any other file written here gets, as config.json has."""
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(path, 0o666 & ~mask)


def _write_tokenizer_config(tokenizer_json: str, hf: dict, out: str) -> None:
  """A tokenizer_config.json naming the bos and eos tokens of `hf` (config.json's
  ids, as strings of tokenizer_json), for a run whose tokenizer came without one."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(tokenizer_json)
  eos = hf.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  special = {name: tok.id_to_token(i) for name, i in
             (("bos_token", hf.get("bos_token_id")), ("eos_token", eos))
             if isinstance(i, int) and tok.id_to_token(i) is not None}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
               "model_max_length": hf.get("max_position_embeddings"), **special},
              f, indent=2)


def export_hf(workdir: str, out: str, step: int | None = None) -> None:
  """A rung workdir's parameters -> safetensors + config.json that transformers loads.
  Raises ConfigError, before anything is read, when `out` already holds files: a
  new checkpoint beside an old one's shards or tokenizer would mix the two.
  On several processes, each reads the parameters and process 0 writes."""
  # Process 0's view: a slower process may already see what this export wrote.
  # (An interrupted export's staging directory is not a file of `out`'s.)
  held = sorted(set(os.listdir(out)) - {staged.partial_name("export-hf")}
                ) if os.path.isdir(out) else []
  if sharding.distributed.process_0_says(os.path.isfile(out) or bool(held)):
    what = (f"holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''}" if held
            else "exists as a file")
    raise ConfigError("--out", f"{out} already {what}; export-hf writes a whole "
                      "checkpoint there" + (" and would mix it with them." if held else
                                            " (a directory)."),
                      "pass a new --out (or remove that " +
                      ("directory" if held else "file") + " first).")
  unwritable = output_path.problem(out, "directory")
  if unwritable:  # before the weights are read
    raise ConfigError("--out", f"{unwritable}.", "pass a directory you can write.")
  config = run_config.load(workdir)
  cfg = ModelConfig.from_config(config.model)
  if not cfg.standard_wiring():  # (a ladder block with ladder_layers=none exports)
    raise ConfigError("model.block", f"a {cfg.describe_blocks()} model has no "
                      "transformers equivalent (LlamaForCausalLM is a standard block).",
                      "only runs trained with --config.model.block=standard export; "
                      "serve this one with `generate` or infer.load.")
  family_of(cfg)  # refuses field combinations no HF family has
  spec = model_spec(cfg, sharding.normalize_rules(config.mesh.rules))
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step = ckpt.step_to_read(step)
  # every process reads the whole parameters onto a device of its own; process 0 writes
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        spec.abstract_params)
  stops = stop_tokens(config.data)  # a config error before anything is written
  generation = kept_generation_config(workdir)
  tokenizer = tokenizer_file(config.data.tokenizer)
  if tokenizer and not os.path.isfile(tokenizer):
    raise ConfigError("data.tokenizer", f"the run's tokenizer {tokenizer} is gone; the "
                      "export would have none.", "put the tokenizer.json back there "
                      "(or into the run directory, where a moved run looks for it).")
  params = jax.device_get(ckpt.restore_params(target, step))
  ckpt.close()
  if jax.process_index() == 0:
    _write_export(params, cfg, config, stops, generation, workdir, out, step)
  if jax.process_count() > 1:  # the others wait for the files: a process that
    # exited first failed JAX's shutdown barrier and aborted every process
    _barrier("export-hf written")


def kept_generation_config(workdir: str) -> dict:
  """What export-hf writes into generation_config.json besides the run's bos and
  eos ids (which overrides may have changed): the imported model's file, which
  import-hf keeps in the run (sampling defaults such as temperature and top_p,
  pad_token_id); {} for a run that holds none. ConfigError naming the file when
  it cannot be read."""
  path = os.path.join(workdir, GENERATION_CONFIG)
  if not os.path.isfile(path):
    return {}
  try:
    kept = _read_hf_json(path)
  except ConfigError as err:
    raise ConfigError("--workdir", err.problem, "restore the file from the model "
                      "imported, or remove it (export-hf then writes the bos and eos "
                      "ids alone).") from None
  return {k: v for k, v in kept.items() if k not in ("bos_token_id", "eos_token_id")}


def _write_export(params, cfg: ModelConfig, config, stops, generation: dict,
                  workdir: str, out: str, step: int) -> None:
  """Process 0's half of `export_hf`: the files, written into a staging directory
  and moved into `out` once all are (config.json last, `train.staged`)."""
  from safetensors.numpy import save_file
  hf = hf_config(cfg, stops, config.data.get("bos_id"))
  tokenizer = tokenizer_file(config.data.tokenizer)
  with staged.staged(out, "export-hf") as stage:
    weights = os.path.join(stage, "model.safetensors")
    save_file(params_to_hf(params, cfg), weights, metadata={"format": "pt"})
    _honour_umask(weights)
    with open(os.path.join(stage, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    with open(os.path.join(stage, GENERATION_CONFIG), "w") as f:
      json.dump({**generation, "bos_token_id": hf["bos_token_id"],
                 "eos_token_id": hf["eos_token_id"]}, f, indent=2)
    if tokenizer and os.path.isfile(tokenizer):
      shutil.copy(tokenizer, os.path.join(stage, "tokenizer.json"))
      # The extras beside the tokenizer the run reads, else the run's own copies.
      copy_extras(os.path.dirname(os.path.abspath(tokenizer)), stage)
      copy_extras(workdir, stage)
      if not os.path.exists(os.path.join(stage, "tokenizer_config.json")):
        _write_tokenizer_config(tokenizer, hf, stage)  # bos/eos
  logging.info("exported step %s of %s to %s", step, workdir, out)
  print(f"exported step {step} of {workdir} to {out}" + (
      "" if stops else "; eos_token_id none: the run has no stop token (data.eos_id "
      "unset and its tokenizer names no end-of-text token)") + (
      "" if tokenizer else f"; no tokenizer files: the run reads "
      f"{'token ids' if config.data.tokenizer == 'none' else 'text as bytes (ids 0-255)'}, "
      "which transformers has no tokenizer for"))
  note = dispatch_note(cfg)
  if note:
    print(note)
