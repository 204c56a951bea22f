"""The same run on any mesh: same losses, and parameters sharded as the rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sharding
import train
from model import ModelConfig
from train.optimizer import make_optimizer
from train.state import model_spec, state_shardings

MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "data2_tensor4": dict(data=2, tensor=4),
    "fsdp2_seq2_tensor2": dict(fsdp=2, sequence=2, tensor=2),
    "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2),
}


def _losses(config, tmp_path, devices=None):
  rows = train.train(config, str(tmp_path), devices=devices, progress=False)
  return np.array([r["loss"] for r in rows if "loss" in r])


def _with_mesh(config, **sizes):
  for a in sharding.AXES:
    config.mesh[a] = sizes.get(a, 1)
  return config


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
  from conftest import make_tiny_config
  c = _with_mesh(make_tiny_config())
  return _losses(c, tmp_path_factory.mktemp("one"), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", MESHES)
def test_same_losses_as_one_device(mesh, tiny_config, one_device_losses, tmp_path):
  c = _with_mesh(tiny_config, **MESHES[mesh])
  losses = _losses(c, tmp_path)
  assert len(losses) == 3
  np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5)


def test_parameters_sharded_by_rules(tiny_config):
  c = _with_mesh(tiny_config, fsdp=2, tensor=4)
  mesh = sharding.make_mesh(c.mesh)
  spec = model_spec(ModelConfig.from_config(c.model), sharding.normalize_rules(None))
  s = state_shardings(spec, make_optimizer(c.optim, 3), mesh).params
  assert s["embed"]["table"].spec == P("tensor", "fsdp")  # (vocab, embed)
  assert s["layers"]["attn"]["q"].spec == P(None, "fsdp", "tensor")  # (layers, embed, heads, hd)
  assert s["layers"]["attn"]["o"].spec == P(None, "tensor", None, "fsdp")
  assert s["layers"]["mlp"]["gate"].spec == P(None, "fsdp", "tensor")
  assert s["layers"]["mlp"]["down"].spec == P(None, "tensor", "fsdp")
  # and the initialised arrays really carry those shardings
  from train.state import init_state
  state = init_state(spec, make_optimizer(c.optim, 3), mesh, 0)
  assert state.params["layers"]["mlp"]["gate"].sharding.spec == P(None, "fsdp", "tensor")
  shard = state.params["layers"]["mlp"]["gate"].addressable_shards[0].data
  assert shard.shape == (2, 32 // 2, 64 // 4)  # (layers, embed/fsdp, mlp/tensor)
  # Adam moments follow their parameter.
  mu = state.opt_state[1][0].mu["layers"]["mlp"]["gate"]
  assert mu.sharding.spec == P(None, "fsdp", "tensor")


def test_remat_and_grad_accumulation_keep_the_numbers(tiny_config, tmp_path,
                                                       one_device_losses):
  """Remat changes memory, not results (offload_dots: the saved matmul outputs
  round-trip through pinned host memory; save_dots_attention: the flash kernel's
  saved output and log-sum-exp feed its backward); accumulating 2 micro-batches
  of 4 equals one batch of 8 (the mean of equal-size means)."""
  for i, (remat, accum) in enumerate([("full", 1), ("save_dots", 2),
                                      ("offload_dots", 1), ("save_dots_attention", 1)]):
    c = _with_mesh(tiny_config, data=1)
    c.model.remat = remat
    if remat == "save_dots_attention":
      c.model.attention = "flash"
    c.train.grad_accum_steps = accum
    losses = _losses(c, tmp_path / str(i), devices=jax.devices()[:1])
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5)


def test_grad_norm_of_bfloat16_gradients_is_summed_in_float32():
  """The logged grad_norm of bf16 gradients (param_dtype=bfloat16) equals the
  float64 norm of the same values: summed in bf16 it kept 8 bits (0.609375 two
  steps running under Muon)."""
  import jax.numpy as jnp
  import ml_dtypes
  from train.step import grad_norm
  rng = np.random.default_rng(0)
  grads = {"w": rng.normal(0, 0.01, (64, 256)).astype(ml_dtypes.bfloat16),
           "b": rng.normal(0, 0.01, (4096,)).astype(ml_dtypes.bfloat16)}
  want = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads.values()))
  got = grad_norm(jax.tree.map(jnp.asarray, grads))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _micro_batch_scans(step, state, batch, accum: int):
  """The outermost scans of `accum` steps in a traced train step (the layer
  scans run inside the micro-batch scan): (scan equation, its body)."""
  from jax.extend.core import jaxprs_in_params
  jaxpr = step.trace(state, batch).jaxpr

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "scan" and eqn.params["length"] == accum:
        yield eqn, eqn.params["jaxpr"].jaxpr
      else:
        for sub in jaxprs_in_params(eqn.params):
          yield from walk(sub)
  return list(walk(jaxpr.jaxpr))


@pytest.mark.parametrize("mesh", [dict(fsdp=8), dict(data=2, fsdp=4),
                                  dict(diloco=2, fsdp=4)])
def test_micro_batches_run_in_turn_with_gradients_in_the_parameter_layout(
    tiny_config, mesh):
  """Gradient accumulation: each micro-batch starts after the previous one's
  gradient is summed (an optimization barrier over the running sum and the
  micro-batch), and the sum is held in the parameters' layout, also where each
  replica accumulates its own (vmapped over `data` or `diloco`). Without the two
  the TPU compiler overlapped two micro-batches' forward passes and kept a
  replica's sum whole over `fsdp` (32B on two v5p slices: 116 GiB per chip
  against 65; benchmarks/README.md). Compiled at the suite's sizes (llama_1b at
  width 256 on v5p:2x2x2, data=2 x fsdp=4) the programs before and after moved
  the same bytes over `data` and differed by 1.4 of 39 MiB of temporaries, so
  the traced program is read instead."""
  from aot.compile import _train_step  # the step `compile` builds (DiLoCo: inner)
  c = _with_mesh(tiny_config, **mesh)
  c.train.grad_accum_steps = 2
  m = sharding.make_mesh(c.mesh)
  rules = sharding.normalize_rules(None)
  step, (state, batch) = _train_step(
      c, model_spec(ModelConfig.from_config(c.model), rules), m, rules)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  with jax.set_mesh(m):
    scans = _micro_batch_scans(step, state, batch, accum=2)
  assert len(scans) == 1, len(scans)
  eqn, body = scans[0]
  n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
  carry_in = body.invars[n_consts:n_consts + n_carry]
  first = body.eqns[0]
  assert first.primitive.name == "optimization_barrier", first.primitive
  assert set(carry_in) <= set(first.invars)  # the running sum, all of it
  # The gradient sum leaves each step through a constraint to its parameter's
  # spec (a replica's with the replica axis in front).
  made_by = {out: e for e in body.eqns for out in e.outvars}
  param_specs = [s.spec for s in jax.tree.leaves(shardings.params)]
  grads_out = body.outvars[n_carry - len(param_specs):n_carry]
  replica = "data" if "data" in mesh else "diloco" if "diloco" in mesh else None
  for out, want in zip(grads_out, param_specs):
    e = made_by[out]
    assert e.primitive.name == "sharding_constraint", e.primitive
    got = tuple(e.params["sharding"].spec)
    if replica:
      assert got[0] == replica, got
      got = got[1:]
    assert P(*got) == P(*want), (got, want)
