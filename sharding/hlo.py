"""Reading compiled HLO text: computations, collectives, and data dependencies.

Used to check what a parallelism plan communicates (tests, benchmarks, the
`compile` command) without running it.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4,
                "s8": 1, "u8": 1, "pred": 1, "s64": 8, "u64": 8, "s16": 2, "u16": 2,
                "f8e4m3fn": 1, "f8e5m2": 1}


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
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", self.shape):
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


def parse(hlo: str) -> dict[str, list[Instruction]]:
  """{computation name: instructions}; the entry computation is also under 'ENTRY'."""
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


def collectives(hlo: str) -> list[Instruction]:
  """Every collective in the module (async starts counted once, dones skipped)."""
  out = []
  for name, instrs in parse(hlo).items():
    if name == "ENTRY":  # the entry computation, also listed under its own name
      continue
    for ins in instrs:
      kind = ins.opcode.removesuffix("-start")
      if kind in COLLECTIVES:
        out.append(ins)
  return out


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
