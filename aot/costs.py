"""What one execution of a compiled program costs a device: FLOPs, HBM bytes and
collectives (with the mesh axes they run over), read from the compiled HLO text.

XLA's own `compiled.cost_analysis()` adds up every computation once, so the body of
a while loop counts once whatever its trip count: for rung's scanned layers the
TPU compiler reports the same FLOPs for 1, 2 or 4 layers. Here every computation is
weighted by how often it runs, with trip counts read from the loop conditions
(`counter < N`, the counter's start and step followed through copies).

- FLOPs: 2 x multiply-adds of every dot and convolution (TPU lowers matmuls to
  convolutions; valid window positions are counted as XLA's cost analysis does),
  plus `cost_estimate` FLOPs of custom kernels that carry one. Kernels without an
  estimate (rung's Pallas kernels) are counted in `uncounted_kernels`.
- HBM bytes: operands read and results written by every instruction that is not
  fused into another; slices of an operand count as the slice (also through
  views, type changes and padding), and in-place updates (dynamic-update-slice,
  scatter) as the update. An estimate of traffic,
  not a measurement.
- Collectives: result bytes per device and the bytes each device receives over
  the interconnect with ring algorithms (all-reduce 2(n-1)/n, all-gather and
  all-to-all (n-1)/n of the result, reduce-scatter (n-1) x the result,
  collective-permute the whole result).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Sequence

import numpy as np

from aot import hlo

# Instructions that move no HBM data of their own (views, control flow, tokens) or
# whose data is accounted elsewhere (collectives, in `Costs.collectives`).
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
               "while", "conditional", "call", "after-all", "partition-id",
               "replica-id", "opt-barrier", "add-dependency", "async-start",
               "async-update", "async-done", "copy-start", "copy-done",
               "send", "send-done", "recv", "recv-done"}
_SLICES = ("dynamic-slice", "slice", "gather")
# Ops between a fused parameter and its slices that do not make the fusion read
# the whole parameter: views, element-type changes, padding (a slice of a padded
# array reads the array's share of the slice; the TPU compiler's collective
# matmuls pad an activation and slice one window of it per step).
_PASS_THROUGH = {"bitcast", "convert", "pad", "reshape", "transpose", "copy"}
# Ops that update their first operand in place: the operand carrying the new data.
_IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}
# Asynchronous DMAs, started here and waited for at the matching `-done`: a slice
# copied out of a buffer (into the core's VMEM, S(1), or out of host memory, S(5)),
# or an update written into one (remat residuals offloaded to host memory). They
# move the slice, not the buffer, and run beside the core.
ASYNC_DMA = ("slice-start", "dynamic-slice-start", "dynamic-update-slice-start")
HOST_MEMORY = "S(5)}"  # the layout suffix of an array in host memory
# Custom calls that are compute kernels (Pallas: Mosaic on TPU, Triton on GPU); the
# other custom calls in TPU programs (AllocateBuffer, ...) are bookkeeping.
_KERNELS = ("tpu_custom_call", "__gpu$xla.gpu.triton")


@dataclasses.dataclass
class Collective:
  kind: str                 # all-reduce, all-gather, ...
  axes: tuple[str, ...]     # mesh axes its groups span (() for an unknown mesh)
  group_size: int
  count: float              # executions per step
  bytes: float              # result bytes per device, summed over executions
  received_bytes: float     # bytes each device receives, summed over executions
  dtypes: tuple[str, ...] = ()  # element types of its result (HLO names: f32, u8)


@dataclasses.dataclass
class Costs:
  flops: float                  # per device, per execution of the program
  hbm_bytes: float              # per device (estimate, see module docstring)
  collectives: list[Collective]
  uncounted_kernels: int        # custom calls without a cost estimate
  unknown_trip_counts: int      # loops counted once because no count was found

  def by_kind(self) -> list[Collective]:
    """Collectives merged by (kind, axes), largest received bytes first."""
    merged: dict[tuple, Collective] = {}
    for c in self.collectives:
      key = (c.kind, c.axes)
      if key not in merged:
        merged[key] = dataclasses.replace(c, count=0.0, bytes=0.0,
                                          received_bytes=0.0)
      m = merged[key]
      m.count += c.count
      m.bytes += c.bytes
      m.received_bytes += c.received_bytes
      m.group_size = max(m.group_size, c.group_size)
    return sorted(merged.values(), key=lambda c: -c.received_bytes)


def analyze(hlo_text: str, mesh_axes: Sequence[str] = (),
            mesh_shape: Sequence[int] = ()) -> Costs:
  """Costs of the compiled module. With the mesh's axis names and shape (the
  devices of the compile in mesh order), collectives name the axes they span."""
  comps = hlo.parse(hlo_text)
  instrs = hlo.instructions(comps)
  counts, roles, unknown = hlo.execution_counts(comps, hlo.entry_name(comps), instrs)

  flops, traffic, kernels, colls = 0.0, 0.0, 0, []
  channels = hlo.async_channels(comps)
  for name, times in counts.items():
    for ins in comps[name]:
      if ins.opcode in ("convolution", "dot"):
        flops += times * _matmul_flops(ins, instrs)
      elif _is_kernel(ins):
        estimate = _cost_estimate(ins)
        if estimate is None:
          kernels += 1
        else:
          flops += times * float(estimate.get("flops", 0))
      if roles[name] != "control":
        continue
      coll = hlo.runs_collective(comps, ins, channels)
      if coll is not None:
        colls.append(_collective(coll, hlo.collective_kind(coll, ins), times,
                                 mesh_axes, mesh_shape, outer=ins))
      if ins.opcode.removesuffix("-start") in hlo.COLLECTIVES:
        continue  # a collective's own traffic is its DMAs (received bytes)
      if not (ins.opcode in _NO_TRAFFIC or ins.opcode.endswith("-done")
              or ins.opcode == "custom-call" and not _is_kernel(ins)):
        traffic += times * _traffic(ins, instrs, comps)
  return Costs(flops, traffic, colls, kernels, unknown)


# --- FLOPs ---------------------------------------------------------------------

def _dims(shape: str) -> list[int]:
  m = re.match(r"\s*\w+\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _matmul_flops(ins, instrs) -> float:
  out = _dims(ins.shape)
  lhs, rhs = (instrs[o] if o in instrs else None for o in ins.operands[:2])
  if lhs is None or rhs is None:
    return 0.0
  if ins.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.text)
    contracted = [_dims(lhs.shape)[int(d)] for d in m.group(1).split(",") if d] if m else []
    return 2.0 * math.prod(out) * math.prod(contracted)
  return 2.0 * _conv_fmas(ins, _dims(lhs.shape), _dims(rhs.shape), out)


def _conv_fmas(ins, lhs: list[int], rhs: list[int], out: list[int]) -> float:
  """Multiply-adds of a convolution, counting only kernel taps that land inside
  the (padded, dilated) input, as XLA's HloCostAnalysis does."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.text)
  if not labels:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", ins.text)
  fields = dict(re.findall(r"(\w+)=([\w\-x]+)", window.group(1))) if window else {}

  def per_dim(key, default):
    values = fields.get(key)
    return [default] * 8 if values is None else values.split("x")

  pads = [p.split("_") for p in per_dim("pad", "0_0")]
  strides = [int(s) for s in per_dim("stride", "1")]
  base = [int(s) for s in per_dim("lhs_dilate", "1")]
  dilation = [int(s) for s in per_dim("rhs_dilate", "1")]
  groups = re.search(r"feature_group_count=(\d+)", ins.text)
  batch_groups = re.search(r"batch_group_count=(\d+)", ins.text)
  fmas = (lhs[lhs_l.index("f")] / (int(groups.group(1)) if groups else 1)
          * out[out_l.index("f")]
          * lhs[lhs_l.index("b")] / (int(batch_groups.group(1)) if batch_groups else 1))
  for d in range(sum(c.isdigit() for c in lhs_l)):
    fmas *= _valid_taps(lhs[lhs_l.index(str(d))], rhs[rhs_l.index(str(d))],
                        out[out_l.index(str(d))], strides[d], int(pads[d][0]),
                        base[d], dilation[d])
  return fmas


