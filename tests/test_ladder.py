"""Ladder Residual: its dataflow under tensor parallelism, read from compiled HLO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sharding
from model import ModelConfig
from aot import hlo
from train.state import abstract_params, model_spec, param_shardings

CFG = dict(vocab_size=64, d_model=64, num_layers=4, num_heads=8, num_kv_heads=4,
           head_dim=8, d_ff=128)


def _forward_hlo(block: str) -> str:
  cfg = ModelConfig(**CFG, block=block)
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=1, sequence=1, tensor=4))
  spec = model_spec(cfg, sharding.normalize_rules(None))
  params = abstract_params(spec, mesh)
  tokens = jax.ShapeDtypeStruct((4, 16), jnp.int32, sharding=NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    return jax.jit(lambda p, t: spec.model(p)(t)).lower(params, tokens).compile().as_text()


def _layer_all_reduces(text: str):
  """(layer body name, its all-reduces): the scanned layer is the while loop whose
  body holds the tensor-parallel all-reduces."""
  for body in hlo.while_bodies(text):
    ars = [i for i in hlo.parse(text)[body] if i.opcode in ("all-reduce",
                                                              "all-reduce-start")]
    if ars:
      return body, ars
  raise AssertionError("no layer loop with all-reduces")


@pytest.mark.parametrize("block,count", [("standard", 2), ("parallel", 1), ("ladder", 2)])
def test_all_reduces_per_layer(block, count):
  _, ars = _layer_all_reduces(_forward_hlo(block))
  assert len(ars) == count, [a.text[:120] for a in ars]


def test_ladder_consumes_each_all_reduce_one_module_later():
  """In a standard layer the MLP's matmuls wait for the attention all-reduce; in a
  ladder layer only the MLP's down projection is ordered after it (so the two
  all-reduces stay separate collectives), and the MLP all-reduce feeds no matmul of
  its own layer: both results are first read by the next module."""
  waits = {}
  for block in ("standard", "ladder"):
    text = _forward_hlo(block)
    body, ars = _layer_all_reduces(text)
    waits[block] = [len(hlo.matmuls_depending_on(text, body, a.name)) for a in ars]
  # all-reduces in program order: attention's, then the MLP's
  assert waits["standard"][0] >= 2, waits  # gate and up (and down) wait
  assert waits["ladder"][0] <= 1, waits    # at most the down projection
  assert waits["ladder"][1] == 0 and waits["standard"][1] == 0, waits


MESHES = {"tensor4": dict(data=2, tensor=4), "fsdp2_tensor4": dict(fsdp=2, tensor=4),
          "seq2_tensor2": dict(data=2, sequence=2, tensor=2)}


def _loss_and_grads(spec, params, batch, mesh):
  from train.step import loss_fn
  with jax.set_mesh(mesh):
    return jax.jit(jax.value_and_grad(lambda p, b: loss_fn(spec, 0.0)(p, b)[0]))(
        params, batch)


# Every block type under tensor parallelism and sequence parallelism; FSDP (which
# shards parameters the same way whatever the dataflow) with ladder only.
BLOCK_MESHES = {"standard": ("tensor4", "seq2_tensor2"),
                "parallel": ("tensor4", "seq2_tensor2"),
                "ladder": ("tensor4", "fsdp2_tensor4", "seq2_tensor2")}


@pytest.mark.parametrize("block", BLOCK_MESHES)
def test_block_sharded_equals_unsharded(block):
  from train.state import init_state
  import optax
  cfg = ModelConfig(**CFG, block=block)
  rules = sharding.normalize_rules(None)
  spec = model_spec(cfg, rules)
  one = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                           jax.devices()[:1])
  params = init_state(spec, optax.sgd(0.1), one, 0).params
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (4, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)),
           "segment_ids": np.ones((4, 16), np.int32)}
  ref_loss, ref_grads = _loss_and_grads(spec, params, batch, one)
  for name in BLOCK_MESHES[block]:
    sizes = MESHES[name]
    mesh = sharding.make_mesh({**dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                               **sizes})
    sharded = jax.device_put(params, param_shardings(spec, mesh))
    loss, grads = _loss_and_grads(spec, sharded, batch, mesh)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=name)
