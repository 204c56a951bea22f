"""Which parameters are matrices, and how a stored tensor groups into matrices.

rung stores weights stacked and unflattened: an MLP weight is `[layers, in, out]`
(`[layers, experts, in, out]` in an MoE), a query projection `[layers, embed, heads,
head_dim]`, the output projection `[layers, heads, head_dim, embed]`. A
matrix-aware optimizer (Muon, NorMuon, GaLore) must see one matrix per layer (and
per expert), `[in, out]` = `[prod(reduction axes), prod(output axes)]`, never the
stack as a whole. `dims(name, ndim)` gives those axes; every axis before them is a
batch axis.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax

import sharding

# The optimizers that act on the parameters `optim.matrices` names.
OPTIMIZERS = ("muon", "normuon", "galore")


class Dims(NamedTuple):
  """Axes of one stored tensor: leading `batch`, then `reduction` (the input, which
  `x @ W` contracts), then `output`. Non-negative, in order."""
  batch: tuple[int, ...]
  reduction: tuple[int, ...]
  output: tuple[int, ...]


# (regex on the '/'-joined path, reduction axes, output axes), counted from the end.
_GROUPING = [
    (re.compile(r"attn/o$"), (-3, -2), (-1,)),        # [.., heads, head_dim, embed]
    (re.compile(r"attn/(q|k|v)$"), (-3,), (-2, -1)),  # [.., embed, heads, head_dim]
]
_DEFAULT = ((-2,), (-1,))                             # [.., in, out]


def patterns(regexes: str) -> list[re.Pattern]:
  """Comma-separated regexes (as `optim.matrices` and `optim.no_decay` hold them)."""
  return [re.compile(p) for p in regexes.split(",") if p.strip()]


def is_matrix(name: str, regexes: str) -> bool:
  return any(p.search(name) for p in patterns(regexes))


def dims(name: str, ndim: int) -> Dims:
  """The grouping of parameter `name` (its '/'-joined path) with `ndim` axes."""
  red, out = next(((r, o) for p, r, o in _GROUPING if p.search(name)), _DEFAULT)
  if ndim < len(red) + len(out):
    red, out = _DEFAULT
  red = tuple(a % ndim for a in red)
  out = tuple(a % ndim for a in out)
  return Dims(tuple(range(min(red))), red, out)


def matrix_shape(shape: tuple[int, ...], d: Dims) -> tuple[int, int]:
  """(in, out) of each matrix of a tensor of `shape` grouped as `d`."""
  return (math.prod(shape[a] for a in d.reduction),
          math.prod(shape[a] for a in d.output))


def labels(params, regexes: str):
  """'matrix' or 'adamw' per leaf of `params` (any tree keyed like the params)."""
  def label(path, x):
    return "matrix" if is_matrix(sharding.path_name(path), regexes) and x.ndim >= 2 \
        else "adamw"
  return jax.tree_util.tree_map_with_path(label, params)


def tree_dims(tree):
  """Dims per leaf of a params-keyed tree (leaves that optax masked stay masked)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: dims(sharding.path_name(path), x.ndim), tree)
