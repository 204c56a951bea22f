"""Train state (params, optimizer state, step), its shardings, and initialisation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sharding
from model import Decoder, ModelConfig, logical_axes
from model.pipeline import Pipeline
from train import compression as compression_lib, diloco as diloco_lib, optimizer


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nested dict of arrays, as nnx.to_pure_dict gives
  opt_state: Any
  # Per-replica gradient-compression buffers, {name: params-like tree of
  # [replicas, *param.shape]} (train/compression.py); None without compression.
  compression: Any = None
  # DiLoCo (train/diloco.py): {'replicas': [replicas, *param.shape] every
  # replica's parameters, 'momentum', 'pending': params-like}; `params` are then
  # the outer parameters and `opt_state` the replicas' inner states, stacked
  # [replicas, ...]. None without DiLoCo.
  diloco: Any = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything needed to rebuild and shard the model without allocating it."""
  cfg: ModelConfig
  graphdef: Any
  abstract_params: Any  # nested dict of ShapeDtypeStruct
  logical: Any  # nested dict of per-dimension logical names
  rules: sharding.Rules
  pipeline: Pipeline = Pipeline()

  def model(self, params) -> Decoder:
    return nnx.merge(self.graphdef, params)


def model_spec(cfg: ModelConfig, rules: sharding.Rules,
               pipeline: Pipeline = Pipeline()) -> ModelSpec:
  """Builds the model abstractly (jax.eval_shape): no parameter memory is used.

  Not under `jax.set_mesh`: eval_shape there would yield abstract-mesh shardings.
  """
  constrain = sharding.LogicalConstraint(rules)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), constrain=constrain,
                                            pipeline=pipeline))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return ModelSpec(cfg, graphdef, nnx.to_pure_dict(params), logical_axes(params),
                   rules, pipeline)


def pipeline_from_config(config, sizes: dict[str, int]) -> Pipeline:
  """The `pipeline` group and mesh.stage as a model.pipeline.Pipeline (validated
  by train/validate.py)."""
  p = config.get("pipeline")
  if p is None:
    return Pipeline(stages=sizes.get("stage", 1))
  return Pipeline(stages=sizes.get("stage", 1), microbatches=int(p.microbatches),
                  repeats=int(p.repeats) if p.schedule == "circular" else 1,
                  schedule=str(p.schedule))


def param_shardings(spec: ModelSpec, mesh: Mesh):
  return sharding.tree_shardings(spec.abstract_params, spec.logical, mesh, spec.rules)


