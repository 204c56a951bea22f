"""Sequence parallelism: ring (natural order), ring_zigzag and Ulysses against the
reference on `sequence` = 2, 4, 8 and with data / tensor, the collectives they
compile to, and the zig-zag load balance counted from what the ring executes."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import kernels
import sharding
from aot import hlo as hlo_lib
from kernels import flash, reference, ring
from test_kernels_flash import (FAST_COMPILE, TOL, assert_close, make_inputs,
                                value_and_vjp)


def mesh_of(**sizes):
  full = {**dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1), **sizes}
  return sharding.make_mesh(full, devices=jax.devices()[:math.prod(full.values())])


def sequence_parallel(impl, p, *, causal, block_sizes=32):
  """fn(q, k, v, seg) in natural order through the public entry, kernels.attention.
  For ring_zigzag the zig-zag permutation is applied around the call the way the
  training loop does it (once, outside attention) and undone on the output; `ring`
  and `ulysses` take natural order as it is."""
  zig = impl == "ring_zigzag"
  assert kernels.uses_zigzag(impl) == zig
  perm = (lambda x: kernels.zigzag_permute(x, p)) if zig else (lambda x: x)
  unperm = (lambda x: kernels.zigzag_unpermute(x, p)) if zig else (lambda x: x)

  def fn(q, k, v, seg):
    o = kernels.attention(perm(q), perm(k), perm(v), causal=causal,
                          segment_ids=None if seg is None else perm(seg),
                          block_sizes=block_sizes, impl=impl)
    return unperm(o)
  return fn


# (impl, mesh, causal, heads, kv_heads, segments, dtype)
GRID = [
    ("ring_zigzag", dict(sequence=2), True, 8, 2, True, jnp.float32),
    ("ring_zigzag", dict(sequence=4), True, 4, 4, False, jnp.float32),
    ("ring_zigzag", dict(sequence=8), True, 8, 2, False, jnp.float32),
    ("ring_zigzag", dict(sequence=8), False, 4, 4, True, jnp.float32),
    ("ring_zigzag", dict(data=2, sequence=2, tensor=2), True, 8, 2, True, jnp.float32),
    ("ring_zigzag", dict(sequence=4), True, 8, 2, False, jnp.bfloat16),
    # impl="ring" on sequences in natural order (it once assumed zig-zag order).
    ("ring", dict(sequence=4), True, 8, 2, True, jnp.float32),
    ("ring", dict(sequence=4), False, 8, 2, False, jnp.float32),
    ("ulysses", dict(sequence=2), True, 4, 4, True, jnp.float32),
    ("ulysses", dict(sequence=4), True, 8, 2, True, jnp.float32),
    ("ulysses", dict(sequence=8), False, 8, 2, False, jnp.float32),
    ("ulysses", dict(data=2, sequence=2, tensor=2), True, 8, 4, False, jnp.bfloat16),
]


def _id(case):
  impl, mesh, causal, h, kvh, segs, dtype = case
  axes = "-".join(f"{a}{n}" for a, n in mesh.items())
  return (f"{impl}-{axes}-{'causal' if causal else 'full'}-{h}:{kvh}-"
          f"{'seg' if segs else 'noseg'}-{jnp.dtype(dtype).name}")


@pytest.mark.parametrize("case", GRID, ids=_id)
def test_matches_reference(case):
  """kernels.attention(impl=...) under the mesh equals kernels.reference, forward and
  gradients; ring_zigzag after unpermuting its zig-zag output (and gradients)."""
  impl, mesh_sizes, causal, h, kvh, segs, dtype = case
  inputs = make_inputs(h * 10 + kvh, batch=2, length=128, heads=h, kv_heads=kvh,
                       head_dim=64, segments=segs, dtype=dtype)
  q, k, v, seg, do = inputs
  ref_out, ref_grads = value_and_vjp(
      lambda q, k, v, s: reference.attention(q, k, v, causal=causal, segment_ids=s),
      q, k, v, seg, do)
  fn = sequence_parallel(impl, mesh_sizes["sequence"], causal=causal)
  with jax.set_mesh(mesh_of(**mesh_sizes)):
    out, grads = value_and_vjp(fn, q, k, v, seg, do)
  tol = TOL[dtype]
  assert_close(out, ref_out, tol, "output")
  for name, g, r in zip("qkv", grads, ref_grads):
    assert_close(g, r, tol, f"d{name}")


def test_ring_default_layout_is_natural_order():
  """kernels.ring.attention called without a layout is exact on natural order."""
  q, k, v, seg, _ = make_inputs(7, batch=1, length=64, heads=2, kv_heads=1,
                                segments=True)
  with jax.set_mesh(mesh_of(sequence=4)):
    out = jax.jit(lambda q, k, v, s: ring.attention(
        q, k, v, causal=True, segment_ids=s, block_sizes=16))(q, k, v, seg)
  assert_close(out, reference.attention(q, k, v, causal=True, segment_ids=seg),
               TOL[jnp.float32], "ring, default layout")


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_sequence_parallel_runs_over_the_axis_the_rules_name(impl):
  """Rules that split `length` over the `data` mesh axis (and the batch over
  nothing) run the ring / Ulysses exchange over `data`: exact against the
  reference, and the compiled program exchanges (collective-permute or
  all-to-all) instead of gathering the sequence."""
  rules = sharding.normalize_rules({**sharding.DEFAULT_RULES, "batch": (),
                                    "length": ("data",)})
  q, k, v, seg, _ = make_inputs(11, batch=1, length=64, heads=4, kv_heads=4,
                                segments=True)
  fn = jax.jit(lambda q, k, v, s: kernels.attention(
      q, k, v, causal=True, segment_ids=s, impl=impl, block_sizes=16, rules=rules))
  with jax.set_mesh(mesh_of(data=4)):
    out = fn(q, k, v, seg)
    text = fn.lower(q, k, v, seg).compile().as_text()
  assert_close(out, reference.attention(q, k, v, causal=True, segment_ids=seg),
               TOL[jnp.float32], f"{impl} over data")
  exchange = "collective-permute" if impl == "ring" else "all-to-all"
  assert count_ops(text, exchange) > 0


@pytest.mark.parametrize("impl", ["flash", "ring", "ulysses"])
def test_a_mesh_axis_the_batch_takes_splits_nothing_else(impl):
  """From a fresh-user trial: rules that map `length` or `act_heads` onto a mesh
  axis the batch already splits made the kernels' shard_map spec name that axis
  twice (DuplicateSpecError), while the reference and the model's activations
  (`sharding.logical_to_spec`: first dimension wins) take it for the batch. Here
  `fsdp` is named by the batch, the length and the heads, and the length and heads
  have a free axis each: exact against the reference, split as the model splits."""
  rules = sharding.normalize_rules({
      **sharding.DEFAULT_RULES, "batch": ("fsdp",), "length": ("fsdp", "sequence"),
      "act_heads": ("fsdp", "sequence", "tensor")})
  axes = kernels.partition.Axes.from_rules(rules)
  assert axes == kernels.partition.Axes(("fsdp",), ("sequence",), ("tensor",))
  q, k, v, seg, _ = make_inputs(13, batch=2, length=32, heads=4, kv_heads=2,
                                segments=True)
  mesh = mesh_of(fsdp=2, sequence=2, tensor=2)
  fn = jax.jit(lambda q, k, v, s: kernels.attention(
      q, k, v, causal=True, segment_ids=s, impl=impl, block_sizes=8, rules=rules))
  with jax.set_mesh(mesh):
    out = fn(q, k, v, seg)
    spec = sharding.logical_to_spec(("batch", "length", "act_heads", None), rules,
                                    mesh, q.shape)
  assert spec == jax.sharding.PartitionSpec("fsdp", "sequence", "tensor")
  assert_close(out, reference.attention(q, k, v, causal=True, segment_ids=seg),
               TOL[jnp.float32], f"{impl} with fsdp named thrice")


# (impl, query heads, K/V heads, mesh): the query heads split further than the K/V
# heads (multi-query; GQA with more tensor devices than K/V heads)
MORE_DEVICES_THAN_KV_HEADS = [
    ("flash", 8, 1, dict(tensor=4, data=2)),
    ("flash", 16, 4, dict(tensor=8)),
    ("ring", 8, 2, dict(tensor=4, sequence=2)),
    ("ulysses", 8, 1, dict(tensor=2, sequence=2, data=2)),
]


@pytest.mark.parametrize("impl,heads,kv_heads,sizes", MORE_DEVICES_THAN_KV_HEADS)
def test_query_heads_split_past_the_kv_heads_each_device_attends_its_own(
    impl, heads, kv_heads, sizes):
  """From a fresh-user trial: where `tensor` divides the query heads but not the
  K/V heads (K/V left unsplit by the rules, as validation's fix says), the
  kernels split the heads over no axis: q was all-gathered and every device
  computed every head. Now each device takes its query heads and the one K/V
  head they share. Against the reference (output and gradients), with q placed
  as the model places it: no all-gather, and the FLOPs per device are at most
  1.15 / Q of the same call with the heads unsplit (rules act_heads=())."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  unsplit_kv = {**sharding.DEFAULT_RULES, "kv_heads": (), "act_kv_heads": ()}
  q, k, v, seg, do = make_inputs(17, batch=2, length=64, heads=heads,
                                 kv_heads=kv_heads, head_dim=16, segments=True)
  mesh = mesh_of(**sizes)
  ways = sizes["tensor"]

  def compiled(rules):
    fn = lambda q, k, v, s: kernels.attention(  # noqa: E731
        q, k, v, causal=True, segment_ids=s, impl=impl, block_sizes=16,
        rules=sharding.normalize_rules(rules))
    placed = jax.device_put(q, NamedSharding(mesh, P(None, None, "tensor")))
    with jax.set_mesh(mesh):
      out, grads = value_and_vjp(fn, placed, k, v, seg, do)
      c = jax.jit(lambda q, k, v: jax.vjp(lambda *a: fn(*a, seg), q, k, v)[1](do)
                  ).lower(placed, k, v).compile()
    return out, grads, c.as_text(), c.cost_analysis()["flops"]

  out, grads, text, flops = compiled(unsplit_kv)
  _, want = jax.vjp(lambda q, k, v: reference.attention(
      q, k, v, causal=True, segment_ids=seg), q, k, v)
  assert_close(out, reference.attention(q, k, v, causal=True, segment_ids=seg),
               TOL[jnp.float32], impl)
  for got, ref, name in zip(grads, want(do), "qkv"):
    assert_close(got, ref, TOL[jnp.float32], f"{impl} d{name}")
  gathered = [line for line in text.splitlines()  # (Ulysses gathers segment ids)
              if re.search(r"= f32\[[^=]*all-gather(-start)?\(", line)]
  assert not gathered, (impl, gathered[:1])
  *_, whole = compiled({**unsplit_kv, "act_heads": ()})
  assert flops * ways <= 1.15 * whole, (impl, flops, whole)


def count_ops(hlo: str, op: str) -> int:
  """Executions of collective `op` in compiled HLO (loop bodies times trip count)."""
  return hlo_lib.collective_counts(hlo).get(op, {}).get("count", 0)


def _compiled_hlo(fn, mesh, length=256, heads=8, kv_heads=2):
  s = jax.ShapeDtypeStruct
  args = (s((2, length, heads, 64), jnp.float32),
          s((2, length, kv_heads, 64), jnp.float32),
          s((2, length, kv_heads, 64), jnp.float32))
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE).as_text()


