"""Optimizers (`optim.name`): AdamW, momentum SGD, Muon, NorMuon, GaLore.

All share linear warmup, cosine decay, global-norm clipping and the decay mask.
Muon, NorMuon and GaLore act on the parameters `optim.matrices` names, one matrix
per layer (`train.matrices`); the others (norms, embedding table, by default the
LM head) take AdamW with the same learning rate, as the papers do.
`optim.state_dtype` keeps the parameter-shaped state in bfloat16; `optim.offload=host`
keeps all optimizer state in pinned host memory and moves it to the device for the
update (`state_shardings` places it).
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import scale_by_shape

import sharding
from train import matrices
from train.compression import Compression
from train.galore import scale_by_galore_per_layer
from train.muon import scale_by_muon
from train.normuon import scale_by_normuon

NAMES = ("adamw", "sgd", "muon", "normuon", "galore")
STATE_DTYPES = ("float32", "bfloat16")
OFFLOADS = ("none", "host")
HOST = "pinned_host"


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay over `optim.decay_steps` (default: the run's
  steps). Setting it lets a run be extended or stopped early on the same curve.
  Warmup is cut to the schedule's length - 1 (`warmup_note` says when).

  Indexed by the optimizer's update count (0 for the first update), it gives
  update n (count n - 1, the step the metrics call n) the curve's value at n:
  warmup W reaches the peak at step W (step 1 takes learning_rate / W, not 0),
  and step `decay_steps` takes learning_rate x min_lr_ratio, as `describe` says.
  """
  o = optim_cfg
  total_steps = o.decay_steps or total_steps
  warmup = _warmup(o, total_steps)
  curve = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=o.learning_rate * o.min_lr_ratio)
  return lambda count: curve(count + 1)


def _warmup(optim_cfg, length: int) -> int:
  return min(optim_cfg.warmup_steps, max(length - 1, 0))


def _steps(n: int) -> str:
  return sharding.report.count(n, "step")


def warmup_note(optim_cfg, total_steps: int) -> str:
  """What a run says when `optim.warmup_steps` does not fit the schedule (a short
  fine-tune on the default 100 warmup steps); empty when it fits."""
  length = optim_cfg.decay_steps or total_steps
  warmup = _warmup(optim_cfg, length)
  if warmup == optim_cfg.warmup_steps:
    return ""
  return (f"optim.warmup_steps={optim_cfg.warmup_steps} does not fit a learning-rate "
          f"schedule of {_steps(length)}: warmup takes {_steps(warmup)} and the cosine "
          f"decay {length - warmup}; set --config.optim.warmup_steps (e.g. "
          f"{min(max(1, length // 10), warmup)}) to choose")


def resume_note(optim_cfg, total_steps: int, step: int) -> str:
  """What a run resumed at `step` says when its schedule (`optim.decay_steps`)
  already ended there: the steps left run at the final rate. Empty otherwise."""
  length = optim_cfg.decay_steps or total_steps
  if step < length or step >= total_steps:
    return ""
  end = optim_cfg.learning_rate * optim_cfg.min_lr_ratio
  when = (f"at step {length} (optim.decay_steps), where this run resumes" if step == length
          else f"at step {length} (optim.decay_steps), before this resume at step {step}")
  return (f"note: the learning-rate schedule ended {when}: steps {step + 1} "
          f"to {total_steps} run at its final rate {end:g}")


_SCHEDULE_FIELDS = ("learning_rate", "min_lr_ratio", "warmup_steps", "decay_steps")


