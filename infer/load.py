"""Loading a trained model from a run directory onto any mesh."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

import kernels
import sharding
from model import Decoder, ModelConfig
from train.checkpoint import Checkpointer
from train.state import abstract_params, model_spec


def load(workdir: str, *, step: int | None = None,
         mesh_overrides: dict[str, int] | None = None,
         devices: list[jax.Device] | None = None) -> tuple[Decoder, Any]:
  """Returns (model with parameters placed on the mesh, config).

  The config is the one saved with the run; `mesh_overrides` (e.g. {'tensor': 4})
  replace its mesh sizes, so a model trained on one mesh serves on another. The
  returned config's mesh holds the resolved sizes; parameters carry their
  NamedShardings, so the model runs as is (or under `jax.set_mesh` of that mesh to
  apply activation constraints too).
  """
  from experiments import saved
  config = saved.get_config(workdir)
  if mesh_overrides:
    config.mesh.update(**mesh_overrides)
  if kernels.uses_zigzag(config.model.attention):
    # Trained on zig-zag ordered batches; prompts arrive in natural order.
    config.model.attention = "auto"
  devices = list(jax.devices() if devices is None else devices)
  config.mesh.update(**sharding.validate_plan(config, len(devices)))
  mesh = sharding.make_mesh(config.mesh, devices)
  spec = model_spec(ModelConfig.from_config(config.model),
                    sharding.normalize_rules(config.mesh.rules))
  target = abstract_params(spec, mesh)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step = ckpt.latest_step() if step is None else step
  params = ckpt.restore_params(target, step)
  ckpt.close()
  return nnx.merge(spec.graphdef, params), config
