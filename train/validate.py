"""Whole-config validation, run before anything is compiled."""

from __future__ import annotations

import copy
import math
import re

import jax

import kernels
import model
import sharding
from sharding import ConfigError
from sharding.report import count
from model import pipeline
from train import compression, data, diloco, galore, matrices, optimizer
from train.state import model_spec
from train.unread import read


def _positive(config, fields: list[str], minimum: float = 1) -> None:
  """Each of `fields` the run reads (`train.unread.read`) is at least `minimum`."""
  for path in fields:
    if not read(config, path):
      continue
    group, name = path.split(".")
    value = config[group][name]
    if value < minimum:
      raise ConfigError(path, f"must be at least {minimum}, got {value}.",
                        f"set --config.{path} to a value >= {minimum}.")


def _finite(config, prefix: str = "") -> None:
  """Every float in the config is a finite number. NaN passes every comparison
  check (`nan <= 0` is False): `optim.learning_rate=nan` trained NaN losses
  whose checkpoints then displaced every good one."""
  for name, value in config.items():
    path = f"{prefix}{name}"
    if hasattr(value, "items"):
      _finite(value, path + ".")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(path, f"is {value}; a config number must be finite.",
                        f"set --config.{path} to a finite number.")


def validate_config(config, num_devices: int) -> dict[str, int]:
  """Raises ConfigError naming the field, the numbers and the fix. Returns the
  resolved mesh sizes."""
  _finite(config)
  model.validate(config.model)
  data.validate(config)
  _positive(config, ["train.steps", "train.batch_size", "train.grad_accum_steps",
                     "log.every_steps", "data.seq_len", "checkpoint.keep"])
  _positive(config, ["optim.warmup_steps", "train.eval_every", "train.eval_steps",
                     "optim.weight_decay", "optim.clip_norm", "train.z_loss",
                     "data.prefetch_batches", "checkpoint.every_steps",
                     "checkpoint.keep_best"], 0)
  if not 0 <= config.train.seed < 2 ** 32:
    raise ConfigError(
        "train.seed", f"is {config.train.seed}; JAX's random keys hold 32 bits, so "
        "seeds outside [0, 2**32) repeat those inside it.",
        "set --config.train.seed to a value in [0, 4294967295].")
  if config.train.eval_every and config.train.eval_steps < 1:
    raise ConfigError(
        "train.eval_steps", f"is {config.train.eval_steps} while train.eval_every="
        f"{config.train.eval_every}: every evaluation would average no batches.",
        "set --config.train.eval_steps to at least 1, or --config.train.eval_every=0 "
        "to train without evaluation.")
  if config.optim.learning_rate <= 0:
    raise ConfigError("optim.learning_rate",
                      f"must be positive, got {config.optim.learning_rate}.",
                      "set e.g. --config.optim.learning_rate=3e-4.")
  _validate_optim(config)
  sizes = sharding.validate_plan(config, num_devices)
  _validate_attention(config, sizes)
  _validate_pipeline(config, sizes)
  _validate_diloco(config, sizes)
  _validate_compression(config, sizes)
  return sizes


def context_note(config) -> str:
  """A note when the run trains on sequences longer than the model's declared
  context (`model.max_position_embeddings`, what export-hf writes and past which
  generate warns); "" otherwise. Rotary positions go on past it, so it is allowed."""
  length, context = config.data.seq_len, config.model.max_position_embeddings
  if length <= context:
    return ""
  return (f"note: data.seq_len={length} is past model.max_position_embeddings="
          f"{context}: export-hf will declare a context of {context} and generate "
          f"warns beyond it; --config.model.max_position_embeddings={length} declares "
          "the length trained on.")


