"""rung's schedule estimate against MaxText's published TPU training runs.

  python benchmarks/predict.py [--only=16b_v5e,32b_v5p] [--slices=1,2]
      [--program=rung|maxtext] [--remat=save_dots] [--batch_per_device=6]
      [--micro_batches=2] [--write_rows=benchmarks/results/predict.jsonl]

For each configuration MaxText published (`MaxText/configs/v5e/README.md` and
`MaxText/configs/v5p/README.md` at commit 0ed7bd52 of
https://github.com/AI-Hypercomputer/maxtext: MFU of synthetic-data training runs),
builds the same model in rung (benchmarks/README.md derives the shapes from
MaxText's `global_parameter_scale` rule), compiles its train step deviceless for
the slice (`aot.compile_step`, no TPU), and prints the published MFU next to rung's
estimate (`time.estimate`, the compiled schedule walked by `aot/schedule.py`) and
its roofline. One JSON row per configuration; a markdown table at the end.

Multi-slice rows (`--slices=2`) join two slices over the data-center network with
data parallelism across them (MaxText's `dcn_data_parallelism=2`), the per-device
batch unchanged. 128B on v5e offloads remat to host memory in MaxText's recipe
(`minimal_offloaded`); rung runs it with `model.remat=offload_dots`, which offloads
every matmul output, not MaxText's minimal set.

Where the compiler refuses a step for memory (rung's program at MaxText's batch
is larger than MaxText's: benchmarks/README.md says where), the same global batch
is compiled as 2, then more, gradient-accumulation micro-batches until it fits
(one "refused" row per count tried); the row says how many it took.

FLOP convention: these tables predate MaxText's halving of causal attention FLOPs,
so their MFU counts (6N + 12·L·H·Q·T) per token; the published MFU becomes a step
time with that count, and rung's estimate is converted back the same way.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks import common
from benchmarks.common import emit, write_rows_to  # noqa: E402

_SLICES = flags.DEFINE_list("slices", ["1", "2"], "slice counts to run (MaxText "
                            "published 1 and 2)")
_ROWS = define_path("write_rows", None, "also append JSON rows here", output="file")
_PROGRAM = flags.DEFINE_enum(
    "program", "rung", ["rung", "maxtext"],
    "rung: rung's defaults beyond the model shape; maxtext: MaxText's choices "
    "there too: activations' embedding split over `tensor` (its "
    "logical_axis_rules: activation_embed -> tensor) and the embedding lookup "
    "as a one-hot matmul (use_iota_embed=true in every recipe)")
_REMAT = flags.DEFINE_string("remat", None,
                             "replace every run's remat policy (model.remat)")
_BATCH = flags.DEFINE_integer(
    "batch_per_device", None, "replace every run's batch per device (to find the "
    "largest that fits when the published one does not)", lower_bound=1)


def _check_remat(value: str | None) -> bool:
  """None or one of model.config.REMAT (imported only when the flag is given)."""
  if value is None:
    return True
  from model.config import REMAT
  if value not in REMAT:
    raise flags.ValidationError(f"must be one of {', '.join(REMAT)}")
  return True


flags.register_validator("remat", _check_remat)
flags.register_validator("slices", lambda v: bool(v) and set(v) <= {"1", "2"},
                         "must be slice counts MaxText published: 1, 2 or both")

# v5p's recipes add these to MaxText's v5e flags (LIBTPU_INIT_ARGS of
# MaxText/configs/v5p/{32b,64b}.sh).
V5P_FLAGS = ("maxtext --xla_tpu_megacore_fusion_allow_ags=false "
             "--xla_enable_async_collective_permute=true "
             "--xla_tpu_enable_ag_backward_pipelining=true")


@dataclasses.dataclass(frozen=True)
class Run:
  """One published configuration: model shape, slice, mesh, batch per device."""
  d_model: int
  heads: int
  layers: int
  topology: str
  mesh: dict
  batch_per_device: int
  flags: str
  published: dict  # slices -> published MFU (fraction)
  d_ff: int = 28672
  remat: str = "full"
  head_dim: int = 128
  vocab: int = 32000
  seq_len: int = 2048
  rules: tuple = ()  # (logical name, mesh axes) replacing sharding.DEFAULT_RULES


RUNS = {
    "16b_v5e": Run(4096, 64, 32, "v5e:16x16", dict(fsdp=256), 6, "maxtext",
                   {1: 0.6110, 2: 0.5937}),
    "32b_v5e": Run(8192, 64, 32, "v5e:16x16", dict(fsdp=256), 4, "maxtext",
                   {1: 0.6686, 2: 0.6481}),
    "64b_v5e": Run(8192, 64, 64, "v5e:16x16", dict(fsdp=256), 2, "maxtext",
                   {1: 0.5990, 2: 0.5666}),
    # MaxText/configs/v5p/{32b,64b}.sh: remat_policy=minimal, which saves every
    # matmul output without batch dimensions: rung's save_dots.
    "32b_v5p": Run(8192, 64, 32, "v5p:4x4x4", dict(fsdp=16, tensor=4), 7, V5P_FLAGS,
                   {1: 0.7147, 2: 0.6943}, remat="save_dots"),
    "64b_v5p": Run(8192, 64, 64, "v5p:4x4x4", dict(fsdp=16, tensor=4), 3, V5P_FLAGS,
                   {1: 0.7031, 2: 0.6726}, remat="save_dots"),
    # MaxText/configs/v5e/128b.sh: remat_policy=minimal_offloaded; rung's nearest
    # is offload_dots (every matmul output to host memory, not only the minimal
    # set). rung's default rules keep the residual stream whole on each of the 16
    # `tensor` chips (its remat checkpoint: 512 MiB per layer, 32 GiB for 64
    # layers, over v5e's 16 GiB); split over `tensor` (MaxText's activation_embed
    # rule) it compiles.
    "128b_v5e": Run(8192, 128, 64, "v5e:16x16", dict(fsdp=16, tensor=16), 1,
                    "maxtext", {1: 0.5606, 2: 0.5582}, d_ff=57344,
                    remat="offload_dots", rules=(("act_embed", ("tensor",)),)),
}
_MICRO = flags.DEFINE_integer(
    "micro_batches", None, "gradient-accumulation micro-batches per step "
    "(default: the fewest the compiler accepts, trying the divisors of each "
    "data-parallel shard's rows in turn; MaxText's runs used 1)", lower_bound=1)
_ONLY = flags.DEFINE_list("only", [], f"configurations to run, of {', '.join(RUNS)} "
                          "(default: all)")
flags.register_validator("only", lambda v: set(v) <= set(RUNS),
                         f"must name configurations of {', '.join(RUNS)}")


def _shard_rows(run: Run, batch_per_device: int | None) -> int:
  """Rows each data-parallel shard holds: the batch per device times the
  devices that share a shard's rows (every mesh axis but `fsdp`)."""
  return (batch_per_device or run.batch_per_device) * math.prod(
      s for a, s in run.mesh.items() if a != "fsdp")


