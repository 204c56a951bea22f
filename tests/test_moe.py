"""Mixture-of-experts layers: both dispatch paths against a per-token reference,
capacity drops by hand, expert parallelism against one device (with its HLO), and
the config checks around them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import sharding
from model import moe as moe_lib
from model.config import ModelConfig, MoEConfig
from sharding import ConfigError, hlo

D, F, E, K = 8, 12, 4, 2


def _layer(dispatch, capacity_factor=1.0, rules=(), **moe):
  cfg = ModelConfig(d_model=D, d_ff=F, moe=MoEConfig(
      num_experts=E, top_k=K, capacity_factor=capacity_factor, dispatch=dispatch,
      **moe))
  return moe_lib.MoE(cfg, constrain=sharding.LogicalConstraint(rules),
                     rngs=nnx.Rngs(0))


def _reference(params, x, choices, keep):
  """Token by token: the gate-weighted sum of the SwiGLU outputs of the experts it
  chose (choices [T, K], concrete), leaving out pairs with keep False."""
  tokens = x.reshape(-1, D)
  probs = jax.nn.softmax(tokens @ params["router"], axis=-1)  # [T, E]
  out = []
  for t in range(tokens.shape[0]):
    y = jnp.zeros(D)
    for j in range(K):
      e = int(choices[t, j])
      if keep[t, j]:
        h = jax.nn.silu(tokens[t] @ params["gate"][e]) * (tokens[t] @ params["up"][e])
        y = y + probs[t, e] * (h @ params["down"][e])
    out.append(y)
  return jnp.stack(out).reshape(x.shape)


def _choices(params, x):
  probs = np.asarray(jax.nn.softmax(x.reshape(-1, D) @ params["router"], axis=-1))
  return np.argsort(-probs, axis=-1, kind="stable")[:, :K]


def _run(layer):
  """(params, f(params, x) -> (y, stats)) for a layer."""
  graphdef, state = nnx.split(layer)

  def f(params, x):
    m = nnx.merge(graphdef, params)
    y = m(x)
    return y, dict(m.stats.get_value())
  return state, f


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_dispatch_equals_per_token_reference(dispatch):
  """Nothing dropped (capacity factor E / K gives every expert room for a whole
  sequence): forward and gradients equal the per-token loop."""
  state, f = _run(_layer(dispatch, capacity_factor=E / K))
  x = jax.random.normal(jax.random.key(1), (2, 6, D))
  plain = nnx.to_pure_dict(state)
  choices = _choices(plain, x)
  keep = np.ones(choices.shape, bool)
  y, stats = jax.jit(f)(state, x)
  assert float(stats["dropped"]) == 0
  reference = jax.jit(lambda p, x: _reference(p, x, choices, keep))
  np.testing.assert_allclose(y, reference(plain, x), rtol=1e-5, atol=1e-7)

  def loss(params, x):  # the probabilities also reach the router through aux_loss
    y, stats = f(params, x)
    return jnp.sum(jnp.sin(y)) + stats["aux_loss"]

  def ref_loss(params, x):
    y = _reference(params, x, choices, keep)
    probs = jax.nn.softmax(x @ params["router"], axis=-1)
    counts = np.bincount(choices.ravel(), minlength=E)
    return jnp.sum(jnp.sin(y)) + E * jnp.sum(counts / counts.sum() *
                                             probs.mean(axis=(0, 1)))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
  ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(plain, x)
  np.testing.assert_allclose(grads[1], ref[1], rtol=1e-5, atol=1e-7)
  for name in ("router", "gate", "up", "down"):
    np.testing.assert_allclose(grads[0][name][...], ref[0][name], rtol=1e-5,
                               atol=1e-7, err_msg=name)


def _skewed():
  """Router and inputs that force choices: tokens of type A pick experts (0, 1),
  B (2, 0), C (3, 2). Row 0 is A A A A A A B B, row 1 is all C."""
  router = np.zeros((D, E), np.float32)
  router[0] = (4, 3, 0, 0)
  router[1] = (3, 0, 4, 0)
  router[2] = (0, 0, 3, 4)
  types = np.array([[0] * 6 + [1] * 2, [2] * 8])
  return router, np.eye(D, dtype=np.float32)[types]  # x [2, 8, D]


def test_capacity_drops_equal_hand_count_and_dropless_drops_none():
  """capacity_factor 1.0, 8 tokens, top-2 of 4 experts: C = ceil(8 * 2 / 4) = 4
  slots per expert per sequence, first choices queued before second choices.

  Row 0: first choices put A0..A5 on expert 0 (A4, A5 dropped) and B6, B7 on
  expert 2; second choices put A0..A5 on expert 1 (A4, A5 dropped) and B6, B7 on
  expert 0, already full (both dropped): 6 drops. Row 1: 8 tokens on expert 3 and 8
  on expert 2, 4 dropped from each: 8 drops. 14 of 32 pairs. Loads (before drops)
  e0..e3 = 8, 6, 10, 8: max / mean = 10 / 8."""
  router, x = _skewed()
  keep = np.ones((16, K), bool)
  keep[[4, 5], :] = False          # A4, A5: both choices
  keep[[6, 7], 1] = False          # B6, B7: second choice (expert 0)
  keep[8 + 4:, :] = False          # row 1: tokens 4..7, both choices
  for dispatch, expect_dropped, expect_keep in [("capacity", 14, keep),
                                                ("dropless", 0, np.ones_like(keep))]:
    layer = _layer(dispatch)
    layer.router[...] = jnp.asarray(router)
    state, f = _run(layer)
    plain = nnx.to_pure_dict(state)
    choices = _choices(plain, x)
    assert choices[:6].tolist() == [[0, 1]] * 6 and choices[6:8].tolist() == [[2, 0]] * 2
    y, stats = jax.jit(f)(state, jnp.asarray(x))
    assert float(stats["dropped"]) == expect_dropped, dispatch
    assert float(stats["routed"]) == 32
    assert float(stats["max_load"]) == pytest.approx(10 / 8)
    reference = jax.jit(lambda p, x: _reference(p, x, choices, expect_keep))
    np.testing.assert_allclose(y, reference(plain, x), rtol=1e-5, atol=1e-7,
                               err_msg=dispatch)


# ---------------------------------------------------------------- expert parallelism

EP_MESHES = {"expert4": dict(expert=4, data=2),
             "expert2_tensor2": dict(expert=2, tensor=2, fsdp=2)}


def _mesh(**sizes):
  return sharding.make_mesh({**dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                             **sizes})


def _expert_weight_gathers(text: str) -> list[str]:
  """All-gathers whose result holds every expert's weights ([..., E, D, F] or
  [..., E, F, D] with the full expert count E)."""
  found = []
  for c in hlo.collectives(text):
    if c.opcode.removesuffix("-start") != "all-gather":
      continue
    for dims in re.findall(r"\[([\d,]+)\]", c.shape):
      shape = [int(d) for d in dims.split(",")]
      if any(shape[i] == E and sorted(shape[i + 1:i + 3]) == [D, F]
             for i in range(len(shape) - 2)):
        found.append(c.text[:160])
  return found


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_parallel_equals_one_device(dispatch):
  """expert=4 (x data=2) and expert=2 x tensor=2 (x fsdp=2): same output, aux loss
  and gradients as one device; the compiled program moves tokens by all-to-all and
  never all-gathers every expert's weights (FSDP gathers only local experts)."""
  layer = _layer(dispatch, rules=sharding.normalize_rules(None), shared_expert=True)
  state, f = _run(layer)

  def loss(params, x):
    y, stats = f(params, x)
    return jnp.sum(jnp.sin(y)) + stats["aux_loss"] + stats["z_loss"]

  x = jax.random.normal(jax.random.key(2), (8, 8, D))
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  ref_loss, ref_grads = grad_fn(state, x)
  for name, sizes in EP_MESHES.items():
    mesh = _mesh(**sizes)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    with jax.set_mesh(mesh):
      compiled = grad_fn.lower(state, xs).compile()
      value, grads = compiled(state, xs)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5, err_msg=name)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=name)
    text = compiled.as_text()
    ops = {c.opcode.removesuffix("-start") for c in hlo.collectives(text)}
    assert "all-to-all" in ops, (name, ops)
    assert not _expert_weight_gathers(text), name