def _choice(path: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError.choice(path, value, allowed)


def _validate_optim(config) -> None:
  """optim.name, state_dtype, offload and galore_projector; the matrices regex;
  GaLore's rank against every matrix it projects (one per layer, as
  train.matrices groups them)."""
  o = config.optim
  _choice("optim.name", o.name, optimizer.NAMES)
  _choice("optim.state_dtype", o.state_dtype, optimizer.STATE_DTYPES)
  _choice("optim.offload", o.offload, optimizer.OFFLOADS)
  if read(config, "optim.galore_projector"):
    _choice("optim.galore_projector", o.galore_projector, galore.PROJECTORS)
  if o.offload == "host":
    kinds = host_memory_kinds()
    if optimizer.HOST not in kinds:
      raise ConfigError(
          "optim.offload", f"is 'host', but the {jax.default_backend()} backend has "
          f"no {optimizer.HOST!r} memory (its memory kinds: {', '.join(kinds)}).",
          "set --config.optim.offload=none, or run on a backend with host memory "
          "(TPU, GPU).")
  # decay rates in [0, 1), each with the value its fix suggests (a field the
  # optimizer does not read is not checked: its fix would be refused)
  for field, usual in (("momentum", 0.95), ("normuon_b2", 0.95), ("b1", 0.9),
                       ("b2", 0.95)):
    if read(config, f"optim.{field}") and not 0 <= o[field] < 1:
      raise ConfigError(f"optim.{field}", f"must be in [0, 1), got {o[field]}.",
                        f"set --config.optim.{field}={usual}.")
  if not 0 <= o.min_lr_ratio <= 1:
    raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got "
                      f"{o.min_lr_ratio} (the cosine ends at learning_rate x it).",
                      "set --config.optim.min_lr_ratio=0.1.")
  # scales whose sign flips the update (a negative one trains uphill)
  for field, low, usual in (("eps", "positive", 1e-8), ("galore_scale", "positive",
                                                        0.25),
                            ("muon_rms", "at least 0 (0: width scaling)", 0.2)):
    if not read(config, f"optim.{field}"):
      continue
    if o[field] < 0 or (o[field] == 0 and low == "positive"):
      raise ConfigError(f"optim.{field}", f"must be {low}, got {o[field]}.",
                        f"set --config.optim.{field}={usual}.")
  if o.decay_steps is not None and o.decay_steps < 1:
    raise ConfigError("optim.decay_steps", f"must be at least 1 when set, got "
                      f"{o.decay_steps}.", "leave it unset (the schedule then spans "
                      "train.steps), or set the steps it should span.")
  _positive(config, ["optim.ns_steps", "optim.galore_rank",
                     "optim.galore_update_proj_gap"])
  for field in ("matrices", "no_decay"):
    if not read(config, f"optim.{field}"):
      continue
    try:
      matrices.patterns(o[field])
    except re.error as e:
      raise ConfigError(f"optim.{field}", f"holds an invalid regex: {e}.",
                        "give comma-separated Python regexes.") from None
  if o.name in matrices.OPTIMIZERS:
    _validate_matrices(config)


def host_memory_kinds() -> list[str]:
  """Memory kinds of the first device (CPU has 'pinned_host' from jax 0.4.36 on)."""
  return [m.kind for m in jax.devices()[0].addressable_memories()]


def _matrix_sides(config) -> list[tuple[int, str, list[int], tuple[int, ...]]]:
  """(the smaller side, name, [m, n], shape) of each parameter optim.matrices
  names. Raises ConfigError for a regex that names no parameter or a non-matrix."""
  o = config.optim
  spec = model_spec(model.ModelConfig.from_config(config.model),
                    sharding.normalize_rules(config.mesh.rules))
  leaves = [(sharding.path_name(p), x)
            for p, x in jax.tree_util.tree_leaves_with_path(spec.abstract_params)]
  if not any(matrices.is_matrix(name, o.matrices) for name, _ in leaves):
    raise ConfigError(
        "optim.matrices", f"{o.matrices!r} matches none of the model's parameters "
        f"({', '.join(name for name, _ in leaves)}), so {o.name} would act on "
        "nothing and the run would be AdamW.",
        "name weight matrices, e.g. the default --config.optim.matrices="
        "'attn/(q|k|v|o)$,mlp/(gate|up|down)$'.")
  sides = []
  for name, x in leaves:
    if not matrices.is_matrix(name, o.matrices):
      continue
    if x.ndim < 2:
      raise ConfigError(
          "optim.matrices", f"matches {name} of shape {tuple(x.shape)}, which is "
          "not a matrix.", "narrow the regex so it names weight matrices only.")
    m, n = matrices.matrix_shape(x.shape, matrices.dims(name, x.ndim))
    sides.append((min(m, n), name, [m, n], tuple(x.shape)))
  return sides


