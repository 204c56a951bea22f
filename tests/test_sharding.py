import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

import sharding
from sharding import ConfigError


def mesh_cfg(**kw):
  c = dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1)
  c.update(kw)
  return c


def test_fill_axis_takes_remaining_devices():
  assert sharding.resolve_shape(mesh_cfg(data=-1, tensor=2), 8)["data"] == 4


def test_mesh_product_mismatch_names_field_and_numbers():
  with pytest.raises(ConfigError, match=r"`mesh.data`.*has 6 devices but 8 are "
                     r"available.*--config.mesh.data=-1"):
    sharding.resolve_shape(mesh_cfg(data=3, tensor=2), 8)
  with pytest.raises(ConfigError, match=r"`mesh.tensor`.*multiply to 3, which does "
                     r"not divide 1 device,.*--config.mesh.tensor=1 "):
    sharding.resolve_shape(mesh_cfg(data=-1, tensor=3), 1)


def test_a_mesh_that_does_not_fit_gets_a_fix_that_fits():
  """Every mesh of sizes 1-8 (at most one -1) over 1-8 devices that does not fit:
  the error names an axis the fix changes (one the user sized, when the fix
  changes one), and the flags in its fix make the mesh fit."""
  import itertools
  import re
  axes = ("data", "fsdp", "sequence", "tensor")
  for n in range(1, 9):
    for values in itertools.product((-1, 1, 2, 3, 4, 6, 8), repeat=len(axes)):
      if values.count(-1) > 1:
        continue
      cfg = mesh_cfg(**dict(zip(axes, values)))
      try:
        sharding.resolve_shape(cfg, n)
        continue
      except ConfigError as err:
        message, named = str(err), err.field.removeprefix("mesh.")
      fix = dict(re.findall(r"--config\.mesh\.(\w+)=(-?\d+)", message))
      assert fix and named in fix, message
      asked = math.prod(values)  # more devices than there are: how to try it on CPU
      hint = f"XLA_FLAGS=--xla_force_host_platform_device_count={asked} set before"
      assert (hint in message) == (-1 not in values and asked > n), message
      if any(cfg.get(a, 1) != 1 for a in fix):
        assert cfg.get(named, 1) != 1, message
      cfg.update({a: int(v) for a, v in fix.items()})
      assert math.prod(sharding.resolve_shape(cfg, n).values()) == n, (message, cfg)


def test_two_fill_axes_rejected():
  with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
    sharding.resolve_shape(mesh_cfg(data=-1, fsdp=-1), 8)


def test_mesh_axes_order_and_types():
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  assert mesh.axis_names == sharding.AXES == (
      "diloco", "data", "stage", "fsdp", "expert", "sequence", "tensor")
  assert dict(mesh.shape) == {"diloco": 1, "data": 2, "stage": 1, "fsdp": 2, "expert": 1,
                              "sequence": 1, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_a_model_on_a_mesh_with_explicit_axes_is_told_how_to_make_the_mesh():
  """From the attention kernels' trial: under `jax.make_mesh`'s default (Explicit
  axes) a model's activation constraint failed as JAX's "acts as an assert"
  AssertionError. It is a ValueError naming the axes and two ways to make the
  mesh; following the second (Auto axes) places the activations by the rules."""
  import jax.numpy as jnp
  rules = sharding.normalize_rules(None)
  constrain = sharding.LogicalConstraint(rules)
  shape = tuple(dict(data=2, sequence=2, tensor=2).get(a, 1) for a in sharding.AXES)
  x = jnp.ones((4, 8, 16))
  run = jax.jit(lambda x: constrain(x, ("batch", "length", "act_embed")))
  with jax.set_mesh(jax.make_mesh(shape, sharding.AXES)):
    with pytest.raises(ValueError, match=r"Explicit axes \['diloco', 'data', .*'tensor'\]"
                       r" \(jax.make_mesh's default\).*sharding.make_mesh") as err:
      run(x)
  assert "axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names)" in str(err.value)
  auto = (jax.sharding.AxisType.Auto,) * len(sharding.AXES)
  for mesh in (jax.make_mesh(shape, sharding.AXES, axis_types=auto),
               sharding.make_mesh(dict(zip(sharding.AXES, shape)))):
    with jax.set_mesh(mesh):
      assert run(x).sharding.spec == P("data", "sequence")


def test_mesh_flags_read_back_as_the_changes_they_make():
  """`respell_mesh_flags` reads what `mesh_flags` writes (infer.load spells a mesh
  fix as its own argument with it), inside a sentence and beside other flags."""
  for changes in ({"data": -1}, {"fsdp": 2, "data": -1}, {"tensor": 1, "expert": 4}):
    text = (f"pass {sharding.mesh_flags(changes)} --config.train.batch_size=8 "
            "(the mesh axes must multiply to 8).")
    seen = []
    out = sharding.respell_mesh_flags(text, lambda c: seen.append(c) or "X")
    assert seen == [changes]
    assert out == "pass X --config.train.batch_size=8 (the mesh axes must multiply to 8)."
  assert sharding.respell_mesh_flags("pass --config.mesh.rules.embed=()", str) is None


def test_logical_to_spec_default_rules():
  rules = sharding.normalize_rules(None)
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (8, 8)) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "length"), rules, mesh, (8, 4)) == P(("data", "fsdp"))
  # A dimension the axis does not divide is replicated rather than failing.
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (3, 8)) == P(None, "tensor")
  # An axis is used once per array.
  assert sharding.logical_to_spec(("mlp", "heads"), rules, mesh, (8, 8)) == P("tensor")


