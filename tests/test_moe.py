"""Mixture-of-experts layers: both dispatch paths against a per-token reference,
capacity drops by hand, expert parallelism against one device (with its HLO), and
the config checks around them."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import sharding
from model import ModelConfig, MoEConfig, moe as moe_lib
from aot import hlo
from sharding import ConfigError

D, F, E, K = 8, 12, 4, 2


def _layer(dispatch, capacity_factor=1.0, rules=(), **moe):
  cfg = ModelConfig(d_model=D, d_ff=F, moe=MoEConfig(
      num_experts=E, top_k=K, capacity_factor=capacity_factor, dispatch=dispatch,
      **moe))
  return moe_lib.MoE(cfg, constrain=sharding.LogicalConstraint(rules), rngs=_rngs())


def _rngs():
  """Parameter draws from the counter-free RBG generator: threefry's init programs
  take seconds to compile on CPU, these a fraction of one."""
  return nnx.Rngs(params=jax.random.key(0, impl="unsafe_rbg"))


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
  x = jax.random.normal(jax.random.key(1), (2, 4, D))
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
    assert choices[:8].tolist() == [[0, 1]] * 6 + [[2, 0]] * 2
    y, stats = jax.jit(f)(state, jnp.asarray(x))
    assert float(stats["dropped"]) == expect_dropped, dispatch
    assert float(stats["routed"]) == 32
    assert float(stats["max_load"]) == pytest.approx(10 / 8)
    reference = jax.jit(lambda p, x: _reference(p, x, choices, expect_keep))
    np.testing.assert_allclose(y, reference(plain, x), rtol=1e-5, atol=1e-7,
                               err_msg=dispatch)


def test_a_capacity_past_the_sequence_holds_no_empty_slots():
  """From an MoE trial: capacity_factor=100 made every step 46 s on one CPU device
  (its buffer held 100x the slots a sequence can fill). A token's top-k experts
  are distinct, so an expert takes at most one pair per token: C(n) stops at n,
  and every factor from num_experts / top_k up compiles to the same program,
  drops nothing and equals the dropless output."""
  for length, top_k, experts, factor in ((8, 2, 4, 100.0), (5, 1, 8, 10.0),
                                         (7, 3, 4, 2.0), (1, 2, 2, 50.0)):
    assert moe_lib.capacity(length, top_k, experts, factor) == length
  table = np.asarray(moe_lib.capacities(8, 2, 4, 100.0))
  assert table.tolist() == list(range(9))  # every n real tokens: n slots
  assert moe_lib.capacity(8, 2, 4, 1.0) == 4  # below the bound: unchanged
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, D)), jnp.float32)
  texts, outs = [], []
  for dispatch, factor in (("capacity", E / K), ("capacity", 100.0), ("dropless", 1.0)):
    state, f = _run(_layer(dispatch, factor))
    y, stats = jax.jit(f)(state, x)
    assert float(stats["dropped"]) == 0
    outs.append(np.asarray(y))
    if dispatch == "capacity":
      texts.append(jax.jit(f).lower(state, x).as_text())
  assert texts[0] == texts[1]
  np.testing.assert_allclose(outs[0], outs[2], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(outs[0], outs[1])


def _run_masked(layer):
  """Like _run, with a token mask."""
  graphdef, state = nnx.split(layer)

  def f(params, x, mask):
    m = nnx.merge(graphdef, params)
    y = m(x, mask=mask)
    return y, dict(m.stats.get_value())
  return state, f


def test_padding_takes_no_capacity_and_is_not_routed():
  """Row 0 of _skewed cut to its 6 A tokens: alone (C(6) = 3, so 3 of A's 6 pairs
  on each of experts 0 and 1 drop: 6 drops of 12 pairs) and as the real part of
  a padded row (mask False at positions 6, 7, which hold two B tokens) beside
  row 1 (all C: 8 drops, C(8) = 4). The real tokens' outputs are the same
  (capacity counts a row's own tokens, not its padded length, and padding takes no
  slot), padding gets 0 from the experts and is not counted: 14 drops of 28
  routed pairs. Dropless: same outputs, nothing dropped."""
  router, x = _skewed()
  mask = np.ones((2, 8), bool)
  mask[0, 6:] = False
  for dispatch, alone_dropped in (("capacity", 6), ("dropless", 0)):
    layer = _layer(dispatch)
    layer.router[...] = jnp.asarray(router)
    state, f = _run(layer)
    _, g = _run_masked(layer)
    alone, alone_stats = jax.jit(f)(state, jnp.asarray(x[:1, :6]))
    assert float(alone_stats["dropped"]) == alone_dropped, dispatch
    padded, stats = jax.jit(g)(state, jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(padded[0, :6], alone[0], rtol=1e-6, atol=1e-7,
                               err_msg=dispatch)
    np.testing.assert_array_equal(padded[0, 6:], 0)
    row1, _ = jax.jit(f)(state, jnp.asarray(x[1:]))
    np.testing.assert_allclose(padded[1], row1[0], rtol=1e-6, atol=1e-7)
    assert float(stats["dropped"]) == alone_dropped + (8 if dispatch == "capacity"
                                                       else 0), dispatch
    assert float(stats["routed"]) == 28


# ---------------------------------------------------------------- expert parallelism

def _mesh(**sizes):
  return _mesh_on(jax.devices(), **sizes)


def _mesh_on(devices, **sizes):
  return sharding.make_mesh({**dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                             **sizes}, devices)


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


MODEL = dict(vocab_size=64, d_model=D, num_heads=4, num_kv_heads=2, head_dim=8,
             d_ff=F)
# Each case one mesh, to keep compiles few; between them both dispatch paths, both
# required meshes (expert=4; expert=2 x tensor=2, here with FSDP too), standard and
# ladder blocks, every_k_layers 1 and 2, and a shared expert.
EP_CASES = {
    # every layer MoE; capacity 1.0 drops pairs, identically on every mesh
    "standard_capacity_expert2_tensor2_fsdp2": (
        dict(block="standard", num_layers=2, moe=MoEConfig(
            num_experts=E, top_k=K, capacity_factor=1.0, dispatch="capacity")),
        dict(expert=2, tensor=2, fsdp=2)),
    # a unit of (dense, MoE) layers; a shared expert beside the routed ones
    "ladder_dropless_expert4_data2": (
        dict(block="ladder", num_layers=2, moe=MoEConfig(
            num_experts=E, top_k=K, every_k_layers=2, shared_expert=True,
            dispatch="dropless")),
        dict(expert=4, data=2)),
}


@pytest.mark.parametrize("case", EP_CASES)
def test_expert_parallel_equals_one_device(case):
  """Expert-parallel meshes give one device's training loss (NLL + MoE aux and
  z-losses) and gradients. The compiled program moves tokens by all-to-all and never
  all-gathers every expert's weights (FSDP gathers only this device's experts)."""
  from train.state import model_spec, param_shardings
  from train.step import loss_fn
  model, sizes = EP_CASES[case]
  spec = model_spec(ModelConfig(**MODEL, **model), sharding.normalize_rules(None))
  rng = np.random.default_rng(0)
  # Drawn in numpy (no init program to compile): norm scales 1, weights N(0, 0.1).
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones(x.shape, x.dtype) if path[-1].key == "scale"
      else rng.normal(0, 0.1, x.shape).astype(x.dtype), spec.abstract_params)
  tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)),
           "segment_ids": np.ones((8, 16), np.int32)}
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(spec, 0.0)(p, b)[0]))
  with jax.set_mesh(_mesh_on(jax.devices()[:1])):
    ref_loss, ref_grads = grad_fn(params, batch)
  mesh = _mesh(**sizes)
  sharded = jax.device_put(params, param_shardings(spec, mesh))
  with jax.set_mesh(mesh):
    compiled = grad_fn.lower(sharded, batch).compile()
    loss, grads = compiled(sharded, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
  text = compiled.as_text()
  ops = {c.opcode.removesuffix("-start") for c in hlo.collectives(text)}
  assert "all-to-all" in ops, ops
  assert not _expert_weight_gathers(text)
  if sizes.get("fsdp", 1) > 1:  # FSDP does gather expert weights: the local ones
    assert "all-gather" in ops, ops


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_parallel_runs_any_batch_size(dispatch):
  """Three sequences on expert=4, which does not divide them, without and with a
  token mask (row 1 padded after 5 tokens): the exchange pads the batch to 4 with
  rows that are not routed and gives one device's outputs (it used to refuse a
  batch left replicated over `expert`: "out_specs is P() ... varying over
  {expert}")."""
  layer = _layer(dispatch, rules=sharding.normalize_rules(None))
  state, f = _run(layer)
  _, g = _run_masked(layer)
  x = jax.random.normal(jax.random.key(2), (3, 8, D))
  mask = np.ones((3, 8), bool)
  mask[1, 5:] = False
  mesh = _mesh_on(jax.devices()[:4], expert=4)
  for fn, args in ((f, (state, x)), (g, (state, x, mask))):
    ref, ref_stats = jax.jit(fn)(*args)
    with jax.set_mesh(mesh):
      y, stats = jax.jit(fn)(*args)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert float(stats["dropped"]) == float(ref_stats["dropped"])


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
                    "model.ladder_layers", "inside a unit of 2 layers (moe.every_k_layers;"),
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
  if case == "ladder_unit":  # the fix's flag validates (it named none)
    for layers, upper in (("upper:1", 2), ("upper:3", 2), ("1,2,3", 2)):
      c.model.ladder_layers = layers
      with pytest.raises(ConfigError) as err:
        train.validate_config(c, 8)
      fix = re.search(r"--config\.model\.ladder_layers=(\S+?)\.$", err.value.fix)
      assert fix[1] == f"upper:{upper}", err.value.fix
      c.model.ladder_layers = fix[1]
      train.validate_config(c, 8)


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
  from model import flops
  dense = ModelConfig(d_model=64, d_ff=128, num_layers=4, num_heads=4,
                      num_kv_heads=4, head_dim=16, vocab_size=100)
  mlp = 3 * 64 * 128
  moe = ModelConfig(**{**dense.__dict__, "moe": MoEConfig(
      num_experts=8, top_k=2, every_k_layers=2, shared_expert=True)})
  # layers 1 and 3 trade their MLP for a router (64 x 8), two experts and the
  # shared one
  assert (flops.matmul_params(moe) - flops.matmul_params(dense)
          == 2 * (64 * 8 + 3 * mlp) - 2 * mlp)


