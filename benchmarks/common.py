"""What the benchmarks share: JSON rows, timing, rung's and PyTorch's train steps on
one device, and a transformers Llama turned into a rung model in memory.

Every benchmark prints one JSON object per line (`emit`) so runs can be compared
with `jq`, and records the figures in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SINK: list[Any] = []


def main_quietly(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` for absl's app.run with the libraries' INFO logs off (Orbax logs
  lines per checkpoint) unless --verbosity is given, and on a host without
  accelerators the CPU chosen before libtpu can start (and print screens of
  warnings), as `python -m experiment` does. Deviceless TPU compiles still work."""
  def run(argv):
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.ERROR)
    from experiment.host import cpu_only_host
    if cpu_only_host():
      import jax
      jax.config.update("jax_platforms", "cpu")
    return main(argv)
  return run


def run(main: Callable[[list[str]], Any]) -> None:
  """Every benchmark's entry point: absl's `app.run` of `main_quietly(main)`,
  except that asking for help (`--help`, `--helpfull`, ...) exits with status 0
  where absl exits 1, which a script or CI step reads as a failure, and a flag
  that does not parse (misspelt, or refused by its check) exits with status 2
  and one line naming it, as `python -m experiment` does (absl: "FATAL", 1)."""
  from absl import app
  try:
    app.run(main_quietly(main), flags_parser=_parse_flags)
  except SystemExit as stop:
    if stop.code == 1 and any(a.lstrip("-").split("=")[0] in _HELP_FLAGS
                              for a in sys.argv[1:]):
      sys.exit(0)
    raise


_HELP_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "?"}


def _parse_flags(argv: list[str]) -> list[str]:
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    sys.stderr.write(f"{os.path.basename(argv[0])}: {err}\n"
                     "Pass --help to list this benchmark's flags.\n")
    sys.exit(2)


def write_rows_to(path: str | None) -> None:
  """Also append every emitted row to `path` (JSON lines), flushed per row."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _SINK.append(open(path, "a"))


def emit(**row) -> dict:
  from sharding.report import json_ready
  line = json.dumps(json_ready(row), allow_nan=False)  # NaN (no MFU peak) -> null
  print(line, flush=True)
  for f in _SINK:
    f.write(line + "\n")
    f.flush()
  return row


def processor() -> str:
  """The CPU model name (/proc/cpuinfo), or "unknown"."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown"


def plot_eval_curves(curves: dict[str, list[tuple[int, float]]], title: str,
                     path: str, solid: tuple[str, ...] | None = None) -> None:
  """Eval loss against step, one line per name (dashed unless in `solid`; all
  solid when `solid` is None), saved to `path` (PNG); emits a 'plot' row."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, evals in curves.items():
    ax.plot(*zip(*evals), marker=".", label=name,
            linestyle="-" if solid is None or name in solid else "--")
  ax.set_xlabel("step")
  ax.set_ylabel("eval loss (nats/byte)")
  ax.set_title(title)
  ax.legend(fontsize=7)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  emit(what="plot", path=path)


def time_call(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
  """Median wall seconds of `fn()` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(nbytes: int, reps: int = 10) -> float:
  """Bytes/s of memory traffic of a jitted x + 1 over `nbytes` of float32 on the
  default device (each element read once and written once): the bandwidth a
  memory-bound decoder can hope for, measured in the same run as what it bounds."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 4,), jnp.float32)
  add = jax.jit(lambda x: x + 1)
  return 2 * x.nbytes / time_call(lambda: add(x).block_until_ready(), reps)


# The 21M-parameter Llama the training and decoding benchmarks time (d_model 512,
# 4 layers, 8 heads, SwiGLU 1408, vocab 8192, untied).
LLAMA_21M = dict(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8,
                 head_dim=64, d_ff=1408, tie_embeddings=False)


def train_matmul_floor(model: dict, *, batch: int, seq_len: int, reps: int) -> dict:
  """The projection and LM-head matmuls of one training step alone -> {seconds,
  flops}: for each weight [in, out] of `model` (a llama_config dict), the forward
  x w, the input gradient g w^T and the weight gradient x^T g over batch x seq_len
  tokens, float32, as independent ops of one jitted program (XLA:CPU may run them
  side by side). No attention, norms, loss or optimizer: 6N FLOPs per token, the
  bulk of the PaLM count. The median of `reps` calls after a warm-up."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  tokens = batch * seq_len
  q = model["num_heads"] * model["head_dim"]
  kv = model["num_kv_heads"] * model["head_dim"]
  d, ff = model["d_model"], model["d_ff"]
  shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)] * \
      model["num_layers"] + [(d, model["vocab_size"])]
  rng = np.random.default_rng(0)
  weights = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]
  acts = {n: jnp.asarray(rng.standard_normal((tokens, n), np.float32))
          for n in {n for s in shapes for n in s}}  # [tokens, width], one per width

  @jax.jit
  def matmuls(weights, acts):
    return [y for w in weights for x, g in [(acts[w.shape[0]], acts[w.shape[1]])]
            for y in (x @ w, g @ w.T, x.T @ g)]

  seconds = time_call(lambda: jax.block_until_ready(matmuls(weights, acts)), reps)
  return dict(seconds=seconds, flops=sum(6 * a * b * tokens for a, b in shapes))