def test_rules_can_be_replaced():
  rules = sharding.normalize_rules({"embed": ("fsdp", "tensor"), "mlp": None})
  mesh = sharding.make_mesh(mesh_cfg(fsdp=2, tensor=4))
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (8, 8)) == P(("fsdp", "tensor"))


def test_slices_split_the_outermost_axes_with_room():
  """Multi-slice meshes: DiLoCo replicas, then data parallelism, ... span the
  slices, as far as each axis's size divides what is left; a mesh that cannot
  hold the slice count is a config error naming the fix."""
  from sharding.mesh import AXES, slice_split

  def split(slices, **sizes):
    got = slice_split({a: sizes.get(a, 1) for a in AXES}, slices)
    return {a: n for a, n in got.items() if n > 1}

  assert split(2, data=2, fsdp=4) == {"data": 2}
  assert split(4, diloco=2, data=4, fsdp=2) == {"diloco": 2, "data": 2}
  assert split(4, data=2, fsdp=8) == {"data": 2, "fsdp": 2}
  assert split(2, fsdp=8, tensor=4) == {"fsdp": 2}
  with pytest.raises(ConfigError, match=r"leave a factor of 2 over.*"
                     r"--config\.mesh\.data=4") as err:
    split(4, data=2, tensor=3)
  assert err.value.field == "mesh"


def test_a_head_or_expert_split_error_suggests_a_mesh_that_passes():
  """Heads, kv heads or experts that a mesh axis does not divide: the flags in the
  fix (a size dividing every count split over that axis, fitting the devices)
  clear that error without causing a mesh error, over head counts, meshes and
  device counts."""
  import itertools
  import re

  from experiments import llama_tiny
  for heads, kv, experts, tensor, expert, n in itertools.product(
      (4, 6, 12), (1, 2, 3), (0, 6), (2, 4, 8), (1, 4), (8, 16)):
    if heads % kv or tensor * expert > n:
      continue
    c = llama_tiny.get_config()
    c.model.update(num_heads=heads, num_kv_heads=kv)
    c.model.moe.num_experts = experts
    c.mesh.update(data=-1, tensor=tensor, expert=expert)
    c.train.batch_size = 16
    try:
      sharding.validate_plan(c, n)
      continue
    except ConfigError as err:
      message, field = str(err), err.field
    if field not in ("model.num_heads", "model.num_kv_heads", "model.moe.num_experts"):
      continue
    fix = dict(re.findall(r"--config\.mesh\.(\w+)=(-?\d+)", message))
    assert fix, message
    c.mesh.update(**{a: int(v) for a, v in fix.items()})
    try:
      sharding.validate_plan(c, n)
    except ConfigError as again:  # only another, independent problem remains
      assert again.field != field and not again.field.startswith("mesh"), (
          message, str(again))


def test_a_mesh_error_on_a_head_axis_suggests_a_size_that_splits_the_heads():
  """tensor=16 on 8 devices with 4 kv heads: the fix is a size that fits the
  devices and divides the heads (4), not the largest that fits (8)."""
  import re

  from experiments import llama_tiny
  c = llama_tiny.get_config()
  c.model.update(num_heads=8, num_kv_heads=4)
  c.mesh.update(data=-1, tensor=16)
  with pytest.raises(ConfigError) as err:
    sharding.validate_plan(c, 8)
  assert err.value.field == "mesh.tensor"
  fix = dict(re.findall(r"--config\.mesh\.(\w+)=(-?\d+)", err.value.fix))
  assert fix == {"tensor": "4"}, str(err.value)
  # the counts it must divide are named, with the devices in words
  assert ("(mesh.tensor must divide model.num_heads=8 and model.num_kv_heads=4 as "
          "well as fit 8 devices)") in err.value.fix, err.value.fix
  c.mesh.update(tensor=4)
  sharding.validate_plan(c, 8)
  c.mesh.update(data=1, tensor=2)
  with pytest.raises(ConfigError, match=r"as well as fit 1 device\)"):
    sharding.validate_plan(c, 1)