def test_ring_collective_permutes():
  """Forward: P-1 hops of stacked K/V. Forward+backward adds P-1 K/V hops and P
  dK/dV hops on the way back. (With P = 2 both directions are the same permutation
  and XLA merges the backward K/V hop into the forward one: 3 instead of 4.)"""
  p = 8
  mesh = mesh_of(sequence=p)

  def fwd(q, k, v):
    return ring.attention(q, k, v, causal=True, layout="zigzag")
  grad = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v)), argnums=(0, 1, 2))
  assert count_ops(_compiled_hlo(fwd, mesh), "collective-permute") == p - 1
  hlo = _compiled_hlo(grad, mesh)
  assert count_ops(hlo, "collective-permute") == 3 * p - 2
  assert count_ops(hlo, "all-to-all") == 0
  # shard_map's all-reduce of the input cotangents over the size-1 axes runs on
  # groups of one device: in the program, but not counted (it moves nothing)
  assert re.search(r"all-reduce\(.*replica_groups=\{\{0\},\{1\}", hlo)
  assert count_ops(hlo, "all-reduce") == 0


def test_ulysses_all_to_alls():
  """Four all-to-alls forward (q, k, v, o), four more for the gradients."""
  mesh = mesh_of(sequence=4)
  fwd = lambda q, k, v: kernels.ulysses.attention(q, k, v, causal=True)  # noqa: E731
  # value_and_grad: with grad alone the output's all-to-all is dead code.
  grad = jax.value_and_grad(lambda q, k, v: jnp.sum(fwd(q, k, v)), argnums=(0, 1, 2))
  assert count_ops(_compiled_hlo(fwd, mesh, heads=8, kv_heads=8), "all-to-all") == 4
  hlo = _compiled_hlo(grad, mesh, heads=8, kv_heads=8)
  assert count_ops(hlo, "all-to-all") == 8
  assert count_ops(hlo, "collective-permute") == 0


