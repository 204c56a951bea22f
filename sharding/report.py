"""Human-readable summaries of how arrays are laid out on a mesh."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def sharding_table(tree: Any, shardings: Any) -> str:
  """One line per leaf: path, shape, dtype, PartitionSpec, bytes per device."""
  rows = [("parameter", "shape", "dtype", "spec", "per device")]
  total, per_dev = 0, 0
  flat_s = jax.tree.leaves(shardings)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(tree), flat_s):
    name = path_name(path)
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    local = int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    total, per_dev = total + nbytes, per_dev + local
    rows.append((name, "x".join(map(str, x.shape)), str(np.dtype(x.dtype)),
                 str(tuple(s.spec)), format_bytes(local)))
  rows.append(("total", "", "", "",
               f"{format_bytes(per_dev)} of {format_bytes(total)}"))
  return format_rows(rows)


def path_name(path) -> str:
  """A pytree key path as 'layers/attn/q' (the names checkpoints and tables use)."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def format_rows(rows: list[tuple[str, ...]], indent: str = "") -> str:
  """Rows of strings as left-aligned columns, two spaces apart."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in rows)


def json_ready(x: Any) -> Any:
  """`x` (nested dicts and lists of numbers and strings) with every NaN or infinite
  float as None: strict JSON (json.dumps(allow_nan=False)), which json.loads, jq and
  pandas all read, where a bare NaN is not JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_ready(v) for v in x]
  return x


def count(n: int, noun: str, plural: str | None = None) -> str:
  """"1 step", "2,048 steps": n with the noun in the number it takes (`plural`
  where adding an s is wrong: "microbatches")."""
  return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"
