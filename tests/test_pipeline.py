"""Pipeline parallelism (model/pipeline.py): GPipe, circular and 1F1B schedules over
the `stage` mesh axis give the sequential model's losses and gradients, pass only
activations between stages, and report their bubble; 1F1B's memory does not grow
with the microbatches."""

import functools
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import sharding
from conftest import assert_fixes_validate, make_tiny_config, run_cli, z_token_loss
from model import Decoder, ModelConfig, MoEConfig
from model.pipeline import Pipeline, microbatches, unmicrobatch
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
  """3 SGD steps on meshes of 8 devices, with S = 2 and 4 (GPipe), S = 2 and 4,
  R = 2 (circular; S = 4 for the dense models, whose 8 layers split into 8
  groups) and S = 2 and 4 (1F1B; at S = 2 the 4 microbatches reuse its 3 stash
  slots), equal 3 steps of one scan over the layers: each step's loss,
  metric and every gradient, with the same microbatches (an MoE layer's
  load-balancing loss is a mean over microbatches, as under accumulation).
  Inside a stage: data with tensor, expert (MoE) or sequence (parallel
  blocks)."""
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=8, num_heads=4,
                    num_kv_heads=2, head_dim=8, d_ff=64, **BLOCKS[block])
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
  targets = jax.random.randint(jax.random.key(2), (8, 16), 0, 64)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(params, pipe, rules):
    m = nnx.merge(graphdef, params)
    m.pipeline = pipe
    m.constrain = sharding.LogicalConstraint(rules)
    loss, (nll, _) = m.loss(tokens, targets, token_loss=z_token_loss)
    return loss, nll

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def three_steps(params, pipe, rules=()):
    def step(params, _):
      (l, nll), g = jax.value_and_grad(loss, has_aux=True)(params, pipe, rules)
      return jax.tree.map(lambda p, d: p - 0.5 * d, params, g), (l, nll, g)
    return jax.lax.scan(step, params, None, length=3)[1]  # each leaf [3, ...]

  want = three_steps(params, Pipeline(1, 4, 1))
  if block != "moe":  # a dense model does not depend on the microbatches at all
    np.testing.assert_allclose(three_steps(params, Pipeline())[0], want[0],
                               rtol=1e-6)
  rules = sharding.normalize_rules(None)
  inside = dict(moe=dict(expert=2), parallel=dict(sequence=2)).get(
      block, dict(tensor=2))
  plans = [(2, 1, "gpipe", dict(stage=2, data=2, **inside)),
           (4, 1, "gpipe", dict(stage=4, data=2)),
           (2, 2, "circular", dict(stage=2, data=4)),
           (2, 1, "1f1b", dict(stage=2, data=2, **inside)),
           (4, 1, "1f1b", dict(stage=4, tensor=2))]
  if cfg.num_layers // cfg.unit % 8 == 0:  # the MoE model has 4 units
    plans.append((4, 2, "circular", dict(stage=4, data=2)))
  for stages, repeats, schedule, mesh in plans:
    mesh = sharding.make_mesh({"data": 1, **mesh})
    placed = jax.device_put(params, jax.tree.map(
        lambda x: NamedSharding(mesh, sharding.logical_to_spec(
            ("layers",) + (None,) * (x.ndim - 1), rules, mesh, x.shape))
        if x.ndim and x.shape[0] == cfg.num_layers // cfg.unit
        else NamedSharding(mesh, jax.sharding.PartitionSpec()), params))
    with jax.set_mesh(mesh):
      got = three_steps(placed, Pipeline(stages, 4, repeats, schedule=schedule),
                        rules)
    where = f"{block} {schedule} S={stages} {dict(mesh.shape)}"
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, err_msg=where)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, err_msg=where)
    # float32 sums in another order differ by a fraction of the tensor's scale,
    # not of each entry's (an entry near 0 is a cancellation): 1e-7 absolute
    # held on one CPU and not on another (AVX-512 vs AVX2 reductions).
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[2]),
                            jax.tree.leaves(want[2])):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(),
                                 err_msg=f"{where} {path}")


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
    tmp_path, capsys):
  """2 steps on stage=2 x tensor=2 x data=2 (1F1B) equal 1 device; a checkpoint
  saved on stage=2 resumes on stage=4 (circular) and on 1 device with the same
  losses; the stage-split model generates what it does on one device."""
  one = _losses(_config(microbatches=2, steps=4), tmp_path / "one",
                jax.devices()[:1])
  c = _config(dict(stage=2, tensor=2, data=2), steps=2, microbatches=2,
              schedule="1f1b")
  np.testing.assert_allclose(_losses(c, tmp_path / "s2"), one[:2], rtol=1e-5)
  # the run says its schedule; 1F1B's bubble is 2(S-1) / (M + 2(S-1))
  assert ("pipeline: 1f1b, 2 stages x 1 repeat, 2 microbatches, bubble 50.0%"
          in capsys.readouterr().out)
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


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_moe_in_microbatches_accumulates_over_data_replicas(dispatch, tmp_path):
  """An MoE model in 2 pipeline microbatches, accumulating 2 micro-batches on
  stage=2 x data=4, takes 1 device's steps (it failed to trace: the expert
  dispatch inside the stage shard_map, vmapped over the replicas)."""
  def config(mesh=None):
    c = _config(mesh, steps=2, microbatches=2)
    c.model.moe.update(num_experts=4, every_k_layers=2, dispatch=dispatch)
    c.train.update(grad_accum_steps=2, batch_size=16)
    return c
  one = _losses(config(), tmp_path / "one", jax.devices()[:1])
  np.testing.assert_allclose(_losses(config(dict(stage=2, data=4)), tmp_path / "s2"),
                             one, rtol=1e-5)