def decode_floor_bytes(model, *, batch: int, prompt: int, new: int) -> float:
  """Bytes a decoder must read to generate `new` tokens if each step read every
  weight and the filled part of the KV cache once: over a bandwidth (bytes/s),
  the weight-read floor in seconds. The cache is counted at its mean fill,
  prompt + new / 2 positions."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  cfg = model.cfg
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  kv = (2 * cfg.num_layers * batch * (prompt + new / 2) * cfg.num_kv_heads *
        cfg.head_dim * jnp.dtype(cfg.dtype).itemsize)
  return new * (weights + kv)


def llama_config(model: dict, *, batch: int, seq_len: int):
  """The base experiment config with `model` fields, synthetic data, one device."""
  from experiments import base
  c = base.get_config()
  c.model.update(**model)
  c.data.seq_len = seq_len
  c.data.source = "synthetic"
  c.train.batch_size = batch
  c.mesh.data = 1
  return c


def rung_train_step(model: dict, *, batch: int, seq_len: int, steps: int, device
                    ) -> dict:
  """rung's AdamW train step on one device -> {step_time_s, tokens_per_sec,
  flops_per_step, params}. Compile excluded (reported as compile_s); the median of
  `steps` timed steps after two warm-up steps."""
  import jax
  import numpy as np

  import sharding
  from model import ModelConfig
  from model import flops as flops_lib
  from train.optimizer import make_optimizer, schedule
  from train.state import init_state, model_spec, state_shardings
  from train.step import batch_sharding, make_train_step

  c = llama_config(model, batch=batch, seq_len=seq_len)
  mesh = sharding.make_mesh(c.mesh, [device])
  rules = sharding.normalize_rules(c.mesh.rules)
  cfg = ModelConfig.from_config(c.model)
  spec = model_spec(cfg, rules)
  tx = make_optimizer(c.optim, 1000)
  shardings = state_shardings(spec, tx, mesh)
  data_sh = batch_sharding(mesh, rules, batch, seq_len)
  state = init_state(spec, tx, mesh, 0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
  host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
          "segment_ids": np.ones((batch, seq_len), np.int32)}
  data = {k: jax.device_put(v, data_sh) for k, v in host.items()}
  step = make_train_step(spec, tx, schedule(c.optim, 1000), c.train, shardings, data_sh)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    box = [state]

    def one():
      box[0], metrics = compiled(box[0], data)
      jax.block_until_ready(metrics)

    dt = time_call(one, steps, warmup=2)
  flops = flops_lib.flops_per_token(cfg, seq_len) * batch * seq_len
  return dict(step_time_s=dt, tokens_per_sec=batch * seq_len / dt,
              flops_per_step=flops, params=flops_lib.matmul_params(cfg),
              compile_s=compile_s)


def plain_llama_loss(params: dict, inputs, targets, *, model: dict, eps: float = 1e-6):
  """Mean next-token cross-entropy of a Llama written directly in jax.numpy, with
  none of rung's modules: the peer that says what XLA itself makes of this model.

  `params` hold transformers' LlamaForCausalLM names with each linear weight as
  [in, out] (`plain_llama_params` converts a state dict): `embed` [vocab, d_model],
  per layer `q, k, v` [d_model, heads * head_dim], `o` [heads * head_dim, d_model],
  `gate, up` [d_model, d_ff], `down` [d_ff, d_model], `attn_norm, mlp_norm`
  [d_model]; `norm` [d_model], `head` [d_model, vocab]. `inputs`, `targets`:
  int [batch, length]. Causal softmax attention (GQA), rotary embeddings with
  HF's half-split layout, RMSNorm, SwiGLU."""
  import jax
  import jax.numpy as jnp
  import optax
  batch, length = inputs.shape
  head_dim = model["head_dim"]
  rope = _plain_rope(jnp.arange(length), head_dim, model.get("rope_theta", 10000.0))
  causal = jnp.tril(jnp.ones((length, length), bool))
  x = params["embed"][inputs].reshape(batch * length, -1)  # [tokens, d_model]
  for layer in params["layers"]:
    q, k, v = _plain_qkv(x, layer, rope, (batch, length), model, eps)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) / jnp.sqrt(head_dim)
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), -1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v).reshape(batch * length, -1)
    x = x + o @ layer["o"]
    x = x + _plain_mlp(_plain_rms(x, layer["mlp_norm"], eps), layer)
  logits = _plain_rms(x, params["norm"], eps) @ params["head"]  # [tokens, vocab]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, targets.reshape(-1)).mean()