def _validate_matrices(config) -> None:
  o = config.optim
  side, name, mn, shape = min(_matrix_sides(config))
  if o.name == "galore" and o.galore_rank > side:
    raise ConfigError(
        "optim.galore_rank", f"is {o.galore_rank}, larger than the smaller side "
        f"of {name}'s {mn} matrices (shape {shape}), the smallest optim.matrices "
        "names.", f"set --config.optim.galore_rank={side} (or less), or leave "
        f"{name} out of optim.matrices.")


def galore_rank_limit(config) -> int:
  """The largest optim.galore_rank `config`'s model and optim.matrices allow (the
  smaller side of the smallest matrix named). Raises ConfigError as
  `validate_config` does for matrices that name no matrix."""
  return min(_matrix_sides(config))[0]


def _validate_attention(config, sizes: dict[str, int]) -> None:
  """Sequence-parallel attention needs shapes its kernels can split, over the mesh
  axes the rules map `length` and the heads to."""
  rules = sharding.normalize_rules(config.mesh.rules)
  table = dict(rules)
  impl, seq = config.model.attention, sharding.split_size(rules, "length", sizes)
  batch = [a for a in table.get("batch", ()) if sizes[a] > 1]
  taken = [a for a in table.get("length", ()) if a in batch]
  if taken:  # the batch comes first in every activation, and a mesh axis splits one
    rest = [a for a in table["batch"] if a not in taken]
    free = [a for a in sharding.AXES if sizes.get(a, 1) > 1 and a not in batch]
    other = (f"(e.g. --config.mesh.rules.length=\"{(free[0],)!r}\")" if free else
             "(no axis of size > 1 is free of the batch: give one, e.g. "
             "mesh.sequence, devices)")
    raise ConfigError(
        "mesh.rules.length", f"splits the length over {taken}, which "
        f"mesh.rules.batch splits the batch over too (size "
        f"{', '.join(str(sizes[a]) for a in taken)}); a mesh axis splits one dimension "
        "of an activation, the batch first, so the length would not be split.",
        f"take {' and '.join(map(repr, taken))} out of the batch's axes "
        f"(--config.mesh.rules.batch=\"{tuple(rest)!r}\"), or map `length` to "
        f"another axis {other}.")
  length_axes = [a for a in table.get("length", ()) if sizes[a] > 1]
  if impl in kernels.SEQUENCE_PARALLEL and not length_axes:
    axes = table.get("length", ())
    where = (" and ".join(f"mesh.{a}={sizes[a]}" for a in axes) if axes else
             "no mesh axis (mesh.rules.length is empty)")
    raise ConfigError(
        "model.attention", f"is {impl!r}, which exchanges the sequence between the "
        f"devices of the mesh axis the rules split `length` over, but {where} does "
        "not split it.", (f"set --config.mesh.{axes[0]}=2" if axes else
                         "set --config.mesh.rules.length=\"('sequence',)\" and "
                         "--config.mesh.sequence=2") +
        " (or more; it must divide data.seq_len), or --config.model.attention=auto.")
  if impl in kernels.SEQUENCE_PARALLEL and len(length_axes) > 1:
    raise ConfigError(
        "mesh.rules.length", f"{impl} attention exchanges over one mesh axis, but "
        f"the rules split the length over {length_axes}.",
        "map `length` to one mesh axis (e.g. --config.mesh.rules.length="
        "\"('sequence',)\").")
  # attention=ring needs seq_len % sequence == 0, which sharding.validate_plan checks.
  if impl == "ring_zigzag" and config.data.seq_len % (2 * seq):
    raise ConfigError(
        "data.seq_len", f"ring_zigzag attention on mesh.sequence={seq} cuts each "
        f"sequence into 2 x {seq} zig-zag chunks, but seq_len={config.data.seq_len} "
        f"is not a multiple of {2 * seq}.",
        f"use a seq_len divisible by {2 * seq}, or --config.model.attention=ring.")
  if impl == "ulysses" and seq > 1:
    m, axes = config.model, kernels.partition.Axes.from_rules(rules)

    def problem_at(s: int) -> str | None:
      """The kernel's own check (`ulysses.check`) on the mesh with the length's axis
      of size `s`: the heads split as the kernel splits them."""
      shape = {**sizes, length_axes[0]: s}
      mesh = jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape))
      return kernels.ulysses.check(mesh, m.num_heads, m.num_kv_heads, axes)
    problem = problem_at(seq)
    if problem:
      works = [s for s in range(seq - 1, 1, -1) if config.data.seq_len % s == 0
               and not problem_at(s)]
      resized = sharding.validate.resize_to(config, length_axes[0], works,
                                            math.prod(sizes.values()))
      raise ConfigError(
          "model.attention", f"{problem}.", "use --config.model.attention="
          "ring_zigzag (or ring)" + (f", or {resized}, the largest smaller "
                                     "sequence size Ulysses can split these heads "
                                     "over" if resized else "") + ".")


