"""`plan`: choose a parallelism plan by compiling the candidates for a TPU topology.

Candidates are the factorisations of the topology's device count over the mesh
axes (data, fsdp, expert, sequence, tensor) times the remat policies, kept when
they pass the same validation `train` runs (`train/validate.py`). Each is compiled
deviceless (`aot/compile.py`) and the plans are ranked: those that fit in HBM
first, then by estimated step time, then by memory per device.

The step-time estimate is compile's roofline, max(compute, HBM, ICI): the compiled
program's FLOPs, HBM bytes and collective bytes per device (loop trip counts
included, `aot/costs.py`) over the chip's peak FLOP/s, HBM and ICI bandwidth
(`sharding/chips.py`). It is not XLA's own estimate (`optimal_seconds`), because
that counts each while-loop body once: for the scanned layers of llama_1b it gave
0.0237, 0.0245 and 0.0246 s for 1, 2 and 4 layers, so it would rank plans by the
work outside the layers. The roofline assumes compute, memory traffic and
communication overlap perfectly and that a collective gets the chip's whole ICI
bandwidth, so it is a lower bound that flatters communication-heavy plans; what
it ranks is which resource bounds each plan, and by how much.

The search stays small: `expert` > 1 only for MoE models (it would only replicate
dense work), `sequence` > 1 only when asked, plans whose train state and batch
alone exceed HBM are marked without compiling, and `max_plans` caps the compiles.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

import sharding
from aot.compile import (Report, compile_step, devices_per_chip, state_bytes,
                         topology_devices)
from model.config import REMAT
from sharding import ConfigError
from sharding.chips import chip_for_topology
from train.validate import validate_config


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  remat: str
  fits: bool | None          # None: not compiled (max_plans reached)
  step_time: float           # roofline seconds; NaN when not compiled
  memory: float              # total bytes per device (state alone when not compiled)
  mfu_bound: float
  note: str = ""
  report: Report | None = None

  def flags(self) -> str:
    """The plan as command-line overrides."""
    return " ".join([f"--config.mesh.{a}={self.mesh[a]}" for a in sharding.AXES]
                    + [f"--config.model.remat={self.remat}"])

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(dataclasses.replace(self, report=None))
    out["report"] = self.report.to_json() if self.report else None
    out["flags"] = self.flags()
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()}


def candidate_meshes(num_devices: int, *, experts: bool = False,
                     sequence: bool = False) -> list[dict[str, int]]:
  """Every {axis: size} whose sizes multiply to `num_devices`; expert and sequence
  stay 1 unless allowed. Ordered by tensor, sequence and expert size, then with
  FSDP before data (sharded state first)."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  out = []
  for sizes in itertools.product(divisors, repeat=len(sharding.AXES)):
    mesh = dict(zip(sharding.AXES, sizes))
    if math.prod(sizes) != num_devices:
      continue
    if (mesh["expert"] > 1 and not experts) or (mesh["sequence"] > 1 and not sequence):
      continue
    out.append(mesh)
  return sorted(out, key=lambda m: (m["tensor"], m["sequence"], m["expert"],
                                    -m["fsdp"]))


def plan(config, topology: str, *, remats: Sequence[str] | None = None,
         sequence: bool = False, max_plans: int | None = None,
         meshes: Iterable[dict[str, int]] | None = None,
         progress: bool = True) -> list[Plan]:
  """Ranked plans for `config` on `topology` (best first). `meshes` replaces the
  enumeration (each a {axis: size} dict, missing axes 1); `remats` defaults to
  every policy."""
  devices = topology_devices(topology)
  chip = chip_for_topology(topology).per_device(devices_per_chip(devices))
  remats = tuple(remats or REMAT)
  for r in remats:
    if r not in REMAT:
      raise ConfigError("model.remat", f"{r!r} is not one of {REMAT}.",
                        f"plan over some of {', '.join(REMAT)}.")
  if meshes is None:
    meshes = candidate_meshes(len(devices), experts=_num_experts(config) > 0,
                              sequence=sequence)
  candidates = []
  for mesh in meshes:
    mesh = {a: int(mesh.get(a, 1)) for a in sharding.AXES}
    for remat in remats:
      c = _override(config, mesh, remat)
      try:
        validate_config(c, len(devices))
      except ConfigError:
        continue
      candidates.append((mesh, remat, c))
  if not candidates:
    raise ConfigError("mesh", f"no mesh of {len(devices)} devices passes validation "
                      "for this config.", "check the config with "
                      "`python -m experiment compile` and one explicit mesh.")

  plans, floors, compiled = [], {}, 0
  bar = tqdm(candidates, desc=f"plan {topology}", disable=not progress,
             dynamic_ncols=True)
  for mesh, remat, c in bar:
    bar.set_postfix_str(" ".join(f"{a}={s}" for a, s in mesh.items() if s > 1)
                        + f" remat={remat}")
    key = tuple(mesh.values())
    if key not in floors:
      floors[key] = state_bytes(c, devices)
    if floors[key] > chip.hbm_bytes:
      plans.append(Plan(mesh, remat, False, math.nan, floors[key], math.nan,
                        f"state and batch alone need "
                        f"{sharding.format_bytes(floors[key])} per device"))
      continue
    if max_plans is not None and compiled >= max_plans:
      plans.append(Plan(mesh, remat, None, math.nan, floors[key], math.nan,
                        f"not compiled: max_plans={max_plans} reached"))
      continue
    compiled += 1
    try:
      report = compile_step(c, topology, devices=devices)
    except Exception as err:  # noqa: BLE001 -- one failing plan must not end the search
      plans.append(Plan(mesh, remat, False, math.nan, floors[key], math.nan,
                        f"compile failed: {str(err).strip().splitlines()[0]}"))
      continue
    plans.append(Plan(mesh, remat, report.fits, report.time.get("roofline", math.nan),
                      report.memory["total"], report.mfu_bound,
                      report.error.splitlines()[0] if report.error else "", report))
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


def _override(config, mesh: dict[str, int], remat: str):
  c = copy.deepcopy(config)
  c.mesh.update(**mesh)
  c.model.remat = remat
  return c


def table(plans: list[Plan]) -> str:
  """The ranked plans, one line each, and the winner as override flags."""
  size = sharding.format_bytes
  rows = [("#", "mesh", "remat", "fits", "memory/device", "step (roofline)",
           "MFU bound", "note")]
  for i, p in enumerate(plans, 1):
    mesh = " ".join(f"{a}={s}" for a, s in p.mesh.items() if s > 1) or "1 device"
    fits = {True: "yes", False: "no", None: "?"}[p.fits]
    rows.append((str(i), mesh, p.remat, fits,
                 # not compiled: what the state and batch alone need
                 ("" if p.report else ">= ") + size(p.memory)
                 if math.isfinite(p.memory) else "-",
                 f"{p.step_time * 1e3:.2f} ms ({p.report.bound()})"
                 if math.isfinite(p.step_time) else "-",
                 f"{p.mfu_bound:.1%}" if math.isfinite(p.mfu_bound) else "-", p.note))
  lines = [sharding.format_rows(rows)]
  best = next((p for p in plans if p.fits), None)
  lines.append("")
  lines.append(f"best: {best.flags()}" if best else "no plan fits in HBM.")
  return "\n".join(lines)