def test_serving_plans_ignore_the_training_batch_and_length():
  """A run trained with batch 7 and length 251 serves on tensor=2 over 8 devices:
  `validate_serving_plan` checks the mesh and the model's splits only, and refuses
  what serving cannot run (heads the mesh does not divide)."""
  from experiments import llama_tiny
  c = llama_tiny.get_config()
  c.train.batch_size, c.data.seq_len = 7, 251
  c.mesh.update(data=-1, tensor=2, sequence=2)
  with pytest.raises(ConfigError) as err:
    sharding.validate_plan(c, 8)
  assert err.value.field == "data.seq_len"
  c.data.seq_len = 256
  with pytest.raises(ConfigError) as err:
    sharding.validate_plan(c, 8)
  assert err.value.field == "train.batch_size"
  c.data.seq_len = 251
  assert sharding.validate_serving_plan(c, 8) == dict(
      diloco=1, data=2, stage=1, fsdp=1, expert=1, sequence=2, tensor=2)
  c.mesh.tensor = 8
  with pytest.raises(ConfigError) as err:
    sharding.validate_serving_plan(c, 8)
  assert err.value.field.startswith(("model.num", "mesh."))
  # A serving mesh larger than the host: the fix divides the heads too, and the
  # CPU host's hint to get the devices stays (it was dropped).
  c.mesh.update(data=1, sequence=1, tensor=16)
  with pytest.raises(sharding.MeshTooLarge) as err:
    sharding.validate_serving_plan(c, 8)
  assert "must divide model.num_heads" in err.value.fix, err.value
  assert "XLA_FLAGS=--xla_force_host_platform_device_count=16 " in str(err.value)


def test_dimensions_the_mesh_does_not_divide_are_reported_as_unsplit():
  """An odd vocabulary on tensor=2 and an odd d_model on fsdp=8 are replicated
  (odd shapes do not fail); `unsplit_dims` names each such array and dimension,
  which the training log prints, and nothing for a shape the mesh divides."""
  from experiments import llama_tiny
  from model import ModelConfig
  from train.state import model_spec

  def lines(mesh_sizes, **model):
    c = llama_tiny.get_config()
    c.model.update(model)
    rules = sharding.normalize_rules(None)
    spec = model_spec(ModelConfig.from_config(c.model), rules)
    mesh = sharding.make_mesh({**dict(data=1, fsdp=1, tensor=1), **mesh_sizes})
    return sharding.unsplit_dims(spec.abstract_params, spec.logical, mesh, rules)

  assert lines(dict(fsdp=4, tensor=2)) == []
  odd_vocab = lines(dict(data=4, tensor=2), vocab_size=1001)
  assert odd_vocab and all(" 1001 over tensor=2" in l for l in odd_vocab)
  assert any(l.startswith("embed/table:") for l in odd_vocab)
  odd_width = lines(dict(fsdp=8), d_model=100, num_heads=4, num_kv_heads=2)
  assert any(l.startswith("layers/attn/q:") and " 100 over fsdp=8" in l
             for l in odd_width)


@pytest.mark.parametrize("mesh", [dict(stage=4, tensor=2), dict(fsdp=4, tensor=2),
                                  dict(sequence=2, tensor=4, data=1),
                                  dict(expert=2, tensor=2, stage=2)])
@pytest.mark.parametrize("devices", [1, 2, 4])
@pytest.mark.parametrize("check", ["validate_serving_plan", "validate_plan"])
def test_a_mesh_fix_names_every_axis_to_change(mesh, devices, check):
  """From a trial: a run trained on stage=4 x tensor=2 refused to generate on one
  device with the fix --config.mesh.tensor=1, and then again with
  --config.mesh.stage=1. The fix, applied, gives a mesh that serves, or trains
  (one error, all its flags)."""
  import re

  from experiments import llama_tiny
  c = llama_tiny.get_config()
  c.model.update(num_heads=8, num_kv_heads=4)
  c.mesh.update(**mesh)
  c.pipeline.microbatches = 4
  validate = getattr(sharding, check)
  try:
    validate(c, devices)
    return  # this mesh fits these devices as it is
  except ConfigError as err:
    fix = re.findall(r"--config\.mesh\.(\w+)=(-?\d+)", err.fix)
    assert fix, str(err)
  c.mesh.update(**{a: int(v) for a, v in fix})
  validate(c, devices)


def test_an_axis_that_splits_no_computation_is_named():
  """`mesh.rules.batch=()` with data=8 (or batch on fsdp alone with data=4)
  trained with every device computing the same batch, silently. The default
  rules on every axis leave none idle; an axis only weights use is named."""
  import sharding
  from sharding import DEFAULT_RULES, idle_axes, normalize_rules
  every = {a: 2 for a in sharding.AXES}
  assert idle_axes(every, normalize_rules(None)) == []
  assert idle_axes({"data": 8}, normalize_rules({"batch": ()})) == ["data=8"]
  assert idle_axes({"data": 4, "fsdp": 2},
                   normalize_rules({"batch": ("fsdp",)})) == ["data=4"]
  assert idle_axes({"data": 1, "tensor": 2},
                   normalize_rules({**DEFAULT_RULES, "act_heads": (), "act_kv_heads": (),
                                    "act_mlp": (), "act_vocab": ()})) == ["tensor=2"]
