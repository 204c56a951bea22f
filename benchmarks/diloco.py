"""DiLoCo and Streaming DiLoCo on llama_tiny against data parallelism: quality and bytes.

  python benchmarks/diloco.py [--steps=600] [--root=runs/diloco] [--only=diloco]
      [--write_rows=benchmarks/results/diloco.jsonl]
      [--plot=benchmarks/results/diloco.png]

Trains experiments/llama_tiny.py (the Python stdlib bytes, AdamW inner optimizer)
for --steps with the same seed, data, global batch and schedule (equal total
tokens) on 4 CPU devices as:

  data_parallel   mesh.data=4
  diloco          mesh.diloco=4, H=--sync_every, float32 outer gradients
  streaming       mesh.diloco=4, H=--sync_every, 2 fragments, tau=1, alpha=0.5, e3m0
  diloco_averaging  as diloco with outer_lr=1 and no outer momentum (averaging)
  one_replica     one device on a quarter of the batch (a replica alone)

evaluating every --eval_every steps (DiLoCo: the outer parameters). The
bytes are read from the compiled programs (aot.costs, the HLO's collectives): what
one device receives over the replica axis per step -- data parallelism's train
step over `data`; DiLoCo's inner step and every fragment's synchronisation over
`diloco` -- as the total per step (averaged over a period of H steps) and the
peak of any one step, with each ratio to data parallelism, and what they would
take over 1 and 10 Gbit/s links (bytes x 8 / rate: computed, not measured);
also, untrained, for DiLoCo in bfloat16 and e3m0 and streaming in float32.
One JSON line per run (its step time the median over logged windows after the
first, which includes compilation); the eval-loss curves go to --plot (none
without it).
"""

from __future__ import annotations

import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import (run, emit, plot_eval_curves, processor,  # noqa: E402
                               write_rows_to)

_STEPS = flags.DEFINE_integer("steps", 600, "training steps per run", lower_bound=1)
_EVAL = flags.DEFINE_integer("eval_every", 50, "steps between evaluations (0: none; "
                             "final_eval_loss is then null and nothing is plotted)",
                             lower_bound=0)
_H = flags.DEFINE_integer("sync_every", 50, "DiLoCo's H (even when a streaming "
                          "variant runs: its 2 fragments sync H/2 steps apart)",
                          lower_bound=1)
_ROOT = define_path("root", "runs/diloco", "run directories", output="directory")
TRAINED = ("data_parallel", "diloco", "streaming", "diloco_averaging", "one_replica")
BYTES_ONLY = ("diloco_bf16", "diloco_e3m0", "streaming_f32")
_ONLY = flags.DEFINE_list("only", [], "variants to run or read, of "
                          f"{', '.join(TRAINED + BYTES_ONLY)} (default: all)")
_ROWS = define_path("write_rows", None, "also append JSON rows here", output="file")
_PLOT = define_path("plot", None, "write the eval-loss curves of every run "
                            "under --root to this PNG (default: no plot)", output="file")
flags.register_validator("only", lambda v: set(v) <= {*TRAINED, *BYTES_ONLY},
                         f"must name variants of {', '.join(TRAINED + BYTES_ONLY)}")
flags.register_multi_flags_validator(
    ["sync_every", "only"], lambda f: f["sync_every"] % 2 == 0 or (
        f["only"] and not {"streaming", "streaming_f32"} & set(f["only"])),
    "--sync_every must be even for the streaming variants (2 fragments): pass an "
    "even H, or --only without streaming and streaming_f32")
flags.register_multi_flags_validator(
    ["plot", "eval_every"], lambda f: not f["plot"] or f["eval_every"] > 0,
    "--plot needs evaluations: --eval_every > 0")


@flags.multi_flags_validator(["steps", "sync_every", "only"])
def _check_steps(f) -> bool:
  synced = {"diloco", "streaming", "diloco_averaging"} & set(f["only"] or TRAINED)
  if synced and f["steps"] < f["sync_every"]:
    raise flags.ValidationError(
        f"--steps={f['steps']} is below --sync_every={f['sync_every']}: "
        f"{', '.join(sorted(synced))} would never take an outer step. Pass more "
        "steps or a smaller --sync_every")
  return True


REPLICAS = 4
GBITS = (1, 10)


def variants() -> dict[str, tuple[dict, dict]]:
  """name -> (mesh sizes, diloco fields)."""
  h = _H.value
  return {
      "data_parallel": (dict(data=REPLICAS), {}),
      "diloco": (dict(diloco=REPLICAS, data=1), dict(sync_every=h)),
      "streaming": (dict(diloco=REPLICAS, data=1), dict(
          sync_every=h, fragments=2, overlap_steps=1, alpha=0.5, outer_dtype="e3m0")),
      # Diagnostics: plain parameter averaging every H steps (outer SGD at lr 1,
      # no momentum), and one replica alone on a quarter of the batch.
      "diloco_averaging": (dict(diloco=REPLICAS, data=1), dict(
          sync_every=h, outer_lr=1.0, outer_momentum=0.0)),
      "one_replica": (dict(data=1), {}),
  }


