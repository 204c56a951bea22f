"""Step time from the compiled schedule: what `compile` reports as `time.estimate`
and `plan` ranks by.

The TPU compiler emits each computation's instructions in the order it scheduled
them. This module walks that order on one device (every device runs the same SPMD
program) with two clocks, the TensorCore's and the ICI's:

- an op (fusion, copy, kernel, ...) advances the core by max(FLOPs / matmul
  FLOP/s, HBM bytes / HBM bandwidth): FLOPs and bytes as `aot/costs.py` counts them, the
  chip figures from `sharding/chips.py`. Matmul FLOPs (dots, convolutions and
  Pallas kernels) run at the chip's `matmul_efficiency` times its peak: the
  fraction a large matmul reached in the one published TPU measurement (0.923 on
  v5e, used for every TPU); no per-shape figure is published, so the
  estimate is optimistic for small or oddly shaped matmuls;
- a loop body runs its trip count times (`aot/hlo.py`), a call once, a conditional
  as its slowest branch;
- an asynchronous collective (`all-gather-start` ... `all-gather-done`, `async-start`
  ... `async-done`, or a TPU collective fusion `AsyncCollectiveStart` ...
  `AsyncCollectiveDone`) starts on the ICI clock when it is issued and lets the core
  run on; at its done the core waits only for what is left, and that wait is the
  collective's *exposed* time;
- a synchronous collective holds the core for its whole time, all exposed; one
  inside a fusion with other work (a TPU all-reduce-scatter, a collective matmul
  step) runs alongside that work, and only what exceeds it is exposed;
- collectives share the links: one starts when the previous one has finished.
- asynchronous copies (`copy-start` / `copy-done`: prefetches between HBM and the
  core's memories) and bookkeeping (tuples, bitcasts, parameters) cost nothing;
- asynchronous DMAs (`slice-start`, `dynamic-slice-start`,
  `dynamic-update-slice-start`: slices prefetched into VMEM, remat residuals moved
  between HBM and host memory) run beside the core and cost it nothing; the bytes
  moved to and from host memory are counted (`collectives["host_bytes"]`), but the
  host link's time is not modelled;
- the HBM is one: the step takes at least all its traffic (the ops' and the
  DMAs', as `aot/costs.py` counts it) over the HBM bandwidth. A program whose
  weights stream in through DMAs beside the core (a decode step) is held to that
  floor (`Estimate.hbm`), so the estimate is never below the roofline's HBM term.

A collective's time is that of its algorithm on the slice's torus, for the
physical axes its replica group spans (read from the devices' coordinates):
ring all-gather, reduce-scatter and all-reduce (reduce-scatter then all-gather),
split over the spanned axes that run concurrently (one ring phase per axis, each
axis order carrying an equal share, as the TPU's multi-dimensional collectives do),
bidirectional on an axis with wraparound links and one-way on a line; latency
one hop time per ring step. All-to-all is a quarter of the all-gather of the same
bytes (the bidirectional-ring figure of the scaling book); a collective-permute is
its bytes over one link plus the hops between the farthest pair. See `ring_time`.
Per-link bandwidth, hop latency and wraparound: `sharding/chips.py`, with sources.

Several slices (`--slices`): a group whose devices sit in several slices adds one
more ring phase, over the data-center network, whose length is the number of
slices and whose bandwidth is the chip's DCN share (`Chip.dcn_bandwidth`) one way,
with no latency charged; the ICI phases run over the group's part in one slice.

What it leaves out: the overlap of independent ops with each other (one op at a
time), VMEM reuse across fusions, contention of concurrent collectives on a link
beyond serialising them, DCN latency and congestion, host-offload transfer time,
and host work between steps.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from aot import costs as costs_lib
from aot import hlo
from sharding.chips import Chip

_FREE = costs_lib._NO_TRAFFIC | {"copy-start", "copy-done"}


@dataclasses.dataclass(frozen=True)
class Torus:
  """The slice's ICI network as the compiled program sees it: device id (the
  index in the compile's device order) -> chip coordinates, axis lengths, which
  axes wrap around, per-link bandwidth (bytes/s one way) and per-hop latency (s)."""
  coords: tuple[tuple[int, ...], ...]
  shape: tuple[int, ...]
  wraps: tuple[bool, ...]
  link_bandwidth: float
  hop_latency: float
  hbm_bandwidth: float  # for "collectives" among devices of one chip (v4's cores)
  slices: tuple[int, ...] = ()  # each device's slice (empty: all in one slice)
  dcn_bandwidth: float = 0.0    # bytes/s per chip between slices, one way

  @classmethod
  def from_coords(cls, coords: Sequence[Sequence[int]], chip: Chip,
                  slices: Sequence[int] = ()) -> Torus:
    coords = tuple(tuple(int(x) for x in c) for c in coords)
    shape = tuple(max(c[d] for c in coords) + 1 for d in range(len(coords[0])))
    return cls(coords, shape, tuple(chip.wraps(n) for n in shape),
               chip.ici_link_bandwidth, chip.ici_hop_latency, chip.hbm_bandwidth,
               tuple(int(x) for x in slices) if len(set(slices)) > 1 else (),
               chip.dcn_bandwidth)

  @classmethod
  def from_devices(cls, devices, chip: Chip) -> Torus:
    """From jax devices in the compile's order (e.g. `mesh.devices.flat`)."""
    return cls.from_coords([getattr(d, "coords", (d.id,)) for d in devices], chip,
                           [getattr(d, "slice_index", 0) for d in devices])


