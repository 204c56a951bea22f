"""Loading a trained model from a run directory onto any mesh."""

from __future__ import annotations

import copy
import json
import math
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


def _as_overrides(err: sharding.ConfigError, overrides: dict[str, int], mesh,
                  num_devices: int) -> sharding.ConfigError:
  """A mesh error met by `load(mesh_overrides=...)` with its fix in that
  argument's terms: the flags `--config.mesh.data=-1` (what the command line
  passes) become `mesh_overrides={'tensor': 2, 'data': -1}`, the caller's sizes
  with the fix's. A mesh of fewer devices than `num_devices` (no -1 among the
  sizes of `mesh`, the config's mesh group) is also offered `devices=`."""
  fix = sharding.respell_mesh_flags(
      err.mesh_fix if isinstance(err, sharding.MeshTooLarge) else err.fix,
      lambda changes: f"mesh_overrides={ {**overrides, **changes}!r}")
  if fix is None:
    return err
  sizes = [mesh.get(a, 1) for a in sharding.AXES]
  wanted = math.prod(sizes)
  if min(sizes) > 0 and wanted < num_devices:  # or on that many devices
    fix = (fix.rstrip(".") + f"; or serve on {wanted} of them: "
           f"devices=jax.devices()[:{wanted}] beside the same mesh_overrides.")
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
    if not mesh_overrides:
      raise
    raise _as_overrides(err, mesh_overrides, config.mesh, len(devices)) from None
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