def _valid_taps(size_in: int, size_k: int, size_out: int, stride: int, pad_low: int,
                base: int, dilation: int) -> int:
  """(output, kernel) position pairs of one spatial dimension that read an input
  element: position o*stride - pad_low + k*dilation, on the base-dilated grid."""
  k = np.arange(size_k, dtype=np.int64)
  if base == 1:  # count the outputs o in range for each tap k, without an O x K grid
    lo = np.maximum(0, -((k * dilation - pad_low) // stride))
    hi = np.minimum(size_out - 1, (size_in - 1 + pad_low - k * dilation) // stride)
    return int(np.maximum(0, hi - lo + 1).sum())
  pos = (np.arange(size_out, dtype=np.int64)[:, None] * stride - pad_low
         + k[None, :] * dilation)
  return int(((pos % base == 0) & (pos >= 0) & (pos < size_in * base)).sum())


def _is_kernel(ins) -> bool:
  target = re.search(r'custom_call_target="([^"]+)"', ins.text)
  return ins.opcode == "custom-call" and bool(target) and target.group(1) in _KERNELS


def _cost_estimate(ins) -> dict | None:
  m = re.search(r'"cost_estimate":\s*(\{[^}]*\})', ins.text)
  return json.loads(m.group(1)) if m else None


# --- HBM traffic ---------------------------------------------------------------

def dma_bytes(ins, instrs) -> float:
  """The bytes an asynchronous DMA (ASYNC_DMA) moves: its slice, not the buffer."""
  if ins.opcode == "dynamic-update-slice-start":  # operands: buffer, update, indices
    return float(instrs[ins.operands[1]].bytes)
  # slice-start, dynamic-slice-start: ((operand, indices...), slice, context)
  return float(hlo.shape_bytes(_tuple_elements(ins.shape)[1]))


def _traffic(ins, instrs, comps) -> float:
  """Bytes an unfused instruction reads and writes."""
  if ins.opcode in _SLICES:
    return 2.0 * ins.bytes
  if ins.opcode in ASYNC_DMA:  # read and written once each
    return 2.0 * dma_bytes(ins, instrs)
  if ins.opcode in _IN_PLACE:
    return 2.0 * instrs[ins.operands[_IN_PLACE[ins.opcode]]].bytes
  if ins.opcode == "custom-call":
    estimate = _cost_estimate(ins)
    if estimate and "bytes_accessed" in estimate:
      return float(estimate["bytes_accessed"])
  fused = comps.get(ins.called[0]) if ins.opcode == "fusion" and ins.called else None
  if fused is None:
    return ins.bytes + sum(instrs[o].bytes for o in ins.operands if o in instrs)
  local = {i.name: i for i in fused}
  params = {int(re.search(r"parameter\((\d+)\)", i.text).group(1)): i
            for i in fused if i.opcode == "parameter"}
  users = collections.defaultdict(list)
  for i in fused:
    for o in i.operands:
      users[o].append(i)

  def elements_read(name: str, view: bool = True) -> float | None:
    """Elements of `name` the fusion reads when every use ends in a slice of it
    (through views, type changes and padding) or, through views only, in an
    in-place update of it; None when some use reads it whole."""
    total = 0.0
    for u in users.get(name, []):
      if u.operands[0] != name:
        return None
      if u.opcode in _SLICES:
        total += hlo._elements(u.shape, False)
      elif u.opcode in _IN_PLACE and view:
        continue
      elif u.opcode in _PASS_THROUGH:
        part = elements_read(u.name, view and u.opcode == "bitcast")
        if part is None:
          return None
        if u.opcode == "pad":  # a slice of the padded array: the array's share
          part *= hlo._elements(local[name].shape, False) / max(
              1, hlo._elements(u.shape, False))
        total += part
      else:
        return None
    return total

  root = hlo.root(fused)
  # A TPU fusion that carries an asynchronous collective between its start and done
  # fusions (`hlo.async_role`) returns the collective's buffers in a tuple beside
  # its own results: the collective inside it and the parameters it returns as
  # they are. The collective's operand and result are moved by its own DMAs
  # (counted at its start and done fusions), and a parameter returned as it is
  # moves nothing (XLA aliases it). A fusion whose root is the collective (a
  # synchronous reduce-scatter fusion) writes its result as before.
  carried = {i.name for i in fused if i.opcode in hlo.COLLECTIVES} if (
      root.opcode == "tuple") else set()

  def untouched(name: str) -> bool:  # only passed through or handed to a carried one
    return all(u is root and root.opcode == "tuple" or u.name in carried
               for u in users[name])

  read = 0.0
  for k, operand in enumerate(ins.operands):
    name = params[k].name if k in params else None
    if users.get(name) and untouched(name):
      continue
    part = elements_read(name) if users.get(name) else None
    whole = instrs[operand].bytes if operand in instrs else 0
    if part is not None:  # a parameter only sliced or updated is read in part
      elements = hlo._elements(params[k].shape, False)
      read += min(whole, whole * part / elements) if elements else 0.0
    else:
      read += whole
  outputs = ([local[o] for o in root.operands] if root.opcode == "tuple" else [root])
  written = sum(local[o.operands[_IN_PLACE[o.opcode]]].bytes if o.opcode in _IN_PLACE
                else 0 if o.opcode == "parameter" or o.name in carried else o.bytes
                for o in outputs)
  return read + written


# --- collectives ---------------------------------------------------------------

def _tuple_elements(shape: str) -> list[str]:
  """'(bf16[2]{0}, u32[])' -> ['bf16[2]{0}', 'u32[]']; an array shape -> [shape]."""
  if not shape.startswith("("):
    return [shape]
  parts, depth, start = [], 0, 1
  for i, c in enumerate(shape):
    if c in "({[":
      depth += 1
    elif c in ")}]":
      depth -= 1
    if (c == "," and depth == 1) or (c == ")" and depth == 0):
      parts.append(shape[start:i].strip())
      start = i + 1
  return parts


def _result_bytes(ins, kind: str) -> int:
  """Bytes of the collective's result (async starts also carry their operand)."""
  elements = _tuple_elements(ins.shape)
  if ins.opcode.endswith("-start") and kind in ("all-gather", "collective-permute") \
      and len(elements) > 1:
    return hlo.Instruction("", elements[1], "", [], [], "").bytes
  return ins.bytes


def group_axes(groups: list[list[int]], mesh_axes: Sequence[str],
               mesh_shape: Sequence[int]) -> tuple[str, ...]:
  """Mesh axes along which the members of the groups differ."""
  coords = [np.array(np.unravel_index(g, tuple(mesh_shape))) for g in groups if g]
  return tuple(a for d, a in enumerate(mesh_axes)
               if any(len(set(c[d].tolist())) > 1 for c in coords))


def _collective(ins, kind: str, times: float, mesh_axes, mesh_shape,
                outer=None) -> Collective:
  """`ins` (a collective, run by `outer`: itself or a fusion holding it) as a
  Collective of `kind` (`hlo.collective_kind`), executed `times` per step."""
  n_devices = math.prod(mesh_shape) if mesh_shape else 0
  groups = hlo.replica_groups(ins)
  if groups == [] or groups == [[]]:  # every device in one group
    groups = [list(range(n_devices))] if n_devices else None
  size = 2 if kind == "collective-permute" else len(groups[0]) if groups else 1
  known = bool(groups) and n_devices and max(map(max, groups)) < n_devices
  axes = group_axes(groups, mesh_axes, mesh_shape) if known else ()
  result = _result_bytes(ins, kind)
  if kind == "reduce-scatter" and ins.opcode.startswith("all-reduce"):
    result = outer.bytes  # an all-reduce-scatter fusion returns the scattered part
  received = {"all-reduce": 2 * (size - 1) / size, "all-gather": (size - 1) / size,
              "all-to-all": (size - 1) / size, "ragged-all-to-all": (size - 1) / size,
              "reduce-scatter": size - 1, "collective-permute": 1}[kind] * result
  dtypes = tuple(sorted(set(re.findall(r"\b([a-z]+\d*)\[", ins.shape))))
  return Collective(kind, axes, size, times, times * result, times * received,
                    dtypes)


@dataclasses.dataclass
class PipelineLoops:
  """The pipeline's loops in a compiled step (model/pipeline.py): while loops
  whose body passes activations between stages by collective-permute over the
  stage axis. GPipe and circular: one forward and one backward loop; 1F1B: one
  loop doing both."""
  stages: int                 # devices in the ring of the permute (S)
  work: int                   # iterations in which a stage has work (R*M)
  trips: list[int]            # iterations of each loop, as compiled
  flops: list[float]          # per device, per iteration, including nested loops

  @property
  def bubble(self) -> float:
    """Fraction of the loops' stage-time idle: in each loop every stage is busy
    in `work` of its iterations; loops weighted by their FLOPs."""
    total = sum(t * f for t, f in zip(self.trips, self.flops))
    idle = sum((t - self.work) * f for t, f in zip(self.trips, self.flops))
    return idle / total if total else math.nan


def pipeline_loops(hlo_text: str, mesh_axes: Sequence[str], mesh_shape: Sequence[int],
                   work: int, axis: str = "stage") -> PipelineLoops | None:
  """The pipeline loops of a compiled program, or None if it has none; `work`:
  the iterations of a loop in which a stage is busy (R*M). A loop around
  pipeline loops (gradient accumulation) is not one, even where it permutes
  over `stage` itself."""
  comps = hlo.parse(hlo_text)
  instrs = hlo.instructions(comps)
  stages = dict(zip(mesh_axes, mesh_shape)).get(axis, 1)
  reached, _, _ = hlo.execution_counts(comps, hlo.entry_name(comps), instrs)
  channels = hlo.async_channels(comps)
  found = {}  # body -> trips
  for name in reached:
    for ins in comps[name]:
      if ins.opcode != "while":
        continue
      body, _, n = hlo.loop_parts(ins, comps, instrs)
      runs = [hlo.runs_collective(comps, c, channels) for c in comps[body]]
      permutes = [c for c in runs if c is not None
                  and c.opcode.removesuffix("-start") == "collective-permute"]
      if n is not None and any(
          axis in _collective(c, "collective-permute", 1, mesh_axes, mesh_shape).axes
          for c in permutes):
        found[body] = n
  trips, flops = [], []
  for body, n in found.items():
    counts, _, _ = hlo.execution_counts(comps, body, instrs)
    if any(inner != body and inner in found for inner in counts):
      continue  # it runs pipeline loops
    trips.append(n)
    flops.append(sum(times * _matmul_flops(i, instrs)
                     for name, times in counts.items() for i in comps[name]
                     if i.opcode in ("convolution", "dot")))
  return PipelineLoops(stages, work, trips, flops) if trips else None
