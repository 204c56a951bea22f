"""Per-matrix optimizer work split over the mesh against every device running it all.

  python benchmarks/newton_schulz.py [--config=experiments/llama_tiny.py]
      [--meshes=data=8,fsdp=8,fsdp=2:tensor=4] [--reps=5]
      [--what=newton_schulz,galore_refresh]

On 8 CPU devices (forced), for each mesh: the matrices the optimizer treats as
matrices in --config's model (`optim.matrices`), with a random momentum or
gradient placed as the parameters are (`train.state.param_shardings`). It times,
side by side in one run:
- `newton_schulz`: rung's `train.newton_schulz.orthogonalize` (each device runs
  its share of the matrices, `train.matrix_split`) and optax.contrib's
  Newton-Schulz on the momentum as placed (what Muon ran before: the compiler
  runs every matrix on every replica, gathered under FSDP);
- `galore_refresh`: GaLore's projector refresh (`optim.galore_rank`,
  `optim.galore_projector`) compiled under the mesh (split) and the same
  program compiled without a context mesh (`matrix_split` then splits nothing:
  the refresh runs as placed, as it did before the split).
One JSON line per mesh and item: median milliseconds of each, their ratio,
FLOPs per device of each (XLA's cost analysis; it counts a loop body, such as
the refresh's loop over the matrices, once), and the largest difference between
the two results. Record results in benchmarks/README.md.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment.host import one_blas_thread_per_cpu_device  # noqa: E402
one_blas_thread_per_cpu_device()

from absl import flags  # noqa: E402
from experiment.path_flag import define_path  # noqa: E402

from benchmarks.common import emit, processor, run, time_call  # noqa: E402

_CONFIG = define_path("config", "experiments/llama_tiny.py",
                      "experiment config whose model's matrices are orthogonalised")
_MESHES = flags.DEFINE_list(
    "meshes", ["data=8", "fsdp=8", "fsdp=2:tensor=4"],
    "meshes of 8 devices, each axis=size joined by ':' (unnamed axes are 1)")
_REPS = flags.DEFINE_integer("reps", 5, "timed repetitions (median)", lower_bound=1)
WHAT = ("newton_schulz", "galore_refresh")
_WHAT = flags.DEFINE_list("what", ["newton_schulz"],
                          f"the per-matrix work to time, of {', '.join(WHAT)}")
flags.register_validator("what", lambda v: bool(v) and set(v) <= set(WHAT),
                         f"each of {', '.join(WHAT)}")


def _mesh_sizes(text: str) -> dict[str, int]:
  sizes = {}
  for part in text.split(":"):
    axis, _, size = part.partition("=")
    sizes[axis.strip()] = int(size)
  return sizes


def _meshes_ok(meshes: list[str]) -> bool:
  import math

  from sharding.mesh import AXES
  try:
    sizes = [_mesh_sizes(m) for m in meshes]
  except ValueError:
    return False
  return bool(sizes) and all(set(s) <= set(AXES) and math.prod(s.values()) == 8
                             for s in sizes)


flags.register_validator(
    "meshes", _meshes_ok,
    "each mesh is mesh-axis=size pairs joined by ':' whose sizes multiply to 8, "
    "e.g. fsdp=2:tensor=4")


def main(argv):
  del argv
  import contextlib
  import importlib.util
  import math

  import jax
  import numpy as np
  import optax
  from optax.contrib import MuonDimensionNumbers
  from optax.contrib._muon import orthogonalize_via_newton_schulz

  import sharding
  from model import ModelConfig
  from train import galore, matrices, newton_schulz
  from train.state import abstract_params, model_spec

  spec_file = importlib.util.spec_from_file_location("config", _CONFIG.value)
  module = importlib.util.module_from_spec(spec_file)
  spec_file.loader.exec_module(module)
  config = module.get_config()
  steps, o = config.optim.ns_steps, config.optim
  for text in _MESHES.value:
    config.mesh.update(**{a: 1 for a in sharding.AXES})
    config.mesh.update(**_mesh_sizes(text))
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
    rules = sharding.normalize_rules(config.mesh.rules)
    spec = model_spec(ModelConfig.from_config(config.model), rules)
    params = abstract_params(spec, mesh)  # [..] with the parameters' shardings
    labels = matrices.labels(params, config.optim.matrices)
    rng = np.random.default_rng(0)
    momentum, dims = {}, {}
    for (path, x), label in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(labels)):
      if label != "matrix":
        continue
      name = sharding.path_name(path)
      momentum[name] = jax.device_put(rng.normal(size=x.shape).astype(np.float32),
                                      x.sharding)
      dims[name] = matrices.dims(name, x.ndim)

    def split(tree):
      return {k: newton_schulz.orthogonalize(v, dims[k], steps) for k, v in tree.items()}

    def everywhere(tree):
      return {k: orthogonalize_via_newton_schulz(
          v, np.asarray(newton_schulz.NS_COEFFS), steps,
          dimension_numbers=MuonDimensionNumbers(dims[k].reduction, dims[k].output))
          for k, v in tree.items()}

    def refresh(tree):  # every matrix's fresh projector (step 0 refreshes)
      out = {}
      for k, g in tree.items():
        init, update = galore._batched(dims[k], g.shape, o.galore_rank, 1,
                                       o.galore_scale, optax.scale_by_adam(),
                                       o.galore_projector)
        out[k] = update(g, init(g))[1].projector
      return out

    # (the program, whether it is compiled under the mesh)
    programs = {"newton_schulz": ((split, True), (everywhere, True)),
                "galore_refresh": ((refresh, True), (refresh, False))}
    for what in _WHAT.value:
      row = {"mesh": text, "matrices": sum(
          math.prod(v.shape[a] for a in dims[k].batch) for k, v in momentum.items())}
      if what == "galore_refresh":
        row.update(rank=o.galore_rank, projector=o.galore_projector)
      outs = {}
      for name, (fn, under_mesh) in zip(("split", "every_device"), programs[what]):
        with jax.set_mesh(mesh) if under_mesh else contextlib.nullcontext():
          compiled = jax.jit(fn).lower(momentum).compile()
        outs[name] = compiled(momentum)
        row[f"{name}_ms"] = 1e3 * time_call(
            lambda: jax.block_until_ready(compiled(momentum)), _REPS.value)
        row[f"{name}_gflops_per_device"] = compiled.cost_analysis()["flops"] / 1e9
      row["speedup"] = row["every_device_ms"] / row["split_ms"]
      row["max_abs_difference"] = float(max(
          optax.tree.max(jax.tree.map(lambda a, b: abs(a - b), outs["split"],
                                      outs["every_device"])), 0.0))
      emit(what=what, processor=processor(), jax=jax.__version__, **row)


if __name__ == "__main__":
  run(main)
