"""Joining a multi-process run through jax.distributed (no process manager of ours).

Explicit flags win; otherwise JAX's own cluster detection covers TPU pods, SLURM
and Kubernetes / JobSet (it reads their environment variables). On CPU the
collectives go over gloo.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import socket
import sys
import threading
import time

import jax
import numpy as np

from sharding.errors import ConfigError

# Environment variables whose presence means a cluster JAX can detect by itself.
_CLUSTER_HINTS = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                  "JOBSET_NAME", "TPU_ACCELERATOR_TYPE")


class JoinError(RuntimeError):
  """This process could not join the run, or lost the others while starting;
  the message names the process and what it waited for."""


def detected_cluster() -> str | None:
  for var in _CLUSTER_HINTS:
    if os.environ.get(var):
      return var
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 120, heartbeat_s: int = 100) -> bool:
  """Joins the run if one is configured; returns whether this is multi-process.

  A process that cannot reach the coordinator fails after `timeout_s` with an
  error naming its process id and the address, rather than hanging. A
  `num_processes` other than the run's is reported by
  `check_same_on_every_process` (pass it there), on every process at once: raised
  here, it left the others waiting for this process in their first collective.

  A process that dies later (killed, out of memory, its host lost) is noticed by
  the coordination service after `heartbeat_s` seconds without its heartbeat;
  JAX then aborts every other process ("another task died", status 134), and
  the last committed checkpoint is intact: relaunch every process to resume.
  Raises ConfigError for a timeout below 1 s.
  """
  for flag, value, usual in (("--join_timeout_s", timeout_s, 300),
                             ("--heartbeat_timeout_s", heartbeat_s, 100)):
    if value < 1:
      raise ConfigError(flag, f"{value} seconds cannot be waited for.",
                        f"pass {flag}={usual} (or any whole number of seconds from 1).")
  explicit = coordinator_address is not None or num_processes is not None
  if not explicit and detected_cluster() is None:
    return False
  if explicit and (coordinator_address is None or num_processes is None
                   or process_id is None):
    raise ConfigError("--coordinator_address", "a multi-process launch needs all of "
                      "--coordinator_address, --num_processes and --process_id.",
                      "pass all three, or none to auto-detect (TPU pod, SLURM, "
                      "Kubernetes).")
  if explicit:
    _check_launch(coordinator_address, num_processes, process_id)
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  who = (f"process {process_id if process_id is not None else '?'} of "
         f"{num_processes if num_processes is not None else '?'}")
  where = coordinator_address or "(auto-detected)"
  # The runtime aborts the process on a failed join without saying which process
  # it was; say it first, and check the coordinator is reachable at all.
  sys.stderr.write(f"{who}: joining the run through coordinator {where} "
                   f"(timeout {timeout_s}s)\n")
  sys.stderr.flush()
  if coordinator_address and process_id:
    _wait_for_coordinator(coordinator_address, timeout_s, who)
  elif coordinator_address:
    _check_port_free(coordinator_address)
  # Process 0 hosts the coordinator and waits there for every other process; when
  # they do not all come, the runtime aborts it (status 134, a C++ stack) some
  # seconds after the timeout. Say who waited for what first, and exit 1.
  watchdog = None
  if process_id == 0 and num_processes and num_processes > 1:
    def give_up():
      others = ("the other process did not" if num_processes == 2 else
                f"the other {num_processes - 1} processes did not all")
      ids = ("--process_id=1" if num_processes == 2 else
             f"its own --process_id (1 to {num_processes - 1})")
      sys.stderr.write(
          f"\n{who}: {others} join through coordinator {where} within {timeout_s}s. "
          f"Start {'it' if num_processes == 2 else 'each'} with "
          f"--coordinator_address={where} --num_processes={num_processes} and {ids}, "
          "or raise --join_timeout_s.\n")
      sys.stderr.flush()
      os._exit(1)
    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_s)
  except Exception as err:
    raise JoinError(f"{who}: could not join the run through coordinator {where} "
                    f"within {timeout_s}s: {err}") from err
  finally:
    if watchdog is not None:
      watchdog.cancel()
  return jax.process_count() > 1


def _check_launch(address: str, num_processes: int, process_id: int) -> None:
  """ConfigErrors for launch flags that cannot join any run: an address without a
  port, a count below 1, an id outside [0, count)."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError("--coordinator_address", f"{address!r} is not HOST:PORT.",
                      "pass process 0's host and a free port, e.g. "
                      f"--coordinator_address={host or address}:1234, to every process.")
  if num_processes < 1:
    raise ConfigError("--num_processes", f"{num_processes} processes cannot run.",
                      "pass the number of processes of the run (2 or more), the "
                      "same to every process.")
  if not 0 <= process_id < num_processes:
    raise ConfigError("--process_id", f"{process_id} is not a process of a run of "
                      f"{num_processes} (ids 0 to {num_processes - 1}).",
                      f"pass --process_id=0 to the first process, 1 to the next, and "
                      f"{num_processes - 1} to the last.")