def _validate_compression(config, sizes: dict[str, int]) -> None:
  """optim.compression: a method, a density in (0, 1], DGC on momentum SGD, and
  replicas to compress between (`data` > 1, the batch's outermost axis, no
  parameter split over it)."""
  c = config.optim.get("compression")
  if c is None:
    return
  _choice("optim.compression.method", c.method, compression.METHODS)
  if c.method == "none":
    return
  path = "optim.compression"
  if not 0 < c.density <= 1:
    raise ConfigError(f"{path}.density", f"must be in (0, 1], got {c.density}.",
                      f"set --config.{path}.density=0.001 (0.1% of each tensor).")
  if not 0 < c.sample_fraction <= 1:
    raise ConfigError(f"{path}.sample_fraction",
                      f"must be in (0, 1], got {c.sample_fraction}.",
                      f"set --config.{path}.sample_fraction=0.01, or 1 for an "
                      "exact top-k.")
  if c.warmup_steps < 0:
    raise ConfigError(f"{path}.warmup_steps", f"must be >= 0, got {c.warmup_steps}.",
                      f"set --config.{path}.warmup_steps=0 (no warm-up).")
  if sizes["data"] == 1:
    raise ConfigError(
        f"{path}.method", f"is {c.method!r} but mesh.data=1: there are no replicas "
        "to exchange compressed gradients between.",
        (f"make the FSDP shards replicas: --config.mesh.data={sizes['fsdp']} "
         "--config.mesh.fsdp=1" if sizes["fsdp"] > 1 else
         "give `data` some of the devices (e.g. --config.mesh.data=2 and halve "
         "another axis)") + f", or set --config.{path}.method=none.")
  if c.method == "dgc" and config.optim.name != "sgd":
    raise ConfigError(
        f"{path}.method", f"is 'dgc', which corrects and masks momentum SGD's "
        f"velocity, but optim.name={config.optim.name!r}.",
        f"set --config.optim.name=sgd, or --config.{path}.method=topk to compress "
        f"in front of {config.optim.name}.")
  if c.method == "dgc" and not c.error_feedback:
    raise ConfigError(
        f"{path}.error_feedback", "is false, but DGC always accumulates what it "
        "has not sent (it switches only for method=topk).",
        f"set --config.{path}.method=topk for top-k without error feedback, or "
        f"--config.{path}.error_feedback=true.")
  rules = sharding.normalize_rules(config.mesh.rules)
  spec = model_spec(model.ModelConfig.from_config(config.model), rules)
  problem = compression.replica_view_problem(rules, spec.logical, sizes=sizes)
  if problem == "batch":
    raise ConfigError(
        "mesh.rules.batch", f"is {dict(rules).get('batch', ())}; compression "
        "exchanges between the replicas of `data`, which must split the batch "
        "first.", "map batch to (\"data\", ...), e.g. the default "
        "--config.mesh.rules.batch=\"('diloco', 'data', 'fsdp', 'expert')\".")
  if problem:
    raise ConfigError(
        f"mesh.rules.{problem}", "splits parameters over `data`, but with "
        "compression each `data` replica holds a whole copy of the model.",
        f"map {problem} to fsdp or tensor instead, or set "
        f"--config.{path}.method=none.")


