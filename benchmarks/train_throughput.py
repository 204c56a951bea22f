"""Training throughput on this machine: rung against PyTorch eager, in one run.

  python benchmarks/train_throughput.py [--steps=10] [--skip_torch]

Prints one JSON line per measurement: the host's matmul peak, then tokens/s and
MFU for rung's train step, with the layers unrolled and scanned
(`model.scan_layers`), on `llama_tiny` and on a 21M-parameter Llama (d_model
512, 4 layers, 8 heads, SwiGLU 1408, vocab 8192, untied, batch 4 x 512, float32);
the same 21M model written directly in jax.numpy with optax.adamw
(`common.plain_llama_loss`: no NNX, no scan, no sharding rules; what XLA itself
makes of the model, so rung / plain JAX is rung's own overhead); `transformers`'
LlamaForCausalLM with AdamW in PyTorch eager on the same shape; and the 21M
step's matmul floor (its projection and LM-head matmuls alone,
`common.train_matmul_floor`). Record results in benchmarks/README.md.
"""

from __future__ import annotations

import os
import platform
import time

from absl import flags

import common
from common import emit, run

_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per measurement", lower_bound=1)
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "skip the PyTorch peer")

SHAPE_21M = common.LLAMA_21M


def main(argv):
  del argv
  import flax
  import jax

  from experiments import llama_tiny
  from train.metrics import measure_matmul_peak
  # This VM's matmul rate drifts by up to 2x within minutes (neighbours), so the
  # peak is measured before and after the runs and MFU divides by the higher.
  peaks = [measure_matmul_peak()]
  device = jax.devices()[0]
  tiny = llama_tiny.get_config()
  runs = {"llama_tiny": (tiny.model.to_dict(), tiny.train.batch_size, tiny.data.seq_len),
          "21m": (SHAPE_21M, 4, 512)}
  rows = []  # (fields, step_time_s, FLOPs per step)
  for name, (model, batch, seq_len) in runs.items():
    for scan in (False, True):  # the scan last: `r` is the default model's
      r = common.rung_train_step({**model, "scan_layers": scan}, batch=batch,
                                 seq_len=seq_len, steps=_STEPS.value, device=device)
      rows.append((dict(system="rung", model=name, scan_layers=scan, params=r["params"],
                        batch=[batch, seq_len], compile_s=r["compile_s"],
                        tokens_per_sec=r["tokens_per_sec"]),
                   r["step_time_s"], r["flops_per_step"]))
  plain = common.plain_jax_train_step(SHAPE_21M, batch=4, seq_len=512, steps=_STEPS.value)
  rows.append((dict(system="plain-jax", model="21m", batch=[4, 512],
                    compile_s=plain["compile_s"], tokens_per_sec=plain["tokens_per_sec"]),
               plain["step_time_s"], r["flops_per_step"]))
  if not _SKIP_TORCH.value:
    t = common.torch_train_step(SHAPE_21M, batch=4, seq_len=512, steps=_STEPS.value)
    import torch
    rows.append((dict(system="pytorch-eager", model="21m", torch=t["torch"],
                      threads=torch.get_num_threads(), batch=[4, 512],
                      tokens_per_sec=t["tokens_per_sec"]),
                 t["step_time_s"], r["flops_per_step"]))
  floor = common.train_matmul_floor(SHAPE_21M, batch=4, seq_len=512, reps=_STEPS.value)
  peaks.append(measure_matmul_peak())  # again, not the cached first figure
  peak = max(peaks)
  emit(what="environment", date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
       cpus=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
       flax=flax.__version__, matmul_peak_tflops=peak / 1e12,
       matmul_peak_before_after_tflops=[p / 1e12 for p in peaks])
  for fields, step_time, flops in rows:
    emit(**fields, step_time_s=step_time, tflops=flops / step_time / 1e12,
         mfu=flops / step_time / peak)
  # The 21M step's matmuls alone (6N per token): the bulk of any step's work.
  emit(system="matmul-floor", model="21m", batch=[4, 512], step_time_s=floor["seconds"],
       tflops=floor["flops"] / floor["seconds"] / 1e12,
       rung_step_over_floor=r["step_time_s"] / floor["seconds"])
  emit(what="ratio", rung_over_plain_jax_tokens_per_sec=r["tokens_per_sec"] /
       plain["tokens_per_sec"], plain_jax_step_over_floor=plain["step_time_s"] / floor["seconds"])
  if not _SKIP_TORCH.value:
    emit(what="ratio", rung_over_pytorch_tokens_per_sec=r["tokens_per_sec"] /
         t["tokens_per_sec"], pytorch_step_over_floor=t["step_time_s"] / floor["seconds"])

if __name__ == "__main__":
  run(main)
