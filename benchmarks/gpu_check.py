"""One command for the first GPU: kernels, training and decoding against the peers.

  python benchmarks/gpu_check.py --out=gpu_check.jsonl      # one NVIDIA GPU, < 8 min
  python benchmarks/gpu_check.py --tiny                     # small shapes, any CPU

Runs with whatever jax, CUDA plugin, torch and transformers the machine has (install
rung with `pip install --no-deps -e .`; nothing is downloaded). Prints one JSON line
per measurement and appends it to --out. Sections (--only to pick):

  environment  versions, device kind and memory, the chip row of `sharding.chips`,
               measured device-to-device copy bandwidth and bf16 matmul rate.
  flash        rung's flash attention (Triton Pallas kernels on a GPU) against the
               XLA reference (`kernels.attention(impl="reference")`) and cuDNN
               (`jax.nn.dot_product_attention(implementation="cudnn")`): causal, GQA
               (4 query heads per KV head), head_dim 64 and 128, bfloat16 (lengths
               1k, 4k, 16k) and float32 (1k, 4k), 16k tokens per call; then the
               Triton tile sizes at 4k, bf16, head_dim 128. Error is the max abs
               difference from the reference computed in float32, for the output and
               for dq, dk, dv; times are forward and forward+backward medians;
               TFLOP/s count causal attention as half of 4*b*h*L^2*d (forward) and
               2.5x that for the backward.
  train        a ~350M Llama (d_model 1024, 24 layers, 16 heads over 8 KV heads,
               SwiGLU 2816, vocab 32000), batch 8 x 2048, float32 parameters and
               bfloat16 compute, AdamW: rung's train step against transformers'
               LlamaForCausalLM in PyTorch (sdpa attention, fused AdamW, autocast
               bf16), eager and with torch.compile. MFU against the chip's dense
               bf16 peak from `sharding.chips`, with the PaLM FLOP count.
  decode       greedy decoding, 128-token prompts, 128 new tokens, bfloat16 weights,
               batch 1 and 64: rung's generate against transformers' generate on the
               same weights, with the weight-read floor (all weights and the filled
               KV cache read once per token at the copy bandwidth measured above).
  blocks       train step time of the standard, parallel and ladder blocks at the
               train shape (one device: no tensor-parallel communication to hide, so
               this measures what each block costs, not what ladder saves).

A section that fails prints an `error` row with its traceback and the rest go on;
the exit status is 1 if any section failed. --deadline_s skips what would not fit.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

import common  # noqa: E402
from common import emit, run  # noqa: E402

SECTIONS = ["environment", "flash", "train", "decode", "blocks"]
_ONLY = flags.DEFINE_list("only", SECTIONS, "sections to run")
_TINY = flags.DEFINE_bool("tiny", False, "small shapes, for CPU (the suite runs this)")
_OUT = define_path("out", None, "also append the JSON lines to this file", output="file")
_DEADLINE = flags.DEFINE_float("deadline_s", 450.0, "skip sections (and flash "
                               "configs) that would start after this many seconds")
_FLASH_DTYPES = flags.DEFINE_list("flash_dtypes", ["bfloat16", "float32"],
                                  "dtypes of the flash section's configs")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", True,
                                   "also time PyTorch with torch.compile (GPU only)")

START = time.perf_counter()


def elapsed() -> float:
  return time.perf_counter() - START


def shapes(tiny: bool) -> dict:
  """Every size the check uses; --tiny shrinks them to seconds on a CPU."""
  if tiny:
    return dict(
        flash=dict(tokens=256, heads=4, kv_heads=1,
                   configs=(("float32", 64, 128),), reps=1,
                   sweep_length=128, sweep_blocks=((32, 32),)),
        model=dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, d_ff=128, tie_embeddings=False,
                   compute_dtype="bfloat16", param_dtype="float32"),
        batch=2, seq_len=64, steps=2, decode=dict(prompt=8, new=8, batches=(3,)),
        copy_bytes=2 ** 22, matmul=256, blocks=("ladder",))
  return dict(
      flash=dict(tokens=16384, heads=16, kv_heads=4,
                 configs=tuple((dtype, d, length) for dtype, lengths in (
                     ("bfloat16", (1024, 4096, 16384)), ("float32", (1024, 4096)))
                     for d in (64, 128) for length in lengths),
                 reps=5, sweep_length=4096,
                 sweep_blocks=((64, 64), (128, 64), (64, 128), (128, 128))),
      model=dict(vocab_size=32000, d_model=1024, num_layers=24, num_heads=16,
                 num_kv_heads=8, head_dim=64, d_ff=2816, tie_embeddings=False,
                 compute_dtype="bfloat16", param_dtype="float32"),
      batch=8, seq_len=2048, steps=10, decode=dict(prompt=128, new=128, batches=(1, 64)),
      copy_bytes=2 ** 32, matmul=8192, blocks=("parallel", "ladder"))


# ---------------------------------------------------------------------- sections

def environment(s: dict, facts: dict) -> None:
  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import sharding
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  chip = sharding.chips.chip_for_device_kind(device.device_kind)
  import jaxlib
  versions = dict(jax=jax.__version__, jaxlib=jaxlib.__version__,
                  flax=flax.__version__, optax=optax.__version__, numpy=np.__version__)
  try:
    import torch
    import transformers
    versions.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_cuda=torch.cuda.is_available())
  except ImportError as e:
    versions.update(torch=f"missing: {e}")
  # Copy bandwidth over a buffer well past the caches.
  facts["bandwidth"] = common.copy_bandwidth(s["copy_bytes"])
  m = s["matmul"]
  a = jax.random.normal(jax.random.key(0), (m, m), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  mm_s = common.time_call(lambda: mm(a).block_until_ready(), reps=10)
  facts["matmul_flops"] = 2 * m ** 3 / mm_s
  facts["peak"] = chip.peak_flops if chip else facts["matmul_flops"]
  facts["device"] = device
  emit(section="environment", date=time.strftime("%Y-%m-%d"), **versions,
       platform=device.platform, device_kind=device.device_kind,
       device_count=jax.device_count(),
       memory_bytes=stats.get("bytes_limit"),
       chip=chip.name if chip else None,
       chip_peak_tflops=chip.peak_flops / 1e12 if chip else None,
       chip_hbm_gbps=chip.hbm_bandwidth / 1e9 if chip else None,
       measured_copy_gbps=facts["bandwidth"] / 1e9,
       measured_bf16_matmul_tflops=facts["matmul_flops"] / 1e12,
       peak_used_for_mfu=("chip table" if chip else "measured bf16 matmul"))


def _attention_flops(batch, heads, length, d) -> float:
  return 4 * batch * heads * length * length * d / 2  # causal: half the tiles


def _flash_row(config, f, inputs, compiled, exact_fwd_bwd) -> dict:
  """One flash config: errors against the float32 reference, then timings."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  dtype_name, d, length = config["dtype"], config["head_dim"], config["length"]
  q, k, v, do = inputs(config["batch"], length, d, jnp.dtype(dtype_name))
  up = [x.astype(jnp.float32) for x in (q, k, v, do)]
  with jax.default_matmul_precision("highest"):  # no TF32 in the error bar
    exact = [np.asarray(x) for x in exact_fwd_bwd(*up)]
  flops = _attention_flops(config["batch"], f["heads"], length, d)
  row = dict(config)
  for name, (fwd, fwd_bwd) in compiled.items():
    try:
      got = [np.asarray(x.astype(jnp.float32)) for x in fwd_bwd(q, k, v, do)]
    except Exception as e:  # cuDNN refuses float32, and CPUs
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
      continue
    for label, g, e in zip(("out", "dq", "dk", "dv"), got, exact):
      row[f"{name}_{label}_max_abs_err"] = float(np.max(np.abs(g - e)))
    t_f = common.time_call(lambda: fwd(q, k, v).block_until_ready(), f["reps"])  # noqa: B023
    t_fb = common.time_call(
        lambda: jax.block_until_ready(fwd_bwd(q, k, v, do)), f["reps"])  # noqa: B023
    row[f"{name}_fwd_ms"] = t_f * 1e3
    row[f"{name}_fwd_bwd_ms"] = t_fb * 1e3
    row[f"{name}_fwd_tflops"] = flops / t_f / 1e12
    row[f"{name}_fwd_bwd_tflops"] = 3.5 * flops / t_fb / 1e12
  if "cudnn_fwd_ms" in row:
    row["flash_over_cudnn_fwd_time"] = row["flash_fwd_ms"] / row["cudnn_fwd_ms"]
    row["flash_over_cudnn_fwd_bwd_time"] = (row["flash_fwd_bwd_ms"] /
                                            row["cudnn_fwd_bwd_ms"])
  return row