def rate_change_note(saved_optim: dict, saved_steps: int | None, optim_cfg,
                     total_steps: int, step: int) -> str:
  """What a run resumed at `step` says when its next step's learning rate is not
  the one the saved run's schedule gave it: the two rates, and the two warm-ups
  when they differ (a longer train.steps with optim.decay_steps unset stretches
  the cosine, and can move a warm-up cut to the old length past the resume).
  `saved_optim` / `saved_steps`: the checkpoint's config.json `optim` group and
  `train.steps`. Empty when the rates agree or nothing is left to run."""
  if not saved_steps or step >= total_steps:
    return ""
  old = types.SimpleNamespace(**{f: saved_optim.get(f, getattr(optim_cfg, f))
                                 for f in _SCHEDULE_FIELDS})
  was = float(schedule(old, saved_steps)(step))  # the rate of step + 1
  now = float(schedule(optim_cfg, total_steps)(step))
  if math.isclose(was, now, rel_tol=1e-6, abs_tol=1e-12):
    return ""
  warmups = (_warmup(old, old.decay_steps or saved_steps),
             _warmup(optim_cfg, optim_cfg.decay_steps or total_steps))
  return (f"note: step {step + 1} takes learning rate {now:g}, where the saved run's "
          f"schedule gave it {was:g}"
          + (f"; warm-up {_steps(warmups[0])} -> {warmups[1]}"
             + (f" (steps {step + 1} to {warmups[1]} warm up again)"
                if warmups[0] <= step < warmups[1] else "")
             if warmups[0] != warmups[1] else ""))


def describe(optim_cfg, total_steps: int, replicas: int | None = None) -> str:
  """One line saying what `make_optimizer(optim_cfg, total_steps)` does: the
  update, which parameters take it, weight decay, clipping and the schedule.
  `replicas` (mesh.data): with DGC, the per-replica clip it implies."""
  o = optim_cfg
  length = o.decay_steps or total_steps
  warmup = _warmup(o, length)
  adam = f"adamw (b1 {o.b1:g}, b2 {o.b2:g})"
  # (Nesterov's look-ahead is a multiple of the momentum: nothing at momentum 0)
  momentum = f"momentum {o.momentum:g}{', nesterov' if o.nesterov and o.momentum else ''}"
  update = {
      "adamw": adam,
      "sgd": f"sgd ({momentum})",
      "muon": f"muon ({momentum}, {o.ns_steps} Newton-Schulz steps, "
              + (f"update RMS {o.muon_rms:g}: scale {o.muon_rms:g} x sqrt(max(in, out))"
                 if o.muon_rms
                 else "width scaling sqrt(max(1, out/in))")
              + f") on {o.matrices}, {adam} elsewhere",
      "normuon": f"normuon (momentum {o.momentum:g}, b2 {o.normuon_b2:g}, {o.ns_steps} "
                 f"Newton-Schulz steps) on {o.matrices}, {adam} elsewhere",
      "galore": f"galore (rank {o.galore_rank}, {o.galore_projector} projection every "
                f"{_steps(o.galore_update_proj_gap)}, scale {o.galore_scale:g}) on "
                f"{o.matrices}, {adam} elsewhere"}.get(o.name, o.name)
  clip = "no clipping"
  comp = Compression.from_config(o)
  if o.clip_norm and comp.method != "dgc":
    clip = f"global-norm clip {o.clip_norm:g}"
  elif o.clip_norm and comp.local_clip:  # DGC clips each replica's gradient instead
    per = (f" = {o.clip_norm / math.sqrt(replicas):.3g}" if replicas and replicas > 0
           else "")  # (a saved mesh.data of -1 leaves the count unknown)
    clip = (f"global-norm clip {o.clip_norm:g} / sqrt(replicas){per} per replica "
            "before DGC")
  elif o.clip_norm:
    clip = "no clipping (DGC's local_clip is off)"
  state = "".join([f"; {o.state_dtype} state" if o.state_dtype != "float32" else "",
                   "; state in host memory" if o.offload == "host" else ""])
  return (f"optimizer: {update}; weight decay {o.weight_decay:g} except {o.no_decay}; "
          f"{clip}; learning rate {o.learning_rate:g}, warmup {_steps(warmup)}, cosine "
          f"to {o.learning_rate * o.min_lr_ratio:g} at step {max(length, warmup + 1)}"
          + state)


