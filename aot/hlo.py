"""rung's one reader of compiled HLO text: computations, how often each runs (loop
trip counts included), the collectives executed, and data dependencies.

`aot.costs` (what `compile` and `plan` report), the tests and the benchmarks all
read programs through it, so a loop body is weighted by its trip count the same way
everywhere. XLA's own `cost_analysis()` counts each loop body once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4,
                "s8": 1, "u8": 1, "pred": 1, "s64": 8, "u64": 8, "s16": 2, "u16": 2,
                "f8e4m3fn": 1, "f8e5m2": 1}
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  called: list[str]
  text: str

  @property
  def bytes(self) -> int:
    """Bytes of the result (summed over a tuple)."""
    return shape_bytes(self.shape)


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, summed over a tuple's elements."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  if rest.startswith("("):
    depth = 0
    for i, c in enumerate(rest):
      depth += c == "("
      depth -= c == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


@functools.lru_cache(maxsize=4)
def parse(hlo: str) -> dict[str, list[Instruction]]:
  """{computation name: instructions}; the entry computation is also under 'ENTRY'.

  Cached on the text (the cost count, the schedule estimate and the pipeline's
  bubble each read the same compiled program), so callers share the result and
  must not modify it."""
  comps: dict[str, list[Instruction]] = {}
  current = None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header and not line[:1].isspace():
      current = comps.setdefault(header.group(2), [])
      if header.group(1):
        comps["ENTRY"] = current
      continue
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
    if not m or current is None:
      continue
    shape, tail = _split_shape(m.group(2))
    op = re.match(r"([\w\-]+)\((.*)", tail)
    if not op:
      continue
    opcode, args = op.groups()
    depth, end = 1, len(args)
    for i, c in enumerate(args):
      depth += c == "("
      depth -= c == ")"
      if depth == 0:
        end = i
        break
    operands = re.findall(r"%([\w.\-]+)", args[:end])
    called = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", args[end:])
    called += re.findall(r"%([\w.\-]+)", "".join(
        re.findall(r"branch_computations=\{([^}]*)\}", args[end:])))
    current.append(Instruction(m.group(1), shape, opcode, operands, called, line))
  return comps


def entry_name(comps: dict[str, list[Instruction]]) -> str:
  """The entry computation's own name (`parse` also lists it under 'ENTRY')."""
  return next(n for n, instrs in comps.items()
              if n != "ENTRY" and instrs is comps["ENTRY"])


def instructions(comps: dict[str, list[Instruction]]) -> dict[str, Instruction]:
  """{instruction name: instruction} over every computation."""
  return {i.name: i for n, instrs in comps.items() if n != "ENTRY" for i in instrs}


def async_channels(comps) -> set[int]:
  """Channel ids of the collectives TPU collective fusions run asynchronously
  (`async_role` 'start'): a fusion elsewhere that carries one of them is a step of
  that collective's compute (e.g. inside a collective matmul's loop), not another
  execution of it."""
  return {channel_id(inner_collective(comps, i)) for n, body in comps.items()
          if n != "ENTRY" for i in body
          if (async_role(comps, i) or ("",))[0] == "start"} - {None}


def runs_collective(comps, ins: Instruction, channels: set[int]) -> Instruction | None:
  """The collective an instruction of a control computation executes, counted
  there once per execution, or None: a collective itself (an async `-start` once,
  its `-done` not), or the one inside a fusion that starts it (a TPU collective
  fusion) or runs it whole (a synchronous collective fusion, e.g. TPU's
  all-reduce-scatter). A fusion that ends an asynchronous collective, or carries
  one in flight (`channels`, from `async_channels`), executes none; an
  `async-start` wrapper's collective is counted in the computation it calls; a
  collective on groups of one device (`moves_nothing`) is none."""
  if ins.opcode.removesuffix("-start") in COLLECTIVES:
    coll = ins
  elif ins.opcode != "fusion":
    return None
  else:
    coll = inner_collective(comps, ins)
    if coll is None:
      return None
    role = async_role(comps, ins)
    if (role[0] != "start" if role is not None
        else channel_id(coll) in channels):
      return None
  return None if moves_nothing(coll) else coll


def collective_kind(coll: Instruction, outer: Instruction) -> str:
  """The collective's kind as it runs: its opcode's, except an all-reduce whose
  fusion returns less than it reduces (TPU's all-reduce-scatter fusion), which is
  a reduce-scatter."""
  kind = coll.opcode.removesuffix("-start").removesuffix("-done")
  if kind == "all-reduce" and outer is not coll and 0 < outer.bytes < coll.bytes:
    return "reduce-scatter"
  return kind


