"""Model numerics against independent references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
from conftest import z_token_loss
from model import Decoder, ModelConfig
from model.rotary import apply_rotary

CFG = dict(vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
           head_dim=8, d_ff=48)


def naive_attention(q, k, v, segment_ids=None):
  """Per-head loops over explicitly repeated K/V: an independent check of GQA."""
  b, l, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(d)
      allowed = np.tril(np.ones((l, l), bool))
      if segment_ids is not None:
        allowed &= segment_ids[bi][:, None] == segment_ids[bi][None, :]
      s = np.where(allowed, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, hi // g]
  return out


def test_dtype_fields_take_dtypes_as_their_names():
  """From a Python-API trial: ModelConfig(compute_dtype=jnp.bfloat16) was refused
  as "<class 'jax.numpy.bfloat16'> is not one of float32, bfloat16". A dtype is
  taken as its name (equal configs, one compiled program); one rung does not run
  is still refused by name."""
  from sharding import ConfigError
  for given, name in ((jnp.bfloat16, "bfloat16"), (np.float32, "float32"),
                      (jnp.dtype("bfloat16"), "bfloat16")):
    cfg = ModelConfig(compute_dtype=given, param_dtype=given)
    cfg.validate()
    assert cfg == ModelConfig(compute_dtype=name, param_dtype=name)
  with pytest.raises(ConfigError, match="'float16' is not one of float32, bfloat16"):
    ModelConfig(compute_dtype=jnp.float16).validate()


@pytest.mark.parametrize("segments", [False, True])
def test_reference_attention_matches_naive(segments):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 12, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 12, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, 12, 2, 8)).astype(np.float32)
  seg = np.array([[1] * 5 + [2] * 7, [1] * 12]) if segments else None
  got = kernels.attention(q, k, v, segment_ids=seg, impl="reference")
  np.testing.assert_allclose(got, naive_attention(q, k, v, seg), rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  score = lambda pq, pk: float(jnp.sum(apply_rotary(q, jnp.array([[pq]]), 1e4) *
                                       apply_rotary(k, jnp.array([[pk]]), 1e4)))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


def _model(**kw):
  return Decoder(ModelConfig(**{**CFG, **kw}), rngs=nnx.Rngs(0))


def test_packed_sequences_equal_separate_forwards():
  """Segment ids and restarting positions make packing invisible to each document."""
  m = _model()
  tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, 61)
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  packed = m(tokens, pos, seg)
  np.testing.assert_allclose(packed[:, :5], m(tokens[:, :5]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:], m(tokens[:, 5:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,layers,phrase", [
    ("standard", "all", "standard block"),
    ("parallel", "all", "parallel block"),
    ("ladder", "all", "ladder block"),
    ("ladder", "none", "standard block"),
    ("ladder", "upper:2", "ladder block on layers 1-2 (standard on 0)"),
    ("ladder", "0,2", "ladder block on layers 0, 2 (standard on 1)"),
    ("ladder", "1", "ladder block on layer 1 (standard on 0, 2)"),
])
def test_block_description_names_a_hybrid_s_layers(block, layers, phrase):
  """The run's model line: each layer's kind (`layer_kinds`) in words."""
  cfg = ModelConfig(**{**CFG, "block": block, "ladder_layers": layers})
  assert cfg.describe_blocks() == phrase


def test_ladder_with_no_ladder_layers_is_standard_bit_for_bit():
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 61)
  standard = _model(block="standard")
  ladder = _model(block="ladder", ladder_layers="none")
  assert (nnx.to_pure_dict(nnx.state(standard)).keys() ==
          nnx.to_pure_dict(nnx.state(ladder)).keys())
  np.testing.assert_array_equal(standard(tokens), ladder(tokens))


def _layer_fns(m, i):
  """Attention and MLP of layer i as plain functions of the residual stream."""
  layer = jax.tree.map(lambda p: p[i], nnx.state(m.layers))
  block = nnx.merge(nnx.graphdef(m.layers), layer)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  attn = lambda r: block.attn(block.attn_norm(r), pos, None)
  mlp = lambda r: block.mlp((block.mlp_norm or block.attn_norm)(r))
  return attn, mlp


@pytest.mark.parametrize("ladder_layers", ["all", "upper:2", "0,2"])
def test_ladder_matches_equations(ladder_layers):
  """Module by module over the stream r_0 (embeddings), r_1, ...:

  - ladder module after a ladder module: r_i = h_i(r_{i-2}) + r_{i-1};
  - otherwise: r_i = h_i(r_{i-1}) + r_{i-1}.

  So a standard layer, or the first ladder module after one, sees every earlier
  output (hybrid models delay only what ladder modules produce).
  """
  m = _model(block="ladder", ladder_layers=ladder_layers)
  kinds = m.cfg.layer_kinds()
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 61)
  r, prev_ladder = [m.embed(tokens)], False
  for i in range(3):
    for h in _layer_fns(m, i):
      ladder = kinds[i] == "ladder"
      src = r[-2] if ladder and prev_ladder else r[-1]
      r.append(r[-1] + h(src))
      prev_ladder = ladder
  expected = m.final_norm(r[-1]) @ m.head[...]
  np.testing.assert_allclose(m(tokens), expected, rtol=2e-5, atol=2e-5)


def test_parallel_block_is_one_shared_norm():
  m = _model(block="parallel")
  attn, mlp = _layer_fns(m, 0)
  x = m.embed(jax.random.randint(jax.random.key(3), (2, 10), 0, 61))
  assert m.layers.mlp_norm is None
  from model import blocks
  layer = nnx.merge(nnx.graphdef(m.layers), jax.tree.map(lambda p: p[0], nnx.state(m.layers)))
  ctx = blocks.Context(jnp.broadcast_to(jnp.arange(10), (2, 10)), None)
  got, _ = blocks.parallel(layer, x, None, ctx)
  np.testing.assert_allclose(got, x + attn(x) + mlp(x), rtol=1e-5, atol=1e-6)


def test_one_hot_lookup_gives_the_gathers_loss_and_gradients_on_a_mesh():
  """model.embed_lookup='one_hot' multiplies one-hot tokens by the table: in
  float32 each row is found exactly, so the loss and every gradient equal the
  gather's, on one device and on fsdp=4 x tensor=2 (table split over both, the
  one-hot's vocabulary over `tensor`)."""
  import sharding
  from jax.sharding import NamedSharding
  from train.state import model_spec, param_shardings
  tokens = jax.random.randint(jax.random.key(4), (8, 12), 0, 61)

  def loss_and_grads(lookup, mesh=None):
    cfg = ModelConfig(**CFG, embed_lookup=lookup)
    spec = model_spec(cfg, sharding.normalize_rules(None))
    params = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    f = jax.value_and_grad(lambda p, t: spec.model(p)(t).sum() / 100)
    if mesh is None:
      return jax.jit(f)(params, tokens)
    params = jax.device_put(params, param_shardings(spec, mesh))
    with jax.set_mesh(mesh):
      return jax.jit(f)(params, jax.device_put(
          tokens, NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))))

  want = loss_and_grads("gather")
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, expert=1, sequence=1, tensor=2))
  for got in (loss_and_grads("one_hot"), loss_and_grads("one_hot", mesh)):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def _loss_and_grads(cfg, tokens, targets, mesh=None):
  """-> (the jitted lowering or None, ((loss, (metric, aux)), gradients)) of
  `cfg`'s training loss, on one device or with parameters and rows (over data and
  fsdp) placed on `mesh`."""
  import sharding
  from jax.sharding import NamedSharding, PartitionSpec as P
  from train.state import model_spec, param_shardings
  spec = model_spec(cfg, sharding.normalize_rules(None))
  params = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  f = jax.jit(jax.value_and_grad(lambda p, t, y: spec.model(p).loss(
      t, y, token_loss=z_token_loss), has_aux=True))
  if mesh is None:
    return None, f(params, tokens, targets)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    args = (jax.device_put(params, param_shardings(spec, mesh)),
            jax.device_put(tokens, rows), jax.device_put(targets, rows))
    return f.lower(*args), f(*args)


