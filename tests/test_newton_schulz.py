"""Newton-Schulz split over the mesh (`train.newton_schulz`): the numbers of one
device, a share of its FLOPs."""

import functools
import math
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz

import sharding
from train import matrices, matrix_split, newton_schulz

# (parameter name, shape, the momentum's sharding as a parameter's would be).
# Matrices of 128 x 192 or so: their iterations' FLOPs (n^3) outweigh the
# moves' elementwise work (n^2) that XLA's cost analysis also counts.
STACKS = [
    ("layers/mlp/up", (4, 128, 192), P(None, "fsdp", "tensor")),
    ("layers/attn/q", (4, 128, 4, 32), P(None, "fsdp", "tensor")),
    ("layers/attn/o", (4, 4, 32, 128), P(None, "tensor", None, "fsdp")),
    ("layers/mlp/up", (6, 128, 192), P()),  # 6 matrices: padded to the split
    ("moe/up", (2, 4, 64, 96), P(None, "expert", "fsdp")),  # layers x experts
    ("head", (1, 128, 192), P()),  # one matrix: nothing to split
]
MESHES = [dict(data=8), dict(fsdp=8), dict(fsdp=2, tensor=4), dict(stage=2, data=4),
          dict(data=2, fsdp=2, tensor=2), dict(diloco=2, expert=2, fsdp=2)]


@functools.cache
def _one_device(index: int):
  """`_compile` of STACKS[index] on one device, compiled once for every mesh."""
  return _compile(STACKS[index], STACKS[index][2], None)


def _compile(x, spec, mesh):
  """(output, FLOPs per device, compiled HLO text) of newton_schulz.orthogonalize
  on `mesh` (None: one device, no mesh), the input placed as `spec` where its
  axes divide the shape."""
  name, shape, _ = x
  d = matrices.dims(name, len(shape))
  value = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  run = jax.jit(lambda m: newton_schulz.orthogonalize(m, d, 5))
  if mesh is None:
    compiled = run.lower(value).compile()
    return np.asarray(compiled(value)), compiled.cost_analysis()["flops"], ""
  spec = P(*[a if a is None or a in mesh.axis_names and mesh.shape[a] > 1
             and shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)])
  placed = jax.device_put(value, NamedSharding(mesh, spec))
  run = jax.jit(run, out_shardings=placed.sharding)  # as a train step pins its state
  with jax.set_mesh(mesh):
    compiled = run.lower(placed).compile()
    return (np.asarray(compiled(placed)), compiled.cost_analysis()["flops"],
            compiled.as_text())


@pytest.mark.parametrize("axes", MESHES, ids=lambda m: "x".join(f"{a}{n}" for a, n
                                                                in m.items()))
