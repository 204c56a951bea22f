"""Attention kernels behind one entry point. The model calls only `attention`
(and, for mixture-of-experts layers, `kernels.expert_parallel.run`, the all-to-all
exchange of expert parallelism).

impl:
  reference  plain XLA (kernels.reference); the numerical reference.
  flash      flash attention on each device (kernels.flash): Mosaic on TPU, Triton on
             GPU, blockwise lax loops elsewhere, chosen when lowering.
  ring       ring attention over the `sequence` axis (kernels.ring), on sequences in
             natural order. Causal masking leaves the last device the most work.
  ring_zigzag  the same ring, load-balanced for causal masks: the input must already
             be in zig-zag order (`zigzag_permute`), and the output comes back in it.
             Wrong on natural-order input; the training loop permutes its batches
             for it (see `uses_zigzag`).
  ulysses    all-to-all sequence parallelism over `sequence` (kernels.ulysses).
  auto       picks one of the above from backend, shape and mesh; logs it once.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax

import sharding
from kernels import flash, partition, reference, ring, ulysses, zigzag
from kernels.block import BlockSizes

# Implementations that exist in this build; config validation checks against it.
IMPLS = ("reference", "flash", "ring", "ring_zigzag", "ulysses", "auto")
# Implementations that exchange the sequence over the mesh axis the rules split
# `length` over; they need that axis to have more than one device.
SEQUENCE_PARALLEL = ("ring", "ring_zigzag", "ulysses")
# On CPU the blockwise flash loops beat the reference for training from about this
# length: a whole llama_tiny train step (length 256) took 1.8 CPU-seconds with flash
# against 2.2-2.6 with the reference, and the 21M model's (length 512) 3.1 against
# 4.1 (benchmarks/README.md, training throughput). Shorter sequences (prompts,
# decode) are cheaper as one fused XLA op.
CPU_FLASH_MIN_LENGTH = 256

zigzag_permute = zigzag.permute
zigzag_unpermute = zigzag.unpermute

_log = logging.getLogger(__name__)
_logged: set[str] = set()

__all__ = ["BlockSizes", "IMPLS", "SEQUENCE_PARALLEL", "attention", "choose",
           "not_served_because", "serving_impl", "uses_zigzag", "zigzag_permute",
           "zigzag_unpermute"]


def serving_impl(impl: str, length_split: int | None = None,
                 rules: sharding.Rules = ()) -> str:
  """The impl to serve a model trained with `impl` (prompts come in natural order)
  on a mesh that splits the length over `length_split` devices (None: the
  context mesh's split under `rules`): `auto` where the trained one cannot serve
  (`ring_zigzag` wants zig-zag ordered prompts; a sequence-parallel impl on an
  unsplit length has nothing to exchange over), else `impl`."""
  if length_split is None:
    length_split = partition.sequence_size(partition.context_mesh(),
                                           partition.Axes.from_rules(rules))
  if uses_zigzag(impl) or (impl in SEQUENCE_PARALLEL and length_split == 1):
    return "auto"
  return impl


def not_served_because(impl: str) -> str:
  """Why `serving_impl` serves `impl` with `auto`, for a message."""
  return ("takes prompts in zig-zag order" if uses_zigzag(impl) else
          "needs the length split over mesh.sequence")


def uses_zigzag(impl: str) -> bool:
  """Whether a causal model must feed this impl its sequences in zig-zag order.

  True only for `ring_zigzag`: the caller permutes every per-token array of a batch
  once with `zigzag_permute(x, n)`, n the size of the mesh axis the rules split
  `length` over (inputs, targets, positions, segment ids, loss weights). `ring`
  takes natural order; `auto` never picks the zig-zag ring.
  """
  return impl == "ring_zigzag"


def _platform(mesh) -> str:
  device = getattr(mesh, "abstract_device", None) if mesh is not None else None
  return getattr(device, "platform", None) or jax.default_backend()


def choose(q_shape, kv_heads: int, axes: partition.Axes = partition.DEFAULT_AXES
           ) -> tuple[str, dict[str, Any], str]:
  """-> (impl, extra keyword arguments, reason) for impl='auto' in the context mesh."""
  mesh = partition.context_mesh()
  heads, length = q_shape[2], q_shape[1]
  seq = partition.sequence_size(mesh, axes)
  if seq > 1 and length % seq:  # neither exchange splits it: every device the whole
    impl, _, reason = choose(q_shape, kv_heads, dataclasses.replace(axes, length=()))
    return impl, {}, (f"length {length} does not split over sequence={seq}, so each "
                      f"device attends over the whole length; {reason}")
  if seq > 1:
    problem = ulysses.check(mesh, heads, kv_heads, axes)
    if problem is None:
      return "ulysses", {}, f"sequence={seq} and heads per device split over it"
    return "ring", {}, (
        f"sequence={seq}; ulysses not possible ({problem}); natural order, so not "
        "zig-zag balanced")
  platform = _platform(mesh)
  if platform in ("tpu", "gpu", "cuda"):
    return "flash", {}, f"Pallas kernels on {platform}"
  if length >= CPU_FLASH_MIN_LENGTH:
    return "flash", {}, f"length {length} >= {CPU_FLASH_MIN_LENGTH} on {platform}"
  return "reference", {}, f"length {length} < {CPU_FLASH_MIN_LENGTH} on {platform}"


def _flash(q, k, v, *, causal, segment_ids, block_sizes, axes, backend="auto",
           window=None):
  mesh = partition.context_mesh()
  fn = lambda q, k, v, seg: flash.attention(  # noqa: E731
      q, k, v, causal=causal, segment_ids=seg, block_sizes=block_sizes, backend=backend,
      window=window)
  if partition.is_trivial(mesh):
    return fn(q, k, v, segment_ids)
  return partition.shard(fn, mesh, q, k, v, segment_ids, split_length=False,
                         axes=axes)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              segment_ids: jax.Array | None = None, impl: str = "auto",
              block_sizes: Any = None, rules: sharding.Rules = (),
              window: int | None = None) -> jax.Array:
  """Multi-head attention with GQA.

  q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
  segment_ids: optional [batch, length] ints; tokens attend within their segment.
  impl: one of IMPLS. block_sizes: None, an int or (block_q, block_kv) for the flash
  tiles (ignored by `reference`). rules: the logical rules (`sharding.Rules`; ()
  for the defaults): the mesh axes the batch, length and heads are split over are
  read from them (`partition.Axes`), never assumed. window: None, or a sliding
  window of W keys (causal; Mistral): query i sees keys i - W < j <= i, in every
  impl except `ring_zigzag` (ValueError).
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not available; choose from {IMPLS}")
  window, block_sizes = flash.check_inputs(q, k, v, segment_ids, causal=causal,
                                           window=window, block_sizes=block_sizes)
  axes = partition.Axes.from_rules(rules)
  extra: dict[str, Any] = {}
  if impl == "auto":
    impl, extra, reason = choose(q.shape, k.shape[2], axes)
    chosen = f"{impl} {extra}" if extra else impl
    message = f"attention impl=auto chose {chosen}: {reason}"
    if message not in _logged:
      _logged.add(message)
      _log.info(message)
  if impl == "reference":
    return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               window=window)
  kwargs = dict(causal=causal, segment_ids=segment_ids, block_sizes=block_sizes,
                axes=axes, window=window, **extra)
  if impl == "flash":
    return _flash(q, k, v, **kwargs)
  if impl in ("ring", "ring_zigzag"):
    layout = "zigzag" if impl == "ring_zigzag" else "contiguous"
    return ring.attention(q, k, v, layout=layout, **kwargs)
  return ulysses.attention(q, k, v, **kwargs)
