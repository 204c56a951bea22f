"""The KV cache object, and attention of new tokens over it (prefill and decode).

`KVCache` carries its arrays, the layout they are stored in and how many positions
each row holds, so no layout flag travels through the model: the kernels here read
`cache.layout`.

Layouts of `k` and `v`:
  position_major  [layers, batch, max_len, kv_heads, head_dim]: how a cache is
                  made, prefilled, sharded (`infer.kv_cache`) and checkpointed.
  heads_major     [layers, batch, kv_heads, max_len, head_dim]: what the attention
                  matmuls read without a transpose. The decode program holds its
                  cache this way (`KVCache.for_decoding`); on XLA:CPU the transposes
                  of the position-major layout took 40% of a batch-16 decode step
                  (benchmarks/README.md, "Decode speed").

A layer writes only its new rows into the stacked arrays (a scatter that XLA
performs in place when the cache is a loop carry or a donated buffer) and then reads
its own slice, so a decode step touches O(new tokens) of cache memory for writing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels import block

POSITION_MAJOR = "position_major"
HEADS_MAJOR = "heads_major"
LAYOUTS = (POSITION_MAJOR, HEADS_MAJOR)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of a stack of layers (a pytree; `layout` is static).

  k, v: [layers, batch, max_len, kv_heads, head_dim] (position_major) or
  [layers, batch, kv_heads, max_len, head_dim] (heads_major).
  lengths: [batch] int32, the positions each row holds: slots 0..lengths-1 are
  written, and the next token of a row is written at, and has position, lengths.
  """
  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  layout: str = dataclasses.field(default=POSITION_MAJOR, metadata=dict(static=True))

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"KVCache layout {self.layout!r} is not one of {LAYOUTS}")

  @property
  def max_length(self) -> int:
    return self.k.shape[3 if self.layout == HEADS_MAJOR else 2]

  @property
  def num_layers(self) -> int:
    return self.k.shape[0]

  def replace(self, **changes) -> "KVCache":
    return dataclasses.replace(self, **changes)

  def for_decoding(self, unit: int = 1) -> list["KVCache"]:
    """The decode program's form: heads-major, one cache per scanned step of `unit`
    layers ([unit, batch, kv_heads, max_len, head_dim] each), so unrolled layers
    each read and write their own arrays. Made once per generation, before the
    token loop."""
    k, v = self.k, self.v
    if self.layout == POSITION_MAJOR:
      k, v = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)
    return [KVCache(k[i:i + unit], v[i:i + unit], self.lengths, HEADS_MAJOR)
            for i in range(0, k.shape[0], unit)]

  def write(self, layer: jax.Array, k_new: jax.Array, v_new: jax.Array,
            start: jax.Array) -> "KVCache":
    """Writes k_new, v_new [batch, t, kv_heads, head_dim] at `layer`, each row from
    its own slot start [batch]. Callers keep writes below max_len (`infer.generate`
    sizes the cache for prompt plus new tokens): the write promises XLA in-bounds
    indices, as a bounds check would add a select over the old contents on every
    step. `lengths` is left as it is (`Decoder` advances it once per call)."""
    return self.replace(k=_write(self.k, k_new, layer, start, self.layout),
                        v=_write(self.v, v_new, layer, start, self.layout))


def _write(cache: jax.Array, new: jax.Array, layer, start, layout: str) -> jax.Array:
  b, t = new.shape[:2]
  rows = jnp.arange(b)[:, None]  # [batch, 1]
  slots = start[:, None] + jnp.arange(t)[None, :]  # [batch, t]
  # Both index forms take `new` as [batch, t, kv_heads, head_dim]: numpy puts the
  # broadcast [batch, t] of separated array indices first.
  at = (cache.at[layer, rows, :, slots] if layout == HEADS_MAJOR
        else cache.at[layer, rows, slots])
  return at.set(new.astype(cache.dtype), mode="promise_in_bounds", unique_indices=True)


def attention(q: jax.Array, cache: KVCache, layer: jax.Array,
              q_positions: jax.Array, window: int | None = None) -> jax.Array:
  """Causal attention of q over one layer of the cache, by absolute position.

  q: [batch, t, heads, head_dim] at positions q_positions [batch, t]; slot s of the
  cache holds position s. A query at position p sees slots 0..p: the written prompt
  or earlier tokens. Slots past p (unwritten, or padding of a shorter prompt) are
  masked until overwritten. A sliding window W also hides slots <= p - W (the
  cache keeps every slot; it is not a rolling buffer). Returns [batch, t, heads,
  head_dim].
  """
  b, t, h, d = q.shape
  k, v = cache.k[layer], cache.v[layer]
  kvh = k.shape[1 if cache.layout == HEADS_MAJOR else 2]
  dims = "bksd" if cache.layout == HEADS_MAJOR else "bskd"
  qg = q.reshape(b, t, kvh, h // kvh, d)  # [batch, t, kv_heads, group, head_dim]
  scores = block.einsum_f32(f"btkgd,{dims}->bkgts", qg, k) * (d ** -0.5)
  distance = q_positions[:, :, None] - jnp.arange(cache.max_length)[None, None, :]
  visible = distance >= 0  # [batch, t, slots]
  if window is not None:
    visible = visible & (distance < window)
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = block.einsum_f32(f"bkgts,{dims}->btkgd", probs, v)
  return out.reshape(b, t, h, d).astype(q.dtype)
