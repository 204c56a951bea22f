"""The Pallas kernels on the hardware back ends, without the hardware: a deviceless
TPU v5e compile through libtpu (Mosaic), and a CUDA lowering through jax.export
(Triton). See DESIGN.md, "Kernels, checked on all three backends"."""

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import kernels
from aot.compile import compile_deviceless
import sharding
from aot import costs
from test_kernels_sequence import count_ops

# Another process may hold libtpu's lock file; a deviceless compile needs no chip.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install jax[tpu])")


@pytest.fixture(scope="module")
def v5e_devices():
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices


def _mesh(devices, **sizes):
  return sharding.make_mesh({**dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                             **sizes}, devices=devices)


def _loss_and_grads(impl, **kwargs):
  def loss(q, k, v, seg):
    o = kernels.attention(q, k, v, causal=True, segment_ids=seg, impl=impl, **kwargs)
    return jnp.sum(o.astype(jnp.float32) ** 2)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _abstract(mesh, length=1024, heads=8, kv_heads=2, head_dim=128, dtype=jnp.bfloat16):
  x = NamedSharding(mesh, P(("data",), "sequence", "tensor"))
  seg = NamedSharding(mesh, P(("data",), "sequence"))
  s = jax.ShapeDtypeStruct
  return (s((2, length, heads, head_dim), dtype, sharding=x),
          s((2, length, kv_heads, head_dim), dtype, sharding=x),
          s((2, length, kv_heads, head_dim), dtype, sharding=x),
          s((2, length), jnp.int32, sharding=seg))


@needs_libtpu
@pytest.mark.parametrize("window", [None, 300])
def test_flash_compiles_for_tpu(v5e_devices, window):
  """Forward + backward Mosaic kernels (3 custom calls), sharded over data x tensor;
  length 1000 is not a tile multiple; with and without a sliding window (whose
  block ranges enter the kernels' index maps)."""
  mesh = _mesh(v5e_devices, data=2, tensor=2)
  with jax.set_mesh(mesh):
    compiled = compile_deviceless(jax.jit(_loss_and_grads(
        "flash", block_sizes=256, window=window)).lower(*_abstract(mesh, length=1000)))
  hlo = compiled.as_text()
  assert hlo.count("custom_call_target=\"tpu_custom_call\"") == 3
  assert compiled.memory_analysis().temp_size_in_bytes >= 0

  # Each kernel declares what it executes (XLA's scheduler and aot/schedule.py read
  # it): per visible 256 x 256 tile of each of the device's 1 x 4 heads, 2 (forward),
  # 3 (dQ) and 4 (dK/dV) [256, 256, 128] matmuls and 256² exps. Visible tiles counted
  # here from the dense mask over the padded length 1024.
  pos = np.arange(1024)
  distance = pos[:, None] - pos[None, :]
  seen = (distance >= 0) & (distance < (window or 1 << 30))
  tiles = int(seen.reshape(4, 256, 4, 256).any(axis=(1, 3)).sum())
  estimates = sorted((float(e["flops"]), float(e["transcendentals"])) for e in map(
      json.loads, re.findall(r'"cost_estimate":\s*(\{[^}]*\})', hlo)))
  per_matmul = 2 * 256 * 256 * 128 * tiles * 4
  assert estimates == [(m * per_matmul, 256 * 256 * tiles * 4) for m in (2, 3, 4)]
  assert costs.analyze(hlo).uncounted_kernels == 0


HEAD_DIMS = (64, 80, 96, 128)


@needs_libtpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_flash_head_dims_compile_for_tpu(v5e_devices, head_dim):
  """Mosaic takes a head_dim that is no multiple of 128 as the full last dim of a
  tile: forward + backward compile for v5e at every head size, and the gradients
  keep it."""
  mesh = _mesh(v5e_devices, data=2, tensor=2)
  args = _abstract(mesh, length=256, heads=4, kv_heads=2, head_dim=head_dim)
  with jax.set_mesh(mesh):
    compiled = compile_deviceless(
        jax.jit(_loss_and_grads("flash", block_sizes=128)).lower(*args))
  assert compiled.as_text().count("custom_call_target=\"tpu_custom_call\"") == 3
  grads = compiled.out_info[1]
  assert [g.shape for g in grads] == [a.shape for a in args[:3]]


