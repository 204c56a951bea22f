"""Training throughput on this machine: rung against PyTorch eager, in one run.

  python benchmarks/train_throughput.py [--steps=10] [--skip_torch]

Prints one JSON line per measurement: the host's matmul peak, then tokens/s and
MFU for rung's train step on `llama_tiny` and on a 21M-parameter Llama (d_model
512, 4 layers, 8 heads, SwiGLU 1408, vocab 8192, untied, batch 4 x 512, float32),
then `transformers`' LlamaForCausalLM with AdamW in PyTorch eager on the same
21M shape. Record results in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per measurement")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "skip the PyTorch peer")

SHAPE_21M = dict(vocab_size=8192, d_model=512, num_layers=4, num_heads=8,
                 num_kv_heads=8, head_dim=64, d_ff=1408, tie_embeddings=False)


def emit(**row):
  print(json.dumps(row), flush=True)


def rung_config(name: str):
  from experiments import llama_tiny
  c = llama_tiny.get_config()
  if name == "21m":
    c.model.update(**SHAPE_21M)
    c.data.seq_len = 512
    c.train.batch_size = 4
  c.data.source = "synthetic"
  c.mesh.data = 1
  return c


def bench_rung(name: str, steps: int, peak: float):
  import jax
  import numpy as np

  import sharding
  from model import ModelConfig
  from model import flops as flops_lib
  from train.optimizer import make_optimizer, schedule
  from train.state import init_state, model_spec, state_shardings
  from train.step import batch_sharding, make_train_step

  c = rung_config(name)
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(c.mesh, devices)
  rules = sharding.normalize_rules(c.mesh.rules)
  cfg = ModelConfig.from_config(c.model)
  spec = model_spec(cfg, rules)
  tx = make_optimizer(c.optim, 1000)
  shardings = state_shardings(spec, tx, mesh)
  data_sh = batch_sharding(mesh, rules, c.train.batch_size, c.data.seq_len)
  state = init_state(spec, tx, mesh, 0)
  rng = np.random.default_rng(0)
  shape = (c.train.batch_size, c.data.seq_len)
  tokens = rng.integers(0, cfg.vocab_size, (shape[0], shape[1] + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
           "segment_ids": np.ones(shape, np.int32)}
  batch = {k: jax.device_put(v, data_sh) for k, v in batch.items()}
  step = make_train_step(spec, tx, schedule(c.optim, 1000), c.train, shardings, data_sh)
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
    for _ in range(2):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
  dt = (time.perf_counter() - start) / steps
  tokens_per_step = shape[0] * shape[1]
  flops = flops_lib.flops_per_token(cfg, shape[1]) * tokens_per_step
  emit(system="rung", model=name, params=flops_lib.matmul_params(cfg),
       batch=list(shape), step_time_s=dt, tokens_per_sec=tokens_per_step / dt,
       tflops=flops / dt / 1e12, mfu=flops / dt / peak)
  return tokens_per_step / dt


def bench_torch(steps: int, peak: float):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from model import ModelConfig
  from model import flops as flops_lib

  torch.manual_seed(0)
  s = SHAPE_21M
  hf = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"],
                   intermediate_size=s["d_ff"], num_hidden_layers=s["num_layers"],
                   num_attention_heads=s["num_heads"],
                   num_key_value_heads=s["num_kv_heads"], tie_word_embeddings=False,
                   max_position_embeddings=512)
  model = LlamaForCausalLM(hf).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  tokens = torch.randint(0, s["vocab_size"], (4, 512))

  def step():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  dt = (time.perf_counter() - start) / steps
  cfg = ModelConfig(**{k: v for k, v in s.items()})
  flops = flops_lib.flops_per_token(cfg, 512) * 4 * 512
  emit(system="pytorch-eager", model="21m", torch=torch.__version__,
       threads=torch.get_num_threads(), batch=[4, 512], step_time_s=dt,
       tokens_per_sec=4 * 512 / dt, tflops=flops / dt / 1e12, mfu=flops / dt / peak)
  return 4 * 512 / dt


def main(argv):
  del argv
  import flax
  import jax

  from train.metrics import measured_matmul_peak
  peak = measured_matmul_peak()
  emit(what="environment", date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
       cpus=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
       flax=flax.__version__, matmul_peak_tflops=peak / 1e12)
  bench_rung("llama_tiny", _STEPS.value, peak)
  rung_21m = bench_rung("21m", _STEPS.value, peak)
  if not _SKIP_TORCH.value:
    torch_21m = bench_torch(_STEPS.value, peak)
    emit(what="ratio", rung_over_pytorch_tokens_per_sec=rung_21m / torch_21m)


if __name__ == "__main__":
  app.run(main)
