"""Mixture-of-experts feed-forward: a softmax top-k router over SwiGLU experts.

Router. Logits [tokens, experts] in float32; each token takes its `top_k` most
probable experts and weights each expert's output by that expert's softmax
probability -- by default not renormalised over the k, so top_k = 1 still trains
the router through the language-model loss, as in Switch; with `renormalize` the k
gates are divided by their sum, as Mixtral computes them (Jiang et al. 2024,
arXiv 2401.04088: softmax over the top-k logits, the same thing).

Two dispatch paths (`moe.dispatch`):
- `capacity` (GShard): each sequence is a group; every expert takes at most
  C(n) = min(n, ceil(capacity_factor * n * top_k / num_experts)) of the group's
  (token, choice) pairs, n the group's real tokens (see "Padding"), filled
  choice-major (every token's first choice before any second choice, each in
  token order). Pairs past C(n) are dropped: they add nothing (the residual
  stream carries the token on). Expert inputs are a fixed [groups, experts,
  C(length), embed] buffer, so compute and communication are static. Grouping by
  sequence keeps the result independent of how the batch is sharded.
- `dropless`: pairs are sorted by expert and each expert's rows go through one
  grouped matmul (`jax.lax.ragged_dot`); nothing is dropped.

Padding. A token mask [batch, length] (False at padding, e.g. the right-padding
of a batch of prompts of different lengths; the decoder's `mask`) keeps padding
out of the experts: a padding token is not routed (its pairs take no slot, add no
output and are not counted in the router statistics), and a group's capacity is
C(n) for its n real tokens, not C(length) for its padded length. So a sequence's
result depends only on its own tokens, never on its batch-mates or the padded
length (the dropless path routes each token on its own, so only the first half
applies there). Without a mask every token is real and C(n) = C(length): plain
GShard capacity over the tokens of the group, as in training.

Expert parallelism (`kernels/expert_parallel.py`): experts are split over the mesh
axes of the rules' `experts` entry and tokens reach them by all-to-all. Capacity
exchanges the [groups, experts, C, embed] buffer (split by expert, joined by
group). Dropless exchanges, per destination device, a buffer sized for the worst
case (all of this device's pairs): the rows are ragged, and XLA:CPU cannot run
`ragged_all_to_all`, so a dense all-to-all padded to the bound keeps the path
exact and testable here, at E_p times the bytes of a balanced exchange.

Auxiliary losses (averaged over MoE layers by the decoder, weighted by
`moe.aux_loss_weight` and `moe.z_loss_weight` in the training loss):
- load balance (Switch): E * sum_e f_e * P_e, f_e the fraction of (token, choice)
  pairs routed to expert e, P_e the mean router probability of e; 1 when uniform.
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import expert_parallel
from model.mlp import MLP
from model.params import param

# Names of the expert weights' dimensions (gate and up; down swaps the last two).
EXPERT_IN = ("experts", "embed", "mlp")
EXPERT_OUT = ("experts", "mlp", "embed")


def capacity(length: int, top_k: int, num_experts: int, factor: float) -> int:
  """Slots per expert per sequence: ceil(factor * length * top_k / num_experts),
  at most `length`: a token's top-k experts are distinct, so no expert gets more
  than one pair per token, and a larger buffer would only hold empty slots (a
  trial's capacity_factor of 100 took 46 s a step on one CPU device)."""
  return max(1, min(length, math.ceil(factor * length * top_k / num_experts)))


def capacities(length: int, top_k: int, num_experts: int, factor: float) -> jax.Array:
  """[length + 1] int32: entry n is the capacity of a sequence of n real tokens
  (`capacity(n, ...)`; 0 for none). A table computed on the host in float64, so a
  traced per-row count gets exactly `capacity`'s rounding."""
  n = np.arange(length + 1)
  table = np.maximum(1, np.minimum(n, np.ceil(factor * n * top_k / num_experts))
                     ).astype(np.int32)
  table[0] = 0
  return jnp.asarray(table)


def route(logits: jax.Array, top_k: int, renormalize: bool = False):
  """logits [batch, length, experts] (float32) -> (probs [b, l, E], gates [b, l, k],
  experts [b, l, k] int32), choices in decreasing probability; with `renormalize`
  the gates of each token sum to 1."""
  probs = jax.nn.softmax(logits, axis=-1)
  # A stable sort rather than lax.top_k, which the auto-partitioner does not split
  # over the batch (it all-gathers every token's probabilities); the gates by a
  # one-hot mask, so no gather either (and no matmul to lose precision in).
  experts = jnp.argsort(-jax.lax.stop_gradient(probs), axis=-1, stable=True)
  experts = experts[..., :top_k]  # [b, l, k], ties to the lower index
  onehot = jax.nn.one_hot(experts, probs.shape[-1], dtype=probs.dtype)  # [b, l, k, E]
  gates = jnp.sum(onehot * probs[:, :, None, :], axis=-1)  # [b, l, k]
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return probs, gates, experts.astype(jnp.int32)


def slots(experts: jax.Array, num_experts: int,
          mask: jax.Array | None = None) -> jax.Array:
  """Each (token, choice)'s position in its expert's queue within its sequence,
  choice-major: experts [batch, length, k] -> [batch, length, k] int32. Tokens
  where `mask` [batch, length] is False queue nowhere (their own positions are
  meaningless)."""
  b, l, k = experts.shape
  onehot = jax.nn.one_hot(experts.swapaxes(1, 2).reshape(b, k * l), num_experts,
                          dtype=jnp.int32)  # [batch, k*length, experts]
  if mask is not None:
    live = jnp.broadcast_to(mask[:, None, :], (b, k, l)).reshape(b, k * l)
    onehot = onehot * live[..., None].astype(jnp.int32)
  position = jnp.cumsum(onehot, axis=1) - 1
  mine = jnp.sum(position * onehot, axis=-1)  # [batch, k*length]
  return mine.reshape(b, k, l).swapaxes(1, 2)


def router_stats(logits: jax.Array, probs: jax.Array, experts: jax.Array,
                 kept: jax.Array, mask: jax.Array | None = None
                 ) -> dict[str, jax.Array]:
  """Per-layer float32 scalars: the two auxiliary losses, the busiest expert's load
  over the mean load (1 = balanced; counted before capacity drops), and the dropped
  and routed (token, choice) counts. Over the tokens where `mask` [batch, length]
  is True (all without one)."""
  num_experts = logits.shape[-1]
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [b, l, k, E]
  z = jax.nn.logsumexp(logits, axis=-1) ** 2  # [b, l]
  if mask is None:
    counts = jnp.sum(onehot, axis=(0, 1, 2))  # [experts]
    mean_prob = jnp.mean(probs, axis=(0, 1))  # [experts]
    z_loss = jnp.mean(z)
    routed = jnp.float32(kept.size)
    dropped = jnp.sum(~kept).astype(jnp.float32)
  else:
    real = mask.astype(jnp.float32)  # [b, l]
    tokens = jnp.maximum(jnp.sum(real), 1.0)
    counts = jnp.sum(onehot * real[..., None, None], axis=(0, 1, 2))
    mean_prob = jnp.sum(probs * real[..., None], axis=(0, 1)) / tokens
    z_loss = jnp.sum(z * real) / tokens
    routed = jnp.sum(real) * experts.shape[-1]
    dropped = jnp.sum(~kept & mask[..., None]).astype(jnp.float32)
  fraction = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return {
      "aux_loss": num_experts * jnp.sum(fraction * mean_prob),
      "z_loss": z_loss,
      "max_load": jnp.max(counts) / jnp.maximum(jnp.mean(counts), 1e-9),
      "dropped": dropped,
      "routed": routed,
  }


def aggregate(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-layer stats stacked [moe layers] -> the model's MoE metrics: mean losses,
  the worst layer's max/mean load, and the dropped fraction of all pairs."""
  return {
      "moe_aux_loss": jnp.mean(stats["aux_loss"]),
      "moe_z_loss": jnp.mean(stats["z_loss"]),
      "moe_max_load": jnp.max(stats["max_load"]),
      "moe_dropped_fraction": (jnp.sum(stats["dropped"])
                               / jnp.maximum(jnp.sum(stats["routed"]), 1.0)),
  }


def merge_microbatches(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-microbatch stats [microbatches, moe layers] -> per-layer [moe layers],
  for a batch run as microbatches (model/pipeline.py): the losses are the mean
  over microbatches, as under gradient accumulation (the load-balancing loss is
  not additive over tokens), the load the worst microbatch's, the counts sums."""
  return {
      "aux_loss": jnp.mean(stats["aux_loss"], 0),
      "z_loss": jnp.mean(stats["z_loss"], 0),
      "max_load": jnp.max(stats["max_load"], 0),
      "dropped": jnp.sum(stats["dropped"], 0),
      "routed": jnp.sum(stats["routed"], 0),
  }


def _swiglu(x, gate, up, down, ex, dependency):
  """Expert FFN on buffers [groups, local experts, C, embed] with local weights."""
  gate, up, down = ex.weight(gate, 1), ex.weight(up, 1), ex.weight(down, 2)
  g = jnp.einsum("gecd,edf->gecf", x, gate.astype(x.dtype))
  u = jnp.einsum("gecd,edf->gecf", x, up.astype(x.dtype))
  h = jax.nn.silu(g) * u + dependency
  return ex.reduce(jnp.einsum("gecf,efd->gecd", h, down.astype(x.dtype)))


def _grouped_swiglu(rows, sizes, gate, up, down, ex, dependency):
  """Expert FFN on rows [n, embed] sorted by local expert, sizes [local experts];
  rows past sum(sizes) come out as zeros."""
  gate, up, down = ex.weight(gate, 1), ex.weight(up, 1), ex.weight(down, 2)
  dt = rows.dtype
  g = jax.lax.ragged_dot(rows, gate.astype(dt), sizes)  # [n, mlp]
  u = jax.lax.ragged_dot(rows, up.astype(dt), sizes)
  h = jax.nn.silu(g) * u + dependency
  return ex.reduce(jax.lax.ragged_dot(h, down.astype(dt), sizes))  # [n, embed]


def _dependency(after: jax.Array, dtype) -> jax.Array:
  """A zero scalar that XLA cannot fold, making the expert down projections wait
  for `after` (see MLP.__call__: it keeps the all-reduce combiner from merging)."""
  return (0.0 * jnp.sum(after)).astype(dtype)


def capacity_local(ex: expert_parallel.Exchange, x, experts, slot, weight, live,
                   after, gate, up, down, *, cap: int):
  """One device: x [b, l, d], experts / slot / weight [b, l, k], live [b, l],
  after [b, l, 1] -> [b, l, d]. `weight` is the gate of each pair, 0 where it was
  dropped or is padding (slot >= cap, which the scatter skips); tokens not `live`
  (padding rows added by `expert_parallel.run`) take no slot either."""
  b, l, d = x.shape
  num_experts = gate.shape[0] * ex.size
  slot = jnp.where(live[..., None], slot, cap)
  rows = jnp.arange(b)[:, None, None]
  buf = jnp.zeros((b, num_experts, cap, d), x.dtype).at[rows, experts, slot].add(
      jnp.broadcast_to(x[:, :, None], (b, l, experts.shape[-1], d)),
      mode="drop")  # [groups, experts, C, embed]
  buf = ex.all_to_all(buf, split_axis=1, concat_axis=0)  # [b*Ep, local experts, C, d]
  out = _swiglu(buf, gate, up, down, ex, _dependency(after, x.dtype))
  out = ex.all_to_all(out, split_axis=0, concat_axis=1)  # [b, experts, C, d]
  picked = out[rows, experts, jnp.minimum(slot, cap - 1)]  # [b, l, k, d]
  return jnp.einsum("blk,blkd->bld", weight.astype(x.dtype), picked)


def dropless_local(ex: expert_parallel.Exchange, x, experts, weight, live, after,
                   gate, up, down):
  """One device: x [b, l, d], experts / weight [b, l, k], live [b, l], after
  [b, l, 1] -> [b, l, d].

  Pairs are sorted by expert (so also by the device holding it). With expert
  parallelism, slot (j, p) of the send buffer [Ep, n, d] holds the p-th pair bound
  for device j; each device sorts what it receives by local expert, runs the grouped
  matmul, and the results travel back the same way. Pairs of tokens not `live`
  (and pairs whose expert is already `num_experts`) are not routed: they sort
  last, are counted for no expert and sent nowhere, and add zeros.
  """
  b, l, d = x.shape
  k = experts.shape[-1]
  n = b * l * k
  local_experts = gate.shape[0]
  num_experts = local_experts * ex.size
  flat = jnp.where(live[..., None], experts, num_experts).reshape(n)
  order = jnp.argsort(flat, stable=True)  # pairs sorted by expert, unrouted last
  sorted_experts = flat[order]
  rows = x.reshape(b * l, d)[order // k]  # [n, d]
  dependency = _dependency(after, x.dtype)
  if ex.size == 1:
    sizes = jnp.bincount(flat, length=num_experts)  # unrouted pairs not counted
    out = _grouped_swiglu(rows, sizes, gate, up, down, ex, dependency)
  else:
    per_device = jnp.bincount(sorted_experts // local_experts,
                              length=ex.size)  # unrouted pairs not counted
    start = jnp.cumsum(per_device) - per_device  # [Ep] first sorted row per device
    p = jnp.arange(n)
    source = jnp.minimum(start[:, None] + p, n - 1)  # [Ep, n]
    valid = p < per_device[:, None]
    send = jnp.where(valid[..., None], rows[source], 0)  # [Ep, n, d]
    owner = jnp.arange(ex.size)[:, None]
    ids = jnp.where(valid, sorted_experts[source] - owner * local_experts,
                    local_experts)  # local expert id; local_experts marks padding
    recv = ex.all_to_all(send, 0, 0).reshape(ex.size * n, d)
    recv_ids = ex.all_to_all(ids, 0, 0).reshape(ex.size * n)
    by_expert = jnp.argsort(recv_ids, stable=True)
    sizes = jnp.bincount(recv_ids, length=local_experts)  # padding not counted
    done = _grouped_swiglu(recv[by_expert], sizes, gate, up, down, ex, dependency)
    done = done[jnp.argsort(by_expert)].reshape(ex.size, n, d)
    back = ex.all_to_all(done, 0, 0)  # [Ep, n, d]: my pairs, as I sent them
    device = jnp.minimum(sorted_experts // local_experts, ex.size - 1)
    out = back[device, jnp.arange(n) - start[device]]  # [n, d], sorted order
    out = jnp.where((sorted_experts < num_experts)[:, None], out, 0)
  pairs = out[jnp.argsort(order)].reshape(b, l, k, d)
  return jnp.einsum("blk,blkd->bld", weight.astype(x.dtype), pairs)


class MoE(nnx.Module):
  """Router, `num_experts` SwiGLU experts of width d_ff, optional shared expert.

  Same call as MLP: [batch, length, embed] -> same. After each call `stats` holds
  this layer's router statistics (see `router_stats`) as an nnx.Intermediate.
  """

  def __init__(self, cfg, *, constrain, rngs: nnx.Rngs):
    m = cfg.moe
    init = nnx.initializers.normal(cfg.init_std)
    e, d, f, dt = m.num_experts, cfg.d_model, cfg.d_ff, cfg.params_dtype
    self.router = param(rngs, init, (d, e), ("embed", None), dt)
    self.gate = param(rngs, init, (e, d, f), EXPERT_IN, dt)
    self.up = param(rngs, init, (e, d, f), EXPERT_IN, dt)
    self.down = param(rngs, init, (e, f, d), EXPERT_OUT, dt)
    self.shared = MLP(d, f, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=dt,
                      constrain=constrain, rngs=rngs) if m.shared_expert else None
    self.moe = m
    self.dtype = cfg.dtype
    self.constrain = constrain

  def __call__(self, x: jax.Array, after: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """x [batch, length, embed] -> same. `after`: see MLP.__call__. `mask`
    [batch, length] bool, False at padding: those tokens are not routed, take no
    capacity and get 0 from the routed experts (module docstring, "Padding")."""
    m = self.moe
    logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # [b, l, E]
    logits = self.constrain(logits, ("batch", "length", None))
    probs, gates, experts = route(logits, m.top_k, m.renormalize)  # [b,l,E], [b,l,k] x2
    dep = (jnp.zeros_like(x[..., :1]) if after is None
           else after[..., :1].astype(x.dtype))  # [b, l, 1]
    weights = (self.gate[...], self.up[...], self.down[...])
    names = (EXPERT_IN, EXPERT_IN, EXPERT_OUT)
    rules = self.constrain.rules
    b, l = x.shape[:2]
    live = (jnp.ones((b, l), bool) if mask is None
            else jnp.broadcast_to(mask, (b, l)).astype(bool))
    if m.dispatch == "capacity":
      # The buffer holds C(length) slots; a row keeps only C(its real tokens).
      cap = capacity(l, m.top_k, m.num_experts, m.capacity_factor)
      slot = slots(experts, m.num_experts, None if mask is None else live)
      if mask is None:
        kept = slot < cap  # [b, l, k]
      else:
        table = capacities(l, m.top_k, m.num_experts, m.capacity_factor)
        row_cap = table[jnp.sum(live, axis=1)]  # [b]
        kept = (slot < row_cap[:, None, None]) & live[..., None]
      slot = jnp.where(kept, slot, cap)  # dropped and padding pairs: no slot
      local = functools.partial(capacity_local, cap=cap)
      y = expert_parallel.run(local, (x, experts, slot, gates * kept, live, dep),
                              weights, names, rules)
    else:
      kept = jnp.broadcast_to(live[..., None], experts.shape)
      y = expert_parallel.run(dropless_local, (x, experts, gates * kept, live, dep),
                              weights, names, rules)
    self.stats = nnx.Intermediate(router_stats(
        logits, probs, experts, kept, None if mask is None else live))
    y = self.constrain(y, ("batch", "length", "act_embed"))
    return y if self.shared is None else y + self.shared(x, after)
