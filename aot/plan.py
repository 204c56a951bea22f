"""`plan`: choose a parallelism plan by compiling the candidates for a TPU topology.

Candidates are the factorisations of the topology's device count over the mesh
axes (data, stage, fsdp, expert, sequence, tensor) times the remat policies (and,
with pipeline stages, microbatch counts and schedules: `pipeline_choices`), kept when
they pass the same validation `train` runs (`train/validate.py`). Each is compiled
deviceless (`aot/compile.py`) and the plans are ranked: those that fit in HBM
first, then by estimated step time, then by memory per device.

The step time plans are ranked by is compile's schedule estimate
(`aot/schedule.py`): the compiled program's ops in their scheduled order, each at
max(FLOPs / peak, HBM bytes / bandwidth), loop bodies times their trip counts,
collectives timed as ring algorithms on the slice's torus and counted only where
the schedule does not hide them behind compute. Plans that differ in how much
communication they expose therefore get different times, which the roofline,
max(compute, HBM, ICI), could not give: it assumes perfect overlap and the whole
ICI bandwidth per collective (on llama_1b / v5p:2x2x2 it tied 14 plans). The
roofline and its MFU bound are still listed. XLA's own estimate (`optimal_seconds`)
is not used: it counts each while-loop body once (0.0237, 0.0245 and 0.0246 s for
1, 2 and 4 scanned layers of llama_1b). `compiler_flags` (libtpu options) apply to
every candidate's compile.

The search stays small: `expert` > 1 only for MoE models (it would only replicate
dense work), `sequence` > 1 only when asked, plans whose train state and batch
alone exceed HBM are marked without compiling, and `max_plans` caps the compiles
(in `candidate_meshes`' order: plans without pipeline stages first).

DiLoCo is the config's choice, not the plan's (it changes the training
algorithm): the config's `mesh.diloco` replicas are kept in every candidate and
the other axes factor the devices left to each replica. A DiLoCo plan's step time
is the inner step's estimate plus its fragments' synchronisations amortised over
`diloco.sync_every` inner steps (`Plan.sync_time`), so plans whose outer
exchanges cost more rank lower.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import sys
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

import sharding
from aot.compile import (Report, compile_step, devices_per_chip, state_bytes,
                         topology_devices)
from model.config import REMAT
from sharding import ConfigError
from sharding.report import count
from sharding.chips import chip_for_topology
from train.validate import validate_config


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  remat: str
  fits: bool | None          # None: not compiled (max_plans reached)
  step_time: float           # schedule-estimate seconds; NaN when not compiled
  memory: float              # total bytes per device (state alone when not compiled)
  mfu_bound: float
  note: str = ""
  report: Report | None = None
  roofline: float = math.nan       # seconds
  mfu_estimate: float = math.nan
  exposed: dict[str, float] = dataclasses.field(default_factory=dict)  # s per axes
  sync_time: float = 0.0     # DiLoCo: synchronisations, seconds per inner step
  #                            (included in step_time)
  microbatches: int = 1      # pipeline microbatches (mesh.stage > 1)
  schedule: str = "gpipe"    # pipeline schedule (mesh.stage > 1)

  def flags(self) -> str:
    """The plan as command-line overrides."""
    return " ".join([f"--config.mesh.{a}={self.mesh[a]}" for a in sharding.AXES]
                    + [f"--config.model.remat={self.remat}"]
                    + ([f"--config.pipeline.microbatches={self.microbatches}",
                        f"--config.pipeline.schedule={self.schedule}"]
                       if self.mesh.get("stage", 1) > 1 else []))

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready; `schedule` is None for a plan without pipeline stages."""
    out = dataclasses.asdict(dataclasses.replace(self, report=None))
    if self.mesh.get("stage", 1) == 1:
      out["schedule"] = None
    out["report"] = self.report.to_dict() if self.report else None
    out["flags"] = self.flags()
    return sharding.json_ready(out)


