"""Deep Gradient Compression on llama_tiny over 8 replicas: quality and bytes.

  python benchmarks/dgc.py [--steps=400] [--root=runs/dgc] [--only=dgc,sgd]
      [--write_rows=benchmarks/results/dgc.jsonl] [--plot=benchmarks/results/dgc.png]
      [--topology=v5p:2x2x2]

Trains experiments/llama_tiny.py (the Python stdlib bytes) on `mesh.data=8` for
--steps with each variant below (same seed, data and schedule), evaluating every
--eval_every steps: dense momentum SGD, dense AdamW, DGC with all four techniques
(momentum correction, local clipping, momentum factor masking, warm-up), DGC
without each in turn, top-k without error feedback, and top-k (with error
feedback) in front of AdamW. One JSON line per run: final eval loss, its ratio to
dense SGD's, the compression ratio of the gradient exchange and the step time.

Then the bytes: `llama_1b` compiled for --topology (deviceless, `mesh.data=8`,
`fsdp=1`, `optim.name=sgd`, its 16 micro-batches per step) dense and with DGC
at --density; the bytes a device
receives over `data` per step are read from each compiled program, and the time
each would take over 1, 10 and 100 Gbit/s links is computed from them (bytes x 8
/ link rate: computed, not measured). The eval-loss curves go to --plot (none
without it).
"""

from __future__ import annotations

import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import (run, emit, plot_eval_curves, processor,  # noqa: E402
                               write_rows_to)

_STEPS = flags.DEFINE_integer("steps", 400, "training steps per run; more than "
                              "--warmup_steps, or DGC never reaches --density and "
                              "the runs compare warm-ups", lower_bound=1)
_EVAL = flags.DEFINE_integer("eval_every", 50, "steps between evaluations (0: none; "
                             "final_eval_loss is then null and nothing is plotted)",
                             lower_bound=0)
_DENSITY = flags.DEFINE_float("density", 0.001, "fraction of each tensor sent, in (0, 1]")
_WARMUP = flags.DEFINE_integer("warmup_steps", 80, "DGC's density warm-up",
                               lower_bound=0)
_SGD_LR = flags.DEFINE_float("sgd_lr", 0.3, "momentum SGD's learning rate (> 0)")
_ADAMW_LR = flags.DEFINE_float("adamw_lr", 3e-3, "AdamW's learning rate (> 0)")
_ROOT = define_path("root", "runs/dgc", "run directories", output="directory")
VARIANTS = ("sgd", "dgc", "adamw", "topk_adamw", "dgc_no_momentum_correction",
            "dgc_no_local_clip", "dgc_no_momentum_masking", "dgc_no_warmup",
            "topk_no_error_feedback")
_ONLY = flags.DEFINE_list("only", [], f"variants to run, of {', '.join(VARIANTS)} "
                          "(default: all; 'none': only the llama_1b bytes)")
_ROWS = define_path("write_rows", None, "also append JSON rows here", output="file")
_PLOT = define_path("plot", None, "write the eval-loss curves to this PNG "
                            "(default: no plot)", output="file")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x2",
                                "TPU topology for the llama_1b bytes ('' skips)")
flags.register_validator("density", lambda v: 0 < v <= 1, "must be in (0, 1]")
flags.register_validator("sgd_lr", lambda v: v > 0, "must be positive")
flags.register_validator("adamw_lr", lambda v: v > 0, "must be positive")
flags.register_validator(
    "only", lambda v: set(v) <= {*VARIANTS, "none"},
    f"must name variants of {', '.join(VARIANTS)}, or 'none'")
flags.register_multi_flags_validator(
    ["plot", "eval_every"], lambda f: not f["plot"] or f["eval_every"] > 0,
    "--plot needs evaluations: --eval_every > 0")


@flags.multi_flags_validator(["steps", "warmup_steps", "only"])
def _check_steps(f) -> bool:
  if f["steps"] <= f["warmup_steps"] and f["only"] != ["none"]:
    raise flags.ValidationError(
        f"--steps={f['steps']} must exceed --warmup_steps={f['warmup_steps']}: DGC "
        "sends more than --density until its warm-up ends. Lower --warmup_steps, "
        "or pass --only=none for the bytes alone")
  return True


def _check_topology(value: str) -> bool:
  """'' or a TPU topology rung knows (sharding.chips), else ValidationError."""
  if value:
    from sharding.chips import chip_for_topology
    try:
      chip_for_topology(value)
    except Exception as e:  # ConfigError: says what is wrong and the fix
      raise flags.ValidationError(str(e)) from None
  return True


flags.register_validator("topology", _check_topology)
GBITS = (1, 10, 100)


