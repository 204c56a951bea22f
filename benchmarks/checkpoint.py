"""Checkpoint cost: how long save() blocks training, async against sync, and
restore time against the disk's sequential read speed, in one run.

  python benchmarks/checkpoint.py [--gib=1.0] [--dir=/tmp/rung_ckpt_bench]

A train state of about --gib GiB (parameters plus two Adam moments, float32) is
saved through rung's Checkpointer with async_save on and off. `blocked_s` is the
time save() holds the training loop; `total_s` includes waiting for the write.
Page caches are dropped before each read measurement when permitted (root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_GIB = flags.DEFINE_float("gib", 1.0, "train state size in GiB")
_DIR = flags.DEFINE_string("dir", "/tmp/rung_ckpt_bench", "scratch directory")


def emit(**row):
  print(json.dumps(row), flush=True)


def drop_caches() -> bool:
  try:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
      f.write("3\n")
    return True
  except OSError:
    return False


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from train.checkpoint import Checkpointer
  from train.state import TrainState

  root = _DIR.value
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  n = int(_GIB.value * 2**30 / 4 / 3)  # floats per tree (params, mu, nu)
  chunk = 1 << 24
  keys = jax.random.split(jax.random.key(0), 3 * (n // chunk + 1))

  def tree(offset):
    return {f"w{i}": jax.random.normal(keys[offset + i], (min(chunk, n - i * chunk),))
            for i in range(0, (n + chunk - 1) // chunk)}

  state = TrainState(step=jnp.array(1, jnp.int32), params=tree(0),
                     opt_state={"mu": tree(n // chunk + 1), "nu": tree(2 * (n // chunk + 1))})
  jax.block_until_ready(state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  emit(what="environment", date=time.strftime("%Y-%m-%d"), state_gib=nbytes / 2**30,
       jax=jax.__version__, cpus=os.cpu_count())

  results = {}
  for mode in ("sync", "async"):
    cfg = ml_collections.ConfigDict(dict(keep=1, keep_best=0, async_save=mode == "async",
                                         fallback=False))
    workdir = os.path.join(root, mode)
    ckpt = Checkpointer(workdir, cfg)
    start = time.perf_counter()
    ckpt.save(state, None, {"bench": True}, force=True)
    blocked = time.perf_counter() - start
    ckpt.wait()
    total = time.perf_counter() - start
    ckpt.close()
    results[mode] = (blocked, total)
    emit(what="save", mode=mode, blocked_s=blocked, total_s=total,
         gib_per_s=nbytes / 2**30 / total)
  emit(what="ratio", async_blocked_over_sync_save=results["async"][0] / results["sync"][1])

  # Restore (sync checkpoint) against dd's sequential read of a same-size file.
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=x.sharding), state)
  dropped = drop_caches()
  cfg = ml_collections.ConfigDict(dict(keep=1, keep_best=0, async_save=False,
                                       fallback=False))
  ckpt = Checkpointer(os.path.join(root, "sync"), cfg, read_only=True)
  start = time.perf_counter()
  restored = ckpt.restore(target)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - start
  ckpt.close()
  assert np.array_equal(np.asarray(restored.params["w0"]), np.asarray(state.params["w0"]))
  blob = os.path.join(root, "dd.bin")
  subprocess.run(["dd", "if=/dev/urandom", f"of={blob}", "bs=16M",
                  f"count={max(1, nbytes // (16 << 20))}"], check=True,
                 capture_output=True)
  drop_caches()
  start = time.perf_counter()
  subprocess.run(["dd", f"if={blob}", "of=/dev/null", "bs=16M"], check=True,
                 capture_output=True)
  dd_s = time.perf_counter() - start
  size = os.path.getsize(blob)
  emit(what="restore", restore_s=restore_s, restore_gib_per_s=nbytes / 2**30 / restore_s,
       dd_read_gib_per_s=size / 2**30 / dd_s, caches_dropped=dropped)
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
