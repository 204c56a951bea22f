"""Mixture-of-experts: dispatch cost, expert-parallel traffic, and load balance.

  python benchmarks/moe.py --what=dispatch,traffic   # under a minute on 2 cores
  python benchmarks/moe.py --what=balance            # two 200-step runs of moe_tiny

Prints one JSON line per measurement:
  dispatch  one MoE layer (moe_tiny's shape: 8 experts of width 256, top-2, d_model
            128, 16 x 128 tokens), forward + backward on one CPU device: best step
            time, compiled temporary memory and XLA's FLOP count of `capacity`
            (capacity factor 1.0, i.e. exactly the active FLOPs of dropless, and
            1.25) against `dropless`.
  traffic   bytes the layer's forward all-to-alls move per device, read from the
            compiled HLO on 8 CPU devices with expert = E_p (data = 8 / E_p), next
            to the formula tokens x top_k x d_model x bytes x (E_p - 1) / E_p per
            device per exchange (tokens: this device's tokens).
  balance   trains experiments/moe_tiny.py with and without the load-balancing loss
            (--steps each): first and last loss, eval loss, and moe_max_load (the
            worst layer's busiest expert over the mean load) at the end.
Compare ratios within one run; record figures in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import run  # noqa: E402

SECTIONS = ["dispatch", "traffic", "balance"]
VARIANTS = ("default", "no_aux")  # experiments/moe_tiny.py's
_WHAT = flags.DEFINE_list("what", ["dispatch", "traffic"], f"sections of {SECTIONS}")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repetitions (best of)",
                                lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 200, "training steps per balance run",
                              lower_bound=1)
_ROOT = define_path("root", "runs/moe_balance", "balance run directories", output="directory")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS),
                              f"moe_tiny variants the balance section trains, of {VARIANTS}")
_AUX = flags.DEFINE_float("aux_loss_weight", None,
                          "override moe_tiny's load-balancing loss weight (default "
                          "variant)", lower_bound=0.0)
flags.register_validator("what", lambda v: bool(v) and set(v) <= set(SECTIONS),
                         f"must name sections of {', '.join(SECTIONS)}")
flags.register_validator("variants", lambda v: bool(v) and set(v) <= set(VARIANTS),
                         f"must name variants of {', '.join(VARIANTS)}")

D_MODEL, D_FF, EXPERTS, TOP_K, BATCH, LENGTH = 128, 256, 8, 2, 16, 128


def emit(**row):
  print(json.dumps(row), flush=True)


def _layer(dispatch: str, capacity_factor: float, rules=()):
  from flax import nnx

  import sharding
  from model.config import ModelConfig, MoEConfig
  from model.moe import MoE
  cfg = ModelConfig(d_model=D_MODEL, d_ff=D_FF, moe=MoEConfig(
      num_experts=EXPERTS, top_k=TOP_K, capacity_factor=capacity_factor,
      dispatch=dispatch))
  return MoE(cfg, constrain=sharding.LogicalConstraint(rules), rngs=nnx.Rngs(0))


def _loss_fn(layer, grad: bool):
  """jit of sum(layer(x)) (+ its gradients): the layer's forward (+ backward)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)) if grad else loss), state


def dispatch():
  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, D_MODEL), jnp.float32)
  x = jax.device_put(x, jax.devices()[0])
  # Expert matmuls a token's top_k choices need, forward and backward (6 FLOPs per
  # parameter per row): what both paths do at capacity factor 1.0.
  useful = 6 * BATCH * LENGTH * TOP_K * 3 * D_MODEL * D_FF
  for name, factor in [("capacity", 1.0), ("capacity", 1.25), ("dropless", None)]:
    fn, state = _loss_fn(_layer(name, factor or 1.0), grad=True)  # dropless: unused
    compiled = fn.lower(state, x).compile()
    jax.block_until_ready(compiled(state, x))
    best = float("inf")
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(compiled(state, x))
      best = min(best, time.perf_counter() - start)
    mem = compiled.memory_analysis()
    emit(section="dispatch", dispatch=name, capacity_factor=factor,
         tokens=BATCH * LENGTH, fwd_bwd_s=round(best, 4),
         temp_bytes=int(mem.temp_size_in_bytes),
         compiled_gflop=round(compiled.cost_analysis()["flops"] / 1e9, 3),
         useful_expert_gflop=round(useful / 1e9, 3))


def traffic():
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  import sharding
  from aot import hlo
  rules = sharding.normalize_rules(None)
  for ep in (2, 4, 8):
    mesh = sharding.make_mesh(dict(data=8 // ep, fsdp=1, expert=ep, sequence=1,
                                   tensor=1))
    x = jax.ShapeDtypeStruct((BATCH, LENGTH, D_MODEL), jnp.float32,
                             sharding=NamedSharding(mesh, P(("data", "expert"))))
    tokens = BATCH * LENGTH // 8  # per device
    formula = tokens * TOP_K * D_MODEL * 4 * (ep - 1) / ep
    for name in ("capacity", "dropless"):
      fn, state = _loss_fn(_layer(name, 1.0, rules), grad=False)
      with jax.set_mesh(mesh):
        text = fn.lower(state, x).compile().as_text()
      exchanges = [c for c in hlo.collectives(text)
                   if c.opcode.removesuffix("-start") == "all-to-all"]
      # An all-to-all's result is the whole per-device buffer; (E_p - 1) / E_p of
      # it comes from (and the same share of the input goes to) other devices.
      moved = sum(c.bytes for c in exchanges) * (ep - 1) / ep
      # The forward has two exchanges of activations (to the experts and back);
      # dropless also sends each row's expert id (int32).
      activations = sum(c.bytes for c in exchanges if c.shape.lstrip("(")[0] == "f")
      emit(section="traffic", dispatch=name, expert=ep, all_to_alls=len(exchanges),
           bytes_per_device=int(moved),
           activation_bytes_per_exchange=int(activations * (ep - 1) / ep / 2),
           formula_bytes_per_exchange=int(formula))


def balance():
  import jax
  import numpy as np

  import train
  from experiments import moe_tiny
  for variant in _VARIANTS.value:
    c = moe_tiny.get_config(None if variant == "default" else variant)
    if variant == "default" and _AUX.value is not None:
      c.model.moe.aux_loss_weight = _AUX.value
    c.train.steps = _STEPS.value
    c.checkpoint.every_steps = 0
    c.log.tensorboard = False
    workdir = os.path.join(_ROOT.value, variant)
    start = time.perf_counter()
    rows = train.train(c, workdir, devices=jax.devices()[:1], progress=False)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    emit(section="balance", variant=variant,
         aux_loss_weight=c.model.moe.aux_loss_weight, steps=c.train.steps,
         first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"],
         first_eval_loss=evals[0]["eval_loss"], last_eval_loss=evals[-1]["eval_loss"],
         max_load_end=steps[-1]["moe_max_load"],
         max_load_last50=float(np.mean([r["moe_max_load"] for r in steps[-5:]])),
         dropped_fraction_end=steps[-1]["moe_dropped_fraction"],
         wall_s=round(time.perf_counter() - start, 1))


def main(argv):
  del argv
  for section in _WHAT.value:
    if section not in SECTIONS:
      raise app.UsageError(f"unknown section {section!r}; choose from {SECTIONS}")
    globals()[section]()


if __name__ == "__main__":
  run(main)