def variants() -> dict[str, tuple[str, dict]]:
  """name -> (optim.name, optim.compression fields)."""
  dgc = dict(method="dgc", density=_DENSITY.value, warmup_steps=_WARMUP.value)
  return {
      "sgd": ("sgd", {}),
      "dgc": ("sgd", dgc),
      "adamw": ("adamw", {}),
      "topk_adamw": ("adamw", dict(method="topk", density=_DENSITY.value)),
      "dgc_no_momentum_correction": ("sgd", {**dgc, "momentum_correction": False}),
      "dgc_no_local_clip": ("sgd", {**dgc, "local_clip": False}),
      "dgc_no_momentum_masking": ("sgd", {**dgc, "momentum_masking": False}),
      "dgc_no_warmup": ("sgd", {**dgc, "warmup_steps": 0}),
      "topk_no_error_feedback": ("sgd", dict(method="topk", density=_DENSITY.value,
                                            error_feedback=False)),
  }


def main(argv):
  del argv
  import jax
  import train
  from experiments import llama_tiny

  write_rows_to(_ROWS.value)
  emit(what="environment", date=time.strftime("%Y-%m-%d"), steps=_STEPS.value,
       jax=jax.__version__, devices=f"{len(jax.devices())} x "
       f"{jax.devices()[0].device_kind}", processor=processor())
  bytes_per_step = _llama_1b_bytes() if _TOPOLOGY.value else {}
  curves, dense_sgd = {}, None
  assert tuple(variants()) == VARIANTS
  for name, (optimizer, comp) in variants().items():
    if _ONLY.value and name not in _ONLY.value:
      continue
    c = llama_tiny.get_config()
    c.mesh.data = 8
    c.train.update(steps=_STEPS.value, eval_every=_EVAL.value)
    c.optim.update(name=optimizer, momentum=0.9,
                   learning_rate=_SGD_LR.value if optimizer == "sgd"
                   else _ADAMW_LR.value)
    c.optim.compression.update(comp)
    c.checkpoint.every_steps = 0
    c.log.every_steps = max(1, min(10, _STEPS.value // 3))
    start = time.perf_counter()
    rows = train.train(c, os.path.join(_ROOT.value, name), progress=False)
    wall = time.perf_counter() - start
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
    last = [r for r in rows if "loss" in r][-1]
    final = evals[-1][1] if evals else None  # None: --eval_every=0
    if name == "sgd":
      dense_sgd = final
    sparse = bool(comp)
    seconds = bytes_per_step.get("compressed" if sparse else "dense")
    emit(what="run", variant=name, optimizer=optimizer,
         learning_rate=c.optim.learning_rate, final_eval_loss=final,
         final_train_loss=last["loss"],
         vs_dense_sgd=final / dense_sgd if final and dense_sgd else None,
         compression_ratio=last.get("compression_ratio", 1.0),
         step_time_s=sorted(times)[len(times) // 2] if times else None,
         wall_s=round(wall, 1),
         **({f"llama_1b_comm_s_{g}gbit": seconds * 8 / (g * 1e9) for g in GBITS}
            if seconds else {}))
    curves[name] = evals
  if _PLOT.value and curves:
    plot_eval_curves(curves, f"llama_tiny on data=8, {_STEPS.value} steps, density "
                     f"{_DENSITY.value:g}", _PLOT.value, solid=("sgd", "adamw", "dgc"))


def _llama_1b_bytes() -> dict[str, float]:
  """Bytes a device receives over `data` per step, dense and compressed, read
  from deviceless compiles of llama_1b (data=8, fsdp=1, momentum SGD)."""
  from aot.compile import compile_step
  from experiments import llama_1b
  out = {}
  for kind, comp in (("dense", {}), ("compressed", dict(
      method="dgc", density=_DENSITY.value))):
    c = llama_1b.get_config()
    c.mesh.update(data=8, fsdp=1)
    c.optim.name = "sgd"
    c.optim.compression.update(comp)
    report = compile_step(c, _TOPOLOGY.value)
    if report.error:
      raise RuntimeError(f"llama_1b ({kind}) did not compile: {report.error[:500]}")
    out[kind] = report.received_bytes.get("data", 0.0)
    emit(what="llama_1b", kind=kind, topology=_TOPOLOGY.value,
         received_over_data_bytes=out[kind],
         compile_s=round(report.compile_seconds, 1),
         **{f"comm_s_{g}gbit": out[kind] * 8 / (g * 1e9) for g in GBITS})
  emit(what="llama_1b", kind="ratio", dense_over_compressed=out["dense"]
       / max(out["compressed"], 1.0))
  return out


if __name__ == "__main__":
  run(main)
