"""Attention kernels: compiled memory, communication, load balance and CPU time.

  python benchmarks/attention.py [--only=memory,ring_memory,comm,balance,cpu_time]

Prints one JSON line per measurement:
  memory       compiled temp bytes (memory_analysis) of forward+backward, reference
               against flash, at lengths 1k..16k; on CPU (flash = blockwise loops) and,
               when libtpu is installed, for a deviceless TPU v5e (flash = Mosaic;
               HBM temporaries only: a Mosaic kernel's VMEM scratch is not in
               memory_analysis, and 0 means none beyond arguments and outputs:
               the ratio is then 0, and null where the reference's is 0 too).
  ring_memory  per-device bytes of ring forward+backward at a fixed total length for
               sequence P = 2, 4, 8, and of flash on one device for P = 1 (what the
               ring splits); 8 CPU devices, and a deviceless TPU v5e:2x4.
  comm         collectives per attention call read from compiled HLO (count and
               elements per device; groups of one device, which move nothing, are
               left out) next to the formulas: ring forward P-1 hops of
               2*(N/P)*kv_heads*head_dim elements; Ulysses 4 all-to-alls of
               4*N*heads*head_dim/P elements (MHA). At P = 2 the ring's backward
               K/V hop is the forward's permutation and XLA merges the two: one
               hop fewer than the formula (the row's `note`). The 1-element
               all-reduce with the backward is the summed output it differentiates.
  balance      attention tiles per device per ring step, zig-zag against contiguous.
  cpu_time     CPU forward+backward seconds of blockwise flash against reference.
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
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # deviceless compile only
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks.common import run  # noqa: E402

SECTIONS = ["memory", "ring_memory", "comm", "balance", "cpu_time"]
_ONLY = flags.DEFINE_list("only", SECTIONS, f"sections to run, of {','.join(SECTIONS)}")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repetitions for cpu_time (best of)",
                                lower_bound=1)
flags.register_validator("only", lambda names: bool(names) and set(names) <= set(SECTIONS),
                         f"--only takes one or more of {','.join(SECTIONS)}")

# One attention call: batch 1, 8 query heads over 2 KV heads, head_dim 128.
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 128


def emit(**row):
  print(json.dumps(row), flush=True)


def _mesh(devices, **sizes):
  import sharding
  full = {**dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1), **sizes}
  n = 1
  for s in full.values():
    n *= s
  return sharding.make_mesh(full, devices=list(devices)[:n])


def _args(mesh, length: int, dtype, heads: int = HEADS, kv_heads: int = KV_HEADS):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  spec = P(None, "sequence") if mesh.shape["sequence"] > 1 else P()
  shard = NamedSharding(mesh, spec)
  return (jax.ShapeDtypeStruct((1, length, heads, HEAD_DIM), dtype, sharding=shard),
          jax.ShapeDtypeStruct((1, length, kv_heads, HEAD_DIM), dtype, sharding=shard),
          jax.ShapeDtypeStruct((1, length, kv_heads, HEAD_DIM), dtype, sharding=shard))


def _fwd_bwd(impl: str, with_value: bool = False, **kwargs):
  """jit of the gradients of sum(attention); with_value keeps the output alive too
  (otherwise e.g. Ulysses' output all-to-all is dead code)."""
  import jax
  import jax.numpy as jnp
  import kernels

  def loss(q, k, v):
    return jnp.sum(kernels.attention(q, k, v, causal=True, impl=impl, **kwargs)
                   .astype(jnp.float32))
  grad = jax.value_and_grad if with_value else jax.grad
  return jax.jit(grad(loss, argnums=(0, 1, 2)))


def _compile(fn, mesh, args):
  import jax
  with jax.set_mesh(mesh):
    return fn.lower(*args).compile()


def _tpu_devices(topology: str):
  try:
    import aot  # its topology call silences libtpu's metadata warnings off a TPU VM
    return aot.topology_devices(topology)
  except Exception as e:  # noqa: BLE001 - libtpu absent or unusable: skip TPU rows
    emit(section="tpu", skipped=f"{type(e).__name__}: {e}"[:200])
    return None


def memory():
  import jax
  import jax.numpy as jnp
  targets = [("cpu", jax.devices("cpu")[:1], jnp.float32)]
  tpu = _tpu_devices("v5e:2x2")
  if tpu is not None:
    targets.append(("tpu_v5e", tpu[:1], jnp.bfloat16))
  for backend, devices, dtype in targets:
    mesh = _mesh(devices)
    for length in (1024, 2048, 4096, 8192, 16384):
      row = {}
      for impl in ("reference", "flash"):
        compiled = _compile(_fwd_bwd(impl), mesh, _args(mesh, length, dtype))
        row[impl] = compiled.memory_analysis().temp_size_in_bytes
      emit(section="memory", backend=backend, length=length, dtype=jnp.dtype(dtype).name,
           heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
           reference_temp_bytes=row["reference"], flash_temp_bytes=row["flash"],
           flash_over_reference=(round(row["flash"] / row["reference"], 4)
                                 if row["reference"] else None))


def ring_memory(length: int = 16384):
  import jax
  import jax.numpy as jnp
  targets = [("cpu", jax.devices("cpu"), jnp.float32)]
  tpu = _tpu_devices("v5e:2x4")
  if tpu is not None:
    targets.append(("tpu_v5e", tpu, jnp.bfloat16))
  for backend, devices, dtype in targets:
    for p in (1, 2, 4, 8):
      mesh = _mesh(devices, sequence=p)
      impl = "ring_zigzag" if p > 1 else "flash"  # a ring needs two devices
      stats = _compile(_fwd_bwd(impl), mesh, _args(mesh, length, dtype))
      stats = stats.memory_analysis()
      total = (stats.temp_size_in_bytes + stats.argument_size_in_bytes +
               stats.output_size_in_bytes)
      emit(section="ring_memory", backend=backend, impl=impl, length=length, sequence=p,
           dtype=jnp.dtype(dtype).name, temp_bytes_per_device=stats.temp_size_in_bytes,
           argument_bytes_per_device=stats.argument_size_in_bytes,
           total_bytes_per_device=total)


def comm(length: int = 4096):
  import jax
  import jax.numpy as jnp
  import kernels
  from aot.hlo import collective_counts as collectives
  for p in (2, 4, 8):
    mesh = _mesh(jax.devices("cpu"), sequence=p)
    n = length // p
    for impl, heads, kv_heads in (("ring_zigzag", HEADS, KV_HEADS),
                                  ("ulysses", HEADS, HEADS)):
      args = _args(mesh, length, jnp.float32, heads, kv_heads)
      fwd = jax.jit(lambda q, k, v, impl=impl: kernels.attention(q, k, v, impl=impl))
      found = {"forward": collectives(_compile(fwd, mesh, args).as_text()),
               "forward_backward": collectives(
                   _compile(_fwd_bwd(impl, with_value=True), mesh, args).as_text())}
      if impl == "ring_zigzag":
        formula = {"forward": {"collective-permute": {
            "count": p - 1, "elements": 2 * n * kv_heads * HEAD_DIM * (p - 1)}},
            "forward_backward": {"collective-permute": {
                "count": 3 * p - 2,
                "elements": 2 * n * kv_heads * HEAD_DIM * (2 * (p - 1) + p)}}}
      else:
        formula = {"forward": {"all-to-all": {
            "count": 4, "elements": 4 * length * heads * HEAD_DIM // p}},
            "forward_backward": {"all-to-all": {
                "count": 8, "elements": 8 * length * heads * HEAD_DIM // p}}}
      for stage in ("forward", "forward_backward"):
        merged = impl == "ring_zigzag" and p == 2 and stage == "forward_backward"
        emit(section="comm", impl=impl, sequence=p, length=length, heads=heads,
             kv_heads=kv_heads, head_dim=HEAD_DIM, stage=stage,
             hlo=found[stage], formula=formula[stage],
             **({"note": "P=2: XLA merges the backward K/V hop into the forward "
                         "one (the same permutation)"} if merged else {}))


def balance(length: int = 8192, block_size: int = 512):
  from kernels import ring
  for p in (2, 4, 8):
    for layout in ("zigzag", "contiguous"):
      table = ring.blocks_per_step(p, length, causal=True, layout=layout,
                                   block_sizes=block_size)
      totals = [sum(row) for row in table]
      per_step_spread = [max(col) - min(col) for col in zip(*table)]
      emit(section="balance", layout=layout, sequence=p, length=length,
           block=block_size, tiles_per_device=totals,
           max_over_mean=round(max(totals) / (sum(totals) / p), 3),
           per_step_spread=per_step_spread)


def cpu_time():
  import jax
  import jax.numpy as jnp
  import numpy as np
  mesh = _mesh(jax.devices("cpu")[:1])
  for length in (1024, 4096, 8192):
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=a.shape), jnp.float32)
            for a in _args(mesh, length, jnp.float32)]
    row = {}
    for impl in ("reference", "flash"):
      fn = _fwd_bwd(impl)
      with jax.set_mesh(mesh):
        jax.block_until_ready(fn(*args))  # compile and warm up
        best = float("inf")
        for _ in range(_REPEATS.value):
          start = time.perf_counter()
          jax.block_until_ready(fn(*args))
          best = min(best, time.perf_counter() - start)
      row[impl] = best
    emit(section="cpu_time", length=length, heads=HEADS, kv_heads=KV_HEADS,
         head_dim=HEAD_DIM, dtype="float32", reference_s=round(row["reference"], 4),
         flash_blockwise_s=round(row["flash"], 4),
         speedup=round(row["reference"] / row["flash"], 2))


def main(argv):
  del argv
  import jax
  emit(section="env", jax=jax.__version__, cpus=os.cpu_count())
  sections = dict(memory=memory, ring_memory=ring_memory, comm=comm, balance=balance,
                  cpu_time=cpu_time)
  for name in _ONLY.value:
    start = time.perf_counter()
    sections[name]()
    emit(section=name, wall_s=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
  run(main)