def _plain_rms(x, w, eps):
  import jax
  import jax.numpy as jnp
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def _plain_qkv(x, layer, rope, batch_length: tuple[int, int], model: dict, eps: float):
  """The attention inputs of one layer from the residual x: q [batch, length,
  kv_heads, group, head_dim] and k, v [batch, length, kv_heads, head_dim], q and k
  rotated."""
  kv_heads, head_dim = model["num_kv_heads"], model["head_dim"]
  h = _plain_rms(x, layer["attn_norm"], eps)
  q = rope((h @ layer["q"]).reshape(*batch_length, kv_heads, -1, head_dim))
  k = rope((h @ layer["k"]).reshape(*batch_length, kv_heads, head_dim))
  v = (h @ layer["v"]).reshape(*batch_length, kv_heads, head_dim)
  return q, k, v


def _plain_mlp(h, layer):
  import jax
  return (jax.nn.silu(h @ layer["gate"]) * (h @ layer["up"])) @ layer["down"]


def _plain_rope(positions, head_dim: int, theta: float):
  """Rotary embedding at int `positions` [length], HF's half-split layout: a
  function of x [batch, length, ..., head_dim]."""
  import jax.numpy as jnp
  half = head_dim // 2
  angle = positions[:, None] * (1.0 / theta ** (jnp.arange(half) / half))  # [length, half]

  def rope(x):
    shape = (len(positions),) + (1,) * (x.ndim - 3) + (half,)
    cos = jnp.cos(angle).reshape(shape).astype(x.dtype)
    sin = jnp.sin(angle).reshape(shape).astype(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
  return rope


def plain_llama_greedy(model: dict, *, new: int, eps: float = 1e-6):
  """A greedy KV-cache decoder for `plain_llama_loss`'s params, written directly
  in jax.numpy (the decode peer of `plain_jax_train_step`): a jitted function
  (params, prompts int [batch, prompt]) -> int [batch, new]. One prefill over the
  prompts, then `new - 1` cached steps in a `fori_loop`; each layer's cache is
  its own [batch, kv_heads, prompt + new, head_dim] array and attention reads
  every slot under a position mask (as rung's decoder does)."""
  import jax
  import jax.numpy as jnp
  kv_heads, head_dim = model["num_kv_heads"], model["head_dim"]
  theta = model.get("rope_theta", 10000.0)

  def forward(params, tokens, start, caches):
    """tokens [batch, length] at positions start.. -> last logits [batch, vocab]."""
    batch, length = tokens.shape
    positions = start + jnp.arange(length)
    rope = _plain_rope(positions, head_dim, theta)
    visible = jnp.arange(caches[0][0].shape[2]) <= positions[:, None]  # [length, slots]
    x = params["embed"][tokens]  # [batch, length, d_model]
    out = []
    for layer, (k_cache, v_cache) in zip(params["layers"], caches):
      q, k, v = _plain_qkv(x, layer, rope, (batch, length), model, eps)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3), (0, 0, start, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3), (0, 0, start, 0))
      s = jnp.einsum("bqhgd,bhkd->bhgqk", q, k_cache) / jnp.sqrt(head_dim).astype(q.dtype)
      p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), -1)
      o = jnp.einsum("bhgqk,bhkd->bqhgd", p, v_cache).reshape(batch, length, -1)
      x = x + o @ layer["o"]
      x = x + _plain_mlp(_plain_rms(x, layer["mlp_norm"], eps), layer)
      out.append((k_cache, v_cache))
    return _plain_rms(x[:, -1], params["norm"], eps) @ params["head"], out

  @jax.jit
  def greedy(params, prompts):
    batch, prompt = prompts.shape
    dtype = params["embed"].dtype
    caches = [(jnp.zeros((batch, kv_heads, prompt + new, head_dim), dtype),) * 2
              for _ in params["layers"]]
    logits, caches = forward(params, prompts, 0, caches)
    tokens = jnp.zeros((batch, new), jnp.int32).at[:, 0].set(jnp.argmax(logits, -1))

    def step(i, carry):
      tokens, caches = carry
      last = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)  # [batch, 1]
      logits, caches = forward(params, last, prompt + i - 1, caches)
      return tokens.at[:, i].set(jnp.argmax(logits, -1)), caches
    return jax.lax.fori_loop(1, new, step, (tokens, caches))[0]
  return greedy