def _executed_tiles(p, layout, length, block_size, monkeypatch):
  """Tiles per device, recorded at run time from every flash call the ring makes."""
  tiles = np.zeros(p, np.int64)
  real_forward = flash.forward

  def counting_forward(q, k, v, q_seg=None, kv_seg=None, *, causal, **kwargs):
    n = kernels.block.count_blocks(q.shape[2], k.shape[2], causal=causal,
                                   block_q=min(block_size, q.shape[2]),
                                   block_kv=min(block_size, k.shape[2]))

    def record(device):
      tiles[int(device)] += n
    jax.debug.callback(record, lax.axis_index("sequence"))
    return real_forward(q, k, v, q_seg, kv_seg, causal=causal, **kwargs)

  monkeypatch.setattr(flash, "forward", counting_forward)
  q = jnp.zeros((1, length, 1, 8), jnp.float32)
  with jax.set_mesh(mesh_of(sequence=p)):
    jax.block_until_ready(jax.jit(lambda q: ring.attention(
        q, q, q, causal=True, layout=layout, block_sizes=block_size))(q))
  return tiles


@pytest.mark.parametrize("p", [2, 4, 8])
def test_zigzag_schedule_is_balanced(p):
  """Zig-zag: every device computes the same tiles at every step. Contiguous: device
  r does r full tiles-squares plus a diagonal, so the last does most."""
  length, bs = 64 * p, 16
  zig = ring.blocks_per_step(p, length, causal=True, layout="zigzag", block_sizes=bs)
  naive = ring.blocks_per_step(p, length, causal=True, layout="contiguous",
                               block_sizes=bs)
  for step in range(p):
    assert len({row[step] for row in zig}) == 1, zig
  naive_totals = [sum(row) for row in naive]
  assert naive_totals == sorted(naive_totals) and naive_totals[0] < naive_totals[-1]
  assert max(naive_totals) / np.mean(naive_totals) > 1.3
  # Zig-zag moves tiles between devices; it adds none beyond the extra diagonals.
  assert sum(map(sum, zig)) <= sum(naive_totals) * 1.1