def _compile(mesh, batch_size=16, seq_len=16, **pipeline):
  """The compiled train step of an 8-layer tiny model, and its spec and mesh."""
  from aot.compile import _train_step
  from train.state import model_spec, pipeline_from_config
  c = _config(mesh, **pipeline)
  c.model.num_layers = 8
  c.train.batch_size = batch_size
  c.data.seq_len = seq_len
  sizes = validate_config(c, 8)
  m = sharding.make_mesh(c.mesh)
  rules = sharding.normalize_rules(None)
  spec = model_spec(ModelConfig.from_config(c.model), rules,
                    pipeline_from_config(c, sizes))
  step, args = _train_step(c, spec, m, rules)
  with jax.set_mesh(m):
    return step.lower(*args).compile(), spec, m


def _compiled(mesh, **pipeline):
  from aot import costs
  compiled, spec, m = _compile(mesh, **pipeline)
  text = compiled.as_text()
  shape = [m.shape[a] for a in sharding.AXES]
  return (costs.analyze(text, sharding.AXES, shape).collectives,
          costs.pipeline_loops(text, sharding.AXES, shape,
                               spec.pipeline.repeats * spec.pipeline.microbatches))


@pytest.mark.parametrize("schedule, repeats",
                         [("gpipe", 1), ("circular", 2), ("1f1b", 1)])
def test_stages_exchange_activations_and_the_bubble_matches_the_formula(
    schedule, repeats):
  """(S, M, R) = (4, 8, R): the loops pass one microbatch's activation per
  iteration by collective-permute over `stage` (1F1B: its activations forward
  and their gradients back, in one loop); GPipe sends nothing else over `stage`
  but the batch's activations in and out, 1F1B nothing but the gradients of the
  parameters outside the stack; the bubble read from the compiled loops is the
  schedule's formula."""
  collectives, loops = _compiled(dict(stage=4, data=2), microbatches=8,
                                 schedule=schedule, repeats=repeats)
  pipe = Pipeline(4, 8, repeats, schedule=schedule)
  one_loop = schedule == "1f1b"
  assert loops.trips == [pipe.iterations] * (1 if one_loop else 2)
  assert loops.bubble == pytest.approx(pipe.bubble, rel=0.05)
  assert pipe.bubble == pytest.approx(
      6 / (8 + 6) if one_loop else 3 / (repeats * 8 + 3))
  # [batch 16 / (data 2 x microbatches 8), length 16, embed 32] float32
  activation = 1 * 16 * 32 * 4
  over = [c for c in collectives if "stage" in c.axes]
  looped = [c for c in over if c.count == pipe.iterations]
  assert len(looped) >= 2 and all(
      c.kind == "collective-permute" and c.bytes == c.count * activation
      for c in looped)
  once = [c for c in over if c.count == 1]
  if schedule == "gpipe":  # the batch in (gradient) and out: [8 rows, 16, 32]
    assert all(c.bytes <= 8 * activation + 128 for c in once), once
  elif schedule == "1f1b":  # embedding, head, norm: [64, 32] x 2 + [32] float32,
    # and a few scalars (the loss)
    assert all(c.kind == "all-reduce" for c in once), once
    assert (2 * 64 * 32 + 32) * 4 <= sum(c.bytes for c in once) <= (
        2 * 64 * 32 + 32 + 64) * 4, once
  else:  # circular: each stage's layer groups move to it once per step
    assert any(c.kind == "all-to-all" for c in once)


