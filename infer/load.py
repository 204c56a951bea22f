"""Loading a trained model from a run directory onto any mesh."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jax
from flax import nnx
from ml_collections import ConfigDict

import kernels
import model
import sharding
from model import Decoder, ModelConfig
from train import run_config
from train.checkpoint import Checkpointer
from train.state import abstract_params, model_spec


# A run of mesh flags in a fix: `--config.mesh.data=-1 --config.mesh.tensor=2`.
_MESH_FLAGS = re.compile(r"--config\.mesh\.(\w+)=(-?\d+)(?:\s+--config\.mesh\.\w+=-?\d+)*")


def _as_overrides(err: sharding.ConfigError, overrides: dict[str, int]
                  ) -> sharding.ConfigError:
  """A mesh error met by `load(mesh_overrides=...)` with its fix in that
  argument's terms: the flags `--config.mesh.data=-1` (what the command line
  passes) become `mesh_overrides={'tensor': 2, 'data': -1}`, the caller's sizes
  with the fix's."""
  fix = err.mesh_fix if isinstance(err, sharding.MeshTooLarge) else err.fix
  found = _MESH_FLAGS.search(fix)
  if not found:
    return err
  sizes = {**overrides, **{axis: int(size) for axis, size in re.findall(
      r"--config\.mesh\.(\w+)=(-?\d+)", found.group(0))}}
  fix = fix[:found.start()] + f"mesh_overrides={sizes!r}" + fix[found.end():]
  fewer = re.search(r"has (\d+) devices? but (\d+) are available", err.problem)
  if fewer and int(fewer.group(1)) < int(fewer.group(2)):  # or on that many devices
    n = int(fewer.group(1))
    fix = (fix.rstrip(".") + f"; or serve on {n} of them: devices=jax.devices()[:{n}] "
           "beside the same mesh_overrides.")
  return err.with_fix(fix)


def load(workdir: str, *, step: int | None = None,
         mesh_overrides: dict[str, int] | None = None,
         devices: list[jax.Device] | None = None,
         config: ConfigDict | None = None) -> tuple[Decoder, Any]:
  """Returns (model with parameters placed on the mesh, config).

  The config is the one saved with the run (`train.run_config.load`), or `config`
  when given (e.g. the saved one with command-line overrides); `mesh_overrides`
  (e.g. {'tensor': 4}) replace its mesh sizes, so a model trained on one mesh
  serves on another; the mesh spans `devices` (default: every device; a smaller
  mesh needs the devices it spans, e.g. `devices=jax.devices()[:4]`). A config
  whose model does not match the checkpoint's parameter shapes, a field the
  config does not have, or a mesh that does not fit is a ConfigError naming it.
  The returned config's mesh holds the resolved sizes; parameters carry their
  NamedShardings, so the model runs as is, except with ring or Ulysses attention
  over a `sequence` axis, whose kernels need the mesh: call it under
  `jax.set_mesh` of that mesh (which also applies the activation constraints).
  """
  # The shape check names what was asked for: the run's config.json, or `config`.
  requested = None if config is None else json.loads(config.to_json())
  config = run_config.load(workdir) if config is None else copy.deepcopy(config)
  if mesh_overrides:
    for axis, size in mesh_overrides.items():
      if axis not in sharding.AXES:
        raise sharding.ConfigError(
            "mesh_overrides", f"{axis!r} is not a mesh axis; the axes are "
            f"{', '.join(sharding.AXES)}.", "name axes of the mesh, e.g. "
            "mesh_overrides={'tensor': 2}.")
      if not isinstance(size, int) or isinstance(size, bool):
        raise sharding.ConfigError(
            "mesh_overrides", f"{axis}={size!r} is a {type(size).__name__}; a mesh "
            "size is an integer (-1: the devices the other axes leave).",
            f"pass e.g. mesh_overrides={{{axis!r}: 2}}.")
    config.mesh.update(**mesh_overrides)
  model.validate(config.model)  # overrides of the saved model are checked too
  devices = list(jax.devices() if devices is None else devices)
  try:
    sizes = sharding.validate_serving_plan(config, len(devices), saved_model=True)
  except sharding.ConfigError as err:
    raise (_as_overrides(err, mesh_overrides) if mesh_overrides else err) from None
  config.mesh.update(**sizes)
  config.model.attention = kernels.serving_impl(
      config.model.attention,
      sharding.split_size(sharding.normalize_rules(config.mesh.rules), "length", sizes))
  mesh = sharding.make_mesh(config.mesh, devices)
  spec = model_spec(ModelConfig.from_config(config.model),
                    sharding.normalize_rules(config.mesh.rules))
  target = abstract_params(spec, mesh)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step = ckpt.step_to_read(step)
  params = ckpt.restore_params(target, step, config=requested, serving=True)
  ckpt.close()
  return nnx.merge(spec.graphdef, params), config
