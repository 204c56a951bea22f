"""Bad benchmark flags are refused at flag parsing, naming the flag: no traceback,
no work done first. Runs each script as a subprocess, all cases at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (script, bad flag, the flag's name that stderr must carry)
CASES = [
    ("dgc.py", "--steps=0", "steps"),
    ("dgc.py", "--only=bogus", "only"),
    ("dgc.py", "--density=-1", "density"),
    ("dgc.py", "--steps=80", "steps"),  # = the default --warmup_steps
    ("diloco.py", "--sync_every=0", "sync_every"),
    ("diloco.py", "--steps=49", "steps"),  # below the default --sync_every=50
    ("diloco.py", "--only=bogus", "only"),
    ("optimizers.py", "--lrs=5", "lrs"),
    ("optimizers.py", "--summarize=/nonexistent/rows.jsonl", "summarize"),
    ("moe.py", "--variants=bogus", "variants"),
    ("ladder_overlap.py", "--reps=0", "reps"),
    ("ladder_quality.py", "--retrain_steps=1", "retrain_steps"),
    ("decode.py", "--dtypes=bogus", "dtypes"),
    ("generate_memory.py", "--rows=0", "rows"),
    ("generate_memory.py", "--new_tokens=0", "new_tokens"),
    ("hf_import.py", "--shard_mb=0", "shard_mb"),
    ("newton_schulz.py", "--meshes=fsdp=2:tensor=2", "meshes"),
    ("newton_schulz.py", "--meshes=fsdp8", "meshes"),
    ("newton_schulz.py", "--reps=0", "reps"),
    ("newton_schulz.py", "--what=galore", "what"),
    ("pipeline.py", "--schedules=bogus", "schedules"),
    ("predict.py", "--batch_per_device=0", "batch_per_device"),
    ("predict.py", "--micro_batches=0", "micro_batches"),
    ("predict.py", "--micro_batches=5", "micro_batches"),  # 16B: 6 rows per shard
    # from a trial: tracebacks after work (steps=0: no median; gib<=0: a shape
    # error or KeyError; rounds=0: exit 0 with every figure null)
    ("train_throughput.py", "--steps=0", "steps"),
    ("checkpoint.py", "--gib=0", "gib"),
    ("checkpoint.py", "--gib=-1", "gib"),
    ("checkpoint.py", "--rounds=0", "rounds"),
    # outputs that cannot be written: refused before the work that makes them
    ("predict.py", "--write_rows=/proc/rung-test.jsonl", "write_rows"),
    ("dgc.py", "--plot=/proc/rung-test.png", "plot"),
    ("plot_loss.py", "--out=/tmp", "out"),
    ("ladder_quality.py", "--out=/proc/rung-test", "out"),
    ("checkpoint.py", "--dir=/proc/rung-test", "dir"),
    ("gpu_check.py", "--out=/proc/rung-test.jsonl", "out"),
    # misspelt: absl's "FATAL Flags parsing error" and exit 1 before
    ("train_throughput.py", "--stepz=3", "stepz"),
    ("predict.py", "--micro_batch=2", "micro_batch"),
]
LIMIT_S = 60


def test_bad_flags_are_refused_before_any_work():
  env = dict(os.environ, PYTHONPATH=ROOT)
  start = time.perf_counter()
  procs = [subprocess.Popen([sys.executable, os.path.join("benchmarks", script), flag],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for script, flag, _ in CASES]
  failures = []
  try:
    for (script, flag, name), p in zip(CASES, procs):
      left = max(1.0, LIMIT_S - (time.perf_counter() - start))
      try:
        _, err = p.communicate(timeout=left)
      except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        failures.append(f"{script} {flag}: still running after {LIMIT_S} s")
        continue
      if p.returncode != 2:  # a usage error, as the launcher's
        failures.append(f"{script} {flag}: exit status {p.returncode}")
      if f"--{name}=" not in err and f"flag '{name}'" not in err:
        # absl: "flag --NAME=VALUE: why" or "Unknown command line flag 'NAME'"
        failures.append(f"{script} {flag}: stderr does not name {name}: {err[-500:]}")
      if "Traceback" in err or "FATAL" in err:
        failures.append(f"{script} {flag}: traceback: {err[-1000:]}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert not failures, "\n".join(failures)


def test_every_output_path_flag_is_checked_writable_at_parsing():
  """From a fresh-user trial of compile (its --dump_hlo and --output_json crashed
  after the work): every benchmark flag that names a file or directory the
  script writes declares it (`define_path(..., output=...)`), so an unwritable
  one fails flag parsing. The launcher checks its own before compiling."""
  import ast
  outputs = {"write_rows", "plot", "write_json", "root", "dir", "out"}
  unchecked = []
  for script in sorted(os.listdir(os.path.join(ROOT, "benchmarks"))):
    if not script.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(ROOT, "benchmarks", script)).read())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "define_path"
          and node.args[0].value in outputs
          and not any(k.arg == "output" for k in node.keywords)):
        unchecked.append(f"{script}: --{node.args[0].value}")
  assert not unchecked, unchecked


def test_help_exits_zero_and_lists_the_scripts_flags():
  """`--help` and `--helpfull` print the script's own flags and exit 0 (absl's
  app.run exits 1, which a shell `&&` or a CI step reads as a failure)."""
  scripts = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                   if f.endswith(".py") and f not in ("__init__.py", "common.py"))
  env = dict(os.environ, PYTHONPATH=ROOT)
  failures = []
  for script in scripts:
    for flag in ("--help", "--helpfull"):
      p = subprocess.run([sys.executable, os.path.join("benchmarks", script), flag],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
      if p.returncode != 0 or f"benchmarks/{script}:" not in p.stdout:
        failures.append(f"{script} {flag}: exit {p.returncode}: {p.stdout[-300:]}"
                        f"{p.stderr[-300:]}")
  assert not failures, "\n".join(failures)
