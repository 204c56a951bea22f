"""Checkpoint cost: how long save() blocks training, async against sync, and
restore time against the disk's sequential read speed, without and with
compression (`checkpoint.compress`), in one run.

  python benchmarks/checkpoint.py [--gib=1.0] [--rounds=3] [--dir=/tmp/rung_ckpt_bench]

A train state of about --gib GiB (parameters plus two Adam moments, float32) is
saved through rung's Checkpointer with async_save on and off. `blocked_s` is the
time save() holds the training loop; `total_s` includes waiting for the write.
Page caches are dropped before each read measurement when permitted (root).
Restores and `dd` reads of a same-size file alternate for --rounds rounds; the
ratio compares their medians, since this VM's disk speed drifts by minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from common import emit, run  # noqa: E402

_GIB = flags.DEFINE_float("gib", 1.0, "train state size in GiB (above 0)")
_DIR = define_path("dir", "/tmp/rung_ckpt_bench", "scratch directory", output="directory")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "alternating dd / restore rounds",
                               lower_bound=1)
flags.register_validator("gib", lambda v: v > 0, "must be above 0 GiB")


def drop_caches() -> bool:
  try:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
      f.write("3\n")
    return True
  except OSError:
    return False


def dd_read(path: str) -> float:
  """GiB/s of dd's sequential read of `path` from a cold page cache."""
  drop_caches()
  start = time.perf_counter()
  subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True,
                 capture_output=True)
  return os.path.getsize(path) / 2**30 / (time.perf_counter() - start)


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

  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=x.sharding), state)
  for compress in (False, True):
    results = {}
    for mode in ("sync", "async"):
      cfg = ml_collections.ConfigDict(dict(keep=1, keep_best=0, fallback=False,
                                           async_save=mode == "async",
                                           compress=compress))
      ckpt = Checkpointer(os.path.join(root, f"{mode}_{compress}"), cfg)
      start = time.perf_counter()
      ckpt.save(state, None, {"bench": True}, force=True)
      blocked = time.perf_counter() - start
      ckpt.wait()
      total = time.perf_counter() - start
      ckpt.close()
      results[mode] = (blocked, total)
      emit(what="save", compress=compress, mode=mode, blocked_s=blocked,
           total_s=total, gib_per_s=nbytes / 2**30 / total)
    emit(what="ratio", compress=compress,
         async_blocked_over_sync_save=results["async"][0] / results["sync"][1])

  def restore(compress: bool) -> float:
    """Seconds to restore the sync checkpoint from a cold page cache."""
    drop_caches()
    cfg = ml_collections.ConfigDict(dict(keep=1, keep_best=0, async_save=False,
                                         fallback=False, compress=compress))
    ckpt = Checkpointer(os.path.join(root, f"sync_{compress}"), cfg, read_only=True)
    start = time.perf_counter()
    restored = jax.block_until_ready(ckpt.restore(target))
    seconds = time.perf_counter() - start
    ckpt.close()
    assert np.array_equal(np.asarray(restored.params["w0"]),
                          np.asarray(state.params["w0"]))
    return seconds

  # The disk's read speed drifts (0.7-2.5 GiB/s within minutes on this VM), so
  # dd and the restores alternate for --rounds rounds and medians are compared.
  blob = os.path.join(root, "dd.bin")
  subprocess.run(["dd", "if=/dev/urandom", f"of={blob}", "bs=16M",
                  f"count={max(1, nbytes // (16 << 20))}"], check=True,
                 capture_output=True)
  dd, restore_s = [], {False: [], True: []}
  for _ in range(_ROUNDS.value):
    dd.append(dd_read(blob))
    for compress in restore_s:
      restore_s[compress].append(restore(compress))
  dd_median = float(np.median(dd))
  emit(what="disk", dd_read_gib_per_s=dd_median, rounds=dd, caches_dropped=drop_caches())
  for compress, seconds in restore_s.items():
    disk = sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(os.path.join(root, f"sync_{compress}"))
               for f in files)
    median = float(np.median(seconds))
    speed = nbytes / 2**30 / median
    emit(what="restore", compress=compress, restore_s=median, rounds=seconds,
         restore_gib_per_s=speed, restore_over_dd=speed / dd_median,
         disk_over_state_bytes=disk / nbytes)
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  run(main)
