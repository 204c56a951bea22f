"""What a compiled attention call communicates, counted as executed.

`collectives(compiled.as_text())` builds on `sharding.hlo.parse` and counts each
collective once per execution: an instruction inside a while loop counts once per
iteration, using the trip count XLA records for the counted loops `fori_loop`
produces (CPU and GPU HLO carry it; TPU's compiled HLO does not, and there a loop
body counts once). The tests and benchmarks/attention.py check the ring and
Ulysses formulas with it.
"""

from __future__ import annotations

import math
import re

from sharding import hlo as hlo_text

_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _elements(shape: str, first_only: bool) -> int:
  """Elements of the array(s) in an HLO result shape."""
  dims = _SHAPE.findall(shape)
  if first_only:  # an async start's tuple begins with its operand
    dims = dims[:1]
  return sum(math.prod(int(d) for d in s.split(",") if d) for s in dims)


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{op: {"count": executions, "elements": elements per device}} of each collective.

  Async pairs count once (at -start); elements are those one device sends.
  """
  computations = hlo_text.parse(hlo)
  out: dict[str, dict[str, int]] = {}

  def visit(name: str, times: int):
    for ins in computations.get(name, ()):
      kind = ins.opcode.removesuffix("-start")
      if kind in hlo_text.COLLECTIVES:
        row = out.setdefault(kind, {"count": 0, "elements": 0})
        row["count"] += times
        row["elements"] += times * _elements(ins.shape, ins.opcode != kind)
      elif ins.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", ins.text).group(1)
        trips = _TRIP_COUNT.search(ins.text)
        visit(body, times * (int(trips.group(1)) if trips else 1))
      elif ins.opcode == "call":
        for callee in ins.called:
          visit(callee, times)

  visit("ENTRY", 1)
  return out
