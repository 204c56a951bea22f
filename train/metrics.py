"""Where training metrics go: metrics.jsonl, TensorBoard, and the progress bar."""

from __future__ import annotations

import json
import os
from typing import Any

# The keys of every logged training row in metrics.jsonl (eval rows add eval_loss).
TRAIN_KEYS = ("step", "loss", "grad_norm", "learning_rate", "step_time_s",
              "tokens_per_sec", "tflops_per_device", "mfu")
# Added to the rows of an MoE model (model/moe.py `aggregate`): the mean
# load-balancing and router z-losses over MoE layers, the worst layer's busiest
# expert load over the mean load, and the fraction of (token, choice) pairs dropped.
MOE_KEYS = ("moe_aux_loss", "moe_z_loss", "moe_max_load", "moe_dropped_fraction")


class MetricsWriter:
  """Appends one JSON object per logged step to <workdir>/metrics.jsonl and mirrors
  the scalars to TensorBoard. Only the writing process (process 0) writes."""

  def __init__(self, workdir: str, *, enabled: bool, tensorboard: bool):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(row) + "\n")
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


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
