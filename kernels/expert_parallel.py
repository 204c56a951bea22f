"""Expert parallelism: a per-device MoE computation run inside `shard_map`.

The MoE layer (`model/moe.py`) writes its dispatch, expert FFN and combine as a
function of one device's arrays and an `Exchange`. The Exchange holds the
collectives that function needs, with their mesh axes read from the logical rules,
so the model never names a mesh axis:

- `all_to_all`: moves token buffers between the devices the `experts` dimension of
  the expert weights is split over (default rule: `experts -> expert`);
- `weight`: gathers the `embed` dimension of a local expert weight (FSDP; default
  `embed -> fsdp`). Only this device's experts are gathered, never every expert;
- `reduce`: sums the partial outputs of experts whose hidden `mlp` dimension is
  split (tensor parallelism; default `mlp -> tensor`).

Tokens enter split over the axes of the rules' `batch` entry and whole along the
length (a sequence-parallel layout is gathered on entry, so every `sequence` shard
runs the layer for its rows; correct, but not sequence-parallel). The shard_map is
manual over every mesh axis, so nothing inside is left to the auto-partitioner.

Any batch size runs on any mesh: a batch that those axes do not divide (serving
one prompt on expert=4, say) is padded with zero rows up to a multiple of their
product, and the padding is cut from the result. Zero rows are inert by contract:
`local` must give a row's result from that row alone, and the MoE layer passes a
`live` mask (False, so not routed, in a zero row) among its token arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

import sharding
from kernels import partition


@dataclasses.dataclass(frozen=True)
class Exchange:
  """The collectives of one expert-parallel layer. The default (no axes) is the
  single-device case: every method is the identity."""
  expert_axes: tuple[str, ...] = ()
  embed_axes: tuple[str, ...] = ()
  mlp_axes: tuple[str, ...] = ()
  size: int = 1  # devices the experts are split over

  def index(self) -> jax.Array:
    """This device's position among the `size` expert-parallel devices."""
    return lax.axis_index(self.expert_axes) if self.expert_axes else jnp.int32(0)

  def all_to_all(self, x: jax.Array, split_axis: int, concat_axis: int) -> jax.Array:
    """Block j of `split_axis` goes to expert-parallel device j; what device i sends
    becomes block i of `concat_axis`."""
    if not self.expert_axes:
      return x
    return lax.all_to_all(x, self.expert_axes, split_axis, concat_axis, tiled=True)

  def weight(self, w: jax.Array, embed_dim: int) -> jax.Array:
    """A local expert weight with its FSDP-split embed dimension gathered."""
    if not self.embed_axes:
      return w
    return lax.all_gather(w, self.embed_axes, axis=embed_dim, tiled=True)

  def reduce(self, y: jax.Array) -> jax.Array:
    """Sums partial expert outputs over the tensor-parallel axes."""
    return lax.psum(y, self.mlp_axes) if self.mlp_axes else y


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def run(local: Callable[..., jax.Array], tokens: Sequence[jax.Array],
        weights: Sequence[jax.Array], weight_names: Sequence[Sequence[str]],
        rules: sharding.Rules) -> jax.Array:
  """local(exchange, *tokens, *weights) -> [batch, length, ...] per device.

  tokens: arrays [batch, length, ...] (activations and routing decisions);
  weights: expert weights with their logical names, the first one named
  ('experts', 'embed', 'mlp'). Without a mesh (or rules) `local` runs as is and
  any enclosing auto-partitioning applies.
  """
  mesh = partition.context_mesh()
  if not rules or partition.is_trivial(mesh):
    return local(Exchange(), *tokens, *weights)
  w_specs = [sharding.logical_to_spec(n, rules, mesh, w.shape)
             for w, n in zip(weights, weight_names)]
  # Mesh axes of each named dimension of the first weight (specs drop trailing
  # replicated dimensions, hence the padding).
  dims = dict(zip(weight_names[0], tuple(w_specs[0]) + (None,) * 3))
  expert_axes = _axes(dims["experts"])
  exchange = Exchange(expert_axes, _axes(dims["embed"]), _axes(dims["mlp"]),
                      sharding.axis_size(mesh, expert_axes))
  # Every mesh axis of the batch rule, whether or not it divides this batch: a
  # batch left replicated over the expert axes would come back from the exchange
  # varying over them.
  batch = sharding.logical_to_spec(("batch",), rules, mesh)
  token_axes = set(_axes(batch[0] if len(batch) else None))
  if token_axes & set(exchange.mlp_axes):
    raise ValueError(
        f"the expert hidden dimension is split over {exchange.mlp_axes}, which also "
        f"split the batch ({sorted(token_axes)}): partial sums over them would add "
        "different tokens. Map `mlp` and `batch` to disjoint mesh axes.")
  rows = tokens[0].shape[0]
  pad = -rows % sharding.axis_size(mesh, tuple(token_axes))
  if pad:
    tokens = [jnp.pad(t, [(0, pad)] + [(0, 0)] * (t.ndim - 1)) for t in tokens]
  fn = functools.partial(local, exchange)
  out = partition.shard_map(fn, mesh, (batch,) * len(tokens) + tuple(w_specs), batch,
                            *tokens, *weights)
  return out[:rows] if pad else out
