"""A small mixture-of-experts Llama that trains on a laptop CPU.

  python -m experiment train --config=experiments/moe_tiny.py --workdir=runs/moe_tiny
  # the same without the load-balancing loss, to see the router collapse onto a few
  # experts:
  python -m experiment train --config=experiments/moe_tiny.py:no_aux \
      --workdir=runs/moe_noaux
  # expert parallelism on 8 (fake) CPU devices: experts split 4 ways, by all-to-all
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiment train \
      --config=experiments/moe_tiny.py --workdir=runs/moe_ep --config.mesh.expert=4

Every layer is MoE: 8 SwiGLU experts of width 256, top-2 routing, capacity factor
1.25 (GShard dispatch), d_model 128, on the bytes of the Python standard library.
Each token's active FLOPs are those of a dense model with d_ff 512.
metrics.jsonl adds moe_aux_loss, moe_z_loss, moe_max_load (the worst layer's
busiest expert over the mean load) and moe_dropped_fraction to every row.

Measured with `python benchmarks/moe.py --what=balance` on the 2-core CPU
(2026-11-22, benchmarks/README.md), 200 steps, about 4 minutes each: eval loss
5.56 -> 2.22; moe_max_load 1.20 at step 200 with 6.1% of (token, choice) pairs
dropped. no_aux: eval loss 2.24, moe_max_load 3.20, 27.9% dropped.
"""

from experiments import base, llama_tiny

VARIANTS = ("default", "no_aux")


def get_config(arg=None):
  if arg not in (None, *VARIANTS):
    raise base.unknown_variant("experiments/moe_tiny.py", arg, VARIANTS)
  c = llama_tiny.get_config()
  c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32, d_ff=256)
  # aux_loss_weight 0.1, not Switch's 0.01: over a 200-step run 0.01 leaves the
  # worst layer's busiest expert at about 1.9x the mean load (benchmarks/README.md).
  c.model.moe.update(num_experts=8, top_k=2, every_k_layers=1, capacity_factor=1.25,
                     dispatch="capacity", aux_loss_weight=0.1)
  if arg == "no_aux":
    c.model.moe.aux_loss_weight = 0.0
  c.data.seq_len = 128
  c.train.update(steps=200, batch_size=16, eval_every=50, eval_steps=4)
  return c
