"""benchmarks/gpu_check.py --tiny: the GPU check runs end to end on CPU, so it is
ready (and has not rotted) when an accelerator is at hand."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_tiny_runs_every_section_and_writes_its_rows(tmp_path):
  out = tmp_path / "rows.jsonl"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--tiny",
       f"--out={out}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert rows == [json.loads(line) for line in proc.stdout.splitlines()
                  if line.startswith("{")]
  assert rows[-1] == {**rows[-1], "what": "done", "failed": []}
  by = lambda section: [r for r in rows if r.get("section") == section  # noqa: E731
                        and "seconds" not in r]
  env, = by("environment")
  assert env["measured_copy_gbps"] > 0 and env["jax"] and env["device_kind"]
  # Flash on CPU runs the blockwise kernels (--tiny: one float32 config): errors
  # against the float32 reference; cuDNN's refusal is recorded, not fatal.
  flash, = by("flash")
  for grad in ("out", "dq", "dk", "dv"):
    assert flash[f"flash_{grad}_max_abs_err"] < 1e-5
    assert flash[f"reference_{grad}_max_abs_err"] < 1e-5
  assert flash["flash_fwd_bwd_ms"] > 0 and "cudnn_error" in flash
  assert by("flash_blocks")[0]["fwd_bwd_ms"] > 0
  train = {r["system"]: r for r in by("train")}
  assert set(train) == {"rung", "pytorch-eager"}
  assert all(r["tokens_per_sec"] > 0 and r["mfu"] > 0 for r in train.values())
  decode = by("decode")  # batch 3: the heads-major KV cache, in bf16
  assert [r["batch"] for r in decode] == [3]
  assert all(r["rung_tokens_per_sec"] > 0 and r["weight_read_floor_s"] > 0
             for r in decode)
  blocks = {r["block"]: r for r in by("blocks")}
  assert set(blocks) == {"ladder"}  # --tiny: the full run adds parallel
  assert all(r["standard_step_time_s"] == train["rung"]["step_time_s"]
             for r in blocks.values())