def ring_time(kind: str, nbytes: float, lengths: Sequence[int],
              rings: Sequence[bool], link_bandwidth: float | Sequence[float],
              hop_latency: float | Sequence[float]) -> float:
  """Seconds for a collective of `nbytes` over a group spanning torus axes of
  `lengths` chips (`rings[i]`: axis i wraps around). `link_bandwidth` and
  `hop_latency` are one figure for every axis or one per axis (a DCN phase).

  `nbytes` is the whole array: an all-gather's result, a reduce-scatter's operand,
  an all-reduce's or all-to-all's operand. An all-gather over one axis of k chips
  sends each link, per direction, (k-1)/k x nbytes / f, f = 2 on a ring (both
  directions) and 1 on a line. Over several axes it runs as one phase per axis;
  with A axes, A orders of the axes (rotations) each carry nbytes/A at once, and
  the busiest axis sets the time. Latency: one hop per ring step, (k-1)/f steps
  per axis. Reduce-scatter takes as long as all-gather; all-reduce twice;
  all-to-all a quarter."""
  n = len(lengths)
  bw = [link_bandwidth] * n if isinstance(link_bandwidth, (int, float)) \
      else list(link_bandwidth)
  lat = [hop_latency] * n if isinstance(hop_latency, (int, float)) \
      else list(hop_latency)
  axes = [(k, 2 if ring else 1, b, t)
          for k, ring, b, t in zip(lengths, rings, bw, lat) if k > 1]
  if not axes:
    return 0.0
  total = math.prod(k for k, *_ in axes)
  load = [0.0] * len(axes)
  for r in range(len(axes)):
    held = nbytes / len(axes) / total  # what a device holds before the phases
    for i in [(r + j) % len(axes) for j in range(len(axes))]:
      k, f, _, _ = axes[i]
      load[i] += (k - 1) * held / f
      held *= k
  seconds = max(x / b for x, (_, _, b, _) in zip(load, axes)) + sum(
      t * math.ceil((k - 1) / f) for k, f, _, t in axes)
  return {"all-gather": 1.0, "reduce-scatter": 1.0, "all-reduce": 2.0,
          "all-to-all": 0.25, "ragged-all-to-all": 0.25}[kind] * seconds