def test_1f1b_memory_does_not_grow_with_microbatches():
  """At a fixed microbatch (one row of 512 tokens per data shard), S = 4: GPipe's
  temporaries grow with M, 1F1B's stay flat (its stash has 2S-1 slots)."""
  temps = {}
  for schedule in ("gpipe", "1f1b"):
    for m in (4, 16):
      compiled, _, _ = _compile(dict(stage=4, data=2), batch_size=2 * m,
                                seq_len=512, microbatches=m, schedule=schedule)
      temps[schedule, m] = compiled.memory_analysis().temp_size_in_bytes
  assert temps["gpipe", 16] > 1.5 * temps["gpipe", 4], temps
  assert temps["1f1b", 16] < 1.1 * temps["1f1b", 4], temps
  assert temps["1f1b", 16] < temps["gpipe", 16] / 2, temps


@pytest.mark.parametrize("change, field", [
    (dict(mesh=dict(stage=8)), "mesh.stage"),  # 4 layers over 8 stages
    (dict(mesh=dict(stage=2), schedule="circular", repeats=4, microbatches=2),
     "pipeline.repeats"),
    (dict(mesh=dict(stage=2), microbatches=3), "pipeline.microbatches"),
    (dict(mesh=dict(stage=4), schedule="circular", microbatches=2),
     "pipeline.microbatches"),
    (dict(mesh=dict(stage=2), repeats=2), "pipeline.repeats"),
    (dict(mesh=dict(stage=2), schedule="zero_bubble"), "pipeline.schedule"),
    (dict(mesh=dict(stage=2), ladder="upper:2"), "model.ladder_layers"),
    (dict(mesh=dict(stage=2), rules=dict(layers=())), "mesh.rules.layers"),
    (dict(mesh=dict(stage=2), rules=dict(embed=("stage",))), "mesh.rules.embed"),
    (dict(mesh=dict(stage=2), schedule="circular", repeats=2, microbatches=1),
     "pipeline.microbatches"),
    (dict(mesh=dict(stage=2), microbatches=1, repeats=2), "pipeline.repeats"),
    # 6 rows per replica: the batch fix must split into 4 microbatches and 3 loss
    # chunks (it offered 8 rows, which the loss-chunk check then refused).
    (dict(mesh=dict(stage=2), microbatches=4, batch=24, loss_chunks=3),
     "pipeline.microbatches"),
])
def test_bad_pipelines_are_config_errors(change, field):
  """Each is refused naming its field, and every fix it offers in flags works
  as given (a trial's ladder fix, --config.model.block=standard, met the
  refusal of ladder_layers on a standard block)."""
  change = dict(change)
  c = _config({"data": -1, **change.pop("mesh")})
  if "ladder" in change:
    c.model.update(block="ladder", ladder_layers=change.pop("ladder"))
  if "rules" in change:
    c.mesh.rules.update(change.pop("rules"))
  c.train.batch_size = change.pop("batch", c.train.batch_size)
  c.model.loss_chunks = change.pop("loss_chunks", c.model.loss_chunks)
  c.pipeline.update(**change)
  assert assert_fixes_validate(c).field == field