def to_host(tree):
  """A pytree of jax Arrays as NumPy on every process, in one host sync when every
  array is local. An array that spans other processes' devices (a batch split
  over `data` across hosts) is gathered first, so every process must call this
  with the same arrays (a collective)."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
      if not x.is_fully_addressable else np.asarray(jax.device_get(x)), tree)


def process_0_says(value: bool) -> bool:
  """Process 0's `value` on every process (one broadcast; `value` itself in a
  single-process run). For a decision read off shared files before the run
  writes them: a slower process could otherwise see what process 0 has just
  written and take another path (and other collectives) than the rest."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def check_same_device_count() -> None:
  """Raises ConfigError (on every process alike, read from `jax.devices()`, no
  collective) when the run's processes hold different numbers of devices: a
  mesh, and every gather across processes, takes as many on each. On CPU hosts
  that is a different XLA_FLAGS device count on one process."""
  held = collections.Counter(d.process_index for d in jax.devices())
  counts = [held.get(p, 0) for p in range(jax.process_count())]
  if len(set(counts)) == 1:
    return
  listed = ", ".join(f"{n} on process {p}" for p, n in enumerate(counts))
  raise ConfigError(
      "devices per process", f"the run's processes hold different numbers of "
      f"devices ({listed}); its mesh and its gathers across processes take the same "
      "number from each.", "give every process the same number of devices: on CPU "
      "hosts, the same XLA_FLAGS=--xla_force_host_platform_device_count=N for each "
      "process; on GPU hosts, as many visible GPUs (CUDA_VISIBLE_DEVICES) on each.")


def check_same_on_every_process(text: str, field: str, fix: str, *,
                                num_processes: int | None = None) -> None:
  """Raises ConfigError (on every process) when `text` -- a config's JSON, say --
  differs between the processes of the run, or when a process was launched with a
  `num_processes` (its --num_processes; None: not given) other than the run's
  process count; compares SHA-256 digests and the counts in one all-gather.
  Processes holding different numbers of devices are refused first (the
  all-gather needs as many on each). Nothing to do in a single-process run."""
  if jax.process_count() == 1:
    return
  check_same_device_count()
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  mine = np.concatenate([digest.astype(np.int64), [num_processes or 0]])
  try:
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 33]
  except jax.errors.JaxRuntimeError as err:
    raise JoinError(f"process {jax.process_index()} of {jax.process_count()}: "
                    f"another process left the run before comparing {field} (its "
                    f"own output says why): {err}") from err
  digests, counts = every[:, :-1], every[:, -1]
  wrong = [i for i, n in enumerate(counts) if n and n != len(every)]
  if wrong:
    raise ConfigError("--num_processes", f"{_processes(wrong, len(every))} "
                      f"--num_processes={counts[wrong[0]]}, but the run joined "
                      f"through the coordinator has {len(every)} processes.",
                      f"pass --num_processes={len(every)} to every process.")
  differ = [i for i in range(len(every)) if not np.array_equal(digests[i], digests[0])]
  if differ:  # every process sees it: gather the texts to say what differs
    data = np.frombuffer(text.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    texts = [bytes(row[:n]).decode() for row, n in zip(
        np.asarray(multihost_utils.process_allgather(padded)), sizes)]
    what = _differences(texts[0], texts[differ[0]], differ[0])
    raise ConfigError(field, f"{_processes(differ, len(every))} a different one from "
                      f"process 0{f' ({what})' if what else ''}.", fix)


def _differences(first: str, other: str, pid: int, most: int = 4) -> str:
  """'train.seed: 0 on process 0, 1 on process 1' for up to `most` fields of two
  JSON objects that differ ('' when the texts are not JSON objects)."""
  import json
  try:
    a, b = json.loads(first), json.loads(other)
  except ValueError:
    return ""
  if not (isinstance(a, dict) and isinstance(b, dict)):
    return ""

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out
  fa, fb = flat(a), flat(b)
  missing = object()
  fields = [k for k in sorted(set(fa) | set(fb))
            if fa.get(k, missing) != fb.get(k, missing)]
  shown = [f"{k}: {fa.get(k, 'unset')!r} on process 0, {fb.get(k, 'unset')!r} on "
           f"process {pid}" for k in fields[:most]]
  more = len(fields) - len(shown)
  return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _processes(ids: list[int], count: int) -> str:
  """'process 1 of the 2 has' / 'processes 1, 3 of the 4 have'."""
  several = len(ids) > 1
  return (f"process{'es' if several else ''} {', '.join(map(str, ids))} of the "
          f"{count} ha{'ve' if several else 's'}")


def _check_port_free(address: str) -> None:
  """Process 0 starts the coordinator on `address`'s port: a port already in use
  is named here instead of the runtime aborting the process."""
  host, _, port = address.rpartition(":")
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", int(port)))
      return
    except OSError as err:
      if err.errno != errno.EADDRINUSE:
        return  # not ours to judge; the runtime says what it finds
  with socket.socket() as s:
    s.bind(("", 0))
    free = s.getsockname()[1]
  raise ConfigError("--coordinator_address", f"port {port} is already in use on this "
                    "host, where process 0 starts the run's coordinator.",
                    f"pass a free port to every process, e.g. "
                    f"--coordinator_address={host}:{free}.")


def _wait_for_coordinator(address: str, timeout_s: int, who: str) -> None:
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return
    except OSError as err:
      if time.monotonic() > deadline:
        raise JoinError(f"{who}: could not join the run through coordinator "
                        f"{address} within {timeout_s}s: nothing accepts "
                        f"connections there ({err}). Is process 0 running?")
      time.sleep(0.5)


def _has_accelerator() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return any(p in platforms for p in ("tpu", "cuda", "gpu", "rocm"))


def describe_process() -> str:
  return (f"process {jax.process_index()} of {jax.process_count()} "
          f"({jax.local_device_count()} local of {jax.device_count()} devices)")