def test_split_over_the_mesh_gives_one_devices_numbers_for_a_share_of_the_flops(axes):
  """Every replica ran every matrix's iterations, and under FSDP each matrix was
  gathered and orthogonalised on every device. Split over the mesh, each device
  runs ceil(matrices / split) of them (FLOPs per device within 15% of that share of
  one device's), and the result is optax's unsplit Newton-Schulz's on one device
  (to float32 rounding). Moving a stack split over two axes onto `matrices` in
  one step made XLA gather it whole first ("Involuntary full rematerialization");
  one axis at a time, no collective holds the whole stack, in or back to the
  parameter's layout. Checked where one batch axis (layers) is split over the
  axes that place it: elsewhere a replicated axis's gather of the result is
  XLA's to order, and merging layers with experts split over `expert` is a
  reshape XLA does by gathering (left as it is; the numbers and FLOPs hold)."""
  mesh = sharding.make_mesh(axes, jax.devices()[:8])
  for index, stack in enumerate(STACKS):
    name, shape, spec = stack
    d = matrices.dims(name, len(shape))
    count = math.prod(shape[a] for a in d.batch)
    split_over = matrix_split.split_axes(count, mesh.abstract_mesh)
    split = math.prod(mesh.shape[a] for a in split_over)
    one, whole, _ = _one_device(index)
    got, flops, text = _compile(stack, spec, mesh)
    want = orthogonalize_via_newton_schulz(
        np.random.default_rng(0).normal(size=shape).astype(np.float32),
        np.asarray(newton_schulz.NS_COEFFS), 5,
        dimension_numbers=MuonDimensionNumbers(d.reduction, d.output))
    # Five iterations amplify float32 rounding: programs that differ only in
    # XLA:CPU's fusions land ~3e-5 of the matrix's scale apart (as in
    # test_optimizers' reference test); a matrix mixed up is off by its scale.
    tol = 1e-4 * np.abs(one).max()
    np.testing.assert_allclose(one, want, atol=tol, err_msg=name)
    np.testing.assert_allclose(got, one, atol=tol, err_msg=f"{name} on {axes}")
    share = -(-count // split) / count
    assert flops <= 1.15 * share * whole, (name, axes, split, flops, whole)
    if count > 1 and "diloco" not in axes:
      assert split > 1, (name, axes)  # every mesh here splits a stack of 2 or more
    placed_on = [a for i, a in enumerate(spec) if a and axes.get(a, 1) > 1
                 and shape[i] % axes[a] == 0]
    if len(placed_on) > 1 and set(placed_on) == set(split_over) and len(d.batch) == 1:
      results = re.findall(r"= f32\[([\d,]+)\]\S* (?:all-gather|all-reduce|all-to-all|"
                           r"collective-permute)\(", text)
      assert max((math.prod(map(int, r.split(","))) for r in results), default=0) < (
          math.prod(shape)), (name, axes, results)


def test_the_split_lowers_the_matrices_per_device_and_never_takes_diloco():
  """`split_axes`: stage first, each axis kept only while it lowers ceil(count /
  split), diloco never (each replica orthogonalises its own momentum)."""
  mesh = sharding.make_mesh(dict(diloco=2, stage=2, fsdp=2), jax.devices()[:8])
  abstract = mesh.abstract_mesh
  assert matrix_split.split_axes(1, abstract) == ()
  assert matrix_split.split_axes(2, abstract) == ("stage",)
  assert matrix_split.split_axes(3, abstract) == ("stage", "fsdp")
  assert matrix_split.split_axes(16, abstract) == ("stage", "fsdp")
  assert matrix_split.split_axes(16, None) == ()


def test_training_inside_diloco_and_a_pipeline_gives_the_unsplit_losses(tmp_path):
  """Inside DiLoCo's replicas (vmapped over `diloco`, which the split leaves
  alone) and on a stage-split model, the split optimizer trains as the
  unsplit one does: diloco=2 x data=2 x fsdp=2 gives diloco=2's losses (2
  devices, nothing to split over), and stage=2 x data=4 gives one device's.
  (NorMuon calls the same split; test_optimizers trains it on a mesh.)"""
  import train
  from conftest import make_tiny_config
  from test_train_meshes import _with_mesh

  def losses(devices, name, **mesh):
    c = _with_mesh(make_tiny_config(), **mesh)
    c.model.num_layers = 4
    c.train.steps = 3
    c.optim.update(name="muon", decay_steps=3)
    if "diloco" in mesh:
      c.diloco.update(sync_every=2)
    if "stage" in mesh or name == "one":
      c.pipeline.microbatches = 2
    rows = train.train(c, str(tmp_path / name), devices=devices, progress=False)
    return [r["loss"] for r in rows if "loss" in r]
  np.testing.assert_allclose(
      losses(jax.devices(), "diloco_split", diloco=2, data=2, fsdp=2),
      losses(jax.devices()[:2], "diloco", diloco=2), rtol=1e-4)
  np.testing.assert_allclose(losses(jax.devices(), "stages", stage=2, data=4),
                             losses(jax.devices()[:1], "one"), rtol=1e-4)