def test_hf_export_refuses_moe_mixtral_cannot_hold(tmp_path):
  """MoE exports as Mixtral, which renormalises its gates and has experts in every
  layer and no shared expert: anything else is refused naming the field."""
  from experiments import base
  from train import hf
  c = base.get_config()
  c.model.moe.num_experts = 4
  (tmp_path / "config.json").write_text(c.to_json())
  with pytest.raises(ConfigError, match=r"model\.moe\.renormalize.*needs "
                     "renormalize=true"):
    hf.export_hf(str(tmp_path), str(tmp_path / "out"))
  c.model.moe.update(renormalize=True, every_k_layers=2)
  (tmp_path / "config.json").write_text(c.to_json())
  with pytest.raises(ConfigError, match=r"model\.moe\.every_k_layers"):
    hf.export_hf(str(tmp_path), str(tmp_path / "out"))


# ---------------------------------------------------------------- TPU, deviceless

@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install jax[tpu])")
def test_moe_train_step_compiles_for_tpu(tiny_config, monkeypatch):
  """A full MoE train step (model, losses, optimizer) on expert=4 of a TPU v5e:2x2,
  compiled by libtpu without a TPU: tokens still move by all-to-all. Dropless, the
  path whose grouped matmul (ragged_dot) has a TPU-specific lowering."""
  from jax.experimental import topologies
  from train.optimizer import make_optimizer, schedule
  from train.state import abstract_state, model_spec, state_shardings
  from train.step import batch_sharding, make_train_step
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  c = tiny_config
  c.model.moe.update(num_experts=8, dispatch="dropless")
  v5e = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  mesh = _mesh_on(v5e.devices, expert=4)
  rules = sharding.normalize_rules(None)
  spec = model_spec(ModelConfig.from_config(c.model), rules)
  tx = make_optimizer(c.optim, c.train.steps)
  # Shardings derived on a CPU mesh of the same shape, then moved to the TPU one
  # (optax's init cannot run on deviceless TPU devices).
  cpu_mesh = _mesh_on(jax.devices()[:4], expert=4)
  to_tpu = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: x.update(sharding=NamedSharding(mesh, x.sharding.spec))
      if isinstance(x, jax.ShapeDtypeStruct) else NamedSharding(mesh, x.spec), tree)
  data = batch_sharding(mesh, rules, c.train.batch_size, c.data.seq_len)
  step = make_train_step(spec, tx, schedule(c.optim, c.train.steps), c.train,
                         to_tpu(state_shardings(spec, tx, cpu_mesh)), data)
  batch = {name: jax.ShapeDtypeStruct((c.train.batch_size, c.data.seq_len),
                                      jnp.int32, sharding=data)
           for name in ("inputs", "targets", "positions", "segment_ids")}
  state = to_tpu(abstract_state(spec, tx, cpu_mesh))
  with jax.set_mesh(mesh):
    text = step.lower(state, batch).compile().as_text()
  ops = {c.opcode.removesuffix("-start") for c in hlo.collectives(text)}
  assert "all-to-all" in ops, ops


