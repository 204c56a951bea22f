"""Does Ladder Residual hide tensor-parallel communication? Two instruments.

  python benchmarks/ladder_overlap.py [--instrument=both|wallclock|tpu] [--reps=20]
      [--programs=all|decode] [--write_json=benchmarks/results/ladder_overlap.json]

1. wallclock: 2 processes x 1 CPU device, joined by jax.distributed over gloo on
   127.0.0.1, `tensor=2` spanning them, so every all-reduce is real inter-process
   communication. Times a decode-like forward without cache (one token per
   sequence, batch 1 and 8), the real KV-cache decode step (one new token per
   sequence after a 64-token prefix, cache of 192 slots, batch 1 and 8) and a
   train step (forward + backward, batch 8 x 128) for standard, parallel and
   ladder blocks, and for `desync`: each process runs its shard's compute (half
   the heads, half the MLP) with no all-reduce at all, the paper's
   no-communication upper bound. `--programs=decode` times only the cached
   decode step (benchmarks/decode.py runs it that way); a full run with
   --write_json=benchmarks/results/ladder_overlap.json also writes its timings
   there (what notebooks/ladder.ipynb plots).
2. tpu: deviceless compile for TPU v5e:2x2 with tensor=4; per block type, the
   number of all-reduces in a layer, whether each is async, and how many
   instructions (and matmuls) the scheduler placed between each start and done.

One JSON line per measurement; ratios are within this run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import run  # noqa: E402

_INSTRUMENT = flags.DEFINE_enum(
    "instrument", "both", ["both", "wallclock", "tpu"],
    "wallclock: time 2 CPU processes joined over gloo; tpu: read the all-reduce "
    "schedule of a deviceless TPU v5e compile; both: the two in turn")
_WORKER = flags.DEFINE_integer("worker", None, "internal: process id of a worker",
                               lower_bound=0, upper_bound=1)
_PORT = flags.DEFINE_integer("port", None, "internal: coordinator port",
                             lower_bound=1, upper_bound=65535)
_REPS = flags.DEFINE_integer("reps", 20, "timed repetitions (median kept)",
                             lower_bound=1)
_PROGRAMS = flags.DEFINE_enum("programs", "all", ["all", "decode"],
                              "wallclock: every program, or only the cached decode step")
_JSON = define_path(
    "write_json", None, "a full wallclock run (--programs=all) also writes its "
    "timings here as JSON (default: not written; notebooks/ladder.ipynb plots "
    "benchmarks/results/ladder_overlap.json)", output="file")
flags.register_multi_flags_validator(
    ["worker", "port"], lambda f: (f["worker"] is None) == (f["port"] is None),
    "--worker and --port (internal) go together")
PREFIX, CACHE_SLOTS = 64, 192

SHAPE = dict(vocab_size=4096, d_model=1024, num_layers=4, num_heads=16,
             num_kv_heads=16, head_dim=64, d_ff=4096)
BLOCKS = ("standard", "parallel", "ladder", "desync")
TPU_ASYNC_FLAGS = ("--xla_enable_async_all_reduce=true "
                   "--xla_tpu_enable_async_collective_fusion=true "
                   "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
                   "--xla_tpu_overlap_compute_collective_tc=true")


def emit(**row):
  print(json.dumps(row), flush=True)


def _model_cfg(block: str, tensor: int):
  from model import ModelConfig
  if block == "desync":  # one shard's compute, nothing to reduce
    return ModelConfig(**{**SHAPE, "num_heads": SHAPE["num_heads"] // tensor,
                          "num_kv_heads": SHAPE["num_kv_heads"] // tensor,
                          "d_ff": SHAPE["d_ff"] // tensor}, block="standard")
  return ModelConfig(**SHAPE, block=block)


def _median_time(fn, reps):
  import jax
  jax.block_until_ready(fn())
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def _decode_step_timer(spec, params, mesh, batch: int):
  """A jitted KV-cache decode step (cache donated, so updated in place) at
  position PREFIX, as a no-argument callable for _median_time."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from infer.kv_cache import init_cache

  # Every call decodes at position PREFIX (the cache's lengths are reset to it).
  step = jax.jit(lambda p, t, c: spec.model(p).decode(
      t, c.replace(lengths=jnp.full_like(c.lengths, PREFIX))), donate_argnums=2)
  replicated = NamedSharding(mesh, P())
  tokens = jax.device_put(np.zeros((batch, 1), np.int32), replicated)
  cache = [init_cache(spec.model(params), batch, CACHE_SLOTS)]

  def run():
    logits, cache[0] = step(params, tokens, cache[0])
    return logits
  return run