def collective_seconds(kind: str, nbytes: float, groups, torus: Torus) -> float:
  """Seconds for one execution of a collective with these replica groups
  (`aot.hlo.replica_groups`: ids index `torus.coords`; pairs for a permute).
  Groups of one device each move nothing: 0."""
  if groups and kind != "collective-permute" and all(len(g) == 1 for g in groups):
    return 0.0
  if not groups or max(map(max, groups)) >= len(torus.coords):
    groups = [list(range(len(torus.coords)))]
  coords = np.array(torus.coords)
  slice_of = np.array(torus.slices or (0,) * len(torus.coords))
  if kind == "collective-permute":
    if any(slice_of[src] != slice_of[dst] for src, dst in groups):
      return nbytes / torus.dcn_bandwidth
    hops = 0
    for src, dst in groups:
      delta = np.abs(coords[src] - coords[dst])
      hops = max(hops, int(sum(min(d, n - d) if w else d for d, n, w
                               in zip(delta, torus.shape, torus.wraps))))
    if hops == 0:
      return nbytes / torus.hbm_bandwidth
    return nbytes / torus.link_bandwidth + hops * torus.hop_latency
  members = coords[groups[0]]
  spanned = len(set(slice_of[groups[0]].tolist()))  # slices the group spans
  lengths = [len(set(members[:, d].tolist())) for d in range(members.shape[1])]
  if all(k == 1 for k in lengths) and spanned == 1:  # cores of one chip
    return nbytes / torus.hbm_bandwidth
  if math.prod(lengths) * spanned != len(groups[0]):  # not a sub-grid: a line
    lengths, rings = [len(groups[0]) // spanned], [False]
  else:
    rings = [torus.wraps[d] and k == torus.shape[d] for d, k in enumerate(lengths)]
  bandwidth = [torus.link_bandwidth] * len(lengths) + [torus.dcn_bandwidth]
  latency = [torus.hop_latency] * len(lengths) + [0.0]
  return ring_time(kind, nbytes, lengths + [spanned], rings + [False], bandwidth,
                   latency)


@dataclasses.dataclass
class Estimate:
  """One step on one device, in seconds."""
  seconds: float                 # the step: the core's clock at the end
  ops: float                     # time of the ops alone (no waiting)
  communication: float           # all collectives' times, overlapped or not
  exposed: dict[str, float]      # waits for collectives, by the mesh axes they span
  #                                ("fsdp", "data+fsdp", "?" when not known)
  collectives: dict[str, int]    # asynchronous / synchronous, executions per step;
  #                                dcn_bytes: what a device sends to other slices
  dcn_seconds: float = 0.0       # the DCN link's busy time (--slices), overlapped
  #                                or not: received bytes / Chip.dcn_bandwidth
  hbm: float = 0.0               # all HBM traffic (ops' and DMAs') / bandwidth: the
  #                                floor `seconds` is held to


def dcn_seconds(kind: str, nbytes: float, torus: Torus) -> float:
  """Seconds for a collective between all of `torus`'s slices over DCN; `nbytes`
  is what one device sends into it (an all-gather's piece, else the operand)."""
  slices = len(set(torus.slices)) or 1
  if kind == "collective-permute":
    return nbytes / torus.dcn_bandwidth
  whole = nbytes * slices if kind == "all-gather" else nbytes
  return ring_time(kind, whole, [slices], [False], torus.dcn_bandwidth, 0.0)


def estimate(hlo_text: str, chip: Chip, torus: Torus,
             mesh_axes: Sequence[str] = (), mesh_shape: Sequence[int] = (),
             kernel_flops: float = 0.0, dcn_axes: str = "dcn") -> Estimate:
  """Walks the compiled module's schedule (module docstring). `kernel_flops`:
  FLOPs per execution of a Pallas kernel that carries no cost estimate (compile
  spreads the model's attention FLOPs over the kernel calls). `dcn_axes`: the
  key under which waits for collectives between slices are exposed (`compile`
  passes the mesh axes that span the slices and " (DCN)", e.g. "data (DCN)", the
  key of their received bytes). A collective between slices compiles to a `send`
  (its start) and a `recv-done` (its end) that the megascale runtime carries; it
  runs on its own DCN clock, beside the ICI's."""
  comps = hlo.parse(hlo_text)
  instrs = hlo.instructions(comps)
  n_devices = len(torus.coords)
  if not mesh_shape:
    mesh_axes, mesh_shape = ("devices",), (n_devices,)

  matmul_rate = chip.peak_flops * chip.matmul_efficiency  # FLOP/s

  @functools.cache
  def fused_flops(name: str) -> float:
    total = 0.0
    for ins in comps.get(name, []):
      if ins.opcode in ("convolution", "dot"):
        total += costs_lib._matmul_flops(ins, instrs)
      for c in ins.called:
        total += fused_flops(c)
    return total

  def op_cost(ins) -> tuple[float, float]:
    """(core seconds, HBM seconds) of an op: max(matmul FLOPs at the matmul rate,
    its HBM traffic as aot/costs.py counts it at the HBM bandwidth), and the
    latter alone (a DMA's, which does not hold the core, counts there too)."""
    if ins.opcode in _FREE or ins.opcode.endswith("-done") or (
        ins.opcode == "custom-call" and not costs_lib._is_kernel(ins)):
      return 0.0, 0.0
    if ins.opcode == "custom-call":  # a kernel: its cost estimate's FLOPs if any
      flops = float((costs_lib._cost_estimate(ins) or {}).get("flops", kernel_flops))
    elif ins.opcode in ("convolution", "dot"):
      flops = costs_lib._matmul_flops(ins, instrs)
    else:
      flops = sum(fused_flops(c) for c in ins.called)
    hbm = costs_lib._traffic(ins, instrs, comps) / chip.hbm_bandwidth
    return max(flops / matmul_rate, hbm), hbm

  def comm(coll, outer) -> tuple[float, str]:
    """(seconds, axes key) of one execution; `outer` holds it (a fusion)."""
    kind = hlo.collective_kind(coll, outer)
    nbytes = costs_lib._result_bytes(coll, kind)
    if kind == "reduce-scatter" and coll.opcode.startswith("reduce-scatter"):
      nbytes *= len((hlo.replica_groups(coll) or [[0] * n_devices])[0])
    groups = hlo.replica_groups(coll)
    seconds = collective_seconds(kind, nbytes, groups, torus)
    if not groups:
      groups = [list(range(n_devices))]
    known = groups is not None and max(map(max, groups)) < math.prod(mesh_shape)
    axes = costs_lib.group_axes(groups, mesh_axes, mesh_shape) if known else ()
    return seconds, "+".join(axes) or "?"

  async_channels = hlo.async_channels(comps)

  @functools.cache
  def walk(name: str) -> tuple[float, float, float, tuple]:
    """(seconds, op seconds, communication seconds, exposed items) of one run."""
    core = link = dcn = ops = communication = 0.0
    exposed = collections.Counter()
    inflight: dict[str, tuple[float, str]] = {}
    alias: dict[str, str] = {}
    for ins in comps.get(name, []):
      if ins.opcode == "while":
        body, cond, trips = hlo.loop_parts(ins, comps, instrs)
        trips = 1 if trips is None else trips
        parts = [(body, trips), (cond, trips + 1)]
      elif ins.opcode == "call":
        parts = [(c, 1) for c in ins.called]
      elif ins.opcode == "conditional":
        parts = [(max(ins.called, key=lambda c: walk(c)[0]), 1)] if ins.called else []
      else:
        parts = None
      if parts is not None:
        for c, times in parts:
          s, o, m, e = walk(c)
          core, ops, communication = core + times * s, ops + times * o, \
              communication + times * m
          for k, v in e:
            exposed[k] += times * v
        link = max(link, core)
        continue
      between = hlo.dcn_role(ins, instrs)
      if between is not None:
        what, key, kind = between
        if what == "start":
          nbytes = hlo.shape_bytes(ins.shape.strip("()").split(", ")[0])  # payload
          seconds = dcn_seconds(kind, nbytes, torus)
          dcn = max(core, dcn) + seconds
          inflight["dcn:" + key] = (dcn, dcn_axes)
          communication += seconds
          exposed["#asynchronous"] += 1
          exposed["#dcn_bytes"] += nbytes
          exposed["#dcn_transfers"] += 1
          exposed["~dcn_seconds"] += seconds
        elif what == "done" and "dcn:" + key in inflight:
          end, axes = inflight.pop("dcn:" + key)
          if end > core:
            exposed[axes] += end - core
            core = end
        continue
      if ins.opcode in costs_lib.ASYNC_DMA:
        if costs_lib.HOST_MEMORY in ins.shape:
          exposed["#host_bytes"] += costs_lib.dma_bytes(ins, instrs)
        exposed["~hbm"] += op_cost(ins)[1]
        continue
      role = hlo.async_role(comps, ins)
      if role is not None:
        what, key = role
        key = alias.get(key, key)
        if what == "update":
          alias[ins.name] = key
        elif what == "start":
          coll = hlo.inner_collective(comps, ins)
          seconds, axes = comm(coll, ins)
          begin = max(core, link)
          link = begin + seconds
          inflight[key] = (link, axes)
          communication += seconds
          exposed["#asynchronous"] += 1
        elif key in inflight:
          end, axes = inflight.pop(key)
          if end > core:
            exposed[axes] += end - core
            core = end
        continue
      coll = hlo.runs_collective(comps, ins, async_channels)
      if coll is None and ins.opcode in hlo.COLLECTIVES:
        continue  # on groups of one device: nothing moves
      if coll is not None:
        # synchronous; in a fusion (TPU's all-reduce-scatter, a collective matmul
        # step) the fusion's own work runs alongside it
        seconds, axes = comm(coll, ins)
        work, hbm = op_cost(ins) if ins.opcode == "fusion" else (0.0, 0.0)
        exposed["~hbm"] += hbm
        link = max(core, link) + seconds
        finish = max(link, core + work)
        exposed[axes] += finish - core - work
        core = finish
        ops += work
        communication += seconds
        exposed["#synchronous"] += 1
        continue
      # (a fusion carrying an in-flight collective's channel is compute: the steps
      # of a collective matmul between its start and done)
      t, hbm = op_cost(ins)
      core += t
      ops += t
      exposed["~hbm"] += hbm
    for end, axes in inflight.values():  # never waited for: the step still ends after
      if end > core:
        exposed[axes] += end - core
        core = end
    return core, ops, communication, tuple(sorted(exposed.items()))

  seconds, ops, communication, items = walk(hlo.entry_name(comps))
  exposed = {k: v for k, v in items if k[0] not in "#~"}
  counts = {k[1:]: round(v) for k, v in items if k.startswith("#")}
  hbm = dict(items).get("~hbm", 0.0)
  return Estimate(max(seconds, hbm), ops, communication, exposed, counts,
                  dict(items).get("~dcn_seconds", 0.0), hbm)


def kernel_calls(hlo_text: str) -> float:
  """Executions per step of Pallas kernels without a cost estimate."""
  comps = hlo.parse(hlo_text)
  counts, _, _ = hlo.execution_counts(comps, hlo.entry_name(comps),
                                      hlo.instructions(comps))
  return sum(times for name, times in counts.items() for ins in comps[name]
             if costs_lib._is_kernel(ins) and costs_lib._cost_estimate(ins) is None)

