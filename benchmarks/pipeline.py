"""Pipeline memory and bubble: llama_1b at stage=4 on v5e:2x4, compiled deviceless.

  python benchmarks/pipeline.py [--microbatches=4,8,16,32]
      [--schedules=gpipe,circular,1f1b] [--write_rows=benchmarks/results/pipeline.jsonl]

For each schedule (gpipe; circular with 2 repeats; 1f1b) and microbatch count M,
compiles llama_1b's train step for a TPU v5e 2x4 slice (libtpu's deviceless
compile; no TPU needed) on mesh stage=4 x fsdp=2, with a fixed microbatch of 2
sequences of 2048 tokens (one per FSDP shard), so the global batch is 2M
sequences and the work per microbatch is the same at every M. Prints per plan
the compiled temporary memory per device (XLA's buffer assignment), the bubble
read from the compiled pipeline loops, and the schedule's formula
((S-1)/(R*M+S-1); 1F1B: 2(S-1)/(M+2(S-1))): one JSON line each on stdout (also
appended to --write_rows), a readable summary of each, and of each schedule's
temporaries from the smallest to the largest M, on stderr. A plan beyond
the chip's 16 GiB is refused by the compiler, which says how many bytes of
temporaries it asked for: that figure is recorded.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import run  # noqa: E402

FLAGS = flags.FLAGS
STAGES, FSDP = 4, 2  # the mesh: stage=4 x fsdp=2
SCHEDULES = ("gpipe", "circular", "1f1b")
flags.DEFINE_list("microbatches", ["4", "8", "16", "32"], "microbatch counts M (>= 1)")
flags.DEFINE_list("schedules", list(SCHEDULES), "gpipe | circular (R=2) | 1f1b")
flags.DEFINE_string("topology", "v5e:2x4", "TPU topology to compile for")
define_path("write_rows", "", "append one JSON line per plan here", output="file")
flags.register_validator(
    "microbatches", lambda v: bool(v) and all(m.isdigit() and int(m) >= 1 for m in v),
    "must be positive integers")
flags.register_validator("schedules", lambda v: bool(v) and set(v) <= set(SCHEDULES),
                         f"must name schedules of {', '.join(SCHEDULES)}")
flags.register_multi_flags_validator(
    ["schedules", "microbatches"],
    lambda f: "circular" not in f["schedules"] or all(
        not m.isdigit() or int(m) >= STAGES for m in f["microbatches"]),
    f"the circular schedule needs --microbatches of at least {STAGES} (the stages) "
    "each: drop the smaller M, or leave circular out of --schedules")


def _check_topology(value: str) -> bool:
  """A TPU topology rung knows (sharding.chips) of STAGES x FSDP chips, else
  ValidationError."""
  import math

  from sharding.chips import chip_for_topology, topology_name
  try:
    chip_for_topology(value)
  except Exception as e:  # ConfigError: says what is wrong and the fix
    raise flags.ValidationError(str(e)) from None
  chips = math.prod(int(d) for d in topology_name(value).split(":")[1].split("x"))
  if chips != STAGES * FSDP:
    raise flags.ValidationError(f"has {chips} chips; the mesh stage={STAGES} x "
                                f"fsdp={FSDP} needs {STAGES * FSDP}")
  return True


flags.register_validator("topology", _check_topology)


def main(argv):
  del argv
  import jax
  from aot.compile import compile_step, topology_devices
  from benchmarks.common import processor
  from experiments import llama_1b
  from sharding import format_bytes

  devices = topology_devices(FLAGS.topology)
  rows = []
  for schedule in FLAGS.schedules:
    for m in map(int, FLAGS.microbatches):
      c = llama_1b.get_config()
      c.mesh.update(data=1, stage=STAGES, fsdp=FSDP)
      c.train.update(batch_size=2 * m, grad_accum_steps=1)
      c.pipeline.update(microbatches=m, schedule=schedule,
                        repeats=2 if schedule == "circular" else 1)
      start = time.perf_counter()
      r = compile_step(c, FLAGS.topology, devices=devices)
      row = dict(schedule=schedule, stages=STAGES, repeats=c.pipeline.repeats,
                 microbatches=m, batch=2 * m, seq_len=c.data.seq_len,
                 temporaries=r.memory["temporaries"], total=r.memory["total"],
                 fits=r.fits, bubble=r.pipeline.get("bubble"),
                 bubble_formula=r.pipeline.get("bubble_formula"),
                 iterations=r.pipeline.get("iterations"),
                 estimate_s=r.time.get("estimate"), mfu_estimate=r.mfu_estimate,
                 refused=r.error.splitlines()[0] if r.error else "",
                 compile_s=round(time.perf_counter() - start, 1),
                 topology=FLAGS.topology, jax=jax.__version__,
                 processor=processor(), date=time.strftime("%Y-%m-%d"))
      rows.append(row)
      print(json.dumps(row), flush=True)
      if FLAGS.write_rows:
        with open(FLAGS.write_rows, "a") as f:
          f.write(json.dumps(row) + "\n")
      bubble = ("refused by the compiler" if r.error
                else f"bubble {row['bubble']:.3f} (formula {row['bubble_formula']:.3f})")
      print(f"# {schedule:9} M={m:<3} temporaries {format_bytes(row['temporaries']):>10}"
            f"  total {format_bytes(row['total']):>10}  {bubble}  compiled in "
            f"{row['compile_s']} s", file=sys.stderr, flush=True)
  for schedule in FLAGS.schedules:
    mine = [r for r in rows if r["schedule"] == schedule]
    if mine[0]["microbatches"] != mine[-1]["microbatches"]:
      print(f"# {schedule}: temporaries at M={mine[-1]['microbatches']} are "
            f"{mine[-1]['temporaries'] / mine[0]['temporaries']:.2f}x those at "
            f"M={mine[0]['microbatches']}", file=sys.stderr, flush=True)


if __name__ == "__main__":
  run(main)