def candidate_meshes(num_devices: int, *, experts: bool = False,
                     sequence: bool = False, diloco: int = 1) -> list[dict[str, int]]:
  """Every {axis: size} whose sizes multiply to `num_devices`; expert and sequence
  stay 1 unless allowed, `diloco` is always the given replica count (DiLoCo
  changes the training algorithm, which a plan does not choose). Ordered, for
  `max_plans`, so a capped search compiles the plainest plans first: no pipeline
  stages before stages, then by tensor and sequence size, then the most sharded
  state first (fsdp x expert, an MoE's experts being its state's bulk), then fewer
  experts before more."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  out = []
  for sizes in itertools.product(divisors, repeat=len(sharding.AXES)):
    mesh = dict(zip(sharding.AXES, sizes))
    if math.prod(sizes) != num_devices or mesh["diloco"] != diloco:
      continue
    if (mesh["expert"] > 1 and not experts) or (mesh["sequence"] > 1 and not sequence):
      continue
    out.append(mesh)
  return sorted(out, key=lambda m: (m["stage"], m["tensor"], m["sequence"],
                                    -m["fsdp"] * m["expert"], m["expert"]))


def plan(config, topology: str, *, remats: Sequence[str] | None = None,
         sequence: bool = False, max_plans: int | None = None,
         meshes: Iterable[dict[str, int]] | None = None,
         progress: bool = True,
         compiler_flags: str | dict | None = None,
         slices: int = 1) -> list[Plan]:
  """Ranked plans for `config` on `topology` (best first). `meshes` replaces the
  enumeration (each a {axis: size} dict, missing axes 1 and a missing `diloco`
  the config's); `remats` defaults to every policy; `compiler_flags`: libtpu
  options for every compile
  (`aot.compile.parse_flags`); `slices`: copies of the slice over DCN, which a
  mesh's outer axes must span (`sharding.mesh.slice_split`)."""
  if max_plans is not None and max_plans < 1:
    raise ConfigError("--max_plans", f"is {max_plans}; it caps how many candidate "
                      "plans are compiled, so it must be at least 1.",
                      "pass e.g. --max_plans=12, or leave it out to compile every "
                      "candidate.")
  devices = topology_devices(topology, slices)
  chip = chip_for_topology(topology).per_device(devices_per_chip(devices))
  remats = tuple(remats or REMAT)
  for r in remats:
    if r not in REMAT:
      raise ConfigError("model.remat", f"{r!r} is not one of {REMAT}.",
                        f"plan over some of {', '.join(REMAT)}.")
  diloco = int(config.mesh.diloco)
  if diloco < 1 or len(devices) % diloco:
    raise ConfigError("mesh.diloco", f"is {diloco}; plan keeps the config's DiLoCo "
                      f"replicas and factors the rest of {topology}'s "
                      f"{count(len(devices), 'device')}, so it must divide {len(devices)}.",
                      "pass --config.mesh.diloco=1 (no DiLoCo) or a divisor of "
                      f"{len(devices)}.")
  if meshes is None:
    meshes = candidate_meshes(len(devices), experts=_num_experts(config) > 0,
                              sequence=sequence, diloco=diloco)
  candidates, refused = [], {}  # refused: ConfigError message -> (error, count)
  for mesh in meshes:
    mesh = {a: int(mesh.get(a, diloco if a == "diloco" else 1)) for a in sharding.AXES}
    for micro, schedule in pipeline_choices(config, mesh["stage"]):
      for remat in remats:
        c = _override(config, mesh, remat, micro, schedule)
        try:
          validate_config(c, len(devices))
          if slices > 1:
            sharding.mesh.slice_split(mesh, slices)
        except ConfigError as err:
          seen = refused.get(str(err), (err, 0))
          refused[str(err)] = (err, seen[1] + 1)
          continue
        candidates.append((mesh, remat, (micro, schedule), c))
  if slices > 1:  # data parallelism over DCN first, as multi-slice runs are laid out
    # (the outer axes span the slices: with data=1, FSDP's gathers would cross DCN)
    # (DiLoCo's replicas are outermost: with diloco a multiple of the slices, they
    # already span them, and every candidate is laid out alike)
    candidates.sort(key=lambda cand: cand[0]["diloco"] * cand[0]["data"] % slices != 0)
  if not candidates:
    if refused:  # the reasons most candidates gave, one per field
      total, top = sum(c for _, c in refused.values()), {}
      for err, n in sorted(refused.values(), key=lambda e: -e[1]):
        top.setdefault(err.field, (err, n))
      reasons = list(top.values())[:3]
      raise ConfigError(reasons[0][0].field, f"no mesh of {count(len(devices), 'device')} "
                        "passes validation for this config. Of the "
                        f"{total} candidates, " + "; ".join(
                            f"{n} say: `{e.field}`: {e.problem.rstrip('.')}" for e, n in reasons),
                        reasons[0][0].fix)
    raise ConfigError("mesh", f"no mesh of {count(len(devices), 'device')} passes validation "
                      "for this config.", "check the config with "
                      "`python -m experiment compile` and one explicit mesh.")

  plans, floors, compiled = [], {}, 0
  bar = tqdm(candidates, desc=f"plan {f'{slices} x ' if slices > 1 else ''}{topology}",
             disable=not progress,
             dynamic_ncols=True,  # piped into a log: a line a minute, not a wall
             mininterval=0.1 if sys.stderr.isatty() else 60)
  for mesh, remat, (micro, schedule), c in bar:
    bar.set_postfix_str(" ".join(f"{a}={s}" for a, s in mesh.items() if s > 1)
                        + f" remat={remat}"
                        + (f" {schedule} M={micro}" if mesh["stage"] > 1 else ""),
                        refresh=sys.stderr.isatty())  # a log gets the bar's own pace
    pipe = dict(microbatches=micro, schedule=schedule)
    key = tuple(mesh.values())
    if key not in floors:
      floors[key] = state_bytes(c, devices)
    if floors[key] > chip.hbm_bytes:
      plans.append(Plan(mesh, remat, False, math.nan, floors[key], math.nan,
                        f"state and batch alone need "
                        f"{sharding.format_bytes(floors[key])} per device",
                        **pipe))
      continue
    if max_plans is not None and compiled >= max_plans:
      plans.append(Plan(mesh, remat, None, math.nan, floors[key], math.nan,
                        f"not compiled: max_plans={max_plans} reached",
                        **pipe))
      continue
    compiled += 1
    try:
      report = compile_step(c, topology, devices=devices,
                            compiler_flags=compiler_flags)
    except Exception as err:  # noqa: BLE001 -- one failing plan must not end the search
      plans.append(Plan(mesh, remat, False, math.nan, floors[key], math.nan,
                        f"compile failed: {str(err).strip().splitlines()[0]}",
                        **pipe))
      continue
    note = report.error.splitlines()[0] if report.error else ""
    if report.unknown_trip_counts:
      note = (f"{report.unknown_trip_counts} loop(s) of unknown trip count "
              "counted once: time too low")
    inner = report.time.get("estimate", math.nan)
    syncs = report.diloco_syncs
    sync_time = sum(s["seconds"] for s in syncs) / syncs[0]["sync_every"] if syncs else 0.0
    fits = report.fits and all(s["fits"] for s in syncs)
    if syncs:
      note = "; ".join(filter(None, [
          f"incl. DiLoCo syncs {sync_time * 1e3:.2f} ms/step "
          f"(every {syncs[0]['sync_every']})",
          "a sync does not fit" if report.fits and not fits else "", note]))
    mfu = report.mfu_estimate * inner / (inner + sync_time) if inner > 0 else math.nan
    plans.append(Plan(mesh, remat, fits, inner + sync_time,
                      report.memory["total"], report.mfu_bound, note, report,
                      report.time.get("roofline", math.nan), mfu,
                      report.exposed_communication, sync_time, **pipe))
  bar.close()
  return sorted(plans, key=_rank)


def _rank(p: Plan):
  fit = {True: 0, None: 1, False: 2}[p.fits]
  time = p.step_time if math.isfinite(p.step_time) else math.inf
  memory = p.memory if math.isfinite(p.memory) else math.inf
  return fit, time, memory


def _num_experts(config) -> int:
  moe = config.model.get("moe")
  return int(moe.get("num_experts", 0)) if moe is not None else 0


def pipeline_choices(config, stages: int) -> tuple[tuple[int, str], ...]:
  """(microbatches, schedule) pairs a plan tries: the config's own without
  stages; with S stages GPipe at M = S and 4S (bubbles (S-1)/(2S-1) and
  (S-1)/(5S-1)) and 1F1B at 4S (bubble 2(S-1)/(6S-2), memory that does not grow
  with M); those the batch cannot split are dropped by validation."""
  p = config.get("pipeline")
  if stages == 1:
    return ((int(p.microbatches) if p is not None else 1,
             str(p.schedule) if p is not None else "gpipe"),)
  return ((stages, "gpipe"), (4 * stages, "gpipe"), (4 * stages, "1f1b"))


def _override(config, mesh: dict[str, int], remat: str, microbatches: int = 1,
              schedule: str = "gpipe"):
  c = copy.deepcopy(config)
  c.mesh.update(**mesh)
  c.model.remat = remat
  if "pipeline" in c:
    c.pipeline.microbatches = microbatches
    if mesh["stage"] > 1:
      c.pipeline.update(schedule=schedule, repeats=1)
  return c


def table(plans: list[Plan], topology: str | None = None, slices: int = 1) -> str:
  """The ranked plans, one line each, and the winner as override flags; headed by
  the topology, slices and chip when `topology` is given."""
  size = sharding.format_bytes
  head = []
  if topology and plans:
    chip = chip_for_topology(topology)
    where = f"{slices} x {topology} over DCN" if slices > 1 else topology
    head = [f"plans on {where}: {math.prod(plans[0].mesh.values())} x TPU {chip.name} "
            f"({size(chip.hbm_bytes)} HBM each), fitting plans first, by the schedule "
            "estimate", ""]
  rows = [("#", "mesh", "remat", "fits", "memory/device", "step (estimate)",
           "MFU est.", "exposed comm (ms)", "roofline", "MFU bound", "note")]
  for i, p in enumerate(plans, 1):
    mesh = " ".join(f"{a}={s}" for a, s in p.mesh.items() if s > 1) or "1 device"
    if p.mesh.get("stage", 1) > 1:
      mesh += f" ({p.schedule} M={p.microbatches})"
    fits = {True: "yes", False: "no", None: "?"}[p.fits]
    rows.append((str(i), mesh, p.remat, fits,
                 # not compiled: what the state and batch alone need
                 ("" if p.report else ">= ") + size(p.memory)
                 if math.isfinite(p.memory) else "-",
                 f"{p.step_time * 1e3:.2f} ms" if math.isfinite(p.step_time) else "-",
                 f"{p.mfu_estimate:.1%}" if math.isfinite(p.mfu_estimate) else "-",
                 " ".join(f"{a} {t * 1e3:.2f}" for a, t in sorted(p.exposed.items()))
                 if p.report else "-",
                 f"{p.roofline * 1e3:.2f} ms ({p.report.bound()})"
                 if math.isfinite(p.roofline) else "-",
                 f"{p.mfu_bound:.1%}" if math.isfinite(p.mfu_bound) else "-", p.note))
  lines = head + [sharding.format_rows(rows)]
  best = next((p for p in plans if p.fits), None)
  lines.append("")
  flags = next((p.report.compiler_flags for p in plans if p.report), {})
  if flags:
    lines.append("compiler flags: " + " ".join(
        f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()))
  lines.append(f"best: {best.flags()} (with this command's other --config overrides "
               "and flags)" if best else none_fits(plans) + ".")
  return "\n".join(lines)


def none_fits(plans: list[Plan], hbm: str = "in HBM") -> str:
  """What a plan search without a fitting plan found: 'no plan fits in HBM', or,
  where `max_plans` left plans uncompiled, how many of each and what to do."""
  left = sum(p.fits is None for p in plans)
  if not left:
    return f"no plan fits {hbm}"
  tried = len(plans) - left  # compiled, or sized past the HBM without compiling
  return (f"no plan of the {tried} tried fits {hbm}, and {count(left, 'plan')} "
          f"{'was' if left == 1 else 'were'} not compiled (max_plans): raise "
          "--max_plans to try them")
