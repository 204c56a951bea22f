"""Killing the trainer at any moment never leaves it unable to resume."""

import os
import random
import re
import signal
import subprocess
import sys
import time


from conftest import REPO

TINY = ["--config.data.source=synthetic", "--config.data.seq_len=16",
        "--config.model.vocab_size=64", "--config.model.d_model=32",
        "--config.model.num_layers=2", "--config.model.num_heads=4",
        "--config.model.num_kv_heads=2", "--config.model.head_dim=8",
        "--config.model.d_ff=64", "--config.train.batch_size=8",
        "--config.train.eval_every=0", "--config.log.every_steps=50",
        "--config.log.peak_flops=1e12", "--config.log.tensorboard=false",
        "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2"]


def _start(workdir, log, steps=100000):
  """The trainer as a subprocess; its output goes to the file `log`."""
  env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiment", "train",
       "--config=experiments/llama_tiny.py", f"--workdir={workdir}",
       f"--config.train.steps={steps}", f"--config.optim.decay_steps={steps}", *TINY],
      cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _output(proc):
  with open(proc.log) as f:
    return f.read()


def _wait_for(proc, pattern, timeout=120):
  deadline = time.time() + timeout
  while not re.search(pattern, _output(proc)):
    assert proc.poll() is None, _output(proc)[-3000:]
    assert time.time() < deadline, f"{pattern!r} never appeared"
    time.sleep(0.1)
  return re.search(pattern, _output(proc))


def _committed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def _latest_restorable(workdir):
  """Latest committed step as Orbax sees it (ignores half-written tmp dirs)."""
  import orbax.checkpoint as ocp
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                              options=ocp.CheckpointManagerOptions(read_only=True))
  step = mgr.latest_step()
  mgr.close()
  return step


def test_sigkill_during_async_saves_always_resumes(tmp_path):
  rng = random.Random(0)
  workdir = str(tmp_path / "run")
  expected = None
  for kill in range(5):
    proc = _start(workdir, tmp_path / f"log{kill}")
    if expected is None:
      _wait_for(proc, "compiled the train step")
      deadline = time.time() + 60
      while not _committed_steps(workdir):
        assert time.time() < deadline and proc.poll() is None, _output(proc)[-3000:]
        time.sleep(0.1)
    else:
      resumed = _wait_for(proc, r"resuming from step (\d+)")
      assert int(resumed.group(1)) == expected  # never a partial step
    # Kill at a random moment while saves (one per step) are in flight.
    time.sleep(rng.uniform(0.3, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    expected = _latest_restorable(workdir)
    assert expected is not None
  proc = _start(workdir, tmp_path / "final", steps=expected + 2)
  assert proc.wait(timeout=300) == 0, _output(proc)[-3000:]
  assert f"resuming from step {expected}" in _output(proc)


def test_sigterm_saves_current_step_and_exits_0(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start(workdir, tmp_path / "log")
  _wait_for(proc, "compiled the train step")
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, _output(proc)[-3000:]
  saved = re.search(r"SIGTERM: saved step (\d+); exiting", _output(proc))
  assert saved, _output(proc)[-3000:]
  assert _latest_restorable(workdir) == int(saved.group(1))


def test_a_signal_during_setup_stops_before_the_first_step(tmp_path, monkeypatch,
                                                           capsys):
  """SIGINT while the run is still being set up (here: as its data is made) is
  not lost to a KeyboardInterrupt somewhere in setup: the run stops before its
  first step, saying so, and trains nothing."""
  import train
  from conftest import make_tiny_config
  from train import loop
  real = loop.make_data

  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

  monkeypatch.setattr(loop, "make_data", interrupted)
  rows = train.train(make_tiny_config(), str(tmp_path), progress=False)
  assert rows == []
  out = capsys.readouterr()
  assert "SIGINT before the first step: nothing new to save; exiting" in out.out
  # what the signal promises at once: no step-boundary save (there is no step yet)
  assert ("SIGINT: stopping before the first step, once setup (data, restore, "
          "compile) is done; nothing new to save; send it again") in out.err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch):
  """Two SIGINTs during setup (a long first tokenization, say): the second stops
  the run at once instead of waiting for the first step."""
  import pytest

  import train
  from conftest import make_tiny_config
  from train import loop
  real = loop.make_data

  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

  monkeypatch.setattr(loop, "make_data", interrupted)
  with pytest.raises(KeyboardInterrupt, match="a second SIGINT"):
    train.train(make_tiny_config(), str(tmp_path), progress=False)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_resume_without_periodic_saves_names_the_step_it_reads(tmp_path, capsys):
  """checkpoint.every_steps=0 on a run resumed from a saved step (a SIGTERM's, say)
  said a resume would have nothing to read: it reads the step the run started
  from."""
  import train
  from conftest import make_tiny_config
  first = make_tiny_config()
  first.train.steps, first.checkpoint.every_steps = 2, 2
  train.train(first, str(tmp_path), progress=False)
  capsys.readouterr()
  again = make_tiny_config()
  again.train.steps, again.checkpoint.every_steps = 3, 0
  train.train(again, str(tmp_path), progress=False)
  assert ("checkpoint.every_steps=0: this run saves no checkpoint (only SIGTERM or "
          "SIGINT does), so generate, export-hf and a resume will read step 2, "
          "where it started") in capsys.readouterr().out
