"""Where training metrics go (metrics.jsonl, TensorBoard) and the peak FLOP/s that
MFU divides by."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

import sharding
from train import run_config

# The keys of every logged training row in metrics.jsonl (eval rows add eval_loss).
TRAIN_KEYS = ("step", "loss", "grad_norm", "learning_rate", "step_time_s",
              "tokens_per_sec", "tflops_per_device", "mfu")
# Added to the rows of an MoE model (model/moe.py `aggregate`): the mean
# load-balancing and router z-losses over MoE layers, the worst layer's busiest
# expert load over the mean load, and the fraction of (token, choice) pairs dropped.
MOE_KEYS = ("moe_aux_loss", "moe_z_loss", "moe_max_load", "moe_dropped_fraction")
# Added to the rows of a run on a data mixture (data.mixture), one key per source:
# data_fraction/<name> is the fraction (0..1) of all training windows read so far,
# from step 1 to this row's step, that came from source <name>
# (train.data.Data.source_fractions).
DATA_FRACTION_PREFIX = "data_fraction/"


class StepTimer:
  """Seconds per training step over a window of steps, with host work between
  steps (compiling a program, evaluating) kept out of it.

  Steps are dispatched asynchronously, so host work can run while earlier steps
  are still computing: `paused(sync)` first waits for them (`sync`, e.g.
  `jax.block_until_ready` on the state), so their time stays in the window, then
  leaves its own duration out. Read `per_step()` after a host sync of the window's
  last step (fetching its metrics)."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self.restart()

  def restart(self) -> None:
    """A new window, from now."""
    self._start, self._steps = self._clock(), 0

  def step(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def paused(self, sync: Callable[[], Any]):
    sync()
    began = self._clock()
    try:
      yield
    finally:
      self._start += self._clock() - began

  def per_step(self) -> float:
    """Seconds per step of the window (its steps must have finished)."""
    return (self._clock() - self._start) / max(self._steps, 1)


class MetricsWriter:
  """Appends one JSON object per logged step to <workdir>/metrics.jsonl and mirrors
  the scalars to TensorBoard. Only the writing process (process 0) writes.

  `start`: the step the run starts from. Rows an interrupted attempt logged past
  the checkpoint it resumes from (past step 0 for a fresh start) are dropped from
  metrics.jsonl first, with any line a kill cut short, so the file holds one
  trajectory in step order; TensorBoard hides those events (`purge_step`).
  `dropped` counts the rows dropped. A NaN or infinite value is written as null
  (strict JSON, which json.loads, pandas and jq all read) and not to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool, tensorboard: bool,
               start: int = 0):
    self.enabled = enabled
    self._tb = None
    self.dropped = 0
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    self.dropped = _keep_rows_before(path, start)
    self._jsonl = open(path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=start + 1 if start else 0)

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = sharding.json_ready(row)
    self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _keep_rows_before(path: str, start: int) -> int:
  """Rewrites the JSON lines at `path` keeping rows of steps up to `start` (none
  for start 0, whose step-0 evaluation runs again) and dropping unreadable lines;
  returns how many lines went. The rewrite is a new file moved over the old one,
  so a crash leaves either whole."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      continue
    if start and step <= start:
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) == len(lines):
    return 0
  run_config.write_atomically(path, "".join(keep))
  return len(lines) - len(keep)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32) -> float:
  """FLOP/s of a large matmul on the first device, measured now: the CPU's
  practical peak."""
  a = jnp.ones((n, n), dtype, device=jax.devices()[0])
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


# Measured once per process: what a training run's MFU divides by.
measured_matmul_peak = functools.cache(measure_matmul_peak)


def peak_flops(log_cfg) -> tuple[float, str]:
  """(peak FLOP/s that MFU divides by, where it came from).

  On CPU a process's fake devices share its host's cores, so the peak is the
  host's measured matmul rate times the number of processes (hosts), and MFU
  compares the step's total FLOP/s over all of them with it.
  `log.peak_flops` overrides it (total FLOP/s over all devices of the run).
  """
  if log_cfg.peak_flops:
    return float(log_cfg.peak_flops), "config"
  device = jax.devices()[0]
  if device.platform == "cpu":
    hosts = jax.process_count()
    return (measured_matmul_peak() * hosts,
            "measured matmul (host)" + (f" x {hosts} processes" if hosts > 1 else ""))
  chip = sharding.chips.chip_for_device_kind(device.device_kind)
  if chip is not None:  # at run time each TPU device is a whole chip (v4: megacore)
    return (chip.peak_flops * jax.device_count(),
            f"{chip.name} bf16 peak ({chip.source})")
  # Other accelerators: from log.peak_flops; without it MFU is reported as NaN
  # rather than guessed.
  return float("nan"), f"unknown for {device.device_kind}"