def _validate_pipeline(config, sizes: dict[str, int]) -> None:
  """The `pipeline` group and mesh.stage: a schedule, layer groups that split
  evenly over stages and repeats, microbatches that split each replica's
  (micro-)batch, and a model of one layer kind."""
  p = config.get("pipeline")
  stages, n = sizes.get("stage", 1), math.prod(sizes.values())
  if p is None:
    p = {"microbatches": 1, "schedule": "gpipe", "repeats": 1}
  if read(config, "pipeline.schedule"):
    _choice("pipeline.schedule", p["schedule"], pipeline.SCHEDULES)
  for field in ("microbatches", "repeats"):
    if read(config, f"pipeline.{field}") and p[field] < 1:
      raise ConfigError(f"pipeline.{field}", f"must be at least 1, got {p[field]}.",
                        f"set --config.pipeline.{field}=1 or more.")
  m, r = p["microbatches"], p["repeats"]
  if stages == 1 and m == 1:  # no pipeline: schedule and repeats are not read
    return
  # What pipelining does not combine with first: the pipeline's own fixes
  # below would only lead here.
  def no_pipeline() -> str:
    """Flags that turn pipelining off (the batch checked without microbatches)."""
    unpipelined = copy.deepcopy(config)
    if unpipelined.get("pipeline") is not None:
      unpipelined.pipeline.microbatches = 1
    return (f"{sharding.validate.axis_off(unpipelined, 'stage', n)} "
            "--config.pipeline.microbatches=1")
  if sizes.get("diloco", 1) > 1:
    raise ConfigError(
        "mesh.stage" if stages > 1 else "pipeline.microbatches",
        f"pipelining and mesh.diloco={sizes['diloco']} do not combine yet.",
        f"set {sharding.validate.axis_off(config, 'diloco', n)}, or {no_pipeline()}.")
  c = config.optim.get("compression")
  if c is not None and c.method != "none":
    raise ConfigError(
        "optim.compression.method", f"is {c.method!r}: gradient compression and "
        "pipelining do not combine yet.",
        f"set --config.optim.compression.method=none, or {no_pipeline()}.")
  if r > 1 and p["schedule"] != "circular":
    more = f" --config.pipeline.microbatches={stages}" if m < stages else ""
    raise ConfigError(
        "pipeline.repeats", f"is {r} with schedule={p['schedule']!r}: only the "
        "circular schedule gives a stage several groups of layers.",
        f"set --config.pipeline.schedule=circular{more}, or "
        "--config.pipeline.repeats=1.")
  rules = dict(sharding.normalize_rules(config.mesh.rules))
  if stages > 1 and tuple(rules.get("layers", ())) != ("stage",):
    raise ConfigError(
        "mesh.rules.layers", f"is {rules.get('layers', ())} with mesh.stage="
        f"{stages}: the pipeline splits the layer stack over `stage`.",
        "set --config.mesh.rules.layers=\"('stage',)\" (the default).")
  other = sorted(name for name, axes in rules.items()
                 if name != "layers" and "stage" in axes)
  if stages > 1 and other:
    raise ConfigError(
        f"mesh.rules.{other[0]}", "uses `stage`, which holds pipeline stages alone.",
        f"map {other[0]} to other mesh axes (see the default rules).")
  cfg = model.ModelConfig.from_config(config.model)
  repeats = r if p["schedule"] == "circular" else 1
  units = cfg.num_layers // cfg.unit
  if units % (stages * repeats):
    what = "layers" if cfg.unit == 1 else f"units of {cfg.unit} layers"
    raise ConfigError(
        "mesh.stage" if repeats == 1 else "pipeline.repeats",
        f"the model's {units} {what} do not split into mesh.stage={stages} x "
        f"pipeline.repeats={repeats} equal groups.",
        f"choose mesh.stage and pipeline.repeats whose product divides {units}, e.g. "
        f"{_pipeline_fix(config, units, stages, repeats, n)}, "
        "or change model.num_layers.")
  if not cfg.scan_layers:
    raise ConfigError(
        "model.scan_layers", "is False in a pipelined model (mesh.stage > 1 or "
        "pipeline.microbatches > 1): each stage scans its own group of layers.",
        "set --config.model.scan_layers=true.")
  if len(cfg.segments()) > 1:
    raise ConfigError(
        "model.ladder_layers", f"{cfg.ladder_layers!r} mixes ladder and standard "
        f"layers ({cfg.describe_blocks()}), but a pipelined model (mesh.stage > 1 "
        "or pipeline.microbatches > 1) must have one layer kind, since every stage "
        "runs the same program.",
        "set --config.model.ladder_layers=all, or --config.model.block=standard "
        "--config.model.ladder_layers=all.")
  if p["schedule"] == "circular" and m < stages:
    raise ConfigError(
        "pipeline.microbatches", f"is {m} with the circular schedule over "
        f"{stages} stages: a microbatch coming back to stage 0 must find it free, "
        "which needs at least as many microbatches as stages.",
        f"set --config.pipeline.microbatches={stages} (or more), or "
        "--config.pipeline.schedule=gpipe"
        + (" --config.pipeline.repeats=1." if r > 1 else "."))
  dp = sharding.split_size(tuple(rules.items()), "batch", sizes)
  rows = config.train.batch_size // dp // config.train.grad_accum_steps
  if rows % m:
    # The next batch whose rows split into the microbatches and the loss chunks.
    unit = sharding.validate.row_unit(config)
    fits = dp * config.train.grad_accum_steps * unit * max(1, -(-rows // unit))
    accum = count(config.train.grad_accum_steps, "accumulation micro-batch",
                  "accumulation micro-batches")
    # One microbatch on one stage is no pipeline, whose schedule and repeats then
    # go unread: not a fix where they were set (the unread refusal sent back here).
    set_here = p["schedule"] != "gpipe" or r > 1
    raise ConfigError(
        "pipeline.microbatches", f"is {m}, but each data-parallel replica's "
        f"(micro-)batch has {count(rows, 'sequence')} (train.batch_size="
        f"{config.train.batch_size} over {count(dp, 'replica')} and "
        f"{accum}).",
        "set " + ", or ".join(
            [f"--config.pipeline.microbatches={d}" for d in range(m - 1, 0, -1)
             if rows % d == 0 and (p["schedule"] != "circular" or d >= stages)
             and not (d == 1 and stages == 1 and set_here)][:1]
            + [f"--config.train.batch_size={fits}"])
        + ".")


def _pipeline_fix(config, units: int, stages: int, repeats: int,
                  num_devices: int) -> str:
  """Flags that split `units` into stages x repeats groups: fewer repeats if the
  stages divide the units, else fewer stages (fitting the devices), one repeat."""
  if repeats > 1 and units % stages == 0:
    return ("--config.pipeline.repeats="
            f"{sharding.mesh.largest_divisor(units // stages, repeats)}")
  fix = sharding.validate.axis_fix(config, "stage", [units], num_devices)
  return fix + (" --config.pipeline.repeats=1" if repeats > 1 else "")


def _validate_diloco(config, sizes: dict[str, int]) -> None:
  """With mesh.diloco > 1, the `diloco` group (read only then): a schedule whose
  fragments and overlap fit in H steps, an outer optimizer, a transport dtype,
  and replicas that each hold the whole model and split the batch first."""
  d = config.get("diloco")
  if d is None or sizes.get("diloco", 1) == 1:
    return
  _choice("diloco.outer_dtype", d.outer_dtype, diloco.OUTER_DTYPES)
  _positive(config, ["diloco.sync_every", "diloco.fragments"])
  _positive(config, ["diloco.overlap_steps"], 0)
  if d.outer_lr <= 0:
    raise ConfigError("diloco.outer_lr", f"must be positive, got {d.outer_lr}.",
                      "set --config.diloco.outer_lr=0.7 (the DiLoCo paper's).")
  if not 0 <= d.outer_momentum < 1:
    raise ConfigError("diloco.outer_momentum",
                      f"must be in [0, 1), got {d.outer_momentum}.",
                      "set --config.diloco.outer_momentum=0.9.")
  if read(config, "diloco.alpha") and not 0 <= d.alpha <= 1:
    raise ConfigError("diloco.alpha", f"must be in [0, 1], got {d.alpha}.",
                      "set --config.diloco.alpha=0.5.")
  units = config.model.num_layers // model.ModelConfig.from_config(config.model).unit
  if d.sync_every % d.fragments:
    fewer = sharding.mesh.largest_divisor(d.sync_every, min(d.fragments, units))
    longer = -(-d.sync_every // d.fragments) * d.fragments  # the next multiple
    raise ConfigError(
        "diloco.fragments", f"{d.fragments} fragments cannot be spaced evenly in "
        f"the {count(d.sync_every, 'step')} of diloco.sync_every.",
        f"set --config.diloco.fragments={fewer} (it divides {d.sync_every})"
        + (f", or --config.diloco.sync_every={longer} (a multiple of "
           f"{d.fragments})" if d.fragments <= units else "") + ".")
  if d.fragments > units:
    raise ConfigError(
        "diloco.fragments", f"is {d.fragments}, but the model has "
        f"{count(units, 'layer group')} to split into fragments.",
        f"set --config.diloco.fragments to at most {units}.")
  if d.overlap_steps >= d.sync_every:
    raise ConfigError(
        "diloco.overlap_steps", f"is {d.overlap_steps}: a fragment's exchange must "
        f"land before its next one starts, {count(d.sync_every, 'step')} later "
        "(diloco.sync_every).",
        f"set --config.diloco.overlap_steps below {d.sync_every} (the paper: 1 to 5).")
  one_replica = lambda: sharding.validate.axis_off(  # noqa: E731  (error paths only)
      config, "diloco", math.prod(sizes.values()))
  c = config.optim.get("compression")
  if c is not None and c.method != "none":
    raise ConfigError(
        "optim.compression.method", f"is {c.method!r} with mesh.diloco="
        f"{sizes['diloco']}: gradient compression over `data` and DiLoCo over "
        "`diloco` do not combine yet.",
        f"set --config.optim.compression.method=none, or {one_replica()}.")
  if config.optim.offload != "none":
    raise ConfigError(
        "optim.offload", f"is {config.optim.offload!r} with mesh.diloco > 1: "
        "DiLoCo's stacked inner optimizer states stay on the device.",
        f"set --config.optim.offload=none, or {one_replica()}.")
  rules = sharding.normalize_rules(config.mesh.rules)
  spec = model_spec(model.ModelConfig.from_config(config.model), rules)
  problem = compression.replica_view_problem(rules, spec.logical, diloco.REPLICA_AXIS,
                                             sizes)
  if problem == "batch":
    raise ConfigError(
        "mesh.rules.batch", f"is {dict(rules).get('batch', ())}; DiLoCo replicas "
        "train on their own rows, so `diloco` must split the batch first.",
        "map batch to (\"diloco\", ...), e.g. the default --config.mesh.rules."
        "batch=\"('diloco', 'data', 'fsdp', 'expert')\".")
  if problem:
    raise ConfigError(
        f"mesh.rules.{problem}", "splits parameters over `diloco`, but each DiLoCo "
        "replica holds a whole copy of the model.",
        f"map {problem} to fsdp or tensor instead.")
