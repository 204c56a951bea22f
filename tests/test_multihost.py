"""Two real processes (4 CPU devices each) joined by jax.distributed over gloo."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from ml_collections import ConfigDict

import train
from conftest import REPO
from experiments import llama_tiny

STEPS = ["--config.data.seq_len=64", "--config.train.batch_size=8",
         "--config.train.eval_every=0", "--config.log.every_steps=1",
         "--config.log.peak_flops=1e12", "--config.log.tensorboard=false",
         "--config.optim.decay_steps=6", "--config.checkpoint.every_steps=5"]
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
DGC = ["--config.optim.name=sgd", "--config.optim.compression.method=dgc",
       "--config.optim.compression.density=0.01"]
# A config file that trains llama_tiny on a two-source mixture (data.mixture).
MIX_CONFIG = '''
from ml_collections import ConfigDict
from experiments import llama_tiny

def get_config(arg=None):
  c = llama_tiny.get_config()
  c.data.mixture = ConfigDict({MIXTURE!r})
  return c
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launcher(before: str | None) -> list[str]:
  """The command that runs `python -m experiment`, after the Python `before`."""
  if not before:
    return [sys.executable, "-m", "experiment"]
  return [sys.executable, "-c", before + "\nimport runpy, sys\n"
          "sys.argv[0] = 'experiment'\n"
          "runpy.run_module('experiment', run_name='__main__')"]


def _launch(workdir, extra, num_processes=2, started=(0, 1), timeout_s=60,
            config="experiments/llama_tiny.py", port=None, per_process=None,
            before=None):
  """Starts `python -m experiment train` as the processes `started` of a run and
  waits for them -> [(Popen, stdout, stderr)]. per_process: {pid: more flags};
  before: {pid: Python run in that process before the launcher}."""
  port = port or _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             # conftest's flags (faster compiles), 4 devices per process
             XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))
  procs = []
  for pid in started:
    procs.append(subprocess.Popen(
        [*_launcher((before or {}).get(pid)), "train",
         f"--config={config}", f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
         f"--process_id={pid}", f"--join_timeout_s={timeout_s}", *extra,
         *(per_process or {}).get(pid, ())],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return [(p, *p.communicate(timeout=600)) for p in procs]


def _config(steps, mixture=None):
  c = llama_tiny.get_config()
  c.train.update(steps=steps, eval_every=0, batch_size=8)
  c.data.seq_len = 64
  if mixture:
    c.data.mixture = ConfigDict(mixture)
  c.log.update(every_steps=1, peak_flops=1e12, tensorboard=False)
  c.optim.decay_steps = 6
  c.checkpoint.every_steps = 5
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.optim.name = "sgd"
  c.optim.compression.update(method="dgc", density=0.01)
  return c


def _mixture(root):
  """Two small sources: Python-ish text files and prose in JSONL."""
  rng = np.random.default_rng(0)
  (root / "code").mkdir()
  for i in range(60):
    (root / "code" / f"m{i}.py").write_text(
        "".join(f"x{j} = {int(rng.integers(100))}\n" for j in range(30)))
  words = ["the", "mixture", "of", "sources", "is", "read", "by", "two", "hosts"]
  with open(root / "web.jsonl", "w") as f:
    for i in range(200):
      f.write(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n")
  return {"code": dict(source="text", path=str(root / "code"), weight=0.7),
          "web": dict(source="jsonl", path=str(root / "web.jsonl"), weight=0.3)}


def test_two_processes_train_then_one_process_resumes(tmp_path):
  """Each process holds one `data` replica, and the replicas exchange gradients
  compressed by DGC (its all-gathers of (index, value) pairs are what crosses
  processes); one process with 8 devices then resumes, compression state
  included. The data is a two-source mixture, so this also checks that both
  processes read the rows of the same mixed global batches as one process does.

  Process 1 alone gets SIGTERM during step 3 (a preemption notice): both
  processes save the same step and exit 0 (process 1 used to stop alone and leave
  process 0 waiting in the next step's collectives, both hung for good)."""
  mixture = _mixture(tmp_path)
  config_file = tmp_path / "mix_config.py"
  config_file.write_text(MIX_CONFIG.replace("{MIXTURE!r}", repr(mixture)))
  work = tmp_path / "multi"
  sigterm_in_step_3 = (
      "import os, signal, train.loop as loop\n"
      "batch, calls = loop._global_batch, []\n"
      "def counted(*a, **k):\n"
      "  calls.append(1)\n"
      "  if len(calls) == 3:\n"
      "    os.kill(os.getpid(), signal.SIGTERM)\n"
      "  return batch(*a, **k)\n"
      "loop._global_batch = counted")
  results = _launch(work, ["--config.train.steps=6", *STEPS, *MESH, *DGC],
                    config=str(config_file), before={1: sigterm_in_step_3})
  for proc, out, err in results:
    assert proc.returncode == 0, err[-3000:]
  assert "process 1 of 2" in results[1][2]
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  multi = [r for r in rows if "loss" in r]  # process 0 alone writes metrics
  stopped = multi[-1]["step"]
  assert 3 <= stopped < 6 and [r["step"] for r in multi] == list(range(1, stopped + 1))
  out, err = results[0][1:]  # process 0 speaks for the run
  assert (f"a process's SIGTERM (preemption): saved step {stopped}; exiting"
          in out + err), (out + err)[-3000:]

  # One process with 8 devices: restore the 2-process checkpoint, finish the run.
  resumed = train.train(_config(6, mixture), str(work), progress=False)
  assert [r["step"] for r in resumed] == list(range(stopped + 1, 7))
  # Reference: the same run in one process from scratch.
  fresh = train.train(_config(6, mixture), str(tmp_path / "one"), progress=False)
  np.testing.assert_allclose([r["loss"] for r in multi + resumed],
                             [r["loss"] for r in fresh], rtol=1e-5)
  assert multi[-1]["compression_ratio"] == fresh[stopped - 1]["compression_ratio"] > 10
  for name in mixture:  # the fraction of each source read so far
    key = f"data_fraction/{name}"
    assert [r[key] for r in multi + resumed] == [r[key] for r in fresh]
    assert abs(fresh[5][key] - mixture[name]["weight"]) < 0.1


DILOCO = ["--config.mesh.diloco=2", "--config.mesh.data=1", "--config.mesh.fsdp=2",
          "--config.mesh.tensor=2", "--config.diloco.sync_every=2",
          "--config.diloco.fragments=2", "--config.diloco.outer_dtype=e3m0"]


def test_diloco_replicas_in_two_processes(tmp_path):
  """One Streaming DiLoCo replica per process (each over fsdp=2 x tensor=2 of its
  own 4 devices): inner steps stay inside a process, the e3m0 exchanges of the
  two fragments (all-to-all, all-gather) cross between them. Equals the same run
  in one process. (Overlap adds only a program without communication, tested in
  test_diloco.py.)"""
  work = tmp_path / "multi"
  results = _launch(work, ["--config.train.steps=4", *STEPS, *DILOCO])
  for proc, out, err in results:
    assert proc.returncode == 0, err[-3000:]
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  c = _config(4)
  c.optim.name, c.optim.compression.method = "adamw", "none"
  c.mesh.update(diloco=2, data=1, fsdp=2, tensor=2)
  c.diloco.update(sync_every=2, fragments=2, outer_dtype="e3m0")
  fresh = train.train(c, str(tmp_path / "one"), progress=False)
  np.testing.assert_allclose([r["loss"] for r in rows if "loss" in r],
                             [r["loss"] for r in fresh], rtol=1e-5)
  # Each fragment's outer-gradient norm, logged at the steps of its syncs
  # (gathered across the processes that hold the replicas), as in one process.
  for p in range(2):
    key = f"outer_grad_norm/fragment_{p}"
    logged = [(r["step"], r[key]) for r in rows if key in r]
    assert [s for s, _ in logged] == [r["step"] for r in fresh if key in r]
    assert len(logged) >= 2
    np.testing.assert_allclose([v for _, v in logged],
                               [r[key] for r in fresh if key in r], rtol=1e-5)


def _generate_in_two_processes(workdir, *flags, command="generate", before=None,
                               timeout=600):
  """`python -m experiment generate` (or `command`) as both processes of a
  2-process run (4 CPU devices each) -> [(Popen, stdout, stderr)]. before:
  {pid: Python run in that process before the launcher}."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))
  procs = []
  for pid in (0, 1):
    procs.append(subprocess.Popen(
        [*_launcher((before or {}).get(pid)), command, f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={pid}", "--join_timeout_s=60", *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return [(p, *p.communicate(timeout=timeout)) for p in procs]


def test_two_processes_generate_and_export_what_one_process_does(tmp_path):
  """A trial's `generate` on two processes crashed fetching tokens split over
  `data` across them (non-addressable devices), with --prompt and --prompts
  alike; with a replicated batch it printed the completion once per process. Now
  every process gets every row, process 0 alone prints or writes, and the text
  is what one process with all 8 devices generates on the same mesh."""
  import io

  import infer.text
  work = tmp_path / "run"
  c = _config(2)
  c.optim.compression.method = "none"
  train.train(c, str(work), progress=False)  # mesh data=2 fsdp=2 tensor=2, saved
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("def f(\nimport numpy as np\nx\n")
  out = tmp_path / "out.jsonl"
  results = _generate_in_two_processes(work, f"--prompts={prompts}",
                                       f"--output_jsonl={out}", "--batch_size=2",
                                       "--max_new_tokens=5")
  for proc, _, err in results:
    assert proc.returncode == 0, err[-3000:]
  want = infer.text.generate_file(str(work), None, str(prompts), batch_size=2,
                                  max_new_tokens=5, progress=False, out=io.StringIO())
  assert [json.loads(line) for line in out.read_text().splitlines()] == want
  whole = out.read_text()  # continued on two processes: process 0 reads, tells 1
  out.write_text("".join(whole.splitlines(True)[:2]) + '{"line": 4, "pro')
  results = _generate_in_two_processes(work, f"--prompts={prompts}",
                                       f"--output_jsonl={out}", "--batch_size=2",
                                       "--max_new_tokens=5", "--resume_output")
  for proc, _, err in results:
    assert proc.returncode == 0, err[-3000:]
  assert out.read_text() == whole and "the first 2 of 3 prompts" in results[0][2]
  # Ctrl-C to process 1 alone, after its first batch: it left process 0 waiting in
  # the next batch's collectives and itself in JAX's shutdown barrier, both hung.
  # Now both stop at one batch (exit 130) and the file holds the finished ones.
  six = tmp_path / "six.txt"
  six.write_text("".join(f"x = {i}\n" for i in range(6)))
  sigint_after_batch_1 = (
      "import os, signal, infer.text as text\n"
      "generate, calls = text.generate, []\n"
      "def counted(*a, **k):\n"
      "  out = generate(*a, **k)\n"
      "  calls.append(1)\n"
      "  if len(calls) == 1:\n"
      "    os.kill(os.getpid(), signal.SIGINT)\n"
      "  return out\n"
      "text.generate = counted")
  cut = tmp_path / "cut.jsonl"
  results = _generate_in_two_processes(work, f"--prompts={six}", f"--output_jsonl={cut}",
                                       "--batch_size=1", "--max_new_tokens=2",
                                       before={1: sigint_after_batch_1}, timeout=180)
  for proc, _, err in results:
    assert proc.returncode == 130, err[-3000:]
  written = [json.loads(line) for line in cut.read_text().splitlines()]
  assert 1 <= len(written) < 6, written
  assert (f"interrupted after {len(written)} of 6 prompts; {cut} holds the finished "
          "ones" in results[0][2]), results[0][2][-2000:]
  assert "every process stops at the next batch boundary" in results[1][2]
  whole6 = infer.text.generate_file(str(work), None, str(six), batch_size=1,
                                    max_new_tokens=2, progress=False, out=io.StringIO())
  assert written == whole6[:len(written)]
  # --prompt streams token by token: the same, at one token
  sigint_after_token_2 = sigint_after_batch_1.replace(
      "text.generate", "text._Printer.__call__").replace("len(calls) == 1",
                                                          "len(calls) == 2")
  results = _generate_in_two_processes(work, "--prompt=def f(", "--max_new_tokens=40",
                                       before={1: sigint_after_token_2}, timeout=180)
  for proc, _, err in results:
    assert proc.returncode == 130, err[-3000:]
  assert "every process stops at the next token boundary" in results[1][2]
  rest = iter(results[0][1])  # the prompt printed (gloo's lines interleave)
  assert all(ch in rest for ch in "def f(") and "new tokens" not in results[0][2]
  results = _generate_in_two_processes(work, "--prompt=def f(", "--max_new_tokens=5")
  for proc, _, err in results:
    assert proc.returncode == 0, err[-3000:]
  printed = io.StringIO()
  infer.text.generate_text(str(work), None, "def f(", max_new_tokens=5, out=printed)
  # gloo prints its own connection lines to stdout (C++), interleaved with the
  # text at any character: process 0's output holds the text in order, and
  # process 1's holds none of it
  rest = iter(results[0][1])
  assert all(ch in rest for ch in printed.getvalue()), results[0][1]
  assert "def f(" not in results[1][1] and results[0][1].count("def f(") == 1
  # the run / step / mesh note too, once (each process wrote it)
  assert "generating from step" in results[0][2]
  assert "generating from step" not in results[1][2]

  # export-hf on both processes (as a TPU pod runs every command on every worker):
  # it restored onto process 0's device from every process and every process
  # wrote the files; now each reads onto its own, process 0 writes, and the
  # files are one process's export.
  from safetensors.numpy import load_file
  results = _generate_in_two_processes(work, f"--out={tmp_path / 'hf2'}",
                                       command="export-hf")
  for proc, _, err in results:
    assert proc.returncode == 0, err[-3000:]
  assert "exported step" in results[0][1] and "exported step" not in results[1][1]
  from train.hf import export_hf
  export_hf(str(work), str(tmp_path / "hf1"))
  two, one = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf2", "hf1"))
  assert two.keys() == one.keys()
  assert all(np.array_equal(two[k], one[k]) for k in one)
  assert sorted(os.listdir(tmp_path / "hf2")) == sorted(os.listdir(tmp_path / "hf1"))
  # import-hf on both processes: each writes its checkpoint shards into the
  # staging directory process 0 made, which process 0 moves into the run once
  # every process has written (`train.staged`); the run exports the same weights.
  back = tmp_path / "back"
  results = _generate_in_two_processes(back, f"--hf_dir={tmp_path / 'hf1'}",
                                       "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                                       command="import-hf")
  for proc, _, err in results:
    assert proc.returncode == 0, err[-3000:]
  # (generation_config.json: kept for export-hf since session 39)
  assert sorted(os.listdir(back)) == ["checkpoints", "config.json",
                                      "generation_config.json"]
  export_hf(str(back), str(tmp_path / "hf3"))
  again = load_file(str(tmp_path / "hf3" / "model.safetensors"))
  assert all(np.array_equal(again[k], one[k]) for k in one)
  # inspect, likewise: one description, from process 0 (each process printed one)
  results = _generate_in_two_processes(work, command="inspect")
  for proc, _, err in results:
    assert proc.returncode == 0, err[-3000:]
  assert "checkpoints" in results[0][1] and "checkpoints" not in results[1][1]


def test_a_killed_process_ends_the_run_and_the_last_checkpoint_resumes(tmp_path):
  """Process 1 is SIGKILLed in step 5 (as the out-of-memory killer would): process 0
  is ended within --heartbeat_timeout_s, told that another process died, instead
  of waiting in a collective for good; the last committed checkpoint (step 2 or
  4, the save of step 4 may be cut off mid-write) resumes in one process and
  trains the same losses as an uninterrupted run."""
  work = tmp_path / "multi"
  killed_in_step_5 = (
      "import os, signal, train.loop as loop\n"
      "batch, calls = loop._global_batch, []\n"
      "def counted(*a, **k):\n"
      "  calls.append(1)\n"
      "  if len(calls) == 5:\n"
      "    os.kill(os.getpid(), signal.SIGKILL)\n"
      "  return batch(*a, **k)\n"
      "loop._global_batch = counted")
  start = time.monotonic()
  results = _launch(work, ["--config.train.steps=8", *STEPS,
                           "--config.checkpoint.every_steps=2", *MESH,
                           "--heartbeat_timeout_s=5"], before={1: killed_in_step_5})
  elapsed = time.monotonic() - start
  (p0, _, err0), (p1, _, _) = results
  assert p1.returncode == -signal.SIGKILL
  assert p0.returncode != 0 and "another task died" in err0, err0[-3000:]
  assert elapsed < 90, elapsed  # JAX's default heartbeat alone is 100 s
  committed = sorted(int(p.name) for p in (work / "checkpoints").iterdir()
                     if p.name.isdigit())
  assert committed[-1] in (2, 4), committed

  c = _config(8)
  c.optim.name, c.optim.compression.method = "adamw", "none"
  c.checkpoint.every_steps = 2
  resumed = train.train(c, str(work), progress=False)
  assert [r["step"] for r in resumed] == list(range(committed[-1] + 1, 9))
  fresh = train.train(c, str(tmp_path / "one"), progress=False)
  np.testing.assert_allclose([r["loss"] for r in resumed],
                             [r["loss"] for r in fresh[committed[-1]:]], rtol=1e-5)


def test_mesh_larger_than_the_processes_fails_clearly(tmp_path):
  results = _launch(tmp_path, ["--config.train.steps=1", *STEPS,
                               "--config.mesh.data=4", "--config.mesh.fsdp=2",
                               "--config.mesh.tensor=2"])
  for pid, (proc, out, err) in enumerate(results):
    assert proc.returncode == 2, err[-3000:]
    assert f"[process {pid} of 2] Config error in `mesh.data`" in err
    assert "has 16 devices but 8 are available" in err
    # XLA's device-count flag splits each process's CPU (a trial followed the hint
    # for one process, 16, and got 32 devices)
    assert ("XLA_FLAGS=--xla_force_host_platform_device_count=8 set before starting "
            "each of the run's 2 processes gives 16 devices in all") in err, err[-2000:]


def test_missing_process_times_out_naming_itself(tmp_path):
  (proc, out, err), = _launch(tmp_path, ["--config.train.steps=1", *STEPS],
                              started=(1,), timeout_s=5)
  assert proc.returncode == 1
  assert "process 1 of 2: could not join the run through coordinator 127.0.0.1:" in err


def test_process_0_alone_says_what_it_waited_for(tmp_path):
  """From a trial: process 0 with no peer was aborted by the runtime (status 134,
  a C++ stack trace) some seconds after its join timeout; it now says who it
  waited for and how to launch them, exit 1."""
  (proc, out, err), = _launch(tmp_path, ["--config.train.steps=1", *STEPS],
                              started=(0,), timeout_s=5)
  assert proc.returncode == 1, err[-3000:]
  assert re.search(r"process 0 of 2: the other process did not join through "
                   r"coordinator 127\.0\.0\.1:\d+ within 5s\. Start it with "
                   r"--coordinator_address=127\.0\.0\.1:\d+ --num_processes=2 and "
                   r"--process_id=1, or raise --join_timeout_s\.", err), err[-3000:]
  assert "Fatal Python error" not in err



def test_processes_launched_differently_fail_naming_the_flag(tmp_path):
  """A process with other --config.* overrides, or another --num_processes, is a
  config error on every process (exit 2) before anything compiles."""
  results = _launch(tmp_path / "config", ["--config.train.steps=1", *STEPS],
                    per_process={1: ["--config.train.seed=1"]})
  for pid, (proc, out, err) in enumerate(results):
    assert proc.returncode == 2, err[-3000:]
    assert (f"[process {pid} of 2] Config error in `--config`: process 1 of the 2 has "
            "a different one from process 0 (train.seed: 0 on process 0, 1 on process "
            "1). Fix: launch every process with the same --config file and --config.* "
            "overrides.") in err
  # Both name the flag at once (process 1 raised it alone, and both then waited 30 s
  # for gloo's timeout: process 0 for process 1 in the comparison, process 1 for
  # process 0 at shutdown).
  start = time.monotonic()
  results = _launch(tmp_path / "count", ["--config.train.steps=1", *STEPS],
                    per_process={1: ["--num_processes=3"]})
  assert time.monotonic() - start < 25
  for pid, (proc, out, err) in enumerate(results):
    assert proc.returncode == 2, err[-3000:]
    assert (f"[process {pid} of 2] Config error in `--num_processes`: process 1 of the "
            "2 has --num_processes=3, but the run joined through the coordinator has "
            "2 processes. Fix: pass --num_processes=2 to every process.") in err
  # From a trial: a process started with another XLA_FLAGS device count made the
  # comparison's own all-gather fail (a reshape ValueError, exit 1)
  fewer = ("import os\nos.environ['XLA_FLAGS'] = os.environ['XLA_FLAGS'].replace("
           "'device_count=4', 'device_count=2')")
  results = _launch(tmp_path / "devices", ["--config.train.steps=1", *STEPS],
                    before={1: fewer})
  for pid, (proc, out, err) in enumerate(results):
    assert proc.returncode == 2, err[-3000:]
    assert (f"[process {pid} of 2] Config error in `devices per process`: the run's "
            "processes hold different numbers of devices (4 on process 0, 2 on "
            "process 1)") in err, err[-3000:]
    assert "the same XLA_FLAGS=--xla_force_host_platform_device_count=N" in err


def test_a_coordinator_port_in_use_is_a_config_error(tmp_path):
  import socket
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    (proc, out, err), = _launch(tmp_path, ["--config.train.steps=1", *STEPS],
                                started=(0,), port=port, timeout_s=5)
  assert proc.returncode == 2, err[-3000:]
  assert f"Config error in `--coordinator_address`: port {port} is already in use" in err
  assert "Fix: pass a free port to every process, e.g. --coordinator_address=127.0.0.1:" \
      in err


def test_a_slow_process_takes_the_same_path_as_process_0(tmp_path):
  """Process 1 reaches the check for a saved model after process 0 has made the
  checkpoint directory: it must not open a checkpoint manager that process 0
  never opens (it did, and the run failed in Orbax's barrier with a name
  mismatch)."""
  slow = ("import time, train.loop as loop\n"
          "check = loop._check_saved_model\n"
          "loop._check_saved_model = lambda *a: (time.sleep(8), check(*a))[1]")
  results = _launch(tmp_path, ["--config.train.steps=1", *STEPS], before={1: slow})
  for proc, out, err in results:
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("held,listed", [
    ((4, 4, 4), None),
    ((8, 8, 0), "8 on process 0, 8 on process 1, 0 on process 2"),
    ((1, 3), "1 on process 0, 3 on process 1"),
])
def test_device_counts_are_compared_across_processes(monkeypatch, held, listed):
  """The check reads every process's count from `jax.devices()` (no collective),
  for any counts, a process holding none included."""
  import types

  import jax

  from sharding import ConfigError, distributed
  devices = [types.SimpleNamespace(process_index=p) for p, n in enumerate(held)
             for _ in range(n)]
  monkeypatch.setattr(jax, "devices", lambda: devices)
  monkeypatch.setattr(jax, "process_count", lambda: len(held))
  if listed is None:
    distributed.check_same_device_count()
    return
  with pytest.raises(ConfigError, match=re.escape(f"different numbers of devices "
                                                  f"({listed})")):
    distributed.check_same_device_count()