def flash(s: dict, facts: dict) -> None:
  import jax
  import jax.numpy as jnp

  import kernels
  f = s["flash"]
  budget_end = _DEADLINE.value * 0.45  # leave the rest of the run to the models

  def inputs(batch, length, d, dtype):
    keys = jax.random.split(jax.random.key(length * d), 4)
    q = jax.random.normal(keys[0], (batch, length, f["heads"], d), dtype)
    k = jax.random.normal(keys[1], (batch, length, f["kv_heads"], d), dtype)
    v = jax.random.normal(keys[2], (batch, length, f["kv_heads"], d), dtype)
    do = jax.random.normal(keys[3], q.shape, dtype)
    return q, k, v, do

  def programs(attend):
    fwd = jax.jit(attend)

    def fwd_bwd(q, k, v, do):
      out, vjp = jax.vjp(attend, q, k, v)
      return (out, *vjp(do))
    return fwd, jax.jit(fwd_bwd)

  impls = {
      "flash": lambda q, k, v: kernels.attention(q, k, v, causal=True, impl="flash"),
      "reference": lambda q, k, v: kernels.attention(q, k, v, causal=True,
                                                     impl="reference"),
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn"),
  }
  compiled = {name: programs(fn) for name, fn in impls.items()}
  exact_fwd_bwd = programs(impls["reference"])[1]  # float32 inputs: the error bar

  for dtype_name, d, length in f["configs"]:
    if dtype_name not in _FLASH_DTYPES.value:
      continue
    config = dict(dtype=dtype_name, head_dim=d, length=length,
                  batch=f["tokens"] // length, heads=f["heads"], kv_heads=f["kv_heads"])
    if elapsed() > budget_end:
      emit(section="flash", **config, skipped="deadline")
      continue
    try:
      emit(section="flash", **_flash_row(config, f, inputs, compiled, exact_fwd_bwd))
    except Exception as e:  # e.g. the reference out of memory at a long length
      emit(section="flash", **config,
           error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")

  # Tile sizes for the Triton kernels at one shape (bf16, head_dim 128).
  length, d = f["sweep_length"], 128
  q, k, v, do = inputs(f["tokens"] // length, length, d, jnp.bfloat16)
  for bq, bk in f["sweep_blocks"]:
    if elapsed() > budget_end:
      emit(section="flash_blocks", block_q=bq, block_kv=bk, skipped="deadline")
      continue
    fwd, fwd_bwd = programs(lambda q, k, v: kernels.attention(  # noqa: B023
        q, k, v, causal=True, impl="flash", block_sizes=(bq, bk)))
    try:
      t_f = common.time_call(lambda: fwd(q, k, v).block_until_ready(), f["reps"])
      t_fb = common.time_call(lambda: jax.block_until_ready(fwd_bwd(q, k, v, do)),
                              f["reps"])
    except Exception as e:  # e.g. a tile larger than shared memory allows
      emit(section="flash_blocks", block_q=bq, block_kv=bk,
           error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
      continue
    emit(section="flash_blocks", length=length, head_dim=d, dtype="bfloat16",
         block_q=bq, block_kv=bk, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3)


def _torch_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def train(s: dict, facts: dict) -> None:
  model, batch, seq_len, steps = s["model"], s["batch"], s["seq_len"], s["steps"]
  r = common.rung_train_step(model, batch=batch, seq_len=seq_len, steps=steps,
                             device=facts["device"])
  flops = r["flops_per_step"]
  facts["standard_step_s"] = r["step_time_s"]  # the blocks section's baseline
  emit(section="train", system="rung", params=r["params"], batch=[batch, seq_len],
       compile_s=r["compile_s"], step_time_s=r["step_time_s"],
       tokens_per_sec=r["tokens_per_sec"], mfu=flops / r["step_time_s"] / facts["peak"])
  device = _torch_device()
  modes = [False] + ([True] if _TORCH_COMPILE.value and device == "cuda" else [])
  for compile in modes:
    system = "pytorch-compile" if compile else "pytorch-eager"
    if elapsed() > _DEADLINE.value * 0.7:
      emit(section="train", system=system, skipped="deadline")
      continue
    t = common.torch_train_step(model, batch=batch, seq_len=seq_len, steps=steps,
                                device=device, autocast_bf16=True, compile=compile)
    emit(section="train", system=system, torch=t["torch"], first_step_s=t["compile_s"],
         step_time_s=t["step_time_s"], tokens_per_sec=t["tokens_per_sec"],
         mfu=flops / t["step_time_s"] / facts["peak"],
         rung_over_this=r["tokens_per_sec"] / t["tokens_per_sec"])


def decode(s: dict, facts: dict) -> None:
  import numpy as np
  import torch
  import transformers

  import infer

  model = dict(s["model"], param_dtype="bfloat16", compute_dtype="bfloat16")
  prompt, new = s["decode"]["prompt"], s["decode"]["new"]
  device = _torch_device()
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(common.hf_llama_config(
      model, max_position_embeddings=prompt + new, eos_token_id=None,
      bos_token_id=None)).to(device=device, dtype=torch.bfloat16).eval()
  rung = common.rung_model_from_hf(hf, model, facts["device"])
  rng = np.random.default_rng(0)
  for batch in s["decode"]["batches"]:
    if elapsed() > _DEADLINE.value * 0.85:
      emit(section="decode", batch=batch, skipped="deadline")
      continue
    prompts = rng.integers(0, model["vocab_size"], (batch, prompt))
    out = infer.generate(rung, prompts.tolist(), max_new_tokens=new)  # compiles
    t_rung = common.time_call(
        lambda: infer.generate(rung, prompts.tolist(), max_new_tokens=new),  # noqa: B023
        reps=2, warmup=0)
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def hf_generate():
      with torch.no_grad():
        result = hf.generate(ids, max_new_tokens=new, min_new_tokens=new,  # noqa: B023
                             do_sample=False)
      sync()
      return result

    ref = hf_generate()[:, prompt:].cpu().numpy()
    t_hf = common.time_call(hf_generate, reps=2, warmup=0)
    floor_s = common.decode_floor_bytes(rung, batch=batch, prompt=prompt,
                                        new=new) / facts["bandwidth"]
    same = [list(o) == list(r) for o, r in zip(out, ref)]
    agree = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(o))
             for o, r in zip(out, ref)]
    emit(section="decode", batch=batch, prompt=prompt, new_tokens=new,
         rung_s=t_rung, rung_tokens_per_sec=batch * new / t_rung,
         transformers_s=t_hf, transformers_tokens_per_sec=batch * new / t_hf,
         rung_over_transformers=t_hf / t_rung, weight_read_floor_s=floor_s,
         rung_over_floor_time=t_rung / floor_s,
         identical_rows=f"{sum(same)}/{batch}",
         mean_agreeing_prefix=float(np.mean(agree)))


def blocks(s: dict, facts: dict) -> None:
  """Standard's time comes from the train section (same shape, same run) when it
  ran; otherwise it is measured here."""
  standard = facts.get("standard_step_s")
  for block in ("standard", *s["blocks"]):
    if block == "standard" and standard is not None:
      continue
    if elapsed() > _DEADLINE.value:
      emit(section="blocks", block=block, skipped="deadline")
      continue
    r = common.rung_train_step(dict(s["model"], block=block), batch=s["batch"],
                               seq_len=s["seq_len"], steps=s["steps"],
                               device=facts["device"])
    standard = r["step_time_s"] if block == "standard" else standard
    emit(section="blocks", block=block, step_time_s=r["step_time_s"],
         standard_step_time_s=standard, over_standard=r["step_time_s"] / standard,
         compile_s=r["compile_s"])


RUNNERS = dict(environment=environment, flash=flash, train=train, decode=decode,
               blocks=blocks)


def main(argv):
  del argv
  common.write_rows_to(_OUT.value)
  unknown = sorted(set(_ONLY.value) - set(SECTIONS))
  if unknown:
    raise app.UsageError(f"--only: unknown sections {unknown}; choose from {SECTIONS}")
  if not _TINY.value:  # leave the GPU's memory to PyTorch too
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  s = shapes(_TINY.value)
  facts: dict = {}
  failed = []
  # The environment's facts (device, bandwidth, peak) are needed by every section.
  for name in ["environment"] + [n for n in SECTIONS[1:] if n in _ONLY.value]:
    if elapsed() > _DEADLINE.value:
      emit(section=name, skipped="deadline")
      continue
    start = time.perf_counter()
    try:
      RUNNERS[name](s, facts)
    except Exception as e:
      failed.append(name)
      emit(section=name, error=f"{type(e).__name__}: {e}"[:2000],
           traceback=traceback.format_exc()[-4000:])
    emit(section=name, seconds=time.perf_counter() - start)
  emit(what="done", failed=failed, seconds=elapsed())
  return 1 if failed else 0


if __name__ == "__main__":
  run(main)
