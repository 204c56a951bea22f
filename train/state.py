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


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nested dict of arrays, as nnx.to_pure_dict gives
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything needed to rebuild and shard the model without allocating it."""
  cfg: ModelConfig
  graphdef: Any
  abstract_params: Any  # nested dict of ShapeDtypeStruct
  logical: Any  # nested dict of per-dimension logical names
  rules: sharding.Rules

  def model(self, params) -> Decoder:
    return nnx.merge(self.graphdef, params)


def model_spec(cfg: ModelConfig, rules: sharding.Rules) -> ModelSpec:
  """Builds the model abstractly (jax.eval_shape): no parameter memory is used.

  Not under `jax.set_mesh`: eval_shape there would yield abstract-mesh shardings.
  """
  constrain = sharding.LogicalConstraint(rules)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), constrain=constrain))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return ModelSpec(cfg, graphdef, nnx.to_pure_dict(params), logical_axes(params),
                   rules)


def param_shardings(spec: ModelSpec, mesh: Mesh):
  return sharding.tree_shardings(spec.abstract_params, spec.logical, mesh, spec.rules)


def state_shardings(spec: ModelSpec, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf: optimizer moments follow their parameter."""
  params = param_shardings(spec, mesh)
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, spec.abstract_params)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated, params=params, opt_state=opt)


def abstract_state(spec: ModelSpec, tx: optax.GradientTransformation,
                   mesh: Mesh) -> TrainState:
  """ShapeDtypeStructs with concrete shardings: a restore or AOT-compile target."""
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                      params=spec.abstract_params,
                      opt_state=jax.eval_shape(tx.init, spec.abstract_params))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, state_shardings(spec, tx, mesh))


def init_state(spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh,
               seed: int) -> TrainState:
  """Initialises parameters directly into their shardings (never whole on one device)."""

  def init():
    model = Decoder(spec.cfg, rngs=nnx.Rngs(params=seed),
                    constrain=sharding.LogicalConstraint(spec.rules))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=state_shardings(spec, tx, mesh))()
