"""Sliding-window attention (Mistral): every impl against a NumPy mask written from
the definition (query i sees keys i - W < j <= i), tile skipping, the ring's
shorter rotation, and the errors."""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import block, flash, reference
from test_kernels_flash import TOL, assert_close, make_inputs, value_and_vjp
from test_kernels_sequence import _compiled_hlo, count_ops, mesh_of


def numpy_window_attention(q, k, v, seg, window):
  """float64 softmax attention with GQA, causal window and segment masks."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, n, h, d = q.shape
  k = np.repeat(k, h // k.shape[2], axis=2)
  v = np.repeat(v, h // v.shape[2], axis=2)
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  allowed = (j <= i) & (j > i - window)  # [n, n]
  allowed = np.broadcast_to(allowed, (b, n, n))
  if seg is not None:
    seg = np.asarray(seg)
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
  s = np.where(allowed[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def assert_matches_reference(fn, inputs, window, mesh=None):
  """fn(q, k, v, seg)'s output and dq, dk, dv equal the windowed reference's (fn
  under `mesh` when given)."""
  ref = lambda q, k, v, s: reference.attention(q, k, v, segment_ids=s,  # noqa: E731
                                               window=window)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    out, grads = value_and_vjp(fn, *inputs)
  out_ref, grads_ref = value_and_vjp(ref, *inputs)
  assert_close(out, out_ref, TOL[jnp.float32], "out")
  for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref):
    assert_close(g, r, TOL[jnp.float32], name)


@pytest.mark.parametrize("window,segments", [(1, False), (9, True), (60, False)])
def test_reference_window_is_the_definition(window, segments):
  q, k, v, seg, _ = make_inputs(window, length=96, heads=4, kv_heads=2, head_dim=16,
                                segments=segments)
  got = reference.attention(q, k, v, segment_ids=seg, window=window)
  np.testing.assert_allclose(got, numpy_window_attention(q, k, v, seg, window),
                             atol=1e-5)
  if window < 96:  # the window really hides keys
    full = reference.attention(q, k, v, segment_ids=seg)
    assert float(jnp.max(jnp.abs(full - got))) > 1e-2


# (backend, length, window, block sizes, segments): windows smaller than, equal to and
# larger than a tile, lengths that pad, and a window past the length (= causal).
GRID = [
    ("blockwise", 300, 37, 64, True), ("blockwise", 200, 1, 64, False),
    ("blockwise", 130, 500, 64, False),
    ("triton_interpret", 300, 37, 64, True), ("triton_interpret", 256, 128, 64, False),
    ("mosaic_interpret", 300, 37, 128, True), ("mosaic_interpret", 256, 200, 128, False),
]


@pytest.mark.parametrize("backend,length,window,blocks,segments", GRID)
def test_flash_window_matches_reference(backend, length, window, blocks, segments):
  inputs = make_inputs(length, length=length, heads=4, kv_heads=2, head_dim=64,
                       segments=segments)
  fn = lambda q, k, v, s: flash.attention(  # noqa: E731
      q, k, v, segment_ids=s, window=window, block_sizes=blocks, backend=backend)
  assert_matches_reference(fn, inputs, window)


def test_window_skips_tiles_outside_it():
  """1024 tokens in 128-blocks: causal visits 36 tiles; a 128-key window needs only
  the diagonal tile and the one before it (1 + 7 * 2 = 15); 129 keys reach no
  further tile; a window past the length is plain causal."""
  count = lambda w: block.count_blocks(  # noqa: E731
      1024, 1024, causal=True, block_q=128, block_kv=128, window=w)
  assert [count(None), count(128), count(129), count(2048)] == [36, 15, 15, 36]
  assert count(1) == 8 and count(130) == 1 + 2 + 6 * 3


@pytest.mark.parametrize("impl,window,segments", [
    ("ring", 37, True), ("ring", 100, False), ("ring", 256, False),
    ("ulysses", 50, True)])
def test_sequence_parallel_window_matches_reference(impl, window, segments):
  """sequence=4 over 256 tokens: chunks of 64, so windows of 37, 100 and 256 need
  1, 2 and 4 ring steps."""
  inputs = make_inputs(window, length=256, heads=4, kv_heads=4, head_dim=32,
                       segments=segments)
  fn = lambda q, k, v, s: kernels.attention(  # noqa: E731
      q, k, v, segment_ids=s, impl=impl, window=window, block_sizes=32)
  assert_matches_reference(fn, inputs, window, mesh_of(data=2, sequence=4))


def test_windowed_ring_sends_only_what_the_window_reaches():
  """sequence=8, chunks of 32: a 20-key window reaches one earlier chunk, so the
  forward makes 1 K/V hop instead of 7 (the causal ring's), and forward+backward 3:
  the backward's K/V hop is the forward's (same permutation of the same operand,
  shared by XLA), then 1 dK/dV hop along and 1 home. The causal ring's
  forward+backward makes 3P - 2 = 22."""
  mesh = mesh_of(sequence=8)

  def fwd(q, k, v):
    return kernels.attention(q, k, v, impl="ring", window=20, block_sizes=32)
  grad = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v)), argnums=(0, 1, 2))
  assert count_ops(_compiled_hlo(fwd, mesh), "collective-permute") == 1
  assert count_ops(_compiled_hlo(grad, mesh), "collective-permute") == 3


def test_window_errors():
  q = jnp.zeros((1, 16, 2, 8))
  with pytest.raises(ValueError, match="window must be a positive int"):
    kernels.attention(q, q, q, window=0)
  with pytest.raises(ValueError, match="a sliding window needs causal=True"):
    kernels.attention(q, q, q, causal=False, window=4)
  with jax.set_mesh(mesh_of(sequence=2)):
    with pytest.raises(ValueError, match="contiguous ring only"):
      kernels.attention(q, q, q, impl="ring_zigzag", window=4)
