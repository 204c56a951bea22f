"""Checks that a parallelism plan fits the model and the devices, before compiling."""

from __future__ import annotations

import math
from typing import Any, Iterable

from sharding.errors import ConfigError, MeshTooLarge
from sharding.mesh import (AXES, devices_phrase, largest_divisor, mesh_fix, mesh_flags,
                           resize_fix, resolve_shape)
from sharding.report import count
from sharding.rules import normalize_rules, split_size


# Model fields split over mesh axes by head: the logical axes of their weights and
# of their activations.
_HEAD_COUNTS = (("num_heads", ("heads", "act_heads")),
                ("num_kv_heads", ("kv_heads", "act_kv_heads")))


def validate_plan(config: Any, num_devices: int) -> dict[str, int]:
  """Raises ConfigError for a training plan that cannot run; returns the resolved
  mesh sizes.

  Every split is checked over the mesh axes the rules (`mesh.rules`) map its
  logical axis to, not over fixed axis names: heads over `heads` / `act_heads`,
  experts over `experts`, the sequence over `length`, the batch over `batch`.
  """
  sizes = validate_serving_plan(config, num_devices, training=True)
  rules = dict(normalize_rules(config.mesh.rules))
  seq = split_size(rules, "length", sizes)
  if config.data.seq_len % seq:
    raise ConfigError(
        "data.seq_len",
        f"seq_len={config.data.seq_len} cannot be split over "
        f"{_describe(rules, 'length', sizes)}.",
        f"make data.seq_len a multiple of {seq} or change "
        f"mesh.{rules['length'][0]}.")
  dp = split_size(rules, "batch", sizes)
  accum = config.train.grad_accum_steps
  batch = config.train.batch_size
  fits = _batch_that_splits(config, sizes)
  if batch % dp:
    raise ConfigError(
        "train.batch_size",
        f"global batch_size={batch} does not split over the "
        f"data-parallel size {dp} ({_describe(rules, 'batch', sizes)}).",
        f"use a batch_size that is a multiple of {dp}"
        + (f" x train.grad_accum_steps={accum}" if accum > 1 else "")
        + _row_unit_text(config) + f", e.g. --config.train.batch_size={fits}.")
  if (batch // dp) % accum:
    shard = batch // dp
    fewer = next((d for d in range(accum - 1, 0, -1)
                  if _accumulation_splits(config, shard, d)), None)
    raise ConfigError(
        "train.grad_accum_steps",
        f"each of the {dp} data-parallel shards gets "
        f"{count(batch // dp, 'sequence')}, which do not split into "
        f"{accum} micro-batches.",
        f"pass --config.train.batch_size={fits} (a multiple of data-parallel size "
        f"{dp} x {accum}" + _row_unit_text(config) + ")"
        + (f", or --config.train.grad_accum_steps={fewer}" if fewer else "") + ".")
  rows = config.train.batch_size // dp // accum
  chunks = _loss_chunks(config)
  if rows % chunks:
    raise ConfigError(
        "model.loss_chunks",
        f"each data-parallel shard's micro-batch holds {count(rows, 'sequence')}, "
        f"which {'does' if rows == 1 else 'do'} not split into {chunks} loss chunks.",
        f"choose model.loss_chunks dividing {rows}, e.g. "
        f"--config.model.loss_chunks={largest_divisor(rows, chunks)}.")
  return sizes


def validate_serving_plan(config: Any, num_devices: int,
                          training: bool = False,
                          saved_model: bool = False) -> dict[str, int]:
  """The checks of `validate_plan` that serving needs: the mesh fits the devices
  and the model's heads and experts split over it. Nothing about `train` or the
  training length: any batch and prompt serve on any mesh (they are padded to it);
  fixes name a batch size only for `training` (`validate_plan`'s call).
  `saved_model`: the model's shapes are a checkpoint's (serving, an HF import),
  so a head or expert count that does not split is the mesh's error and its fix
  changes only the mesh. Returns the resolved mesh sizes."""
  table = normalize_rules(config.mesh.rules)  # ConfigError for a bad axis
  try:
    sizes = resolve_shape({a: config.mesh.get(a, 1) for a in AXES}, num_devices)
  except ConfigError as err:
    # The mesh's own fix knows only the devices; an axis that splits heads or
    # experts must also divide them.
    axis = err.field.removeprefix("mesh.")
    counts = _counts_on(config, axis, table) if axis in AXES else {}
    if not counts or config.mesh.get(axis, 1) < 1:
      raise _with_batch_that_splits(err, config, num_devices) if training else err
    divides = " and ".join(f"{field}={n}" for field, n in counts.items())
    fix = (f"pass {axis_fix(config, axis, counts.values(), num_devices, training)} "
           f"(mesh.{axis} must divide {divides} as well as fit "
           f"{devices_phrase(num_devices)})")
    if isinstance(err, MeshTooLarge):
      raise err.with_fix(fix) from None
    raise ConfigError(err.field, err.problem, fix + ".") from None
  rules = dict(table)
  m = config.model
  # Every rule that splits a head count it does not divide, so the fix that
  # leaves them unsplit names them all at once.
  failing = [(field, name) for field, names in _HEAD_COUNTS for name in names
             if m[field] % split_size(table, name, sizes)]
  if failing:
    field, name = failing[0]
    axis = rules[name][0]
    unsplit = " ".join(f"--config.mesh.rules.{n}=()" for _, n in failing)
    raise ConfigError(
        f"mesh.{axis}" if saved_model else f"model.{field}",
        f"{m[field]} {field.replace('num_', '').replace('_', ' ')} cannot be "
        f"split over {_describe(rules, name, sizes)}.",
        f"choose mesh.{axis} dividing {m[field]} (e.g. "
        f"{_resize(config, axis, table, num_devices, training)}"
        f"), {'' if saved_model else f'change model.{field}, '}or leave the heads "
        f"unsplit: {unsplit}.")
  # mesh.expert > 1 with a dense model (moe.num_experts = 0) is allowed: `batch`
  # is split over `expert` too, so it is plain data parallelism.
  experts = m.moe.num_experts if "moe" in m else 0
  e = split_size(table, "experts", sizes)
  if experts and experts % e:
    axis = rules["experts"][0]
    raise ConfigError(
        f"mesh.{axis}" if saved_model else "model.moe.num_experts",
        f"{experts} experts cannot be split over {_describe(rules, 'experts', sizes)}.",
        f"choose mesh.{axis} dividing {experts} (e.g. "
        f"{_resize(config, axis, table, num_devices, training)})"
        + ("." if saved_model else f", or a multiple of {e} experts."))
  if experts:
    both = _split_by_both(rules, "experts", "mlp", sizes)
    if both:
      raise ConfigError(
          "mesh.rules.experts",
          f"splits the experts over {both}, which also split each expert's hidden "
          "dimension (`mlp`): an expert's shards would be on other devices than "
          "its tokens.",
          "map the experts to mesh axes the mlp rule does not use, e.g. "
          "--config.mesh.rules.experts=\"('expert',)\" (the default).")
    shared = _split_by_both(rules, "mlp", "batch", sizes)
    if shared:
      raise ConfigError(
          "mesh.rules.mlp",
          f"the experts' hidden dimension (`mlp`) and the batch are both split "
          f"over mesh axes {shared}: expert parallelism sums partial expert outputs "
          "over the `mlp` axes, which would add up different tokens.",
          "map `mlp` and `batch` to disjoint mesh axes (the default maps mlp to "
          "tensor and batch to data, fsdp, expert).")
  return sizes


def _split_by_both(rules: dict, a: str, b: str, sizes: dict[str, int]) -> list[str]:
  """The mesh axes of size > 1 that the rules map both logical axes `a` and `b` to."""
  return [axis for axis in rules.get(a, ()) if axis in rules.get(b, ())
          and sizes[axis] > 1]


def _describe(rules: dict, name: str, sizes: dict[str, int]) -> str:
  """'mesh.tensor=8', or 'mesh.data*mesh.fsdp*mesh.expert = 2*2*2' for several."""
  axes = rules.get(name, ())
  if len(axes) == 1:
    return f"mesh.{axes[0]}={sizes[axes[0]]}"
  return (f"{'*'.join(f'mesh.{a}' for a in axes)} = "
          f"{'*'.join(str(sizes[a]) for a in axes)}")


def _counts_on(config: Any, axis: str, table) -> dict[str, int]:
  """{model field: count} of what the rules split over mesh `axis`: heads, kv
  heads, experts."""
  m, rules = config.model, dict(table)
  counts = {f"model.{field}": m[field] for field, names in _HEAD_COUNTS
            if any(axis in rules.get(n, ()) for n in names)}
  experts = m.moe.num_experts if "moe" in m else 0
  if experts and axis in rules.get("experts", ()):
    counts["model.moe.num_experts"] = experts
  return counts


def _with_batch_that_splits(err: ConfigError, config: Any,
                            num_devices: int) -> ConfigError:
  """`err` (the mesh's own refusal, whose fix resizes axes to fit the devices,
  `mesh_fix`) with a train.batch_size added to its fix where the batch would not
  split over the resized mesh (with accumulation, pipeline microbatches and loss
  chunks); `err` itself where it does, or where its fix is not a resize."""
  mesh = {a: config.mesh.get(a, 1) for a in AXES}
  if any(s == 0 or s < -1 for s in mesh.values()) or list(mesh.values()).count(-1) > 1:
    return err  # a size no mesh takes: its fix is not a resize
  changes = mesh_fix(mesh, num_devices)
  try:
    resized = resolve_shape({**mesh, **changes}, num_devices)
  except ConfigError:
    return err
  fits = _batch_that_splits(config, resized)
  if fits == config.train.batch_size:
    return err
  fix = resize_fix(changes, num_devices, f"--config.train.batch_size={fits}",
                   "the batch must split over the new data-parallel size")
  return err.with_fix(fix) if isinstance(err, MeshTooLarge) else ConfigError(
      err.field, err.problem, fix + ".")


def _resize(config: Any, axis: str, table, num_devices: int, training: bool) -> str:
  """`axis_fix` for every count the rules split over mesh `axis`."""
  return axis_fix(config, axis, _counts_on(config, axis, table).values(), num_devices,
                  training)


def more_micro_batches(config: Any, sizes: dict[str, int]) -> int | None:
  """The fewest accumulation micro-batches above `train.grad_accum_steps` that
  the data-parallel shard of `config`'s batch on mesh `sizes` splits into (with
  pipeline microbatches and loss chunks still splitting each), or None when none
  does: a plan that does not fit holds fewer activations with it."""
  rules = dict(normalize_rules(config.mesh.rules))
  shard = config.train.batch_size // split_size(rules, "batch", sizes)
  return next((a for a in range(config.train.grad_accum_steps + 1, shard + 1)
               if _accumulation_splits(config, shard, a)), None)


def _accumulation_splits(config: Any, shard: int, accum: int) -> bool:
  """Whether a data-parallel shard of `shard` sequences splits into `accum`
  accumulation micro-batches, each of which splits into `config`'s pipeline
  microbatches and loss chunks."""
  return shard % accum == 0 and (shard // accum) % row_unit(config) == 0


def _microbatches(config: Any) -> int:
  """Pipeline microbatches per (micro-)batch of a data-parallel replica."""
  p = config.get("pipeline")
  return _count(p.get("microbatches", 1) if p is not None else 1)


def _loss_chunks(config: Any) -> int:
  return _count(config.model.get("loss_chunks", 1))


def _count(value: Any) -> int:
  """`value` where it is a count, else 1: the batch checks read a bad
  microbatch or chunk count as 1 and leave its refusal to its own check."""
  return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def row_unit(config: Any) -> int:
  """What each accumulation micro-batch's sequences (per data-parallel shard)
  must be a multiple of: both the pipeline microbatches and the loss chunks
  split them."""
  return math.lcm(_microbatches(config), _loss_chunks(config))


def _row_unit_text(config: Any) -> str:
  """`row_unit` as a factor of a batch-size fix's "a multiple of" text ("" for 1)."""
  m, chunks = _microbatches(config), _loss_chunks(config)
  named = [f"pipeline.microbatches={m}"] * (m > 1) + [f"model.loss_chunks={chunks}"] * (
      chunks > 1)
  unit = math.lcm(m, chunks)
  if unit == 1:
    return ""
  return f" x {named[0]}" if len(named) == 1 else (
      f" x {unit} (the least common multiple of {' and '.join(named)})")


def _batch_that_splits(config: Any, sizes: dict[str, int]) -> int:
  """train.batch_size rounded down (to one unit at least) to a multiple of the
  data-parallel size on mesh `sizes` x accumulation micro-batches x `row_unit`
  (pipeline microbatches and loss chunks), which every batch split check passes."""
  unit = (split_size(dict(normalize_rules(config.mesh.rules)), "batch", sizes)
          * config.train.grad_accum_steps * row_unit(config))
  return max(unit, config.train.batch_size // unit * unit)


def axis_fix(config: Any, axis: str, counts: Iterable[int], num_devices: int,
             training: bool = True) -> str:
  """Flags that resize mesh `axis` to the largest size (at most its current one)
  that divides every count in `counts` and still fits the devices (with -1 on
  `data` when no other axis takes the rest); when no size of `axis` alone fits,
  the other axes shrink too, as the mesh's own fix shrinks them (`mesh_fix`), so
  the flags name every axis to change at once. For `training`, a mesh of that
  size on which the batch still splits comes first; where none does, the flags
  add a train.batch_size that does (serving reads no batch size)."""
  current = config.mesh.get(axis, 1)
  if current == -1:  # the rest of the devices: its resolved size
    try:
      current = resolve_shape({a: config.mesh.get(a, 1) for a in AXES},
                              num_devices)[axis]
    except ConfigError:
      current = 1
  current = max(current, 1)
  return resize_to(config, axis, [s for s in range(current, 0, -1)
                                  if not any(c % s for c in counts)], num_devices,
                   training) or mesh_flags({axis: 1})


def axis_off(config: Any, axis: str, num_devices: int) -> str:
  """Flags that set mesh `axis` to 1, giving its devices to `data` (-1) unless
  another axis already takes the rest (and a batch size that splits, if needed)."""
  return resize_to(config, axis, [1], num_devices) or mesh_flags({axis: 1})


def resize_to(config: Any, axis: str, sizes: list[int], num_devices: int,
              training: bool = True) -> str | None:
  """`axis_fix`'s flags for the first of `sizes` (in order of preference) whose
  mesh fits the devices; None when none does."""
  mesh = {a: config.mesh.get(a, 1) for a in AXES}
  # The devices an axis gives up go to `data`; when it is `data` that shrinks
  # (e.g. experts mapped onto it), to `fsdp`, the other axis the batch splits over.
  taker = "data" if axis != "data" else "fsdp"
  candidates = [{axis: s, **extra} for s in sizes for extra in ({}, {taker: -1})]
  candidates += [{axis: s, **{a: v for a, v in mesh_fix({**mesh, axis: s},
                                                        num_devices).items() if a != axis}}
                 for s in sizes]
  fitting = []
  for changes in candidates:
    try:
      fitting.append((changes, resolve_shape({**mesh, **changes}, num_devices)))
    except ConfigError:
      continue
  if not fitting:
    return None
  changes, resized = fitting[0]
  if not training:
    return mesh_flags(changes)
  # Of the meshes with the preferred size, one the batch still splits over.
  batch = config.train.batch_size
  changes, resized = next(((c, r) for c, r in fitting if c[axis] == changes[axis]
                           and _batch_that_splits(config, r) == batch), fitting[0])
  fits = _batch_that_splits(config, resized)
  return (mesh_flags(changes)
          + (f" --config.train.batch_size={fits}" if fits != batch else ""))
