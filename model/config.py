"""The model's hyperparameters as a frozen dataclass, built from `config.model`."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax.numpy as jnp
from ml_collections import ConfigDict

import kernels
from model.embedding import LOOKUPS
from model.rotary import ROPE_TYPES, Rotary
from sharding import ConfigError
from sharding.report import count

BLOCKS = ("standard", "parallel", "ladder")
REMAT = ("none", "full", "save_dots", "save_dots_attention", "offload_dots")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DISPATCH = ("capacity", "dropless")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts feed-forward layers (`config.model.moe`); see model/moe.py.

  num_experts = 0 keeps a dense SwiGLU MLP in every layer. Otherwise every
  `every_k_layers`-th layer (layers k-1, 2k-1, ...) replaces its MLP with
  `num_experts` SwiGLU experts of width `d_ff`, of which each token uses `top_k`.
  """
  num_experts: int = 0
  top_k: int = 2
  every_k_layers: int = 1
  capacity_factor: float = 1.25
  shared_expert: bool = False
  aux_loss_weight: float = 0.01
  z_loss_weight: float = 0.001
  dispatch: str = "capacity"
  # Gates divided by their sum over the top_k choices (Mixtral; HF norm_topk_prob).
  renormalize: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 8
  head_dim: int = 32
  d_ff: int = 704
  tie_embeddings: bool = False
  # How tokens find their rows: 'gather' or 'one_hot' (a matmul; see
  # model/embedding.py for what each moves under FSDP).
  embed_lookup: str = "gather"
  # Rotary variant (model/rotary.py): default | linear | llama3 | yarn, and its
  # knobs; the defaults are Rotary's, written once there.
  rope_theta: float = Rotary.theta
  rope_type: str = Rotary.type
  rope_factor: float = Rotary.factor
  rope_low_freq_factor: float = Rotary.low_freq_factor
  rope_high_freq_factor: float = Rotary.high_freq_factor
  rope_original_max_positions: int = Rotary.original_max_positions
  rope_beta_fast: float = Rotary.beta_fast
  rope_beta_slow: float = Rotary.beta_slow
  rope_attention_factor: float | None = Rotary.attention_factor
  max_position_embeddings: int = 8192
  qkv_bias: bool = False  # bias on the q, k and v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm of q and k over head_dim, before rotary (Qwen3)
  # Sliding-window attention (Mistral): each token sees itself and the previous
  # sliding_window - 1 tokens, in training, prefill and decoding; 0 = full causal.
  sliding_window: int = 0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "auto"
  # Flash tiles along the query and key length (flash, ring, ulysses); 0 takes the
  # backend's default. Each backend adapts a size to what it can run (TPU: a
  # multiple of 128, GPU: a power of two, no larger than the padded length).
  attention_block_q: int = 0
  attention_block_kv: int = 0
  remat: str = "none"
  # False: the training and evaluation forward runs the layers one after another
  # (the parameters keep their stacked [layers, ...] layout), so no layer's weights
  # are sliced out of the stack inside a loop and no saved activation is written
  # into a stacked buffer; compile time then grows with depth. Prefill and decoding
  # are unaffected (generation always slices the layers once, outside its loop).
  scan_layers: bool = True
  # The LM head and loss (training and evaluation) run over this many chunks of
  # rows, in training each chunk's logits recomputed in the backward, so the whole
  # batch's [batch, length, vocab] logits never exist (1: one piece). The 1F1B
  # pipeline schedule computes them per microbatch already and ignores it.
  loss_chunks: int = 1
  block: str = "standard"
  # Which layers read the residual stream late when block == 'ladder': 'all',
  # 'upper:N' (the top N layers, as when converting a pretrained model), or a
  # comma-separated list of layer indices such as '4,5,6,7'.
  ladder_layers: str = "all"
  moe: MoEConfig = MoEConfig()

  def __post_init__(self):
    # From Python, a dtype may be given as one (jnp.bfloat16): its name is the field
    for field in ("compute_dtype", "param_dtype"):
      value = getattr(self, field)
      if not isinstance(value, str):
        try:
          object.__setattr__(self, field, jnp.dtype(value).name)
        except TypeError:
          pass  # validate names the field
    # From Python, `moe` may be the dict `config.model.moe` is (dict(num_experts=4)).
    if isinstance(self.moe, (dict, ConfigDict)):
      object.__setattr__(self, "moe", MoEConfig(**_known_fields(
          MoEConfig, dict(self.moe), "model.moe")))
    elif not isinstance(self.moe, MoEConfig):
      raise ConfigError("model.moe", f"{self.moe!r} is not a MoEConfig or a dict of "
                        "its fields.", "pass e.g. moe=MoEConfig(num_experts=4) or "
                        "moe=dict(num_experts=4).")

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """`config.model` (a ConfigDict or dict; missing fields take the defaults) ->
    ModelConfig. A field the model does not have is a ConfigError naming it."""
    return cls(**_known_fields(cls, dict(cfg), "model"))

  def validate(self) -> None:
    """`validate` of these fields: ConfigError naming the first that cannot build
    a model."""
    validate(ConfigDict(dataclasses.asdict(self)))

  @property
  def rotary(self) -> Rotary:
    return Rotary(
        theta=float(self.rope_theta), type=self.rope_type, factor=float(self.rope_factor),
        low_freq_factor=float(self.rope_low_freq_factor),
        high_freq_factor=float(self.rope_high_freq_factor),
        original_max_positions=int(self.rope_original_max_positions),
        beta_fast=float(self.rope_beta_fast), beta_slow=float(self.rope_beta_slow),
        attention_factor=(None if self.rope_attention_factor is None
                          else float(self.rope_attention_factor)))

  @property
  def attention_block_sizes(self) -> tuple[int | None, int | None]:
    """(block_q, block_kv) for `kernels.attention`; None takes the default."""
    return self.attention_block_q or None, self.attention_block_kv or None

  @property
  def dtype(self):
    return DTYPES[self.compute_dtype]

  @property
  def params_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def unit(self) -> int:
    """Layers per scanned unit: `moe.every_k_layers` in an MoE model (k-1 dense
    layers, then one MoE layer), else 1. Scanned layers must share one parameter
    structure, so a model with both kinds scans whole units."""
    return self.moe.every_k_layers if self.moe.num_experts else 1

  def layer_kinds(self) -> tuple[str, ...]:
    """The residual dataflow of each layer: 'standard', 'parallel' or 'ladder'."""
    if self.block != "ladder":
      return (self.block,) * self.num_layers
    ladder = parse_ladder_layers(self.ladder_layers, self.num_layers)
    return tuple("ladder" if i in ladder else "standard"
                  for i in range(self.num_layers))

  def standard_wiring(self) -> bool:
    """Whether every layer is a standard block (`block=standard`, or a ladder
    block whose ladder_layers pick none): the residual dataflow transformers'
    models have, so HF import and export keep the model's outputs."""
    return set(self.layer_kinds()) == {"standard"}

  def describe_blocks(self) -> str:
    """'ladder block', or for a hybrid 'ladder block on layers 2-3 (standard on
    0-1)': what the run's first lines say of the dataflow."""
    def span(start, stop):
      return f"{start}" if stop - start == 1 else f"{start}-{stop - 1}"
    segments = self.segments()
    if len(segments) < 2:
      return f"{segments[0][0] if segments else self.block} block"
    by_kind: dict[str, list[str]] = {}
    for kind, start, stop in segments:
      by_kind.setdefault(kind, []).append(span(start, stop))
    ladder = ", ".join(by_kind.pop("ladder"))
    rest = "; ".join(f"{k} on {', '.join(v)}" for k, v in by_kind.items())
    word = "layer" if ladder.isdigit() else "layers"
    return f"ladder block on {word} {ladder} ({rest})"

  def segments(self) -> tuple[tuple[str, int, int], ...]:
    """Maximal runs of layers with the same kind: ((kind, start, stop), ...)."""
    out: list[list[Any]] = []
    for i, kind in enumerate(self.layer_kinds()):
      if out and out[-1][0] == kind:
        out[-1][2] = i + 1
      else:
        out.append([kind, i, i + 1])
    return tuple(tuple(s) for s in out)