@flags.multi_flags_validator(["micro_batches", "only", "batch_per_device"])
def _check_micro_batches(values) -> bool:
  n = values["micro_batches"]
  for name in values["only"] or RUNS:
    rows = _shard_rows(RUNS[name], values["batch_per_device"])
    if n is not None and rows % n:
      divisors = ", ".join(map(str, micro_batch_counts(rows)))
      raise flags.ValidationError(
          f"--micro_batches={n} does not divide the {rows} rows of each of "
          f"{name}'s data-parallel shards; use one of {divisors} (or --only "
          "other configurations)")
  return True


def config_for(run: Run, slices: int, program: str = "rung"):
  """experiments/llama_1b.py reshaped to `run` (MaxText's base config: untied
  embeddings, SwiGLU, float32 weights and Adam state, bfloat16 compute, flash
  attention, the run's remat), data parallel over `slices`; with
  `program="maxtext"`, activations' embedding split over `tensor` (MaxText's
  `activation_embed` rule) and the lookup a one-hot matmul (`use_iota_embed`)."""
  from experiments import llama_1b
  c = llama_1b.get_config()
  c.model.update(vocab_size=run.vocab, d_model=run.d_model, num_layers=run.layers,
                 num_heads=run.heads, num_kv_heads=run.heads, head_dim=run.head_dim,
                 d_ff=run.d_ff, tie_embeddings=False, remat=run.remat,
                 attention="flash")
  c.data.seq_len = run.seq_len
  chips = math.prod(run.mesh.values())
  c.train.update(batch_size=run.batch_per_device * chips * slices, grad_accum_steps=1)
  c.mesh.update(**{**dict(data=slices, fsdp=1, tensor=1), **run.mesh})
  for name, axes in run.rules:
    c.mesh.rules[name] = axes
  if program == "maxtext":
    c.mesh.rules.act_embed = ("tensor",)
    c.model.embed_lookup = "one_hot"
  return c