def executed_collectives(hlo: str) -> list[tuple[Instruction, float]]:
  """(the collective, executions per run of the module) for every collective
  executed (`runs_collective`: loop trip counts included; an asynchronous one
  counted at its start)."""
  comps = parse(hlo)
  counts, roles, _ = execution_counts(comps, entry_name(comps), instructions(comps))
  channels = async_channels(comps)
  return [(coll, times) for name, times in counts.items()
          if roles[name] == "control" for ins in comps[name]
          for coll in [runs_collective(comps, ins, channels)] if coll is not None]


def collectives(hlo: str) -> list[Instruction]:
  """Every collective instruction of the module, each once (async starts once,
  dones skipped), whether or not it executes."""
  return [ins for name, instrs in parse(hlo).items() if name != "ENTRY"
          for ins in instrs if ins.opcode.removesuffix("-start") in COLLECTIVES]


def replica_groups(ins) -> list[list[int]] | None:
  """Device groups of a collective (ids index the compile's devices in order),
  pairs for collective-permute; [] for all devices in one group; None when the
  groups are written in a form not parsed here."""
  text = ins.text
  m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", text)
  if m:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
  m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", text)
  if m:
    return [[int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
  m = re.search(r"replica_groups=\[([\d,]+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", text)
  if m:  # iota: [groups, size] <= device ids laid out as [dims], transposed
    return _iota(m.group(2)).reshape([int(x) for x in m.group(1).split(",")]).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                r"(?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?)\))?\s*\{([^}]*)\}", text)
  if m:  # a mesh of its own over the device ids, and the axes each group spans
    dims = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names, sizes = [d[0] for d in dims], [int(d[1]) for d in dims]
    spanned = re.findall(r"'(\w+)'", m.group(3))
    if ":" in m.group(3) or any(s not in names for s in spanned):
      return None  # sub-axes: not parsed
    ids = _iota(m.group(2)) if m.group(2) else np.arange(math.prod(sizes))
    ids = ids.reshape(sizes)
    keep = [i for i, n in enumerate(names) if n not in spanned]
    span = [i for i, n in enumerate(names) if n in spanned]
    return ids.transpose(keep + span).reshape(
        -1, math.prod(sizes[i] for i in span)).tolist()
  return None if "replica_groups=" in text else []


def moves_nothing(ins: Instruction) -> bool:
  """Whether a collective's every group is one device (e.g. shard_map's all-reduce
  of a cotangent over size-1 axes, `replica_groups={{0},{1}}`): no data moves."""
  groups = replica_groups(ins)
  return bool(groups) and "source_target_pairs" not in ins.text and all(
      len(g) == 1 for g in groups)


def _iota(text: str) -> np.ndarray:
  """'[2,4]T(1,0)' -> arange(8).reshape(2, 4).transpose(1, 0), flattened."""
  m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
  dims = [int(x) for x in m.group(1).split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(2):
    ids = ids.transpose([int(x) for x in m.group(2).split(",")])
  return ids.reshape(-1)


def collective_counts(hlo: str) -> dict[str, dict[str, float]]:
  """{op: {"count": executions, "elements": elements per device}} of each collective
  kind; elements are those one device sends (an async start's operand); one on
  groups of single devices (`moves_nothing`) is not counted."""
  out: dict[str, dict[str, float]] = {}
  for coll, times in executed_collectives(hlo):
    kind = coll.opcode.removesuffix("-start")
    row = out.setdefault(kind, {"count": 0, "elements": 0})
    row["count"] += times
    row["elements"] += times * _elements(coll.shape, coll.opcode != kind)
  return out


def _elements(shape: str, first_only: bool) -> int:
  """Elements of the array(s) in an HLO result shape."""
  dims = _SHAPE.findall(shape)
  if first_only:  # an async start's tuple begins with its operand
    dims = dims[:1]
  return sum(math.prod(int(d) for d in s.split(",") if d) for s in dims)


def while_bodies(hlo: str) -> list[str]:
  comps = parse(hlo)
  return [c for instrs in comps.values() for ins in instrs if ins.opcode == "while"
          for c in re.findall(r"body=%([\w.\-]+)", ins.text)]


def _is_matmul(comps, ins: Instruction, seen=None) -> bool:
  if ins.opcode in ("dot", "convolution"):
    return True
  if ins.opcode == "custom-call" and "matmul" in ins.text.lower():
    return True
  seen = seen or set()
  for c in ins.called:
    if c not in seen and c in comps:
      seen.add(c)
      if any(_is_matmul(comps, i, seen) for i in comps[c]):
        return True
  return False


def matmuls_depending_on(hlo: str, computation: str, name: str) -> list[str]:
  """Matmuls (dots, or fusions containing one) in `computation` that use the value
  `name` directly or through other instructions of the same computation."""
  comps = parse(hlo)
  instrs = comps[computation]
  users: dict[str, list[Instruction]] = {}
  for ins in instrs:
    for o in ins.operands:
      users.setdefault(o, []).append(ins)
  found, stack, seen = [], [name], {name}
  while stack:
    for user in users.get(stack.pop(), []):
      if user.name in seen:
        continue
      seen.add(user.name)
      if _is_matmul(comps, user):
        found.append(user.name)
      stack.append(user.name)
  return found


# --- how often each computation runs -------------------------------------------

def execution_counts(comps, entry: str, instrs):
  """{computation: executions per run of the entry}, {computation: role}, and the
  number of loops whose trip count was not found. Roles: 'control' (entry, loop
  bodies, branches, calls: their instructions touch HBM), 'fused' (inside a
  fusion) or 'scalar' (reducers applied element by element)."""
  counts: dict[str, float] = collections.defaultdict(float)
  roles: dict[str, str] = {}
  unknown = 0

  def visit(name: str, times: float, role: str) -> None:
    nonlocal unknown
    counts[name] += times
    roles.setdefault(name, role)
    for ins in comps.get(name, []):
      if ins.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", ins.text).group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", ins.text).group(1)
        trips = _trip_count(ins, comps[cond], comps[body], instrs)
        if trips is None:
          unknown, trips = unknown + 1, 1
        visit(body, times * trips, "control")
        visit(cond, times * (trips + 1), "control")
        continue
      inner = "fused" if ins.opcode == "fusion" or role == "fused" else "control"
      applied = set(re.findall(r"to_apply=%?([\w.\-]+)", ins.text))
      for called in ins.called:
        visit(called, times, "scalar" if called in applied else inner)

  visit(entry, 1.0, "control")
  return counts, roles, unknown


def root(instrs_of_comp: list[Instruction]) -> Instruction:
  """The ROOT instruction of a computation."""
  return next(i for i in instrs_of_comp if i.text.lstrip().startswith("ROOT"))


def _constant(name: str, instrs) -> int | None:
  """The integer a value holds, following copies and bitcasts to a constant."""
  ins = _through_copies(instrs.get(name), instrs)
  if ins is None or ins.opcode != "constant":
    return None
  m = re.search(r"constant\((-?\d+)\)", ins.text)
  return int(m.group(1)) if m else None


def _through_copies(ins: Instruction | None, instrs) -> Instruction | None:
  """The instruction a chain of copies, bitcasts and converts starts from."""
  while ins is not None and ins.opcode in ("copy", "bitcast", "convert"):
    ins = instrs.get(ins.operands[0])
  return ins


def _trip_count(loop, cond, body, instrs) -> int | None:
  """Trip count of a while loop: the count XLA records for counted loops (CPU and
  GPU HLO carry `known_trip_count`), else read from `while (counter <cmp> limit)`
  with counter += step in the body; None when the loop has another form."""
  known = _KNOWN_TRIP_COUNT.search(loop.text)
  if known:
    return int(known.group(1))
  compare = root(cond)
  direction = re.search(r"direction=(\w+)", compare.text)
  if compare.opcode != "compare" or not direction or len(compare.operands) != 2:
    return None
  counter, limit = (_through_copies(instrs.get(o), instrs) for o in compare.operands)
  op = direction.group(1)
  if counter is not None and counter.opcode != "get-tuple-element":
    counter, limit = limit, counter
    op = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(op, op)
  init = instrs.get(loop.operands[0]) if loop.operands else None
  body_root = root(body)
  if (counter is None or counter.opcode != "get-tuple-element" or limit is None
      or init is None or init.opcode != "tuple" or body_root.opcode != "tuple"):
    return None
  index = int(re.search(r"index=(\d+)", counter.text).group(1))
  limit, start = _constant(limit.name, instrs), _constant(init.operands[index], instrs)
  # TPU loop passes leave `counter + 1` behind a copy
  update = _through_copies(instrs.get(body_root.operands[index]), instrs)
  step = None
  if update is not None and update.opcode in ("add", "subtract"):
    known = [c for c in (_constant(o, instrs) for o in update.operands) if c is not None]
    if len(known) == 1:
      step = known[0] if update.opcode == "add" else -known[0]
  if limit is None or start is None or not step:
    return None
  span = {"LT": limit - start, "LE": limit - start + 1,
          "GT": start - limit, "GE": start - limit + 1}.get(op)
  return None if span is None else max(0, math.ceil(span / abs(step)))


# --- the schedule: loops, async pairs --------------------------------------------

def loop_parts(ins: Instruction, comps, instrs) -> tuple[str, str, int | None]:
  """(body, condition, trip count or None) of a while instruction."""
  body = re.search(r"body=%?([\w.\-]+)", ins.text).group(1)
  cond = re.search(r"condition=%?([\w.\-]+)", ins.text).group(1)
  return body, cond, _trip_count(ins, comps[cond], comps[body], instrs)


def channel_id(ins: Instruction) -> int | None:
  m = re.search(r"channel_id=(\d+)", ins.text)
  return int(m.group(1)) if m else None


def inner_collective(comps, ins: Instruction) -> Instruction | None:
  """The collective an instruction runs: itself, or the first one inside the
  computations it calls (a TPU collective fusion, an `async-start` wrapper)."""
  if ins.opcode.removesuffix("-start").removesuffix("-done") in COLLECTIVES:
    return ins
  for c in ins.called:
    for i in comps.get(c, []):
      if i.opcode in COLLECTIVES:
        return i
      found = inner_collective(comps, i) if i.called else None
      if found is not None:
        return found
  return None


def async_role(comps, ins: Instruction) -> tuple[str, str] | None:
  """('start' | 'done', key) for the two ends of an asynchronous collective, the
  same key at both ends; None for anything else. Three forms are read:
  `all-gather-start` ... `all-gather-done(start)`; `async-start` ... `async-done`
  around a collective; and TPU collective fusions, whose called computations end
  in custom calls `AsyncCollectiveStart` / `AsyncCollectiveDone` around the same
  collective (matched by channel id; the fusions scheduled between them that
  carry that channel are compute, e.g. a collective matmul's steps)."""
  kind = ins.opcode
  if kind.endswith("-start") and kind.removesuffix("-start") in COLLECTIVES:
    return "start", ins.name
  if kind.endswith("-done") and kind.removesuffix("-done") in COLLECTIVES:
    return "done", ins.operands[0]
  if kind == "async-start" and inner_collective(comps, ins) is not None:
    return "start", ins.name
  if kind in ("async-update", "async-done") and ins.operands:
    return ("done" if kind == "async-done" else "update"), ins.operands[0]
  if kind == "fusion" and ins.called and ins.called[0] in comps:
    target = re.search(r'custom_call_target="(AsyncCollective(?:Start|Done))"',
                       root(comps[ins.called[0]]).text)
    coll = inner_collective(comps, ins) if target else None
    if coll is not None:
      role = "start" if target.group(1).endswith("Start") else "done"
      return role, f"channel:{channel_id(coll)}"
  return None


# Collectives between TPU slices compile to host-transfer send / recv pairs that the
# megascale runtime carries over the data-center network (multi-slice programs).
_DCN_KINDS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather",
              "REDUCE_SCATTER": "reduce-scatter", "ALL_TO_ALL": "all-to-all"}


def dcn_role(ins: Instruction, instrs) -> tuple[str, str, str] | None:
  """('start' | 'done' | 'other', rendezvous, kind) for the ops of a collective
  between slices: its `send` starts it, the `recv-done` of the same rendezvous
  ends it; kind is a collective opcode ('collective-permute' for a plain
  transfer). None for anything else."""
  if ins.opcode not in ("send", "recv", "send-done", "recv-done") or \
     "xla_megascale_runtime" not in ins.text:
    return None
  source = ins if ins.opcode in ("send", "recv") else instrs.get(ins.operands[0])
  key = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"',
                  source.text if source is not None else "")
  kind = re.search(r'_xla_megascale_transfer_type="([A-Z_]*)"',
                   source.text if source is not None else "")
  kind = _DCN_KINDS.get(kind.group(1), "collective-permute") if kind else \
      "collective-permute"
  role = {"send": "start", "recv-done": "done"}.get(ins.opcode, "other")
  return role, key.group(1) if key else ins.name, kind