def test_loss_chunks_give_the_same_loss_and_gradients_on_a_mesh():
  """model.loss_chunks=4 (head and loss over 4 chunks of rows, recomputed in the
  backward) on data=2 x fsdp=2 x tensor=2 equals one piece on one device: the
  loss, the metric and every gradient, for a dense and an MoE model (whose router
  losses are added outside the chunks)."""
  import sharding
  from model import MoEConfig
  tokens = jax.random.randint(jax.random.key(5), (8, 12), 0, 61)
  targets = jax.random.randint(jax.random.key(6), (8, 12), 0, 61)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=1, sequence=1, tensor=2))

  for moe in (False, True):
    cfg = ModelConfig(**CFG, moe=MoEConfig(num_experts=4 if moe else 0, top_k=2))
    _, ((want_loss, (want_metric, _)), want_grads) = _loss_and_grads(
        cfg, tokens, targets)
    _, ((loss, (metric, _)), grads) = _loss_and_grads(
        dataclasses.replace(cfg, loss_chunks=4), tokens, targets, mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(metric, want_metric, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)


def test_unrolled_layers_give_the_scans_loss_and_gradients_on_a_mesh():
  """model.scan_layers=False on data=2 x fsdp=2 x tensor=2 equals the scanned
  model on one device (loss, metric, every gradient of the stacked parameters) for
  a ladder model under remat whose top layers alone read late (a standard and a
  ladder segment, ladder outputs pending at the end) and an MoE model of 2-layer
  units; its program has no loop over the layers."""
  import sharding
  from model import MoEConfig
  tokens = jax.random.randint(jax.random.key(7), (8, 12), 0, 61)
  targets = jax.random.randint(jax.random.key(8), (8, 12), 0, 61)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=1, sequence=1, tensor=2))
  models = {"ladder": dict(num_layers=4, block="ladder", ladder_layers="upper:2",
                          remat="full"),
            "moe": dict(num_layers=4, moe=MoEConfig(num_experts=4, top_k=2,
                                                    every_k_layers=2))}

  for name, fields in models.items():
    cfg = ModelConfig(**{**CFG, **fields})
    _, ((want_loss, (want_metric, _)), want_grads) = _loss_and_grads(
        cfg, tokens, targets)
    lowered, ((loss, (metric, _)), grads) = _loss_and_grads(
        dataclasses.replace(cfg, scan_layers=False), tokens, targets, mesh)
    assert "stablehlo.while" not in lowered.as_text(), name
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(metric, want_metric, rtol=1e-6, err_msg=name)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(want_grads)):
      assert g.shape == w.shape, (name, path)
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7, err_msg=f"{name} {path}")


