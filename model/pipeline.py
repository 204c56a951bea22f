"""Pipeline parallelism in one SPMD program: GPipe and the circular schedule.

The layer stack is split into S stages along its leading `layers` axis, which the
sharding rules map to the `stage` mesh axis, and the batch into M microbatches.
Every stage runs the same program (a `jax.vmap` over stages with
`spmd_axis_name`), one microbatch per iteration, for R*M + S - 1 iterations;
between iterations each stage's output moves to the next stage by `jnp.roll`
over the stage dimension, which the SPMD partitioner turns into one
collective-permute of an activation-sized buffer.

- GPipe (Huang et al. 2019, arXiv 1811.06965), R = 1: stage s holds layers
  [s*L/S, (s+1)*L/S). Idle fraction of stage-time (the bubble): (S-1)/(M+S-1).
- Circular (interleaved; Narayanan et al. 2021, arXiv 2104.04473, section 2.2.2),
  R > 1: stage s holds R non-adjacent groups of K = L/(S*R) layers, group r being
  layers (r*S + s)*K ... + K - 1, so a microbatch passes the ring of stages R
  times. Bubble (S-1)/(R*M+S-1); needs M >= S, since a microbatch coming round
  waits in stage 0's buffer until stage 0 is free (M - S iterations).

Work item g = r*M + i (microbatch i, repeat r) is on stage s at iteration g + s.
Stage 0 reads its input from a buffer of M slots, which starts as the
microbatches and takes each work item back from stage S-1; stage S-1 writes
what leaves the last repeat into its own buffer, which is the output. Iterations
outside a stage's work (the bubble) compute on whatever the stage holds and are
discarded, so the gradient is the sequential one exactly.

The parameters keep their layer order [L, ...], so checkpoints do not depend on
the schedule; for R > 1 that order is not stage-contiguous and the compiler moves
each stage's groups to it once per step (measured in benchmarks/README.md,
"Pipeline parallelism").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SCHEDULES = ("gpipe", "circular")


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """How the decoder runs its layer stack in training: `stages` (S) over the mesh
  axes `axes`, `microbatches` (M) per batch, `repeats` (R) layer groups per stage
  (R > 1: the circular schedule). The default runs the layers in one scan."""
  stages: int = 1
  microbatches: int = 1
  repeats: int = 1
  axes: tuple[str, ...] = ("stage",)

  @property
  def active(self) -> bool:
    return self.stages > 1 or self.microbatches > 1

  @property
  def iterations(self) -> int:
    """Stage-steps per batch: R*M + S - 1."""
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    """Fraction of stage-time idle: (S-1) / (R*M + S-1)."""
    return (self.stages - 1) / self.iterations


def microbatches(tree: Any, n: int) -> Any:
  """[batch, ...] -> [n, batch/n, ...]. Microbatch i takes rows i, i+n, i+2n, ...,
  so each keeps the data-parallel sharding of the whole batch."""
  return jax.tree.map(
      lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


def unmicrobatch(tree: Any) -> Any:
  """Inverse of `microbatches`: [n, batch/n, ...] -> [batch, ...]."""
  return jax.tree.map(
      lambda x: x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]),
      tree)


def _constrain_leading(tree: Any, axes: tuple[str, ...]) -> Any:
  """Shards every leaf's leading dimension over `axes`, the rest as the compiler
  likes. No-op without a mesh (`jax.set_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in axes if not mesh.empty and mesh.shape.get(a, 1) > 1)
  if not axes:
    return tree
  lead = axes[0] if len(axes) == 1 else axes
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(
          x, P(lead, *([P.UNCONSTRAINED] * (x.ndim - 1)))), tree)


def run(pipe: Pipeline, stage_fn: Callable, stacked: Any, carry: Any,
        rows: Any) -> tuple[Any, Any]:
  """Runs the layer stack over a batch, pipelined.

  stage_fn(params, carry, rows) -> (carry, stats): K consecutive scanned steps
    whose parameters `params` are leaves [K, ...], on one microbatch's `carry`
    (leaves [batch/M, ...]) and per-row inputs `rows` (positions, segment ids,
    mask: leaves [batch/M, length]); stats: leaves [K, ...] or None.
  stacked: the layer stack's parameters, leaves [S*R*K, ...] in layer order.
  carry: leaves [batch, ...] (the residual stream; for ladder blocks also the
    pending attention and MLP outputs, which travel between stages with it).
  rows: leaves [batch, ...].

  Returns (carry after every layer, leaves [batch, ...]; stats, leaves
  [M, S*R*K, ...] per microbatch in layer order, or None).
  """
  S, M, R = pipe.stages, pipe.microbatches, pipe.repeats
  units = jax.tree.leaves(stacked)[0].shape[0]
  K = units // (S * R)
  # [S*R*K, ...] -> [S, R, K, ...]: stage s, repeat r holds units (r*S + s)*K + k.
  params = jax.tree.map(
      lambda p: p.reshape(R, S, K, *p.shape[1:]).swapaxes(0, 1), stacked)
  params = _constrain_leading(params, pipe.axes)
  carry_mb = microbatches(carry, M)  # leaves [M, b, ...]
  rows_mb = microbatches(rows, M)
  # Every stage's buffer starts as the microbatches; only stage 0's inputs and
  # stage S-1's outputs are ever read.
  inbox = _constrain_leading(jax.tree.map(
      lambda x: jnp.broadcast_to(x, (S, *x.shape)), carry_mb), pipe.axes)
  state = _constrain_leading(jax.tree.map(
      lambda x: jnp.zeros((S, *x.shape[1:]), x.dtype), carry_mb), pipe.axes)
  item = jax.tree.map(lambda x: x[0], carry_mb)
  stats_shape = jax.eval_shape(
      stage_fn, jax.tree.map(lambda p: p[0, 0], params), item,
      jax.tree.map(lambda x: x[0], rows_mb))[1]
  stats = None if stats_shape is None else jax.tree.map(
      lambda s: jnp.zeros((S, R, M, *s.shape), s.dtype), stats_shape)

  def one_stage(s, params_s, inbox_s, received, stats_s, t):
    g = t - s  # this stage's work item
    valid = (g >= 0) & (g < R * M)
    g = jnp.clip(g, 0, R * M - 1)
    i, r = g % M, g // M
    # Stage 0 keeps the work item coming round from stage S-1 (item t - S)...
    back = jnp.maximum(t - S, 0) % M
    keep = (s == 0) & (t >= S)
    inbox_s = jax.tree.map(
        lambda b, x: b.at[back].set(jnp.where(keep, x, b[back])), inbox_s, received)
    # ... and takes its input from its buffer; the others from the stage before.
    x = jax.tree.map(lambda b, y: jnp.where(s == 0, b[t % M], y), inbox_s, received)
    p = jax.tree.map(lambda a: a[r], params_s)
    out, st = stage_fn(p, x, jax.tree.map(lambda a: a[i], rows_mb))
    done = valid & (s == S - 1) & (r == R - 1)
    inbox_s = jax.tree.map(
        lambda b, y: b.at[i].set(jnp.where(done, y, b[i])), inbox_s, out)
    if stats_s is not None:
      stats_s = jax.tree.map(
          lambda a, v: a.at[r, i].set(jnp.where(valid, v, a[r, i])), stats_s, st)
    return inbox_s, out, stats_s

  def iteration(loop, t):
    inbox, state, stats = loop
    received = _constrain_leading(
        jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), state), pipe.axes)
    inbox, state, stats = jax.vmap(
        one_stage, in_axes=(0, 0, 0, 0, 0, None),
        spmd_axis_name=pipe.axes if len(pipe.axes) > 1 else pipe.axes[0])(
            jnp.arange(S), params, inbox, received, stats, t)
    state = _constrain_leading(state, pipe.axes)
    return (inbox, state, stats), None

  (inbox, _, stats), _ = jax.lax.scan(
      iteration, (inbox, state, stats), jnp.arange(pipe.iterations))
  out = unmicrobatch(jax.tree.map(lambda b: b[S - 1], inbox))
  if stats is not None:
    # [S, R, M, K, ...] -> [M, R, S, K, ...] -> [M, units]: layer order.
    stats = jax.tree.map(
        lambda a: a.transpose(2, 1, 0, *range(3, a.ndim)).reshape(
            M, units, *a.shape[4:]), stats)
  return out, stats