def decay_mask(params, no_decay: str):
  """True for parameters that get weight decay: those whose '/'-joined path matches
  none of the comma-separated regexes in `no_decay` (default: norm scales)."""
  patterns = matrices.patterns(no_decay)

  def keep(path, _):
    name = sharding.path_name(path)
    return not any(p.search(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(keep, params)


def _muon_dims(tree):
  """MuonDimensionNumbers per leaf: each layer's [in, out] matrix on its own."""
  return jax.tree.map(lambda d: MuonDimensionNumbers(d.reduction, d.output),
                      matrices.tree_dims(tree),
                      is_leaf=lambda x: isinstance(x, matrices.Dims))


def _matrix_tx(o, lr, mask) -> optax.GradientTransformation:
  """The update of the parameters `optim.matrices` names."""
  if o.name == "muon":  # optax.contrib.muon's matrix branch, with rung's grouping
    core = optax.chain(
        scale_by_muon(ns_steps=o.ns_steps, beta=o.momentum, nesterov=o.nesterov),
        scale_by_shape(weight_dimension_numbers=_muon_dims,
                       consistent_rms=o.muon_rms or None))
  elif o.name == "normuon":
    core = scale_by_normuon(b1=o.momentum, b2=o.normuon_b2, eps=o.eps,
                            ns_steps=o.ns_steps)
  else:  # galore
    core = scale_by_galore_per_layer(
        o.galore_rank, o.galore_update_proj_gap, o.galore_scale,
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps), o.galore_projector)
  return optax.chain(core, optax.add_decayed_weights(o.weight_decay, mask),
                     optax.scale_by_learning_rate(lr))


def _base(o, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(o, total_steps)
  mask = lambda p: decay_mask(p, o.no_decay)  # noqa: E731
  adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=mask)
  if o.name == "adamw":
    return adamw
  if o.name == "sgd":  # PyTorch-style momentum (dampening 0), decoupled decay
    # DGC's momentum correction runs the momentum per replica, before the exchange.
    local = Compression.from_config(o).local_momentum
    return optax.chain(optax.identity() if local else
                       optax.trace(decay=o.momentum, nesterov=o.nesterov),
                       optax.add_decayed_weights(o.weight_decay, mask),
                       optax.scale_by_learning_rate(lr))
  if o.name not in NAMES:
    raise ValueError(f"unknown optim.name {o.name!r}")  # validate_config says more
  return optax.partition({"matrix": _matrix_tx(o, lr, mask), "adamw": adamw},
                         lambda p: matrices.labels(p, o.matrices))


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """`optim`'s optimizer. Global-norm clipping acts on the gradient it is given,
  except under DGC (`optim.compression.method=dgc`), which clips each replica's
  gradient before compressing it (`train.compression`)."""
  o = optim_cfg
  clip = o.clip_norm and Compression.from_config(o).method != "dgc"
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if clip else optax.identity(),
      _base(o, total_steps))
  if o.state_dtype == "bfloat16":
    tx = store_state_as(tx, jnp.bfloat16)
  if o.offload == "host":
    tx = offload_state(tx)
  return tx


# --- where the state lives --------------------------------------------------------

def owner(path, param_paths) -> tuple | None:
  """The parameter a state leaf belongs to: the longest tail of the dict keys on
  its path that is a parameter's path (optax states are NamedTuples, tuples and
  label-keyed dicts around params-keyed dicts). None for counters and constants."""
  keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
  return next((keys[i:] for i in range(len(keys)) if keys[i:] in param_paths), None)