def test_loss_chunks_keep_the_whole_batchs_logits_out_of_memory():
  """With a 4096-token vocabulary the float32 logits of 8 x 64 tokens are 8 MiB;
  the compiled training step's temporaries fall by at least that much with 4
  chunks (each chunk's logits are a quarter, and are not kept for the backward),
  and the eval step's stay under half of it."""
  tokens = jnp.zeros((8, 64), jnp.int32)
  logits_bytes = 8 * 64 * 4096 * 4

  def temporaries(chunks):
    m = Decoder(ModelConfig(**{**CFG, "vocab_size": 4096, "num_layers": 1},
                            loss_chunks=chunks), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m)
    f = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(
        tokens, tokens, token_loss=z_token_loss)[0])
    return jax.jit(f).lower(params).compile().memory_analysis().temp_size_in_bytes

  assert temporaries(1) - temporaries(4) >= logits_bytes

  # the eval step (no backward) holds a quarter of the logits at a time
  import sharding
  from train.state import model_spec
  from train.step import make_eval_step
  cfg = ModelConfig(**{**CFG, "vocab_size": 4096, "num_layers": 1}, loss_chunks=4)
  params = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  batch = dict(inputs=tokens, targets=tokens, weights=jnp.ones((8, 64)),
               positions=tokens, segment_ids=tokens)
  evaluate = make_eval_step(model_spec(cfg, sharding.normalize_rules(None)), None,
                            None)
  assert evaluate.lower(params, batch).compile().memory_analysis(
      ).temp_size_in_bytes < logits_bytes / 2


def test_evaluation_sums_over_the_same_loss_chunks():
  """The eval step runs the head over model.loss_chunks chunks too (a model that
  trains only with chunks must evaluate): its weighted NLL sum on data=2 x fsdp=2
  x tensor=2 with 4 chunks equals a float64 NumPy sum over one device's logits,
  padding rows (weight 0) left out."""
  import sharding
  from jax.sharding import NamedSharding, PartitionSpec as P
  from train.state import model_spec, param_shardings
  from train.step import make_eval_step
  tokens = jax.random.randint(jax.random.key(8), (8, 12), 0, 61)
  targets = jax.random.randint(jax.random.key(9), (8, 12), 0, 61)
  weights = np.ones((8, 12), np.float32)
  weights[5:] = 0  # a partial batch
  batch = dict(inputs=tokens, targets=targets, weights=weights,
               positions=jnp.broadcast_to(jnp.arange(12), (8, 12)),
               segment_ids=jnp.zeros((8, 12), jnp.int32))
  model = Decoder(ModelConfig(**CFG), rngs=nnx.Rngs(0))
  logits = np.asarray(model(tokens), np.float64)  # [batch, length, vocab]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) \
      + logits.max(-1)
  nll = logz - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  want = (nll * weights).sum()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=1, sequence=1, tensor=2))
  spec = model_spec(ModelConfig(**CFG, loss_chunks=4), sharding.normalize_rules(None))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    total, count = make_eval_step(spec, param_shardings(spec, mesh), rows)(
        jax.device_put(params, param_shardings(spec, mesh)),
        jax.device_put(batch, rows))
  np.testing.assert_allclose(total, want, rtol=1e-5)
  assert count == weights.sum()
  # a mixture of 3 sources: the same sums split by each row's source
  source = np.array([2, 0, 2, 1, 0, 1, 2, 0])
  batch["source_ids"] = np.repeat(source[:, None], 12, 1).astype(np.int32)
  with jax.set_mesh(mesh):
    totals, counts = make_eval_step(spec, param_shardings(spec, mesh), rows, 3)(
        jax.device_put(params, param_shardings(spec, mesh)),
        jax.device_put(batch, rows))
  for s in range(3):
    np.testing.assert_allclose(totals[s], (nll * weights)[source == s].sum(),
                               rtol=1e-5)
    assert counts[s] == weights[source == s].sum()


def test_loss_defaults_to_the_mean_next_token_nll():
  """`model.loss(tokens, targets)` without a token_loss is the mean NLL of the
  targets under the model's own logits (NumPy log-softmax), as loss and metric."""
  import numpy as np
  from flax import nnx
  from model import Decoder, ModelConfig
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8, d_ff=32)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens, targets = (rng.integers(0, 32, (2, 5)) for _ in range(2))
  logits = np.asarray(model(tokens), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, targets[..., None], -1).mean()
  loss, (metric, aux) = model.loss(tokens, targets)
  np.testing.assert_allclose([float(loss), float(metric)], [want, want], rtol=1e-5)
  assert aux == {}