def worker(process_id: int, port: int, reps: int, programs: str):
  import jax
  import numpy as np
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import sharding
  from train.state import init_state, model_spec
  from train.step import loss_fn

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
  for block in BLOCKS:
    tensor = 1 if block == "desync" else 2
    devices = jax.local_devices() if block == "desync" else jax.devices()
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1,
                                   tensor=tensor), devices)
    rules = sharding.normalize_rules(None)
    spec = model_spec(_model_cfg(block, 2), rules)
    tx = optax.sgd(1e-4)
    state = init_state(spec, tx, mesh, 0)
    replicated = NamedSharding(mesh, P())
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(spec, 0.0)(p, b)[0]))
    forward = jax.jit(lambda p, t: spec.model(p)(t))
    rows = {}
    with jax.set_mesh(mesh):
      for batch in (1, 8):
        rows[f"decode_step_b{batch}"] = _median_time(
            _decode_step_timer(spec, state.params, mesh, batch), reps)
        if programs == "decode":
          continue
        tokens = jax.device_put(np.zeros((batch, 1), np.int32), replicated)
        rows[f"forward_b{batch}"] = _median_time(lambda: forward(state.params, tokens),
                                                 reps)
      if programs == "all":
        shape = (8, 128)
        b = {k: jax.device_put(np.zeros(shape, np.int32) + (k == "segment_ids"),
                               replicated)
             for k in ("inputs", "targets", "positions", "segment_ids")}
        rows["train_step_b8x128"] = _median_time(lambda: grad(state.params, b),
                                                 max(reps // 4, 3))
    if process_id == 0:
      for what, seconds in rows.items():
        emit(instrument="wallclock", block=block, what=what, seconds=seconds)


def wallclock(reps: int, programs: str = "all"):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__),
                             f"--worker={i}", f"--port={port}", f"--reps={reps}",
                             f"--programs={programs}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate() for p in procs]
  for p, (out, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(err[-3000:])
  rows = [json.loads(l) for l in outs[0][0].splitlines() if l.startswith("{")]
  for r in rows:
    print(json.dumps(r))
  if programs == "all" and _JSON.value:  # what notebooks/ladder.ipynb plots
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump({"date": time.strftime("%Y-%m-%d"), "shape": SHAPE,
                 "median_seconds": rows}, f, indent=1)
  table = {(r["block"], r["what"]): r["seconds"] for r in rows}
  for what in sorted({r["what"] for r in rows}):
    std, lad, par, bound = (table[(b, what)] for b in
                            ("standard", "ladder", "parallel", "desync"))
    gap = std - bound
    emit(instrument="wallclock", what=what,
         ladder_over_standard=lad / std, parallel_over_standard=par / std,
         desync_over_standard=bound / std,
         ladder_gap_recovered=(std - lad) / gap if gap > 0 else None)


def tpu_schedule():
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import NamedSharding, PartitionSpec as P

  import sharding
  from aot import hlo
  from train.state import abstract_params, model_spec
  from train.step import loss_fn

  # As a TPU job would run it: collectives asynchronous, free to overlap compute.
  os.environ.setdefault("LIBTPU_INIT_ARGS", TPU_ASYNC_FLAGS)
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=4),
                            topo.devices)
  rules = sharding.normalize_rules(None)
  for block in ("standard", "parallel", "ladder"):
    spec = model_spec(_model_cfg(block, 4), rules)
    params = abstract_params(spec, mesh)
    rep = NamedSharding(mesh, P())
    programs = {
        "decode_b8": (lambda p, t: spec.model(p)(t),
                      (params, jax.ShapeDtypeStruct((8, 1), jnp.int32, sharding=rep))),
        "train_b8x128": (jax.grad(lambda p, b: loss_fn(spec, 0.0)(p, b)[0]),
                         (params, {k: jax.ShapeDtypeStruct((8, 128), jnp.int32,
                                                           sharding=rep)
                                   for k in ("inputs", "targets", "positions",
                                             "segment_ids")})),
    }
    for what, (fn, args) in programs.items():
      with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(*args).compile().as_text()
      comps = hlo.parse(text)
      for body in sorted(set(hlo.while_bodies(text))):
        instrs = comps[body]
        starts = [i for i, ins in enumerate(instrs) if ins.opcode == "all-reduce-start"]
        syncs = [ins for ins in instrs if ins.opcode == "all-reduce"]
        if not starts and not syncs:
          continue
        gaps = []
        for i in starts:
          name = instrs[i].name
          done = next(j for j, ins in enumerate(instrs)
                      if ins.opcode == "all-reduce-done" and name in ins.operands)
          between = instrs[i + 1:done]
          gaps.append({"instructions": len(between),
                       "matmuls": sum(hlo._is_matmul(comps, b) for b in between)})
        emit(instrument="tpu_v5e_2x2_tensor4", block=block, program=what,
             loop=body, async_all_reduces=len(starts), sync_all_reduces=len(syncs),
             between_start_and_done=gaps)


def main(argv):
  del argv
  if _WORKER.value is not None:
    worker(_WORKER.value, _PORT.value, _REPS.value, _PROGRAMS.value)
    return
  import jax
  emit(what="environment", date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
       cpus=os.cpu_count(), shape=SHAPE)
  if _INSTRUMENT.value in ("both", "wallclock"):
    wallclock(_REPS.value, _PROGRAMS.value)
  if _INSTRUMENT.value in ("both", "tpu"):
    tpu_schedule()


if __name__ == "__main__":
  run(main)
