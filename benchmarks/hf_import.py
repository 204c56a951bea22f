"""Peak host memory of `import-hf` on a ~1 GiB checkpoint.

  python benchmarks/hf_import.py [--layers=3] [--dtype=float32] [--shard_mb=400]

Writes a random Llama checkpoint in the HF layout (sharded safetensors with an
index, no torch needed), then runs `python -m experiment import-hf` on it in a
child process on one CPU device and reports the child's peak resident memory
(ru_maxrss) over the checkpoint's size on disk, over the float32 parameters the
run holds (on a CPU they are host memory too: the floor), and the size of the
step-0 checkpoint it writes (the parameters alone since session 34; before, with
AdamW's two zero moments, three times them).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import flags  # noqa: E402

from common import emit, run  # noqa: E402

_LAYERS = flags.DEFINE_integer("layers", 3, "decoder layers (3: ~1.06 GiB in float32)",
                               lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "dtype of the checkpoint's tensors")
_SHARD_MB = flags.DEFINE_integer("shard_mb", 400, "safetensors shard size (MiB)",
                                 lower_bound=1)

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
             num_attention_heads=16, num_key_value_heads=16, head_dim=128)


def write_checkpoint(path: str, layers: int, dtype: str, shard_bytes: int) -> int:
  """A random HF Llama checkpoint at `path`; returns its tensor bytes."""
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file
  d, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
  kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
            "lm_head.weight": (v, d)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (d, d),
                   p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d),
                   p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f),
                   p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)})
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  rng = np.random.default_rng(0)
  shard, shard_size, weight_map, total, n = {}, 0, {}, 0, 0

  def flush():
    nonlocal shard, shard_size, n
    name = f"model-{n:05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
    shard, shard_size, n = {}, 0, n + 1

  for key, shape in shapes.items():
    x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)
    shard[key] = x
    shard_size += x.nbytes
    total += x.nbytes
    if shard_size >= shard_bytes:
      flush()
  if shard:
    flush()
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
  config = dict(architectures=["LlamaForCausalLM"], model_type="llama",
                num_hidden_layers=layers, rms_norm_eps=1e-5, hidden_act="silu",
                max_position_embeddings=4096, tie_word_embeddings=False,
                rope_theta=10000.0, eos_token_id=2, bos_token_id=1, **SHAPE)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config, fh)
  return total


def main(argv):
  del argv
  root = tempfile.mkdtemp()
  try:
    hf_dir, workdir = os.path.join(root, "hf"), os.path.join(root, "rung")
    os.makedirs(hf_dir)
    size = write_checkpoint(hf_dir, _LAYERS.value, _DTYPE.value,
                            _SHARD_MB.value * 2 ** 20)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiment", "import-hf",
                    f"--hf_dir={hf_dir}", f"--workdir={workdir}",
                    "--config.mesh.data=1"], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    params = size * (4 // (2 if _DTYPE.value == "bfloat16" else 4))  # as float32
    written = sum(os.path.getsize(os.path.join(d, f))
                  for d, _, files in os.walk(os.path.join(workdir, "checkpoints"))
                  for f in files)
    emit(what="import-hf peak memory", date=time.strftime("%Y-%m-%d"),
         checkpoint_dtype=_DTYPE.value, checkpoint_gib=size / 2 ** 30,
         peak_rss_gib=peak / 2 ** 30, peak_over_checkpoint=peak / size,
         float32_params_gib=params / 2 ** 30, peak_over_params=peak / params,
         step0_on_disk_gib=written / 2 ** 30, step0_over_params=written / params,
         seconds=seconds)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  run(main)
