"""Pipeline parallelism (model/pipeline.py): GPipe and circular schedules over the
`stage` mesh axis give the sequential model's losses and gradients, pass only
activations between stages, and report their bubble."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import sharding
from conftest import make_tiny_config, run_cli
from model import Decoder, ModelConfig, MoEConfig
from model.pipeline import Pipeline, microbatches, unmicrobatch
from sharding import ConfigError
from train.loop import train
from train.validate import validate_config

BLOCKS = {  # name -> ModelConfig fields
    "standard": dict(block="standard"),
    "parallel": dict(block="parallel"),
    "ladder": dict(block="ladder"),
    # units of 2 layers (one dense, one MoE) cross stage boundaries whole
    "moe": dict(moe=MoEConfig(num_experts=4, top_k=2, every_k_layers=2)),
}


def test_microbatches_round_trip_and_keep_rows_strided():
  x = np.arange(24).reshape(12, 2)
  mb = microbatches(x, 3)
  assert mb.shape == (3, 4, 2)
  np.testing.assert_array_equal(mb[1, :, 0], x[1::3, 0])
  np.testing.assert_array_equal(unmicrobatch(mb), x)


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_stages_give_the_sequential_losses_and_gradients(block):
  """On a stage x data x tensor mesh of 8 devices, S = 2 and 4 (GPipe) and S = 2,
  R = 2 (circular) equal one scan over the layers: loss and every gradient, with
  the same microbatches (an MoE layer's load-balancing loss is a mean over
  microbatches, as under accumulation)."""
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=8, num_heads=4,
                    num_kv_heads=2, head_dim=8, d_ff=64, **BLOCKS[block])
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(params, pipe, rules=()):
    m = nnx.merge(graphdef, params)
    m.pipeline = pipe
    m.constrain = sharding.LogicalConstraint(rules)
    logits, aux = m.forward_and_aux(tokens)
    return jnp.mean(logits ** 2) + sum(aux.values(), 0.0)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
  want_loss, want = grad(params, Pipeline(1, 4, 1))
  if block != "moe":  # a dense model does not depend on the microbatches at all
    one_loss, one = grad(params, Pipeline())
    np.testing.assert_allclose(want_loss, one_loss, rtol=1e-6)
  rules = sharding.normalize_rules(None)
  for stages, micro, repeats, mesh in ((2, 4, 1, dict(stage=2, data=2, tensor=2)),
                                       (4, 4, 1, dict(stage=4, data=2)),
                                       (2, 4, 2, dict(stage=2, data=4))):
    mesh = sharding.make_mesh({"data": 1, **mesh})
    placed = jax.device_put(params, jax.tree.map(
        lambda x: NamedSharding(mesh, sharding.logical_to_spec(
            ("layers",) + (None,) * (x.ndim - 1), rules, mesh, x.shape))
        if x.ndim and x.shape[0] == cfg.num_layers // cfg.unit
        else NamedSharding(mesh, jax.sharding.PartitionSpec()), params))
    with jax.set_mesh(mesh):
      got_loss, got = grad(placed, Pipeline(stages, micro, repeats), rules)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{block} S={stages} R={repeats} {path}")


def _config(mesh=None, steps=3, **pipeline):
  c = make_tiny_config()
  c.model.update(num_layers=4)
  c.optim.decay_steps = 4
  c.train.steps = steps
  c.mesh.update(**{"data": 1, **(mesh or {})})
  c.pipeline.update(**pipeline)
  return c


def _losses(config, workdir, devices=None):
  rows = train(config, str(workdir), devices=devices, progress=False)
  return np.array([r["loss"] for r in rows if "loss" in r])


def test_training_on_stage_tensor_data_equals_one_device_and_resumes_across_stages(
    tmp_path):
  """3 steps on stage=2 x tensor=2 x data=2 equal 1 device; a checkpoint saved on
  stage=2 resumes on stage=4 (circular) and on 1 device with the same losses;
  the stage-split model generates what it does on one device."""
  one = _losses(_config(microbatches=2, steps=4), tmp_path / "one",
                jax.devices()[:1])
  c = _config(dict(stage=2, tensor=2, data=2), steps=2, microbatches=2)
  np.testing.assert_allclose(_losses(c, tmp_path / "s2"), one[:2], rtol=1e-5)
  shutil.copytree(tmp_path / "s2", tmp_path / "s2b")
  c4 = _config(dict(stage=4, data=2), steps=4, microbatches=4, schedule="circular")
  c4.train.batch_size = 8
  np.testing.assert_allclose(_losses(c4, tmp_path / "s2"), one[2:], rtol=1e-5)
  c1 = _config(steps=4, microbatches=2)
  np.testing.assert_allclose(_losses(c1, tmp_path / "s2b", jax.devices()[:1]),
                             one[2:], rtol=1e-5)

  import infer
  prompts = [[1, 2, 3], [4, 5]]
  split, config = infer.load(str(tmp_path / "s2"))
  assert config.mesh.stage == 4
  one_device, _ = infer.load(str(tmp_path / "s2"), devices=jax.devices()[:1],
                             mesh_overrides=dict(stage=1, data=1))
  want = infer.generate(one_device, prompts, max_new_tokens=5)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    assert infer.generate(split, prompts, max_new_tokens=5) == want


def _compiled(mesh, **pipeline):
  from aot import costs
  from aot.compile import _train_step
  from train.state import model_spec, pipeline_from_config
  c = _config(mesh, **pipeline)
  c.model.num_layers = 8
  c.train.batch_size = 16
  sizes = validate_config(c, 8)
  m = sharding.make_mesh(c.mesh)
  rules = sharding.normalize_rules(None)
  spec = model_spec(ModelConfig.from_config(c.model), rules,
                    pipeline_from_config(c, sizes))
  step, args = _train_step(c, spec, m, rules)
  with jax.set_mesh(m):
    text = step.lower(*args).compile().as_text()
  shape = [m.shape[a] for a in sharding.AXES]
  return (costs.analyze(text, sharding.AXES, shape).collectives,
          costs.pipeline_loops(text, sharding.AXES, shape))


@pytest.mark.parametrize("repeats", [1, 2])
def test_stages_exchange_activations_and_the_bubble_matches_the_formula(repeats):
  """(S, M, R) = (4, 8, R): the loops pass one microbatch's activation per
  iteration by collective-permute over `stage`; GPipe sends nothing else over
  `stage` but the batch's activations in and out; the bubble read from the
  compiled loops is (S-1)/(R*M+S-1)."""
  collectives, loops = _compiled(dict(stage=4, data=2), microbatches=8,
                                 schedule="circular" if repeats > 1 else "gpipe",
                                 repeats=repeats)
  pipe = Pipeline(4, 8, repeats)
  assert loops.trips == [pipe.iterations] * 2  # forward and backward
  assert loops.bubble == pytest.approx(pipe.bubble, rel=0.05)
  assert pipe.bubble == pytest.approx(3 / (repeats * 8 + 3))
  # [batch 16 / (data 2 x microbatches 8), length 16, embed 32] float32
  activation = 1 * 16 * 32 * 4
  over = [c for c in collectives if "stage" in c.axes]
  looped = [c for c in over if c.count == pipe.iterations]
  assert len(looped) >= 2 and all(
      c.kind == "collective-permute" and c.bytes == c.count * activation
      for c in looped)
  once = [c for c in over if c.count == 1]
  if repeats == 1:  # the batch in (gradient) and out: [8 rows, 16, 32] at most
    assert all(c.bytes <= 8 * activation + 128 for c in once), once
  else:  # circular: each stage's layer groups move to it once per step
    assert any(c.kind == "all-to-all" for c in once)


@pytest.mark.parametrize("change, field", [
    (dict(mesh=dict(stage=8)), "mesh.stage"),  # 4 layers over 8 stages
    (dict(mesh=dict(stage=2), schedule="circular", repeats=4, microbatches=2),
     "pipeline.repeats"),
    (dict(mesh=dict(stage=2), microbatches=3), "pipeline.microbatches"),
    (dict(mesh=dict(stage=4), schedule="circular", microbatches=2),
     "pipeline.microbatches"),
    (dict(mesh=dict(stage=2), repeats=2), "pipeline.repeats"),
    (dict(mesh=dict(stage=2), schedule="1f1b"), "pipeline.schedule"),
    (dict(mesh=dict(stage=2), ladder="upper:2"), "model.ladder_layers"),
    (dict(mesh=dict(stage=2), rules=dict(layers=())), "mesh.rules.layers"),
])
def test_bad_pipelines_are_config_errors(change, field):
  change = dict(change)
  c = _config({"data": -1, **change.pop("mesh")})
  if "ladder" in change:
    c.model.update(block="ladder", ladder_layers=change.pop("ladder"))
  if "rules" in change:
    c.mesh.rules.update(change.pop("rules"))
  c.pipeline.update(**change)
  with pytest.raises(ConfigError) as err:
    validate_config(c, 8)
  assert err.value.field == field


def test_cli_refuses_layers_that_do_not_split_over_stages(tmp_path):
  out = run_cli("train", "--config=experiments/base.py", f"--workdir={tmp_path}",
                "--config.model.num_layers=3", "--config.mesh.stage=2",
                "--config.mesh.data=4", "--config.pipeline.microbatches=2")
  assert out.returncode == 2, out.stderr
  assert "mesh.stage" in out.stderr and "3 layers" in out.stderr
