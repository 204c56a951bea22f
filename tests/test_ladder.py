"""Ladder Residual: its dataflow under tensor parallelism, read from compiled HLO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sharding
from model import ModelConfig
from sharding import hlo
from train.state import model_spec, param_shardings

CFG = dict(vocab_size=64, d_model=64, num_layers=4, num_heads=8, num_kv_heads=4,
           head_dim=8, d_ff=128)


def _forward_hlo(block: str) -> str:
  cfg = ModelConfig(**CFG, block=block)
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=1, sequence=1, tensor=4))
  spec = model_spec(cfg, sharding.normalize_rules(None))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        spec.abstract_params, param_shardings(spec, mesh))
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