def test_zigzag_balance_counted_at_run_time(monkeypatch):
  """The tiles of the flash calls each device really executes match the schedule."""
  p, bs = 4, 16
  length = 64 * p
  zig = ring.blocks_per_step(p, length, causal=True, layout="zigzag", block_sizes=bs)
  naive = ring.blocks_per_step(p, length, causal=True, layout="contiguous",
                               block_sizes=bs)
  naive_totals = [sum(row) for row in naive]
  executed = _executed_tiles(p, "zigzag", length, bs, monkeypatch)
  assert len(set(executed)) == 1
  assert list(executed) == [sum(row) for row in zig]
  executed = _executed_tiles(p, "contiguous", length, bs, monkeypatch)
  assert list(executed) == naive_totals


def test_zigzag_permutation():
  x = np.arange(16)
  y = kernels.zigzag_permute(x[None], 2)[0]
  # chunks of 4: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2.
  np.testing.assert_array_equal(y, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
  np.testing.assert_array_equal(kernels.zigzag_unpermute(y[None], 2)[0], x)
  z = jnp.arange(2 * 48 * 3).reshape(2, 48, 3)
  np.testing.assert_array_equal(
      kernels.zigzag_unpermute(kernels.zigzag_permute(z, 4), 4), z)
  with pytest.raises(ValueError, match="multiple of 2"):
    kernels.zigzag_permute(x[None, :10], 2)
  assert kernels.uses_zigzag("ring_zigzag")
  assert not any(map(kernels.uses_zigzag, ("ring", "ulysses", "flash", "auto")))


@pytest.mark.parametrize("impl", ["ring", "ring_zigzag", "ulysses", "flash", "auto"])
def test_a_mesh_with_explicit_axes_splits_as_an_auto_one(impl):
  """From a fresh-user trial: on a mesh from plain `jax.make_mesh` (Explicit axes,
  jax's default) every axis counted as size 1, so ring / Ulysses refused "needs a
  mesh whose length axes have a size above 1" with sequence=4 in it, and auto and
  flash ignored the mesh. Each impl now splits over it (the inputs resharded to
  the kernel's specs): exact against the reference, forward and gradients, and
  the output sharded as q was."""
  mesh = jax.make_mesh((1, 4, 2), ("data", "sequence", "tensor"))
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
  q, k, v, seg, do = make_inputs(21, batch=2, length=64, heads=4, kv_heads=2,
                                 head_dim=16, segments=True)
  ref_out, ref_grads = value_and_vjp(
      lambda q, k, v, s: reference.attention(q, k, v, causal=True, segment_ids=s),
      q, k, v, seg, do)
  fn = sequence_parallel(impl, 4, causal=True, block_sizes=16)
  with jax.set_mesh(mesh):
    if impl == "auto":
      assert kernels.choose(q.shape, 2)[0] == "ulysses"
    out, grads = value_and_vjp(fn, q, k, v, seg, do)
    on_length = jax.sharding.reshard(q, jax.P(None, "sequence"))
    placed = jax.jit(fn)(on_length, k, v, seg)
    text = jax.jit(fn).lower(q, k, v, seg).compile().as_text()
  assert_close(out, ref_out, TOL[jnp.float32], "output")
  for name, g, r in zip("qkv", grads, ref_grads):
    assert_close(g, r, TOL[jnp.float32], f"d{name}")
  assert jax.typeof(placed).sharding.spec == jax.typeof(on_length).sharding.spec
  assert_close(placed, ref_out, TOL[jnp.float32], "output of q split on its length")
  if impl != "flash":  # the exchange runs: the length is split, not gathered
    exchange = "all-to-all" if impl in ("ulysses", "auto") else "collective-permute"
    assert count_ops(text, exchange) > 0, impl


def test_auto_takes_an_exchange_only_where_the_length_splits():
  """From a fresh-user trial: `auto` chose Ulysses on sequence=4 for a length of
  30, which then failed "length=30 is not a multiple of sequence=4" although
  flash / reference run it. Over lengths and sequence sizes, auto takes ring or
  Ulysses exactly when the length splits, and otherwise says why it gathers."""
  for p in (2, 4, 8):
    with jax.set_mesh(mesh_of(sequence=p)):
      for length in range(1, 3 * p + 2):
        impl, _, reason = kernels.choose((1, length, 8, 16), 2)
        splits = length % p == 0
        assert (impl in ("ring", "ulysses")) == splits, (p, length, impl)
        assert reason.startswith(f"length {length} does not split over "
                                 f"sequence={p}") != splits, reason
  q, k, v, seg, _ = make_inputs(3, batch=1, length=30, heads=4, kv_heads=2,
                                head_dim=16, segments=True)
  with jax.set_mesh(mesh_of(sequence=4)):
    out = kernels.attention(q, k, v, segment_ids=seg, impl="auto")
  assert_close(out, reference.attention(q, k, v, causal=True, segment_ids=seg),
               TOL[jnp.float32], "auto, length 30 over sequence=4")


def test_errors():
  q, k, v, _, _ = make_inputs(0, batch=2, length=100, heads=6, kv_heads=2)
  with pytest.raises(ValueError, match="jax.set_mesh"):
    ring.attention(q, k, v)
  with jax.set_mesh(mesh_of(sequence=4)):
    with pytest.raises(ValueError, match="heads per device .* multiple of sequence=4"):
      kernels.attention(q, k, v, impl="ulysses")
    with pytest.raises(ValueError, match="length=100 is not a multiple of 8"):
      kernels.attention(q[:, :, :4], k, v, impl="ring_zigzag")
    with pytest.raises(ValueError, match="length=98 is not a multiple of 4"):
      kernels.attention(q[:, :98, :4], k[:, :98], v[:, :98], impl="ring")