def _param_keys(params) -> dict:
  return {tuple(k.key for k in p): x
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _mesh_axes(entry) -> tuple:
  """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def state_spec(shape: tuple, param_shape: tuple, param_spec: P,
               mesh_sizes: dict[str, int]) -> P:
  """The PartitionSpec of an optimizer-state leaf of `shape` owned by a parameter
  of `param_shape` sharded as `param_spec` (ZeRO: the state is sharded over every
  mesh axis its parameter is).

  1. An axis that is the parameter's own keeps its spec: every axis of the same
     size when the ranks agree (Adam's moments, NorMuon's per-neuron moment with
     its reduced axes kept as 1), else the leading axes while the sizes agree
     (the `[layers, (experts,)]` batch axes of GaLore's per-layer state).
  2. A mesh axis the parameter is sharded over that step 1 did not place (its
     axis was reduced or projected away: GaLore's `[layers, m, rank]` moments and
     projectors of a `[layers, embed, heads, head_dim]` projection) goes onto the
     largest state axis it still divides, so FSDP and tensor shard low-rank state
     as they shard the parameter. An axis nothing divides stays replicated.
  """
  pspec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
  if len(shape) == len(param_shape):
    spec = [a if n == m else None for a, n, m in zip(pspec, shape, param_shape)]
  else:
    spec = [None] * len(shape)
    for i, (n, m) in enumerate(zip(shape, param_shape)):
      if n != m:
        break
      spec[i] = pspec[i]
  placed = {a for e in spec for a in _mesh_axes(e)}
  for axis in (a for e in pspec for a in _mesh_axes(e) if a not in placed):
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
      have = math.prod(mesh_sizes[a] for a in _mesh_axes(spec[i]))
      if shape[i] % (have * mesh_sizes[axis]) == 0:
        spec[i] = _mesh_axes(spec[i]) + (axis,)
        spec[i] = spec[i][0] if len(spec[i]) == 1 else spec[i]
        break
  return P(*spec)


def opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh,
                        memory_kind: str | None = None):
  """A NamedSharding per optimizer-state leaf: `state_spec` of the parameter it
  belongs to; counters (also GaLore's per-layer ones) and constants are
  replicated. `memory_kind="pinned_host"`
  puts every leaf in host memory."""
  shapes = _param_keys(abstract_params)
  specs = {k: s.spec for k, s in _param_keys(param_shardings).items()}
  sizes = dict(mesh.shape)

  def one(path, leaf):
    key = owner(path, shapes)
    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
    spec = P() if key is None or not floating else state_spec(
        leaf.shape, shapes[key].shape, specs[key], sizes)
    return NamedSharding(mesh, spec, memory_kind=memory_kind)

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def _map_owned(fn, state, params):
  """fn on the floating leaves of `state` that belong to a parameter of `params`."""
  paths = _param_keys(params)

  def f(path, x):
    owned = owner(path, paths) is not None and jnp.issubdtype(x.dtype, jnp.floating)
    return fn(x) if owned else x
  return jax.tree_util.tree_map_with_path(f, state)


def store_state_as(tx: optax.GradientTransformation, dtype
                   ) -> optax.GradientTransformation:
  """Keeps every parameter-shaped (or parameter-derived) state buffer in `dtype`
  (moments, NorMuon's per-neuron moment, GaLore's projectors); the update computes
  in the parameters' dtype and rounds the new state to nearest."""

  def init(params):
    return _map_owned(lambda x: x.astype(dtype), tx.init(params), params)

  def update(updates, state, params=None):
    full = jax.tree.leaves(updates)[0].dtype
    state = _map_owned(lambda x: x.astype(full), state, updates)
    updates, state = tx.update(updates, state, params)
    return updates, _map_owned(lambda x: x.astype(dtype), state, updates)

  return optax.GradientTransformation(init, update)


class Offloaded(optax.GradientTransformation):
  """A transformation whose state `state_shardings` places in pinned host memory."""


def offload_state(tx: optax.GradientTransformation) -> Offloaded:
  """ZeRO-Offload-style: the state lives in pinned host memory between steps
  (`opt_state_shardings(..., memory_kind="pinned_host")`); the update copies it to
  the device, runs there, and copies the new state back (inside the jitted step)."""

  def update(updates, state, params=None):
    state = jax.device_put(state, jax.memory.Space.Device)
    updates, state = tx.update(updates, state, params)
    return updates, jax.device_put(state, jax.memory.Space.Host)

  return Offloaded(tx.init, update)
