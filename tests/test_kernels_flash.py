"""Flash attention against the XLA reference: forward and gradients, every back end
that runs on CPU (blockwise lax loops; Mosaic and Triton kernels in interpret mode),
plus the public dispatch (`kernels.attention`, impl='auto')."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import sharding
from kernels import block, flash, reference, ring

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# Tests run tiny shapes, where XLA's LLVM optimisation costs more than it saves.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_jit(fn, *args):
  """jax.jit(fn)(*args), compiled with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def make_inputs(seed, *, batch=2, length=128, heads=8, kv_heads=2, head_dim=64,
                segments=False, dtype=jnp.float32):
  """q, k, v, segment ids (sorted, 3 packed documents) and an output cotangent."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, length, heads, head_dim))
  k = rng.normal(size=(batch, length, kv_heads, head_dim))
  v = rng.normal(size=(batch, length, kv_heads, head_dim))
  do = rng.normal(size=(batch, length, heads, head_dim))
  seg = np.sort(rng.integers(0, 3, size=(batch, length)), axis=1) if segments else None
  cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  return (cast(q), cast(k), cast(v), None if seg is None else jnp.asarray(seg, jnp.int32),
          cast(do))


def assert_close(actual, expected, tol, what=""):
  """max |actual - expected| <= tol * max(1, max |expected|), in float32."""
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert np.all(np.isfinite(actual)), what
  scale = max(1.0, float(np.abs(expected).max()))
  err = float(np.abs(actual - expected).max()) / scale
  assert err <= tol, f"{what}: scaled error {err:.3g} > {tol}"


def value_and_vjp(fn, q, k, v, seg, do):
  """(output, (dq, dk, dv)) of fn(q, k, v, seg) under one jit."""
  def run(q, k, v, seg, do):
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return out, pull(do)
  return run_jit(run, q, k, v, seg, do)


def check_against_reference(fn, inputs, *, causal, dtype, what=""):
  q, k, v, seg, do = inputs
  def ref(q, k, v, s):
    return reference.attention(q, k, v, causal=causal, segment_ids=s)
  out, grads = value_and_vjp(fn, q, k, v, seg, do)
  ref_out, ref_grads = value_and_vjp(ref, q, k, v, seg, do)
  tol = TOL[dtype]
  assert out.dtype == q.dtype
  assert_close(out, ref_out, tol, f"{what} output")
  for name, g, r, x in zip("qkv", grads, ref_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    assert_close(g, r, tol, f"{what} d{name}")


# (causal, heads, kv_heads, head_dim, length, segments, dtype, block): the full
# causal x GQA x segments product at a length that is not a block multiple, head_dim
# 128, length 1024, bfloat16 and an odd length on top.
BLOCKWISE_GRID = [
    (c, h, kvh, 64, 384, s, jnp.float32, 256)
    for c in (True, False) for (h, kvh) in ((8, 2), (4, 4)) for s in (False, True)
] + [
    (True, 8, 2, 128, 128, True, jnp.float32, 64),
    (True, 8, 2, 128, 1024, True, jnp.float32, None),
    (False, 4, 4, 64, 1024, False, jnp.float32, None),
    (True, 8, 2, 64, 100, True, jnp.float32, 32),
    (True, 8, 2, 64, 384, True, jnp.bfloat16, 256),
    (False, 4, 4, 128, 128, False, jnp.bfloat16, 64),
    (False, 8, 2, 64, 384, True, jnp.bfloat16, 256),
]


def _case_id(case):
  c, h, kvh, d, length, s, dtype, bs = case
  return (f"{'causal' if c else 'full'}-{h}:{kvh}-d{d}-L{length}-"
          f"{'seg' if s else 'noseg'}-{jnp.dtype(dtype).name}-b{bs}")


@pytest.mark.parametrize("case", BLOCKWISE_GRID, ids=_case_id)
def test_blockwise_matches_reference(case):
  causal, h, kvh, d, length, segs, dtype, bs = case
  inputs = make_inputs(length + h, batch=1 if length >= 1024 else 2, length=length,
                       heads=h, kv_heads=kvh, head_dim=d, segments=segs, dtype=dtype)
  def fn(q, k, v, s):
    return flash.attention(q, k, v, causal=causal, segment_ids=s, block_sizes=bs,
                           backend="blockwise")
  check_against_reference(fn, inputs, causal=causal, dtype=dtype, what=_case_id(case))


# The Pallas kernels run through the generic interpreter, which is slow: fewer cases,
# each combining several features (GQA, padding, segment ids, causal skipping).
PALLAS_GRID = [
    (True, 8, 2, 64, 384, True, jnp.float32, 256),
    (False, 4, 4, 128, 128, False, jnp.float32, 64),
    (True, 8, 2, 128, 384, False, jnp.bfloat16, 128),
]


@pytest.mark.parametrize("backend", ["mosaic_interpret", "triton_interpret"])
@pytest.mark.parametrize("case", PALLAS_GRID, ids=_case_id)
def test_pallas_interpret_matches_reference(backend, case):
  causal, h, kvh, d, length, segs, dtype, bs = case
  inputs = make_inputs(length, batch=1, length=length, heads=h, kv_heads=kvh,
                       head_dim=d, segments=segs, dtype=dtype)
  def fn(q, k, v, s):
    return flash.attention(q, k, v, causal=causal, segment_ids=s, block_sizes=bs,
                           backend=backend)
  check_against_reference(fn, inputs, causal=causal, dtype=dtype,
                          what=f"{backend} {_case_id(case)}")


# Head sizes of real models that are not powers of two (80, 96; also 112, 192), next
# to the powers of two. The Triton kernels zero-pad head_dim to a power of two.
HEAD_DIMS = (64, 80, 96, 128)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("backend", ["auto", "mosaic_interpret", "triton_interpret"])
def test_head_dims_match_reference(backend, head_dim):
  """Every head size on every back end, forward and gradients (causal, GQA, segment
  ids, a length that is no tile multiple). backend="auto" is the public entry,
  kernels.attention(impl="flash"), under jit: it traces the Mosaic and Triton
  branches too, so a refusal in either failed it on CPU."""
  inputs = make_inputs(head_dim, batch=1, length=100, heads=4, kv_heads=2,
                       head_dim=head_dim, segments=True)
  def fn(q, k, v, s):
    if backend == "auto":
      return kernels.attention(q, k, v, causal=True, segment_ids=s, impl="flash",
                               block_sizes=32)
    return flash.attention(q, k, v, causal=True, segment_ids=s, block_sizes=32,
                           backend=backend)
  check_against_reference(fn, inputs, causal=True, dtype=jnp.float32,
                          what=f"{backend} d{head_dim}")


def test_triton_pads_head_dim_and_rounds_tiles():
  """Triton needs power-of-two blocks: head_dim is padded up (at least 16), tile
  sizes rounded down; a non-power-of-two block size is no error on CPU either."""
  from kernels import flash_gpu
  assert [flash_gpu.head_dim(d) for d in (8, 64, 80, 96, 112, 128, 192)] == [
      16, 64, 128, 128, 128, 128, 256]
  x = jnp.zeros((1, 2, 300, 64))
  assert flash_gpu._plan(x, x, block.BlockSizes(96, 200)) == (64, 128, 320, 384)
  inputs = make_inputs(1, batch=1, length=200, heads=2, kv_heads=2)
  def fn(q, k, v, s):
    return kernels.attention(q, k, v, causal=True, segment_ids=s, impl="flash",
                             block_sizes=96)
  check_against_reference(fn, inputs, causal=True, dtype=jnp.float32)


def test_mosaic_interpret_length_1024():
  inputs = make_inputs(3, batch=1, length=1024, heads=4, kv_heads=2, head_dim=128,
                       segments=True)
  def fn(q, k, v, s):
    return flash.attention(q, k, v, causal=True, segment_ids=s, block_sizes=512,
                           backend="mosaic_interpret")
  check_against_reference(fn, inputs, causal=True, dtype=jnp.float32)


def test_lse_is_the_saved_residual():
  """forward returns the exact log-sum-exp of each row (what the backward relies on)."""
  q, k, v, _, _ = make_inputs(0, batch=1, length=256, heads=4, kv_heads=2)
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  _, lse = flash.forward(qt, kt, vt, causal=True, block_sizes=64, backend="blockwise")
  s = jnp.einsum("bhqd,bhkd->bhqk", qt, jnp.repeat(kt, 2, axis=1)) * 64 ** -0.5
  s = jnp.where(jnp.tril(jnp.ones((256, 256), bool)), s, -jnp.inf)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(s, axis=-1), rtol=1e-5, atol=1e-5)


def test_causal_tiles_are_skipped():
  """The cost model the kernels follow: causal does n(n+1)/2 of n^2 tiles."""
  assert block.count_blocks(1024, 1024, causal=True, block_q=128, block_kv=128) == 36
  assert block.count_blocks(1024, 1024, causal=False, block_q=128, block_kv=128) == 64
  assert block.count_blocks(384, 384, causal=True, block_q=256, block_kv=128) == 2 + 3


def test_flash_dispatch_under_mesh_matches_reference():
  """impl='flash' under a data x tensor mesh: shard_map over batch and heads."""
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=1, sequence=1, tensor=2),
                            devices=jax.devices()[:4])
  inputs = make_inputs(5, batch=2, length=256, heads=8, kv_heads=2, segments=True)
  def fn(q, k, v, s):
    return kernels.attention(q, k, v, causal=True, segment_ids=s, impl="flash",
                             block_sizes=128)
  with jax.set_mesh(mesh):
    check_against_reference(fn, inputs, causal=True, dtype=jnp.float32)


def test_auto_choice_and_logs_once(caplog, monkeypatch):
  caplog.set_level(logging.INFO, logger="kernels")
  # Once per process: forget what earlier tests in this process logged.
  monkeypatch.setattr(kernels, "_logged", set())
  q, k, v, _, _ = make_inputs(0, batch=1, length=64, heads=4, kv_heads=4)
  assert kernels.choose((1, 64, 4, 32), 4)[0] == "reference"
  assert kernels.choose((1, 4096, 4, 32), 4)[0] == "flash"
  seq2 = sharding.make_mesh(dict(data=4, fsdp=1, expert=1, sequence=2, tensor=1))
  seq8 = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=8, tensor=1))
  with jax.set_mesh(seq2):
    assert kernels.choose((4, 64, 4, 32), 2)[0] == "ulysses"
  with jax.set_mesh(seq8):
    impl, extra, reason = kernels.choose((4, 64, 4, 32), 2)
    assert (impl, extra) == ("ring", {}) and "heads" in reason
  for _ in range(3):
    out = kernels.attention(q, k, v, impl="auto")
  np.testing.assert_array_equal(out, reference.attention(q, k, v))
  chose = [r for r in caplog.records if "impl=auto chose reference" in r.getMessage()]
  assert len(chose) == 1


def test_errors():
  q, k, v, _, _ = make_inputs(0, batch=1, length=64, heads=4, kv_heads=4)
  with pytest.raises(ValueError, match="not available"):
    kernels.attention(q, k, v, impl="splash")
  with pytest.raises(ValueError, match="not a multiple of kv_heads"):
    kernels.attention(q, k[:, :, :3], v[:, :, :3], impl="flash")
  with pytest.raises(ValueError, match="segment_ids"):
    kernels.attention(q, k, v, segment_ids=jnp.zeros((1, 63), jnp.int32), impl="flash")
  with pytest.raises(ValueError, match="backend"):
    flash.attention(q, k, v, backend="cuda")
  assert kernels.IMPLS == ("reference", "flash", "ring", "ring_zigzag", "ulysses",
                           "auto")


BAD_BLOCK_SIZES = [-4, 0, True, 4.0, (8,), (8, 8, 8), "8", (0, 8), (8, 2.5)]


def test_every_entry_and_backend_refuses_the_same_inputs_alike():
  """From a fresh-user trial: block_sizes=-4 was a ValueError on the blockwise
  loops, a ZeroDivisionError on Mosaic and ran with 16 on Triton; np.int64(8)
  was a TypeError and a NumPy window refused; (8,) meant (8, default); q and
  k of different lengths ran with a top-left causal mask, and length 0 was a
  ZeroDivisionError. Every entry point now refuses the same inputs with one
  ValueError before running, and takes NumPy integers as ints. The reference
  called directly (it takes no tiles) ran other lengths and float windows too."""
  q, k, v, _, _ = make_inputs(1, batch=1, length=24, heads=2, kv_heads=1, head_dim=8)
  entries = {
      **{f"flash.{b}": lambda bs, w=None, b=b, **kw: flash.attention(
          kw.get("q", q), kw.get("k", k), kw.get("v", v), block_sizes=bs,
          backend=b, window=w)
         for b in ("blockwise", "mosaic_interpret", "triton_interpret")},
      **{impl: lambda bs, w=None, impl=impl, **kw: kernels.attention(
          kw.get("q", q), kw.get("k", k), kw.get("v", v), block_sizes=bs, impl=impl,
          window=w)
         for impl in ("flash", "reference", "ring", "ulysses")},
      "ring.attention": lambda bs, w=None, **kw: ring.attention(
          kw.get("q", q), kw.get("k", k), kw.get("v", v), block_sizes=bs, window=w),
  }
  entries["reference.attention"] = lambda bs, w=None, **kw: reference.attention(
      kw.get("q", q), kw.get("k", k), kw.get("v", v), window=w)
  for name, run in entries.items():
    for bad in BAD_BLOCK_SIZES * (name != "reference.attention"):
      with pytest.raises(ValueError, match="block_sizes must be None, a positive int"):
        run(bad)
    with pytest.raises(ValueError, match="window must be a positive int"):
      run(8, w=np.float32(4))
    with pytest.raises(ValueError, match="must have one length of at least 1"):
      run(8, k=k[:, :20], v=v[:, :20])
    with pytest.raises(ValueError, match="must have one length of at least 1"):
      run(8, q=q[:, :0], k=k[:, :0], v=v[:, :0])
  for name in ("flash.blockwise", "flash.mosaic_interpret", "flash.triton_interpret",
               "reference.attention"):
    run = entries[name]
    want = run(8, w=4)
    np.testing.assert_array_equal(run(np.int64(8), w=np.int64(4)), want, err_msg=name)
    np.testing.assert_array_equal(run((np.int32(8), 8), w=4), want, err_msg=name)
    np.testing.assert_array_equal(run([8, 8], w=4), want, err_msg=name)