def parse_ladder_layers(spec: str, num_layers: int) -> frozenset[int]:
  spec = str(spec).strip()
  field = "model.ladder_layers"
  if spec == "all":
    return frozenset(range(num_layers))
  if spec in ("", "none"):
    return frozenset()
  if spec.startswith("upper:"):
    try:
      n = int(spec[len("upper:"):])
    except ValueError:
      n = -1
    if not 0 <= n <= num_layers:
      top = max(1, num_layers // 2)
      raise ConfigError(field, f"{spec!r} needs N in 0..num_layers={num_layers}.",
                        f"write e.g. --config.model.ladder_layers=upper:{top} for "
                        f"the top {top} layer{'s' if top > 1 else ''}.")
    return frozenset(range(num_layers - n, num_layers))
  try:
    listed = [int(t) for t in spec.split(",")]
  except ValueError:
    listed = None
  if listed and len(set(listed)) < len(listed):
    twice = next(i for i in listed if listed.count(i) > 1)
    raise ConfigError(field, f"{spec!r} lists layer {twice} more than once.",
                      f"list each layer once, e.g. --config.model.ladder_layers="
                      f"'{','.join(map(str, sorted(set(listed))))}'.")
  layers = None if listed is None else frozenset(listed)
  if layers is None or any(not 0 <= i < num_layers for i in layers):
    top = max(1, num_layers // 2)
    raise ConfigError(field, f"{spec!r} is not 'all', 'none', 'upper:N' or a list "
                      f"of layer indices in 0..{num_layers - 1}.",
                      f"write e.g. --config.model.ladder_layers=upper:{top} or "
                      f"'{','.join(map(str, range(num_layers - top, num_layers)))}'.")
  return layers


def _int_at_least(cfg: Any, field: str, minimum: int, what: str, fix: str) -> int:
  """cfg[field] (default `minimum` when absent, as in configs saved before the
  field existed), or a ConfigError unless it is an int >= minimum (not a bool)."""
  value = cfg.get(field, minimum)
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ConfigError(f"model.{field}", f"{value!r} is not {what}.", fix)
  return value


def _known_fields(cls, values: dict, group: str) -> dict:
  """`values`, refusing a key that is not a field of dataclass `cls`."""
  names = [f.name for f in dataclasses.fields(cls)]
  for key in values:
    if key not in names:
      close = difflib.get_close_matches(key, names, n=1)
      hint = f"did you mean `{group}.{close[0]}`?" if close else (
          f"the fields are {', '.join(names)}.")
      raise ConfigError(f"{group}.{key}", f"there is no such field; {hint}",
                        "fix the name; experiments/base.py lists every field.")
  return values


def validate(cfg: Any) -> None:
  """Raises ConfigError for model fields that cannot build a model."""
  choices = {"compute_dtype": tuple(DTYPES), "param_dtype": tuple(DTYPES),
             "remat": REMAT, "block": BLOCKS, "attention": kernels.IMPLS,
             "embed_lookup": LOOKUPS}
  for field, allowed in choices.items():
    if cfg[field] not in allowed:
      raise ConfigError.choice(f"model.{field}", cfg[field], allowed)
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "d_ff"):
    if cfg[field] <= 0:
      raise ConfigError(f"model.{field}", f"must be positive, got {cfg[field]}.",
                        f"set --config.model.{field} to a positive integer.")
  if "norm_eps" in cfg and not cfg.norm_eps > 0:  # RMSNorm's sqrt(mean + eps)
    raise ConfigError("model.norm_eps", f"must be positive, got {cfg.norm_eps}: "
                      "RMSNorm divides by sqrt(mean(x^2) + eps), NaN for a row "
                      "whose mean square is below -eps.",
                      "set --config.model.norm_eps=1e-5 (or the checkpoint's "
                      "rms_norm_eps).")
  _int_at_least(cfg, "loss_chunks", 1, "a number of chunks",
                "set --config.model.loss_chunks to a positive integer (1: the whole "
                "batch's logits at once).")
  if not isinstance(cfg.get("scan_layers", True), bool):
    raise ConfigError("model.scan_layers", f"{cfg.scan_layers!r} is not True or False.",
                      "set --config.model.scan_layers=true (a loop over the layers) "
                      "or false (unrolled).")
  # The reference attention reads no tiles: their fields go unchecked there (the
  # launcher refuses to set them, train/unread.py).
  tiles = (() if cfg.attention == "reference" else
           ("attention_block_q", "attention_block_kv"))
  for field in tiles:
    _int_at_least(cfg, field, 0, "a tile size",
                  f"set --config.model.{field} to 0 (the backend's default) or a "
                  "positive number of rows such as 512.")
  window = _int_at_least(cfg, "sliding_window", 0, "a number of keys",
                         "set --config.model.sliding_window to 0 (full causal) or a "
                         "positive integer such as 4096.")
  if window and cfg.attention == "ring_zigzag":
    raise ConfigError("model.attention", "ring_zigzag cannot run a sliding window "
                      f"(model.sliding_window={window}).",
                      "set --config.model.attention=ring (or ulysses, or auto).")
  if cfg.num_heads % cfg.num_kv_heads:
    raise ConfigError(
        "model.num_kv_heads",
        f"num_heads={cfg.num_heads} is not a multiple of "
        f"num_kv_heads={cfg.num_kv_heads} (grouped-query attention shares each "
        "K/V head across an equal group of query heads).",
        "choose num_kv_heads dividing num_heads.")
  parse_ladder_layers(cfg.ladder_layers, cfg.num_layers)  # refuses what does not parse
  if cfg.block != "ladder" and cfg.ladder_layers not in ("all", "none"):
    # (one that picks every layer was accepted, and the model stayed cfg.block)
    raise ConfigError(
        "model.ladder_layers", f"{cfg.ladder_layers!r} picks ladder layers, but "
        f"model.block={cfg.block!r} has none, so it would be ignored.",
        "set --config.model.block=ladder for a hybrid (ladder layers there, "
        "standard elsewhere), or leave ladder_layers at 'all'.")
  if "rope_type" in cfg:
    validate_rotary(ModelConfig.from_config(cfg))
  if "moe" in cfg:
    validate_moe(ModelConfig.from_config(cfg))


def validate_rotary(m: ModelConfig) -> None:
  """The `model.rope_*` fields: a known variant with parameters it can use."""
  if m.rope_type not in ROPE_TYPES:
    raise ConfigError.choice("model.rope_type", m.rope_type, ROPE_TYPES)
  if m.head_dim % 2:
    raise ConfigError("model.head_dim", f"rotary embeddings rotate pairs of features; "
                      f"head_dim={m.head_dim} is odd.", "choose an even head_dim.")
  if m.rope_theta <= 1:
    raise ConfigError("model.rope_theta", f"must be > 1, got {m.rope_theta}.",
                      "set e.g. --config.model.rope_theta=10000.")
  if m.rope_type != "default" and m.rope_factor <= 0:
    raise ConfigError("model.rope_factor", f"rope_type={m.rope_type} needs a positive "
                      f"factor, got {m.rope_factor}.", "set e.g. "
                      "--config.model.rope_factor=8.")
  if m.rope_type in ("llama3", "yarn") and m.rope_original_max_positions <= 0:
    raise ConfigError("model.rope_original_max_positions", "must be positive, got "
                      f"{m.rope_original_max_positions}.", "set the pre-training "
                      "context length, e.g. 8192.")
  if m.rope_type == "llama3" and not (
      0 < m.rope_low_freq_factor < m.rope_high_freq_factor):
    raise ConfigError("model.rope_high_freq_factor", "llama3 scaling needs 0 < "
                      f"rope_low_freq_factor={m.rope_low_freq_factor} < "
                      f"rope_high_freq_factor={m.rope_high_freq_factor}.",
                      "use Llama 3.1's 1 and 4.")
  if m.rope_type == "yarn" and not 0 < m.rope_beta_slow < m.rope_beta_fast:
    raise ConfigError("model.rope_beta_fast", "yarn needs 0 < rope_beta_slow="
                      f"{m.rope_beta_slow} < rope_beta_fast={m.rope_beta_fast}.",
                      "use the paper's 1 and 32.")
  if m.max_position_embeddings <= 0:
    raise ConfigError("model.max_position_embeddings", "must be positive, got "
                      f"{m.max_position_embeddings}.", "set e.g. 8192.")


def _upper_fit(m: ModelConfig, k: int) -> int:
  """The `upper:N` closest below the model's ladder-layer count (at least k) whose
  ladder layers start at a multiple of k (num_layers divides by k)."""
  n = len(parse_ladder_layers(m.ladder_layers, m.num_layers))
  return max(n - n % k, k)


def validate_moe(m: ModelConfig) -> None:
  """The `model.moe` group: counts that fit, known dispatch, units that tile."""
  moe = m.moe
  if moe.num_experts < 0:
    raise ConfigError("model.moe.num_experts", f"must be >= 0, got {moe.num_experts}.",
                      "use 0 for dense MLPs, or the number of experts.")
  if not moe.num_experts:
    return
  if not 1 <= moe.top_k <= moe.num_experts:
    raise ConfigError("model.moe.top_k", f"top_k={moe.top_k} must be between 1 and "
                      f"num_experts={moe.num_experts}.",
                      "set --config.model.moe.top_k to e.g. 1 or 2.")
  if moe.dispatch not in DISPATCH:
    raise ConfigError.choice("model.moe.dispatch", moe.dispatch, DISPATCH)
  if moe.dispatch == "capacity" and moe.capacity_factor <= 0:  # dropless: unread
    raise ConfigError("model.moe.capacity_factor", f"must be positive, got "
                      f"{moe.capacity_factor}.", "set e.g. "
                      "--config.model.moe.capacity_factor=1.25 (1.0: no slack).")
  for field in ("aux_loss_weight", "z_loss_weight"):
    if getattr(moe, field) < 0:
      raise ConfigError(f"model.moe.{field}", f"must be >= 0, got "
                        f"{getattr(moe, field)}.",
                        f"set --config.model.moe.{field}=0 to switch the loss off.")
  k = moe.every_k_layers
  if k < 1 or m.num_layers % k:
    raise ConfigError(
        "model.moe.every_k_layers",
        f"every_k_layers={k} must be >= 1 and divide num_layers={m.num_layers}: "
        "layers are scanned in units of k (k-1 dense, then one MoE layer).",
        f"choose a divisor of {m.num_layers}, e.g. 1 (every layer MoE) or 2.")
  for kind, start, stop in m.segments():
    if start % k:
      raise ConfigError(
          "model.ladder_layers",
          f"{m.ladder_layers!r} switches to {kind} layers at layer {start}, inside "
          f"a unit of {count(k, 'layer')} (moe.every_k_layers; one scanned unit has one "
          "residual dataflow).",
          "make the ladder layers start at a multiple of "
          f"{k}, e.g. --config.model.ladder_layers=upper:{_upper_fit(m, k)}.")