@needs_libtpu
@pytest.mark.parametrize("impl,window", [("ring_zigzag", None), ("ring", None),
                                         ("ring", 300)])
def test_ring_compiles_for_tpu(v5e_devices, impl, window):
  """Ring over sequence=4 with Mosaic kernels inside shard_map and lax.cond, in
  zig-zag order, in natural order, and windowed (offset chunks)."""
  mesh = _mesh(v5e_devices, sequence=4)
  with jax.set_mesh(mesh):
    hlo = compile_deviceless(jax.jit(_loss_and_grads(impl, window=window)).lower(
        *_abstract(mesh))).as_text()
  assert "tpu_custom_call" in hlo
  # (The exact hop count is asserted on CPU: TPU's compiled HLO omits loop trip counts.)
  assert count_ops(hlo, "collective-permute") > 0


@needs_libtpu
def test_train_step_with_ring_compiles_for_tpu(v5e_devices, tiny_config):
  """A full train step (model, loss, optimizer) with attention=ring_zigzag, the
  load-balanced ring for training, on sequence=4."""
  from model import ModelConfig
  from train.optimizer import make_optimizer, schedule
  from train.state import abstract_state, model_spec, state_shardings
  from train.step import batch_sharding, make_train_step
  c = tiny_config
  c.model.attention = "ring_zigzag"
  c.model.head_dim = 128
  c.data.seq_len = 256
  mesh = _mesh(v5e_devices, sequence=4)
  rules = sharding.normalize_rules(None)
  spec = model_spec(ModelConfig.from_config(c.model), rules)
  tx = make_optimizer(c.optim, c.train.steps)
  state = abstract_state(spec, tx, mesh)
  data = batch_sharding(mesh, rules, c.train.batch_size, c.data.seq_len)
  step = make_train_step(spec, tx, schedule(c.optim, c.train.steps), c.train,
                         state_shardings(spec, tx, mesh), data)
  batch = {name: jax.ShapeDtypeStruct((c.train.batch_size, c.data.seq_len), jnp.int32,
                                      sharding=data)
           for name in ("inputs", "targets", "positions", "segment_ids")}
  with jax.set_mesh(mesh):
    hlo = compile_deviceless(step.lower(state, batch)).as_text()
  assert "tpu_custom_call" in hlo
  assert count_ops(hlo, "collective-permute") > 0


@pytest.mark.parametrize("window", [None, 300])
def test_flash_lowers_for_cuda(window):
  """Forward + backward lower to three Triton kernels (forward, dQ, dK/dV), with
  and without a sliding window."""
  mesh = _mesh(jax.devices()[:1])
  exported = jax.export.export(
      jax.jit(_loss_and_grads("flash", block_sizes=64, window=window)),
      platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  )(*_abstract(mesh, length=1000, heads=4, kv_heads=2, head_dim=64))
  module = exported.mlir_module()
  assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3
  assert "tpu_custom_call" not in module


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_flash_head_dims_lower_for_cuda(head_dim):
  """Every head size lowers to the three Triton kernels: 80 and 96 run zero-padded
  to 128 inside the kernels, and the gradients come back at the real head_dim."""
  mesh = _mesh(jax.devices()[:1])
  args = _abstract(mesh, length=128, heads=4, kv_heads=2, head_dim=head_dim)
  exported = jax.export.export(
      jax.jit(_loss_and_grads("flash", block_sizes=64)), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  )(*args)
  calls = [line for line in exported.mlir_module().splitlines()
           if "stablehlo.custom_call @__gpu$xla.gpu.triton" in line]
  assert len(calls) == 3
  # Every [b, heads, len, d] operand and result of the kernels is at the padded d.
  dims = {int(d) for line in calls
          for d in re.findall(r"tensor<\d+x\d+x\d+x(\d+)x(?:bf16|f32)>", line)}
  assert dims == {1 << (head_dim - 1).bit_length()}
  assert [a.shape for a in exported.out_avals[1:]] == [a.shape for a in args[:3]]
