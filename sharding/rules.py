"""Logical axis names -> mesh axes.

Model code names tensor dimensions logically (`embed`, `heads`, `batch`, ...). The
rules here are the only place those names meet mesh axes, so a parallelism plan is a
table, not code inside the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.errors import ConfigError
from sharding.mesh import AXES

# logical name -> mesh axes it is split over (outer to inner). Names absent here, or
# mapped to (), are replicated.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "experts": ("expert",),
    "layers": ("stage",),
    "head_dim": (),
    # activations
    "batch": ("diloco", "data", "fsdp", "expert"),
    "length": ("sequence",),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def normalize_rules(rules: Mapping[str, Any] | None) -> Rules:
  """A hashable rules table from a {name: axes} mapping.

  axes: a mesh axis name, a sequence of distinct names (outer to inner), or None /
  () for replicated. Raises ConfigError naming `mesh.rules.<name>` and the valid
  axes for anything else (a misspelt axis, None inside a tuple, a repeated axis).
  """
  rules = DEFAULT_RULES if rules is None else rules
  out = []
  for name, axes in rules.items():
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    axes = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    bad = [a for a in axes if a not in AXES]
    if bad or len(set(axes)) < len(axes):
      problem = (f"{bad[0]!r} is not a mesh axis" if bad
                 else "a mesh axis appears twice")
      raise ConfigError(
          f"mesh.rules.{name}",
          f"{axes!r}: {problem}; the mesh axes are {', '.join(AXES)}.",
          f"map `{name}` to distinct mesh axes, e.g. "
          f"--config.mesh.rules.{name}=\"{DEFAULT_RULES.get(name, ('data',))!r}\", "
          f"or to \"()\" to replicate it.")
    out.append((name, axes))
  return tuple(out)


def split_size(rules: Rules, name: str, sizes: Mapping[str, int]) -> int:
  """How many ways the rules split logical axis `name` on a mesh of `sizes`
  ({axis: size}): the product of the sizes of the mesh axes it maps to."""
  n = 1
  for axis in dict(rules).get(name, ()):
    n *= sizes[axis]
  return n


def logical_to_spec(names: Sequence[str | None], rules: Rules,
                    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for one array whose dimensions carry `names`.

  A mesh axis is used at most once per array (first dimension wins). With `mesh` and
  `shape`, axes of size 1 are dropped and a dimension keeps only the leading axes
  whose sizes divide it, so odd shapes replicate instead of failing.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    axes = [a for a in table.get(name, ()) if a not in used] if name else []
    if mesh is not None:
      axes = [a for a in axes if mesh.shape[a] > 1]
      if shape is not None:
        kept, size = [], 1
        for a in axes:
          if shape[dim] % (size * mesh.shape[a]):
            break
          kept.append(a)
          size *= mesh.shape[a]
        axes = kept
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def idle_axes(sizes: dict[str, int], rules: Rules) -> list[str]:
  """Mesh axes of size > 1 that split no computation: no activation rule (batch,
  length, act_*), nor the experts or the layers (stages), names them, so every
  device along them computes the same thing (e.g. `mesh.rules.batch=()` with
  data=8). Returns 'data=8'-style entries."""
  table = dict(rules)
  working = {a for name, axes in table.items()
             if name in ("batch", "length", "experts", "layers") or name.startswith("act_")
             for a in axes}
  return [f"{a}={s}" for a, s in sizes.items() if s > 1 and a not in working]


def unsplit_dims(abstract_tree: Any, logical_tree: Any, mesh: Mesh,
                 rules: Rules) -> list[str]:
  """Where `logical_to_spec` replicated a dimension the rules split, because the
  mesh axes do not divide it: one line per (array, dimension), e.g.
  'embed/table: vocab 1001 over tensor=2' (the array is then that many times
  larger per device than the rules meant)."""
  from sharding.report import path_name
  lines = []
  leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
  for (path, x), names in zip(leaves, jax.tree.leaves(
      logical_tree, is_leaf=lambda n: isinstance(n, tuple))):
    meant = logical_to_spec(names, rules, mesh)
    got = logical_to_spec(names, rules, mesh, x.shape)
    for dim, name in enumerate(names):
      lost = [a for a in _axes(meant, dim) if a not in _axes(got, dim)]
      if lost:
        lines.append(f"{path_name(path)}: {name} {x.shape[dim]} over "
                     + "*".join(f"{a}={mesh.shape[a]}" for a in lost))
  return lines


def _axes(spec: P, dim: int) -> tuple[str, ...]:
  """The mesh axes `spec` splits dimension `dim` over (() for none)."""
  entry = spec[dim] if dim < len(spec) else None
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def tree_shardings(abstract_tree: Any, logical_tree: Any, mesh: Mesh,
                   rules: Rules) -> Any:
  """NamedShardings for a tree of arrays given a same-structured tree of names."""
  return jax.tree.map(
      lambda x, names: NamedSharding(
          mesh, logical_to_spec(names, rules, mesh, x.shape)),
      abstract_tree, logical_tree)


@dataclasses.dataclass(frozen=True)
class LogicalConstraint:
  """`constrain(x, ('batch', 'length', 'act_embed'))` inside jit.

  Models take one of these at construction (default: no-op) instead of reading any
  global parallel state. It constrains only when a mesh is set with `jax.set_mesh`,
  whose axes must be Auto (`sharding.make_mesh`): on Explicit axes, the default of
  `jax.make_mesh`, a constraint is an assertion about the arrays' types, which
  rung's models do not carry; that is a ValueError saying how to make the mesh.
  """
  rules: Rules = ()

  def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if not self.rules or mesh.empty:
      return x
    explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types)
                if t == jax.sharding.AxisType.Explicit]
    if explicit:
      raise ValueError(
          f"the mesh set with jax.set_mesh has Explicit axes {explicit} "
          "(jax.make_mesh's default); rung's models place their activations on Auto "
          "axes. Make the mesh with sharding.make_mesh({'tensor': 2, ...}), or pass jax.make_mesh "
          "axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names).")
    return jax.lax.with_sharding_constraint(
        x, logical_to_spec(names, self.rules, mesh, x.shape))