def micro_batch_counts(rows: int) -> list[int]:
  """The micro-batch counts a shard of `rows` rows splits into, fewest first."""
  return [n for n in range(1, rows + 1) if rows % n == 0]


def maxtext_flops_per_token(cfg, seq_len: int) -> float:
  """6N + 12·L·H·Q·T: the count of MaxText's tables (causal attention whole)."""
  from model import flops as flops_lib
  return flops_lib.flops_per_token(cfg, seq_len, causal=False)


def main(argv):
  del argv
  import jax
  jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import aot
  from model import ModelConfig
  from sharding.chips import chip_for_topology

  write_rows_to(_ROWS.value)
  emit(what="environment", date=time.strftime("%Y-%m-%d"), jax=jax.__version__)
  rows = []
  for name, run in RUNS.items():
    if _ONLY.value and name not in _ONLY.value:
      continue
    run = dataclasses.replace(
        run, remat=_REMAT.value or run.remat,
        batch_per_device=(_BATCH.value if _BATCH.value is not None
                          else run.batch_per_device))
    variant = dict(program=_PROGRAM.value, remat=run.remat,
                   batch_per_device=run.batch_per_device)  # in every row
    for slices in map(int, _SLICES.value):
      c = config_for(run, slices, _PROGRAM.value)
      for micro in ([_MICRO.value] if _MICRO.value
                    else micro_batch_counts(_shard_rows(run, None))):
        c.train.grad_accum_steps = micro
        start = time.perf_counter()
        report = aot.compile_step(c, run.topology, compiler_flags=run.flags,
                                  slices=slices)
        wall = time.perf_counter() - start
        if not report.error:
          break
        # the compiler refused the plan (memory): no step time; fewer rows at once
        emit(what="refused", config=name, slices=slices, topology=run.topology,
             **variant, micro_batches=micro, published_mfu=run.published[slices],
             total_gib=report.memory["total"] / 2 ** 30,
             temporaries_gib=report.memory["temporaries"] / 2 ** 30,
             hbm_gib=report.memory["hbm"] / 2 ** 30,
             error=report.error.splitlines()[0][:300], compile_s=round(wall, 1))
      if report.error:
        continue
      cfg = ModelConfig.from_config(c.model)
      chip = chip_for_topology(run.topology)
      count = maxtext_flops_per_token(cfg, run.seq_len) * c.train.batch_size \
          * run.seq_len / report.devices  # per device per step
      published_step = count / (run.published[slices] * chip.peak_flops)
      est, roof = report.time.get("estimate"), report.time.get("roofline")
      rows.append(emit(
          what="prediction", config=name, slices=slices, topology=run.topology,
          **variant, micro_batches=micro,
          mesh={a: s for a, s in report.mesh.items() if s > 1},
          batch=c.train.batch_size, fits=report.fits,
          total_gib=report.memory["total"] / 2 ** 30,
          published_mfu=run.published[slices], published_step_s=published_step,
          estimate_step_s=est, predicted_mfu=count / (est * chip.peak_flops),
          roofline_step_s=roof, roofline_mfu=count / (roof * chip.peak_flops),
          mfu_estimate_rung_count=report.mfu_estimate,
          ops_s=report.schedule.get("ops"),
          communication_s=report.schedule.get("communication"),
          exposed_s=report.exposed_communication,
          dcn_bytes=report.schedule.get("collectives", {}).get("dcn_bytes", 0),
          compile_s=round(wall, 1),
          peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                             / 2 ** 20, 2)))
  print()
  print(f"program: {_PROGRAM.value}")
  print("| config | slices | remat | batch / device | micro-batches "
        "| published MFU (step) | predicted MFU (step) | error | roofline MFU "
        "| exposed communication |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    exposed = ", ".join(f"{k} {v:.2f} s" for k, v in r["exposed_s"].items())
    print(f"| {r['config']} | {r['slices']} | {r['remat']} | "
          f"{r['batch_per_device']} | {r['micro_batches']} | "
          f"{r['published_mfu']:.2%} "
          f"({r['published_step_s']:.2f} s) | {r['predicted_mfu']:.1%} "
          f"({r['estimate_step_s']:.2f} s) | "
          f"{100 * (r['predicted_mfu'] - r['published_mfu']):+.1f} pp | "
          f"{r['roofline_mfu']:.1%} | {exposed} |")


if __name__ == "__main__":
  common.run(main)
