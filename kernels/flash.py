"""Flash attention: one custom_vjp whose back end is chosen when it is lowered.

`forward` / `backward` work in kernel layout (q [b, heads, len, d], k and v
[b, kv_heads, len, d]) and are shared with ring and Ulysses. With backend="auto" the
implementation is picked by `lax.platform_dependent` while lowering, so a deviceless
TPU compile from a CPU process still gets the Mosaic kernels:

  tpu  -> Mosaic Pallas kernels (flash_tpu)
  cuda -> Triton Pallas kernels (flash_gpu)
  else -> pure-JAX blockwise loops (blockwise), the fast choice on CPU.

The residual saved for the backward pass is the log-sum-exp ([b, heads, len] float32)
plus the inputs and output, so memory stays linear in length. The output and the
log-sum-exp carry the checkpoint names in RESIDUAL_NAMES (ring's too), so a remat
policy can keep them and the backward need not run the forward kernel again
(`model.remat=save_dots_attention`). Tests name a backend explicitly, e.g.
"mosaic_interpret" runs the TPU kernels with interpret=True on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from kernels import block, blockwise, flash_gpu, flash_tpu

# backend name -> (module, interpret flag or None for modules without one)
_BACKENDS = {
    "blockwise": (blockwise, None),
    "mosaic": (flash_tpu, False),
    "triton": (flash_gpu, False),
    "mosaic_interpret": (flash_tpu, True),
    "triton_interpret": (flash_gpu, True),
}
BACKENDS = ("auto", *_BACKENDS)


def _bind(backend: str, stage: str, block_sizes, **kwargs):
  module, interpret = _BACKENDS[backend]
  if interpret is not None:
    kwargs["interpret"] = interpret
  sizes = block.BlockSizes.of(block_sizes).resolve(module.DEFAULT)
  return functools.partial(getattr(module, stage), block_sizes=sizes, **kwargs)


def _run(backend: str, stage: str, args, block_sizes, **kwargs):
  if backend not in BACKENDS:
    raise ValueError(f"flash backend {backend!r} is not one of {BACKENDS}")
  if backend != "auto":
    return _bind(backend, stage, block_sizes, **kwargs)(*args)
  return lax.platform_dependent(
      *args, tpu=_bind("mosaic", stage, block_sizes, **kwargs),
      cuda=_bind("triton", stage, block_sizes, **kwargs),
      default=_bind("blockwise", stage, block_sizes, **kwargs))


def forward(q, k, v, q_seg=None, kv_seg=None, *, causal: bool, block_sizes=None,
            scale: float | None = None, out_dtype=None, backend: str = "auto",
            window: int | None = None, offset: int = 0):
  """Kernel layout -> (o [b, h, q_len, d] in out_dtype (default q's), lse [b, h, q_len]).

  Causal means query i sees keys j <= i + offset, both counted from the start of
  the call; a window W also hides keys j <= i + offset - W (`block.Span`).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return _run(backend, "forward", (q, k, v, q_seg, kv_seg), block_sizes, causal=causal,
              scale=scale, out_dtype=out_dtype or q.dtype, **_span(window, offset))


def backward(q, k, v, q_seg, kv_seg, lse, delta, do, *, causal: bool, block_sizes=None,
             scale: float | None = None, backend: str = "auto",
             window: int | None = None, offset: int = 0):
  """Kernel layout -> float32 (dq, dk, dv); delta = rowsum(dO * O) [b, h, q_len]."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return _run(backend, "backward", (q, k, v, q_seg, kv_seg, lse, delta, do),
              block_sizes, causal=causal, scale=scale, **_span(window, offset))


def _span(window, offset) -> dict:
  """Keyword arguments for the back ends: none unless a window or offset is set."""
  return {k: v for k, v in (("window", window), ("offset", offset)) if v}


def _to_kernel(x):
  return jnp.swapaxes(x, 1, 2)  # [b, len, heads, d] <-> [b, heads, len, d]


# Checkpoint names of the attention output and log-sum-exp the backward reads.
RESIDUAL_NAMES = ("attention_out", "attention_lse")


def name_residuals(o, lse):
  """o [b, heads, len, d] and lse [b, heads, len], named for remat policies."""
  return checkpoint_name(o, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, segment_ids, causal, block_sizes, backend, window):
  return _attention_fwd(q, k, v, segment_ids, causal, block_sizes, backend, window)[0]


def _attention_fwd(q, k, v, segment_ids, causal, block_sizes, backend, window):
  qt, kt, vt = _to_kernel(q), _to_kernel(k), _to_kernel(v)
  o, lse = name_residuals(*forward(qt, kt, vt, segment_ids, segment_ids, causal=causal,
                                   block_sizes=block_sizes, backend=backend,
                                   window=window))
  return _to_kernel(o), (qt, kt, vt, segment_ids, o, lse)


def _attention_bwd(causal, block_sizes, backend, window, residuals, do):
  qt, kt, vt, segment_ids, o, lse = residuals
  do = _to_kernel(do)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  dq, dk, dv = backward(qt, kt, vt, segment_ids, segment_ids, lse, delta, do,
                        causal=causal, block_sizes=block_sizes, backend=backend,
                        window=window)
  return (_to_kernel(dq).astype(qt.dtype), _to_kernel(dk).astype(kt.dtype),
          _to_kernel(dv).astype(vt.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def check_inputs(q, k, v, segment_ids=None, *, causal: bool, window=None,
                 block_sizes=None) -> tuple[int | None, block.BlockSizes]:
  """The checks of every attention entry point: raises ValueError for inputs no
  kernel takes (`block.check_shapes`, `block.check_window`, `block.BlockSizes.of`);
  returns (window as an int or None, the BlockSizes)."""
  block.check_shapes(q, k, v, segment_ids)
  return block.check_window(window, causal), block.BlockSizes.of(block_sizes)


def attention(q, k, v, *, causal: bool = True, segment_ids=None, block_sizes=None,
              backend: str = "auto", window: int | None = None):
  """Flash attention on this device. q [b, l, h, d]; k, v [b, l, kvh, d] -> [b, l, h, d].

  block_sizes: None, an int, a (block_q, block_kv) pair or a block.BlockSizes.
  window: None, or W > 0 with causal: each query sees itself and the W - 1 keys
  before it; key blocks outside the window are never visited.
  """
  window, block_sizes = check_inputs(q, k, v, segment_ids, causal=causal,
                                     window=window, block_sizes=block_sizes)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  return _attention(q, k, v, segment_ids, causal, block_sizes, backend, window)