def state_shardings(spec: ModelSpec, tx: optax.GradientTransformation,
                    mesh: Mesh, comp: compression_lib.Compression | None = None,
                    dl: diloco_lib.DiLoCo | None = None) -> TrainState:
  """NamedShardings for every leaf: optimizer state follows its parameter.

  Nothing here executes: the optimizer state's shapes come from tracing its init
  abstractly (an eager init would place its step counters on the default device --
  inside `jax.set_mesh` on a deviceless TPU topology, a device that cannot run
  anything). `optimizer.opt_state_shardings` gives each state leaf its
  parameter's spec (on the axes it shares with it) and, for `optim.offload=host`,
  host memory. Compression buffers take `data` on their replica dimension; with
  DiLoCo (`dl` enabled) the replicas' parameters and inner optimizer states take
  `diloco` on theirs.
  """
  params = param_shardings(spec, mesh)
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, spec.abstract_params)
  opt = optimizer.opt_state_shardings(
      abstract_opt, spec.abstract_params, params, mesh,
      optimizer.HOST if isinstance(tx, optimizer.Offloaded) else None)
  param_specs = jax.tree.map(lambda s: s.spec, params)
  named = lambda specs: jax.tree.map(  # noqa: E731
      lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
  comp_shardings = dl_shardings = None
  if comp is not None and comp.enabled:
    comp_shardings = named(compression_lib.state_specs(comp, param_specs))
  if dl is not None and dl.enabled:
    dl_shardings = named(diloco_lib.state_specs(dl, param_specs))
    opt = jax.tree.map(lambda s: NamedSharding(
        mesh, diloco_lib.stacked_spec(s.spec), memory_kind=s.memory_kind), opt)
  return TrainState(step=replicated, params=params, opt_state=opt,
                    compression=comp_shardings, diloco=dl_shardings)


def abstract_params(spec: ModelSpec, mesh: Mesh):
  """Parameter ShapeDtypeStructs with concrete shardings on `mesh` (no memory)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      spec.abstract_params, param_shardings(spec, mesh))


def abstract_state(spec: ModelSpec, tx: optax.GradientTransformation,
                   mesh: Mesh, comp: compression_lib.Compression | None = None,
                   replicas: int | None = None,
                   dl: diloco_lib.DiLoCo | None = None) -> TrainState:
  """ShapeDtypeStructs with concrete shardings: a restore or AOT-compile target.
  `replicas`: the compression buffers' replica count (default: the mesh's
  `data` size; another count is replicated, to read a checkpoint written with it).
  `dl`: DiLoCo's layout; a `dl.replicas` other than the mesh's `diloco` size is
  replicated likewise."""
  n = mesh.shape[compression_lib.REPLICA_AXIS]
  replicas = replicas or n
  shapes = jax.eval_shape(lambda p: _from_params(tx, p, comp, replicas, dl),
                          spec.abstract_params)
  other = dl is not None and dl.replicas != mesh.shape[diloco_lib.REPLICA_AXIS]
  shardings = state_shardings(spec, tx, mesh, comp, dl)
  unstack = lambda t: jax.tree.map(  # noqa: E731
      lambda s: NamedSharding(mesh, P(None, *s.spec[1:]), memory_kind=s.memory_kind), t)
  if replicas != n and shapes.compression is not None:
    shardings = shardings.replace(compression=unstack(shardings.compression))
  if other and dl.enabled:
    shardings = shardings.replace(
        opt_state=unstack(shardings.opt_state),
        diloco={**shardings.diloco, "replicas": unstack(shardings.diloco["replicas"])})
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def _from_params(tx, params, comp, replicas: int, dl) -> TrainState:
  """Step 0 state around `params`: fresh optimizer (per DiLoCo replica) and
  compression state."""
  extra = (diloco_lib.init_state(dl, params)
           if dl is not None and dl.enabled else None)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=(jax.vmap(tx.init)(extra["replicas"]) if extra is not None
                 else tx.init(params)),
      compression=compression_lib.init_state(comp, params, replicas)
      if comp is not None and comp.enabled else None,
      diloco=extra)


def init_state(spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh,
               seed: int, params: Any = None,
               comp: compression_lib.Compression | None = None,
               dl: diloco_lib.DiLoCo | None = None) -> TrainState:
  """Step 0 state, built directly into its shardings (never whole on one device).

  Parameters are drawn from `seed`, or taken from `params` (e.g. imported weights,
  already placed with `param_shardings`), which are donated: the state holds
  them without a second copy, and the caller's arrays are invalid afterwards. The
  optimizer state (and compression buffers, `comp`; DiLoCo's replicas, `dl`,
  each a copy of the parameters) start fresh.
  """
  replicas = mesh.shape[compression_lib.REPLICA_AXIS]

  def from_params(params):
    return _from_params(tx, params, comp, replicas, dl)

  def fresh():
    model = Decoder(spec.cfg, rngs=nnx.Rngs(params=seed),
                    constrain=sharding.LogicalConstraint(spec.rules))
    return from_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  out = state_shardings(spec, tx, mesh, comp, dl)
  with jax.set_mesh(mesh):
    if params is None:
      return jax.jit(fresh, out_shardings=out)()
    return jax.jit(from_params, out_shardings=out, donate_argnums=0)(params)