def plain_llama_params(state_dict: dict) -> dict:
  """transformers' LlamaForCausalLM state dict (NumPy arrays) -> the params of
  `plain_llama_loss` (linear weights transposed to [in, out])."""
  import jax.numpy as jnp
  w = lambda name: jnp.asarray(state_dict[name])  # noqa: E731
  num_layers = len({k.split(".")[2] for k in state_dict if k.startswith("model.layers.")})
  layers = []
  for i in range(num_layers):
    n = f"model.layers.{i}."
    layers.append(dict(
        **{k: w(n + f"self_attn.{k}_proj.weight").T for k in "qkvo"},
        **{k: w(n + f"mlp.{k}_proj.weight").T for k in ("gate", "up", "down")},
        attn_norm=w(n + "input_layernorm.weight"),
        mlp_norm=w(n + "post_attention_layernorm.weight")))
  head = state_dict.get("lm_head.weight", state_dict["model.embed_tokens.weight"])
  return dict(embed=w("model.embed_tokens.weight"), layers=layers,
              norm=w("model.norm.weight"), head=jnp.asarray(head).T)


def plain_jax_train_step(model: dict, *, batch: int, seq_len: int, steps: int) -> dict:
  """`plain_llama_loss` under jax.value_and_grad with optax.adamw, jitted, on
  random weights of `model`'s shape (untied) -> {step_time_s, tokens_per_sec,
  compile_s}: the same work as rung's step without rung (no NNX, no layer scan,
  no sharding rules, reference attention). The median of `steps` timed steps
  after two warm-up steps."""
  import jax
  import numpy as np
  import optax
  rng = np.random.default_rng(0)
  d, ff, hd = model["d_model"], model["d_ff"], model["head_dim"]
  q, kv = model["num_heads"] * hd, model["num_kv_heads"] * hd
  normal = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
  layer = lambda: dict(q=normal(d, q), k=normal(d, kv), v=normal(d, kv), o=normal(q, d),  # noqa: E731
                       gate=normal(d, ff), up=normal(d, ff), down=normal(ff, d),
                       attn_norm=np.ones(d, np.float32), mlp_norm=np.ones(d, np.float32))
  params = jax.device_put(dict(
      embed=normal(model["vocab_size"], d), layers=[layer() for _ in range(model["num_layers"])],
      norm=np.ones(d, np.float32), head=normal(d, model["vocab_size"])))
  tx = optax.adamw(1e-4)
  tokens = rng.integers(0, model["vocab_size"], (batch, seq_len + 1)).astype(np.int32)
  inputs, targets = jax.device_put(tokens[:, :-1]), jax.device_put(tokens[:, 1:])

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(plain_llama_loss)(params, inputs, targets, model=model)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  box = [params, tx.init(params)]
  start = time.perf_counter()
  compiled = step.lower(*box).compile()
  compile_s = time.perf_counter() - start

  def one():
    box[0], box[1], loss = compiled(*box)
    jax.block_until_ready(loss)

  dt = time_call(one, steps, warmup=2)
  return dict(step_time_s=dt, tokens_per_sec=batch * seq_len / dt, compile_s=compile_s)


