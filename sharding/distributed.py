"""Joining a multi-process run through jax.distributed (no process manager of ours).

Explicit flags win; otherwise JAX's own cluster detection covers TPU pods, SLURM
and Kubernetes / JobSet (it reads their environment variables). On CPU the
collectives go over gloo.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax

from sharding.errors import ConfigError

# Environment variables whose presence means a cluster JAX can detect by itself.
_CLUSTER_HINTS = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                  "JOBSET_NAME", "TPU_ACCELERATOR_TYPE")


def detected_cluster() -> str | None:
  for var in _CLUSTER_HINTS:
    if os.environ.get(var):
      return var
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 120) -> bool:
  """Joins the run if one is configured; returns whether this is multi-process.

  A process that cannot reach the coordinator fails after `timeout_s` with an
  error naming its process id and the address, rather than hanging.
  """
  explicit = coordinator_address is not None or num_processes is not None
  if not explicit and detected_cluster() is None:
    return False
  if explicit and (coordinator_address is None or num_processes is None
                   or process_id is None):
    raise ConfigError("--coordinator_address", "a multi-process launch needs all of "
                      "--coordinator_address, --num_processes and --process_id.",
                      "pass all three, or none to auto-detect (TPU pod, SLURM, "
                      "Kubernetes).")
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
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  except Exception as err:
    raise RuntimeError(f"{who}: could not join the run through coordinator {where} "
                       f"within {timeout_s}s: {err}") from err
  return jax.process_count() > 1


def _wait_for_coordinator(address: str, timeout_s: int, who: str) -> None:
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return
    except OSError as err:
      if time.monotonic() > deadline:
        raise RuntimeError(f"{who}: could not join the run through coordinator "
                           f"{address} within {timeout_s}s: nothing accepts "
                           f"connections there ({err}). Is process 0 running?")
      time.sleep(0.5)


def _has_accelerator() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return any(p in platforms for p in ("tpu", "cuda", "gpu", "rocm"))


def describe_process() -> str:
  return (f"process {jax.process_index()} of {jax.process_count()} "
          f"({jax.local_device_count()} local of {jax.device_count()} devices)")