def test_training_lowers_loss_and_logs_moe_metrics(tiny_config, tmp_path, capsys):
  """A few steps of an MoE model through the training loop: the loss falls, and
  every logged row carries the MoE metrics (loads, drops, aux loss)."""
  import train
  from train.metrics import MOE_KEYS, read_metrics
  c = tiny_config
  c.model.moe.update(num_experts=4, top_k=2, every_k_layers=2)
  c.train.steps = 12
  c.checkpoint.every_steps = 0
  c.optim.learning_rate = 1e-2
  with jax.default_prng_impl("unsafe_rbg"):  # see _rngs
    rows = train.train(c, str(tmp_path), devices=jax.devices()[:1], progress=False)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] - 0.1, losses
  out = capsys.readouterr().out
  assert "MoE: 4 experts, top-2, capacity dispatch" in out
  assert "M matmul params (active per token)" in out
  logged = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert all(set(MOE_KEYS) <= set(r) for r in logged)
  # top-2 of 4 experts: an expert holds at most every token, twice the mean load
  assert all(1.0 <= r["moe_max_load"] <= 2.0 for r in logged)
  assert all(0.0 <= r["moe_dropped_fraction"] < 1.0 for r in logged)
  assert all(r["moe_aux_loss"] > 0 for r in logged)
