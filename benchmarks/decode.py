"""Decode speed: rung's KV-cache generation against transformers' generate.

  python benchmarks/decode.py [--reps=2]

Same weights on both sides: a random 21M-parameter Llama (d_model 512, 4 layers,
8 heads, SwiGLU 1408, vocab 8192) is saved by transformers and imported into rung.
64-token prompts, 128 new tokens, greedy, batch 1 and 16, float32 and then
bfloat16 (rung: bf16 weights, activations and KV cache, as `generate
--config.model.compute_dtype=bfloat16 --config.model.param_dtype=bfloat16` loads;
transformers: the model cast to bf16), on this CPU. New tokens per second exclude
compilation (one warm-up generation first). One JSON line per measurement.

The weight-read floor (the issue's target: batch 1 within 1.3x of it): the time to
read every weight and the filled KV cache once per token at the copy bandwidth
over a 1 GiB buffer (`common.decode_floor_bytes`), measured before and after the
decoding runs (it drifts on a shared VM); the floor uses the higher, and its rows
come last.

Also timed: the same model as a greedy KV-cache decoder written directly in
jax.numpy (`common.plain_llama_greedy`: no NNX, no rung; what XLA itself makes of
this decoder, so rung / plain JAX is rung's own overhead), and, as the reference
for what any float32 decoder can reach under XLA:CPU here, the "matmul floor":
only the model's projection matmuls (every weight read once per token, as
separate per-layer arrays, in a jitted loop of 128 steps) with no attention,
norms, sampling or cache.

Then (unless --prompt_file=false) `generate --prompts` on a file of 32 prompts
in batches of 8, one line of 1,000 bytes among lines of 24 to 40: each batch
padded to its own length bucket (`infer.text.prompt_bucket`) against every batch
padded to the file's longest, as it was before; the completions must be the same.

Then (unless --ladder=false) the ladder question: the cached decode step of a
larger model under tensor=2 spanning two processes joined over gloo, for standard,
parallel and ladder blocks and the no-communication bound (`desync`), run by
`ladder_overlap.py --instrument=wallclock --programs=decode`; it reports each
block's step time over standard's and the share of the standard-to-desync gap
that ladder recovers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import common  # noqa: E402
from common import emit, run  # noqa: E402

_REPS = flags.DEFINE_integer("reps", 2, "timed generations per setting (best kept)",
                             lower_bound=1)
DTYPES = ("float32", "bfloat16")  # what rung's model.param_dtype accepts
_DTYPES = flags.DEFINE_list("dtypes", list(DTYPES), "weight and compute dtypes to "
                            f"time, each on both sides, of {DTYPES} (empty: none)")
_LADDER = flags.DEFINE_bool("ladder", True, "also time the 2-process tensor=2 "
                            "decode step per block type")
_PROMPT_FILE = flags.DEFINE_bool("prompt_file", True, "also time a file of prompts "
                                 "with one long line, per-batch length buckets "
                                 "against padding every batch to the longest")
flags.register_validator("dtypes", lambda v: set(v) <= set(DTYPES),
                         f"must name dtypes of {', '.join(DTYPES)}")
PROMPT, NEW = 64, 128
SHAPE = common.LLAMA_21M


def matmul_floor(model, batch: int, steps: int = NEW) -> float:
  """Seconds for `steps` passes of [batch, d_model] rows through every projection
  of `model` (attention q, k, v, o; MLP gate, up, down; LM head), nothing else."""
  import jax
  import jax.numpy as jnp

  d = model.cfg.d_model
  mats = [[w.reshape(d, -1) if w.shape[0] == d else w.reshape(-1, d)
           for w in (layer["attn"]["q"], layer["attn"]["k"], layer["attn"]["v"],
                     layer["attn"]["o"], layer["mlp"]["gate"], layer["mlp"]["up"],
                     layer["mlp"]["down"])]
          for layer in (jax.tree.map(lambda p: p[...], s)
                        for s in model.split_layers())]
  head = model.head[...]

  @jax.jit
  def run(x, mats, head):
    def token(_, x):
      for q, k, v, o, gate, up, down in mats:
        x = x + (x @ q + x @ k + x @ v) @ o
        x = x + (jax.nn.silu(x @ gate) * (x @ up)) @ down
      return (x @ head)[:, :d]
    return jax.lax.fori_loop(0, steps, token, x)

  x = jnp.ones((batch, d), head.dtype)
  return best_time(lambda: run(x, mats, head).block_until_ready())[0]


def main(argv):
  del argv
  import jax
  import torch
  import transformers

  import infer
  from experiments import base
  from train import hf, run_config

  torch.manual_seed(0)
  config = common.hf_llama_config(SHAPE, max_position_embeddings=2048, eos_token_id=None,
                                  bos_token_id=None)
  hf_model = transformers.LlamaForCausalLM(config).eval()
  tmp = tempfile.mkdtemp(prefix="rung-bench-decode-")  # ~325 MB: removed at exit
  atexit.register(shutil.rmtree, tmp, ignore_errors=True)
  hf_model.save_pretrained(os.path.join(tmp, "hf"))
  c = base.get_config()
  c.mesh.data = 1
  hf.import_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "rung"), c)
  emit(what="environment", date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
       torch=torch.__version__, transformers=transformers.__version__,
       torch_threads=torch.get_num_threads(), cpus=os.cpu_count())

  before = common.copy_bandwidth(2 ** 30)
  timed = []  # (dtype, batch, rung seconds, floor bytes)
  for dtype in _DTYPES.value:
    saved = run_config.load(os.path.join(tmp, "rung"))
    saved.model.update(compute_dtype=dtype, param_dtype=dtype)
    model, _ = infer.load(os.path.join(tmp, "rung"), devices=jax.devices()[:1],
                          config=saved)
    hf_model = hf_model.to(getattr(torch, dtype))
    plain = common.plain_llama_params(
        {k: v.float().numpy() for k, v in hf_model.state_dict().items()})
    plain = jax.tree.map(lambda w: w.astype(dtype), plain)
    timed += time_dtype(model, hf_model, plain, dtype)
  if _PROMPT_FILE.value:
    time_prompt_file(os.path.join(tmp, "rung"), tmp)
  after = common.copy_bandwidth(2 ** 30)
  bandwidth = max(before, after)
  emit(what="copy bandwidth", gib_per_s=bandwidth / 2 ** 30,
       before_gib_per_s=before / 2 ** 30, after_gib_per_s=after / 2 ** 30)
  for dtype, batch, seconds, floor_bytes in timed:
    floor_s = floor_bytes / bandwidth
    emit(system="weight-read floor", dtype=dtype, batch=batch, seconds=floor_s,
         rung_over_weight_read_floor=seconds / floor_s)
  if _LADDER.value:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "ladder_overlap.py")
    out = subprocess.run([sys.executable, script, "--instrument=wallclock",
                          "--programs=decode", "--reps=30"],
                         check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
      if line.startswith("{") and '"environment"' not in line:
        print(line, flush=True)


def best_time(fn) -> tuple[float, object]:
  """(best wall seconds of `_REPS` calls after one warm-up call, last result)."""
  fn()
  best = float("inf")
  for _ in range(_REPS.value):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def time_prompt_file(workdir: str, tmp: str) -> None:
  """Times `infer.text.generate_file` (float32, greedy, 32 new tokens) on a
  file with one long line, bucketed and padded to the longest; emits one row."""
  import numpy as np

  import infer.text
  rng = np.random.default_rng(0)
  lines = ["".join(rng.choice(list("abcdefgh "), n)) for n in rng.integers(24, 41, 31)]
  lines.insert(20, "x" * 1000)  # in the third batch of 8
  path = os.path.join(tmp, "prompts.txt")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")

  def run():
    with open(os.devnull, "w") as sink:
      return infer.text.generate_file(workdir, None, path, batch_size=8,
                                      max_new_tokens=32, progress=False, out=sink)
  bucketed_s, records = best_time(run)
  bucket = infer.text.prompt_bucket
  infer.text.prompt_bucket = lambda length, longest: longest  # the old padding
  try:
    longest_s, padded = best_time(run)
  finally:
    infer.text.prompt_bucket = bucket
  emit(what="prompt file", prompts=len(lines), batch_size=8, longest_prompt=1000,
       new_tokens=32, bucketed_seconds=bucketed_s, padded_to_longest_seconds=longest_s,
       speedup=longest_s / bucketed_s, same_completions=records == padded)


def time_dtype(model, hf_model, plain_params, dtype: str
               ) -> list[tuple[str, int, float, float]]:
  """Times rung, plain JAX and transformers at batch 1 and 16 and emits their
  rows; returns (dtype, batch, rung seconds, weight-read floor bytes) per batch."""
  import jax
  import numpy as np
  import torch

  import infer
  rng = np.random.default_rng(0)
  plain_greedy = common.plain_llama_greedy(SHAPE, new=NEW)
  timed = []
  for batch in (1, 16):
    prompts = rng.integers(0, 8192, (batch, PROMPT))
    best, out = best_time(lambda: infer.generate(model, prompts.tolist(), max_new_tokens=NEW))
    rung_tps = batch * NEW / best
    timed.append((dtype, batch, best, common.decode_floor_bytes(
        model, batch=batch, prompt=PROMPT, new=NEW)))
    emit(system="rung", dtype=dtype, batch=batch, seconds=best,
         new_tokens_per_sec=rung_tps)
    plain_s, plain_out = best_time(
        lambda: jax.block_until_ready(plain_greedy(plain_params, prompts)))
    emit(system="plain-jax", dtype=dtype, batch=batch, seconds=plain_s,
         new_tokens_per_sec=batch * NEW / plain_s, rung_over_plain_jax=plain_s / best,
         same_greedy_tokens_as_rung=f"{sum(o == p.tolist() for o, p in zip(out, plain_out))}"
                                    f"/{batch}")
    ids = torch.tensor(prompts)
    with torch.no_grad():
      hf_model.generate(ids, max_new_tokens=4, do_sample=False)  # warm up
      best_hf = float("inf")
      for _ in range(_REPS.value):
        start = time.perf_counter()
        ref = hf_model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW,
                                do_sample=False)
        best_hf = min(best_hf, time.perf_counter() - start)
    hf_tps = batch * NEW / best_hf
    same = [o == r.tolist() for o, r in zip(out, ref[:, PROMPT:])]
    emit(system="transformers", dtype=dtype, batch=batch, seconds=best_hf,
         new_tokens_per_sec=hf_tps)
    emit(what="ratio", dtype=dtype, batch=batch, rung_over_transformers=rung_tps / hf_tps,
         same_greedy_tokens=f"{sum(same)}/{batch}")
    floor_tps = batch * NEW / matmul_floor(model, batch)
    emit(system="matmul floor", dtype=dtype, batch=batch, new_tokens_per_sec=floor_tps,
         floor_over_transformers=floor_tps / hf_tps,
         rung_over_floor=rung_tps / floor_tps)
  return timed


if __name__ == "__main__":
  run(main)