def bytes_only() -> dict[str, tuple[dict, dict]]:
  """Transports whose bytes are read from their compiled programs, untrained."""
  h = _H.value
  return {
      "diloco_bf16": (dict(diloco=REPLICAS, data=1), dict(
          sync_every=h, outer_dtype="bfloat16")),
      "diloco_e3m0": (dict(diloco=REPLICAS, data=1), dict(
          sync_every=h, outer_dtype="e3m0")),
      "streaming_f32": (dict(diloco=REPLICAS, data=1), dict(
          sync_every=h, fragments=2, overlap_steps=1, alpha=0.5)),
  }


def config(name: str):
  from experiments import llama_tiny
  mesh, fields = {**variants(), **bytes_only()}[name]
  c = llama_tiny.get_config()
  c.mesh.update(**{"data": 1, **mesh})
  c.diloco.update(fields)
  c.train.update(steps=_STEPS.value, eval_every=_EVAL.value)
  if name == "one_replica":  # a DiLoCo replica's share of the batch, alone
    c.train.batch_size //= REPLICAS
  c.checkpoint.every_steps = 0
  # >= 2 rows to time even a short run: the first window includes compilation.
  c.log.every_steps = max(1, min(10, _STEPS.value // 3))
  return c


def received_bytes(c) -> dict[str, float]:
  """Per step, bytes one device receives over the replica axis, from the
  compiled programs: {'total': mean per step over a period, 'peak': the most in
  one step}."""
  import jax

  import sharding
  from aot import costs as costs_lib
  from aot.compile import _train_step
  from model import ModelConfig
  from train import diloco
  from train.state import model_spec

  mesh = sharding.make_mesh(c.mesh)
  rules = sharding.normalize_rules(c.mesh.rules)
  spec = model_spec(ModelConfig.from_config(c.model), rules)

  def over(program, args, axis):
    with jax.set_mesh(mesh):
      text = program.lower(*args).compile().as_text()
    return sum(col.received_bytes for col in costs_lib.analyze(
        text, sharding.AXES, [mesh.shape[a] for a in sharding.AXES]).collectives
        if axis in col.axes)

  step, args = _train_step(c, spec, mesh, rules)
  if args[0].diloco is None:
    per_step = over(step, args, "data")
    return {"total": per_step, "peak": per_step}
  d = diloco.DiLoCo.from_config(c, mesh.shape["diloco"])
  frags = diloco.Fragments.of(spec.abstract_params, spec.logical, d.fragments)
  shardings = jax.tree.map(lambda x: x.sharding, args[0])
  inner = over(step, args, "diloco")
  syncs = [over(diloco.make_sync(d, frags, spec.abstract_params, p, "sync",
                                 shardings), args[:1], "diloco")
           for p in range(d.fragments)]
  return {"total": inner + sum(syncs) / d.sync_every, "peak": inner + max(syncs)}


def main(argv):
  del argv
  import jax
  import train

  write_rows_to(_ROWS.value)
  emit(what="environment", date=time.strftime("%Y-%m-%d"), steps=_STEPS.value,
       jax=jax.__version__, devices=f"{len(jax.devices())} x "
       f"{jax.devices()[0].device_kind}", processor=processor())
  assert tuple(variants()) == TRAINED and tuple(bytes_only()) == BYTES_ONLY
  baseline = received_bytes(config("data_parallel"))
  for name in bytes_only():
    if _ONLY.value and name not in _ONLY.value:
      continue
    sent = received_bytes(config(name))
    emit(what="bytes", variant=name, bytes_per_step=sent["total"],
         peak_bytes_per_step=sent["peak"],
         total_bytes_ratio=baseline["total"] / sent["total"],
         peak_bytes_ratio=baseline["peak"] / sent["peak"])
  curves = {}
  for name in variants():
    if _ONLY.value and name not in _ONLY.value:
      continue
    c = config(name)
    alone = name == "one_replica"
    sent = {"total": 0.0, "peak": 0.0} if alone else received_bytes(c)
    start = time.perf_counter()
    rows = train.train(c, os.path.join(_ROOT.value, name), progress=False,
                       devices=jax.devices()[:1] if alone else None)
    wall = time.perf_counter() - start
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
    timing = ({"step_time_s": sorted(times)[len(times) // 2]} if times else
              {"step_time_note": "one logged window, which includes compilation: "
               "no step time (run --steps >= 2)"})
    emit(what="run", variant=name,
         final_eval_loss=evals[-1][1] if evals else None,  # None: --eval_every=0
         bytes_per_step=sent["total"], peak_bytes_per_step=sent["peak"],
         total_bytes_ratio=baseline["total"] / sent["total"] if sent["total"] else None,
         peak_bytes_ratio=baseline["peak"] / sent["peak"] if sent["peak"] else None,
         **{f"comm_s_per_step_{g}gbit": sent["total"] * 8 / (g * 1e9) for g in GBITS},
         **timing, wall_s=round(wall, 1))
    curves[name] = evals
  if curves and _PLOT.value:
    plot_eval_curves(_curves(), f"llama_tiny, {REPLICAS} replicas, {_STEPS.value} "
                     f"steps, H={_H.value}", _PLOT.value)


def _curves() -> dict[str, list[tuple[int, float]]]:
  """Eval-loss curves of every variant with a run under --root (this
  invocation's and earlier ones')."""
  import json
  curves = {}
  for name in variants():
    path = os.path.join(_ROOT.value, name, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        rows = [json.loads(line) for line in f]
      curves[name] = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  return curves


if __name__ == "__main__":
  run(main)