def test_a_hybrid_ladder_on_stages_is_refused_in_a_sentence():
  """From a ladder trial: the refusal read "`model.ladder_layers`: is 'upper:2':
  a pipelined model ...", a sentence without its subject."""
  from train.validate import validate_config
  c = _config({"data": -1, "stage": 2})
  c.model.update(block="ladder", ladder_layers="upper:2")
  with pytest.raises(sharding.ConfigError, match=r"'upper:2' mixes ladder and standard "
                     r"layers \(ladder block on layers 2-3 \(standard on 0-1\)\), but "
                     r"a pipelined model"):
    validate_config(c, 8)


def test_cli_refuses_layers_that_do_not_split_over_stages(tmp_path):
  out = run_cli("train", "--config=experiments/base.py", f"--workdir={tmp_path}",
                "--config.model.num_layers=3", "--config.mesh.stage=2",
                "--config.mesh.data=4", "--config.pipeline.microbatches=2")
  assert out.returncode == 2, out.stderr
  assert "mesh.stage" in out.stderr and "3 layers" in out.stderr


@pytest.mark.parametrize("pipeline,phrase", [
    (dict(schedule="1f1b"), "no pipeline (pipeline.schedule='1f1b' unused: "
                            "mesh.stage=1 and pipeline.microbatches=1)"),
    (dict(schedule="circular", repeats=2),
     "no pipeline (pipeline.schedule='circular', repeats=2 unused"),
])
def test_pipeline_settings_without_a_pipeline_are_named_unused(pipeline, phrase):
  """A schedule on one stage and one microbatch was dropped without a word."""
  import sharding
  from model import ModelConfig
  from train.loop import _architecture
  from train.state import model_spec, pipeline_from_config
  c = _config(**pipeline)
  rules = sharding.normalize_rules(c.mesh.rules)
  spec = model_spec(ModelConfig.from_config(c.model), rules,
                    pipeline_from_config(c, {"stage": 1}))
  line = _architecture(spec, sharding.make_mesh(c.mesh, jax.devices()[:1]), rules, 8, 16)
  assert phrase in line
  c = _config()  # the defaults say nothing
  spec = model_spec(ModelConfig.from_config(c.model), rules,
                    pipeline_from_config(c, {"stage": 1}))
  assert "pipeline" not in _architecture(
      spec, sharding.make_mesh(c.mesh, jax.devices()[:1]), rules, 8, 16)


@pytest.mark.parametrize("mesh, batch, microbatches, more, field", [
    # a trial: the microbatches fix (batch 8) led to "do not combine"
    (dict(diloco=2, stage=2, data=-1), 4, 2, {}, "mesh.stage"),
    (dict(diloco=2, data=2, stage=2), 8, 2, {}, "mesh.stage"),
    (dict(diloco=2, data=-1), 8, 2, {}, "pipeline.microbatches"),
    (dict(stage=2, data=-1), 8, 2, {"optim.compression.method": "dgc",
                                    "optim.name": "sgd"}, "optim.compression.method"),
    # microbatches that do not divide a replica's rows: flags, not words
    (dict(stage=2, data=-1), 8, 4, {}, "pipeline.microbatches"),
    (dict(stage=2, data=-1), 12, 2, {}, "pipeline.microbatches"),
    # fewer accumulation micro-batches, 1, leave 1 row: not 2 microbatches
    (dict(stage=2, data=-1), 4, 2, {"train.grad_accum_steps": 2},
     "train.grad_accum_steps"),
    (dict(stage=2, data=-1), 24, 2, {"train.grad_accum_steps": 4},
     "train.grad_accum_steps"),
])
def test_what_pipelining_does_not_combine_with_is_said_first(mesh, batch,
                                                             microbatches, more, field):
  """A fix of the pipeline's own settings that leads to "does not combine" (or
  into words: "use microbatches dividing 1") is no fix: what pipelining does not
  combine with is refused first, and each fix is flags that validate as given."""
  c = _config(mesh, microbatches=microbatches)
  c.train.batch_size = batch
  for key, value in more.items():
    group, name = key.rsplit(".", 1)
    node = c
    for g in group.split("."):
      node = node[g]
    node[name] = value
  err = assert_fixes_validate(c)
  assert err.field == field, str(err)
  assert " and " not in err.fix and "dividing" not in err.fix, err.fix
