"""The launcher end to end, and training that learns."""

import json
import os

import numpy as np
import pytest

import train
from conftest import run_cli
from train.metrics import TRAIN_KEYS


def test_cli_trains_and_writes_metrics(tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(30):
    (docs / f"{i}.py").write_text("def f(x):\n    return x + 1\n" * 20)
  work = tmp_path / "run"
  proc = run_cli("train", "--config=experiments/llama_tiny.py", f"--workdir={work}",
                 f"--config.data.path={docs}", "--config.data.seq_len=32",
                 "--config.model.num_layers=3", "--config.model.d_model=64",
                 "--config.model.d_ff=128", "--config.train.steps=4",
                 "--config.train.batch_size=8", "--config.train.eval_every=2",
                 "--config.log.every_steps=2", "--config.log.peak_flops=1e12",
                 "--config.model.max_position_embeddings=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Training past the declared context is allowed, and said.
  assert ("note: data.seq_len=32 is past model.max_position_embeddings=16: export-hf "
          "will declare a context of 16") in proc.stdout
  # What the run trains on and with: its windows and epochs, its optimizer.
  import re
  m = re.search(r"data: ([\d,]+) training / [\d,]+ held-out windows of data.seq_len "
                r"\+ 1 = 33 tokens; ([\d.]+) epochs in train.steps=4", proc.stdout)
  assert m, proc.stdout
  assert float(m[2]) == pytest.approx(4 * 8 / int(m[1].replace(",", "")), abs=0.01)
  assert "optimizer: adamw (b1 0.9, b2 0.95); weight decay" in proc.stdout
  # The override reached the model: the stacked layer weights have 3 layers.
  assert "layers/mlp/gate         3x64x128" in proc.stdout
  # attention=auto names what it chose (32 tokens on CPU: the reference).
  assert ("model: standard block, attention auto -> reference (length 32 < 256 on "
          "cpu)") in proc.stdout
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert all(set(TRAIN_KEYS) <= set(r) for r in train_rows)
  assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
  assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in train_rows)
  assert any(f.startswith("events.out.tfevents") for f in
             os.listdir(work / "tensorboard"))


def test_training_learns_the_synthetic_pattern(tiny_config, tmp_path):
  tiny_config.train.update(steps=40, eval_every=40, eval_steps=2)
  tiny_config.optim.update(learning_rate=1e-2, warmup_steps=5)
  tiny_config.log.every_steps = 10
  rows = train.train(tiny_config, str(tmp_path), progress=False)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[0] > 3.5  # about ln(64) = 4.16 at the start
  assert losses[-1] < 0.6 * losses[0]
  assert rows[-1]["eval_loss"] < 0.6 * losses[0]
  # rows hold Python numbers, as metrics.jsonl does (not NumPy scalars)
  assert {type(v) for r in rows for v in r.values()} <= {int, float}, rows[-1]


def test_same_seed_same_run(tiny_config, tmp_path):
  a = train.train(tiny_config, str(tmp_path / "a"), progress=False)
  b = train.train(tiny_config, str(tmp_path / "b"), progress=False)
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  # and the seed matters: it draws the initial parameters
  import sharding
  from model import ModelConfig
  from train.optimizer import make_optimizer
  from train.state import init_state, model_spec
  spec = model_spec(ModelConfig.from_config(tiny_config.model),
                    sharding.normalize_rules(None))
  mesh = sharding.make_mesh(tiny_config.mesh)
  tx = make_optimizer(tiny_config.optim, 3)
  p0, p1 = (init_state(spec, tx, mesh, s).params["head"] for s in (0, 1))
  assert not np.array_equal(np.asarray(p0), np.asarray(p1))


class _AsyncDevice:
  """A fake clock and device: a dispatched step returns to the host at once and
  runs on the device after the steps before it; `sync` waits for the device."""

  def __init__(self):
    self.now = self.free_at = 0.0

  def dispatch(self, seconds):
    self.free_at = max(self.free_at, self.now) + seconds
    self.now += 1e-4  # the host's dispatch

  def sync(self):
    self.now = max(self.now, self.free_at)


def test_step_time_leaves_out_host_work_and_keeps_the_steps_it_overlaps():
  """`StepTimer` over asynchronously dispatched steps: compiling or evaluating
  between steps (while earlier steps still run on the device) is left out of the
  window and the steps keep their device time, so the logged step time is the
  steps' own, for random step times, pauses and window lengths."""
  from train.metrics import StepTimer
  rng = np.random.default_rng(0)
  for _ in range(20):
    dev = _AsyncDevice()
    timer = StepTimer(clock=lambda: dev.now)
    steps = rng.uniform(0.5, 2.0, size=rng.integers(1, 8))
    for k, seconds in enumerate(steps):
      if k and rng.random() < 0.5:  # a compile or an evaluation before this step
        with timer.paused(dev.sync):
          dev.now += rng.uniform(1.0, 30.0)
          dev.dispatch(rng.uniform(0.1, 1.0))  # an evaluation's device work
          dev.sync()
      dev.dispatch(seconds)
      timer.step()
    dev.sync()  # fetching the last step's metrics
    assert timer.per_step() == pytest.approx(steps.mean(), rel=1e-3)


def test_cpu_mfu_peak_is_one_host_rate_per_process(monkeypatch):
  """MFU divides the FLOP/s of all processes by the peak of all their hosts: the
  measured host rate times the process count; log.peak_flops overrides it."""
  from ml_collections import ConfigDict
  from train import metrics
  monkeypatch.setattr(metrics, "measured_matmul_peak", lambda: 3e11)
  log = ConfigDict(dict(peak_flops=0.0))
  assert metrics.peak_flops(log) == (3e11, "measured matmul (host)")
  monkeypatch.setattr(metrics.jax, "process_count", lambda: 2)
  assert metrics.peak_flops(log) == (6e11, "measured matmul (host) x 2 processes")
  log.peak_flops = 1e12
  assert metrics.peak_flops(log) == (1e12, "config")