def hf_llama_config(model: dict, **extra):
  """A transformers LlamaConfig of the same shape as rung's `model` fields."""
  import transformers
  return transformers.LlamaConfig(
      vocab_size=model["vocab_size"], hidden_size=model["d_model"],
      intermediate_size=model["d_ff"], num_hidden_layers=model["num_layers"],
      num_attention_heads=model["num_heads"], num_key_value_heads=model["num_kv_heads"],
      head_dim=model["head_dim"], tie_word_embeddings=model.get("tie_embeddings", False),
      rope_theta=model.get("rope_theta", 10000.0), **extra)


def torch_train_step(model: dict, *, batch: int, seq_len: int, steps: int,
                     device: str = "cpu", autocast_bf16: bool = False,
                     compile: bool = False) -> dict:
  """transformers' LlamaForCausalLM with AdamW in PyTorch (eager, or
  `torch.compile`d) -> {step_time_s, tokens_per_sec, compile_s}. With
  `autocast_bf16` the parameters stay float32 and the forward runs under
  `torch.autocast(bfloat16)`, as rung's compute_dtype=bfloat16 does."""
  import contextlib

  import torch
  from transformers import LlamaForCausalLM

  torch.manual_seed(0)
  hf = LlamaForCausalLM(hf_llama_config(model, max_position_embeddings=seq_len))
  hf = hf.to(device).train()
  opt = torch.optim.AdamW(hf.parameters(), lr=1e-4,
                          fused=True if device.startswith("cuda") else None)
  tokens = torch.randint(0, model["vocab_size"], (batch, seq_len), device=device)
  autocast = (lambda: torch.autocast(device_type=device.split(":")[0],
                                     dtype=torch.bfloat16)) if autocast_bf16 \
      else contextlib.nullcontext
  forward = torch.compile(hf) if compile else hf
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

  def one():
    with autocast():
      loss = forward(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()

  start = time.perf_counter()
  one()
  compile_s = time.perf_counter() - start
  dt = time_call(one, steps, warmup=1)
  return dict(step_time_s=dt, tokens_per_sec=batch * seq_len / dt,
              compile_s=compile_s, torch=torch.__version__)


def rung_model_from_hf(hf_model, model: dict, device):
  """The weights of a transformers Llama as a rung Decoder on `device` (in memory;
  `model` gives rung's fields, e.g. param_dtype)."""
  import jax
  import numpy as np

  import sharding
  from model import ModelConfig
  from train.hf import params_from_hf
  from train.state import model_spec, param_shardings

  c = llama_config(model, batch=1, seq_len=1)
  rules = sharding.normalize_rules(c.mesh.rules)
  spec = model_spec(ModelConfig.from_config(c.model), rules)
  mesh = sharding.make_mesh(c.mesh, [device])
  weights = {k: v.detach().float().cpu().numpy()
             for k, v in hf_model.state_dict().items()}
  params = params_from_hf(weights, spec)
  params = jax.device_put(jax.tree.map(np.asarray, params),
                          param_shardings(spec, mesh))
  return spec.model(params)