# ---------------------------------------------------------------- config and counts

def _moe_config(**moe):
  from experiments import llama_tiny
  c = llama_tiny.get_config()
  c.model.moe.update(num_experts=8, **moe)
  return c


MOE_CASES = {
    "experts_over_mesh": (dict(mesh=dict(expert=4, data=2), num_experts=6),
                          "model.moe.num_experts",
                          "6 experts cannot be split over mesh.expert=4"),
    "every_k": (dict(every_k_layers=3), "model.moe.every_k_layers",
                "every_k_layers=3 must be >= 1 and divide num_layers=4"),
    "top_k": (dict(top_k=9), "model.moe.top_k", "top_k=9 must be between 1 and "
              "num_experts=8"),
    "dispatch": (dict(dispatch="sorted"), "model.moe.dispatch",
                 "'sorted' is not one of"),
    "ladder_unit": (dict(every_k_layers=2, block="ladder", ladder_layers="upper:1"),
                    "model.ladder_layers", "inside a unit of every_k_layers=2"),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_config_errors(case):
  import train
  overrides, field, numbers = MOE_CASES[case]
  overrides = dict(overrides)
  c = _moe_config()
  c.mesh.update(**overrides.pop("mesh", {}))
  for key in ("block", "ladder_layers"):
    if key in overrides:
      c.model[key] = overrides.pop(key)
  c.model.moe.update(**overrides)
  with pytest.raises(ConfigError) as err:
    train.validate_config(c, 8)
  assert err.value.field == field
  assert numbers in str(err.value) and "Fix:" in str(err.value)


def test_expert_axis_without_experts_is_data_parallel():
  """A dense model may use mesh.expert: `batch` is split over it (the rules), so it
  is plain data parallelism (tests/test_train_meshes.py trains data2_expert2_tensor2
  to the same losses as one device)."""
  import train
  c = _moe_config()
  c.model.moe.num_experts = 0
  c.mesh.update(expert=4, data=2)
  assert train.validate_config(c, 8)["expert"] == 4


def test_flops_count_active_parameters():
  """6N counts the router, top_k experts and the shared expert of MoE layers."""
  from train import flops
  dense = ModelConfig(d_model=64, d_ff=128, num_layers=4, num_heads=4,
                      num_kv_heads=4, head_dim=16, vocab_size=100)
  mlp = 3 * 64 * 128
  moe = ModelConfig(**{**dense.__dict__, "moe": MoEConfig(
      num_experts=8, top_k=2, every_k_layers=2, shared_expert=True)})
  # layers 1 and 3 are MoE: router 64 * 8, two experts and the shared one each
  assert (flops.matmul_params(moe) - flops.matmul_params(dense)
          == 2 * (64 * 8 + 2 * mlp + mlp - mlp))


def test_hf_export_refuses_moe(tmp_path):
  from experiments import base
  from train import hf
  c = base.get_config()
  c.model.moe.num_experts = 4
  (tmp_path / "config.json").write_text(c.to_json())
  with pytest.raises(ConfigError, match="mixture-of-experts model .4 experts. has no "
                     "LlamaForCausalLM equivalent"):
    hf.export_hf(str(tmp_path), str(tmp_path / "out"))
