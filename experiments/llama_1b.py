"""A 1B-class Llama (the Llama 3.2 1B shape: 16 layers, d_model 2048, 32 query and
8 KV heads, SwiGLU 8192, vocabulary 128256, tied embeddings; 1.24B parameters).

  # An 8-chip TPU or GPU host, FSDP over all devices, bfloat16 compute:
  python -m experiment train --config=experiments/llama_1b.py --workdir=runs/1b \
      --config.data.tokenizer=/path/to/tokenizer.json

  # On a laptop CPU, the same architecture shrunk (`local`), for debugging plans:
  python -m experiment train --config=experiments/llama_1b.py:local --workdir=runs/1b_local

Expected: on 8 accelerators with 16+ GiB each, FSDP=8 fits parameters, Adam
moments and remat'd activations at 2k context, with the 256-sequence batch taken
as 16 micro-batches of 16. Measured with `compile` (deviceless, 2026-12-07,
libtpu 0.0.42.1): 13.0 GiB per chip on v5e:2x4 (81% of 16 GiB; it read 12.6 GiB
on 2026-11-22); the whole batch at once would need 82 GiB. With the default byte tokenizer the
large vocabulary is mostly unused; give a tokenizer.json for real runs. `local`
keeps the proportions (GQA 4:1, tied embeddings, SwiGLU 4x) at 3.9M parameters,
for checking a plan and the pipeline on a CPU before spending accelerator time.
"""

from experiments import base


def get_config(arg=None):
  c = base.get_config()
  c.model.update(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
                 num_kv_heads=8, head_dim=64, d_ff=8192, tie_embeddings=True,
                 rope_theta=500000.0, compute_dtype="bfloat16", remat="save_dots")
  c.mesh.update(data=1, fsdp=-1)
  c.data.seq_len = 2048
  c.train.update(steps=20000, batch_size=256, grad_accum_steps=16, eval_every=1000)
  c.optim.update(learning_rate=3e-4, warmup_steps=2000)
  if arg == "local":
    c.model.update(vocab_size=256, d_model=256, num_layers=4, num_heads=8,
                   num_kv_heads=2, head_dim=32, d_ff=1024, compute_dtype="float32",
                   remat="none")
    c.mesh.update(data=-1, fsdp=1)
    c.data.seq_len = 256
    c.train.update(steps=300, batch_size=16, grad_accum_steps=1, eval_every=50)
    c.optim.update(learning_rate=3e-3, warmup_steps=30)
  elif arg:
    raise base.unknown_variant("experiments/llama_1b.py", arg, ("local",))
  return c
