"""Pipeline parallelism in one SPMD program: GPipe, circular and 1F1B schedules.

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

GPipe and circular are forward loops that autodiff turns into backward loops,
so a stage keeps what its backward needs of all M microbatches until the
forward loop ends: activation memory grows with M. `one_forward_one_backward`
(schedule "1f1b", after PipeDream-Flush, Narayanan et al. 2021, arXiv
2006.09503) runs forward and backward in one loop, with the loss inside it,
and keeps at most 2S - 1 microbatches' stage inputs per stage, whatever M.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.report import count

SCHEDULES = ("gpipe", "circular", "1f1b")


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """How the decoder runs its layer stack in training: `stages` (S) over the mesh
  axes `axes`, `microbatches` (M) per batch, `repeats` (R) layer groups per stage
  (R > 1: the circular schedule), `schedule` one of SCHEDULES. The default runs
  the layers in one scan."""
  stages: int = 1
  microbatches: int = 1
  repeats: int = 1
  axes: tuple[str, ...] = ("stage",)
  schedule: str = "gpipe"

  @property
  def active(self) -> bool:
    return self.stages > 1 or self.microbatches > 1

  @property
  def iterations(self) -> int:
    """Iterations of each pipeline loop: R*M + S - 1; for 1F1B, whose loop
    takes a microbatch through every stage and back, M + 2(S - 1)."""
    if self.schedule == "1f1b":
      return self.microbatches + 2 * (self.stages - 1)
    return self.repeats * self.microbatches + self.stages - 1

  def describe(self) -> str:
    """'pipeline: 1f1b, 2 stages x 1 repeat, 4 microbatches, bubble 33.3%'."""
    return (f"pipeline: {self.schedule}, {count(self.stages, 'stage')} x "
            f"{count(self.repeats, 'repeat')}, "
            f"{count(self.microbatches, 'microbatch', 'microbatches')}, "
            f"bubble {self.bubble:.1%}")

  @property
  def bubble(self) -> float:
    """Fraction of stage-time idle: (S-1) / (R*M + S-1); 1F1B: 2(S-1) / (M +
    2(S-1)), each of its iterations being a forward and a backward."""
    return 1 - self.repeats * self.microbatches / self.iterations


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



def one_forward_one_backward(pipe: Pipeline, first_fn: Callable, stage_fn: Callable,
                             last_fn: Callable, outer: Any, stacked: Any,
                             inputs: Any, rows: Any):
  """The loss of a batch and its gradient, with forward and backward interleaved
  so that a stage's live activations do not grow with M (schedule "1f1b").

  first_fn(outer, inputs) -> carry: stage 0's input for one microbatch (the
    embedding), leaves [batch/M, ...].
  stage_fn(params, carry, rows) -> (carry, stats, loss): K consecutive scanned
    steps (parameters leaves [K, ...]); `loss` is a float32 scalar the stage
    adds to the microbatch's loss (an MoE model's router losses; 0 otherwise).
  last_fn(outer, carry, inputs) -> (loss, metric): float32 scalars for one
    microbatch, means over its rows (the head and the token loss).
  outer: the parameters outside the layer stack; stacked: the layer stack,
    leaves [S*K, ...] in layer order; inputs, rows: leaves [batch, ...].

  The loss is the mean over microbatches of last_fn's loss plus every stage's.
  Iteration t: stage s runs the forward of microbatch t - s and the backward of
  microbatch t - 2(S-1) + s; on the last stage the loss and its gradient come
  between the two, so it runs both halves of a microbatch in one iteration.
  Activations go forward by `jnp.roll(+1)` and input gradients backward by
  `jnp.roll(-1)` over the stage dimension: two collective-permutes per
  iteration. A stage keeps only its inputs, in 2S - 1 slots (microbatch f in
  slot f mod 2S-1 from its forward until its backward, 2(S-1-s) iterations
  later), and recomputes its forward inside the backward (jax.vjp), under the
  model's remat policy. Like every stage's program, the embedding and the head
  run on every stage, masked: no stage waits on a broadcast.

  The price of the bound: M + 2(S-1) iterations, each a forward and a backward,
  where GPipe's two loops take M + S - 1 each; and one more forward per
  microbatch and stage.

  Returns (loss, metric, stats: leaves [M, S*K, ...] in layer order or None,
  gradients (of outer, of stacked) in the parameters' dtypes).
  """
  S, M = pipe.stages, pipe.microbatches
  W = 2 * S - 1
  units = jax.tree.leaves(stacked)[0].shape[0]
  K = units // S
  stage_major = lambda tree: _constrain_leading(tree, pipe.axes)  # noqa: E731
  at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
  zeros = lambda tree, lead=(), dtype=None: jax.tree.map(  # noqa: E731
      lambda a: jnp.zeros((*lead, *a.shape), dtype or a.dtype), tree)
  params = stage_major(jax.tree.map(lambda p: p.reshape(S, K, *p.shape[1:]),
                                    stacked))
  inputs_mb, rows_mb = microbatches(inputs, M), microbatches(rows, M)
  carry = jax.eval_shape(first_fn, outer, at(inputs_mb, 0))
  stats = jax.eval_shape(stage_fn, at(params, 0), carry, at(rows_mb, 0))[1]
  loop = dict(  # every leaf [S, ...], sharded over the stage axes
      stash=stage_major(zeros(carry, (S, W))),    # [S, 2S-1, batch/M, ...] inputs
      sent=stage_major(zeros(carry, (S,))),       # forward outputs, to roll +1
      grad_sent=stage_major(zeros(carry, (S,))),  # input gradients, to roll -1
      grad_stacked=stage_major(zeros(at(params, 0), (S,), jnp.float32)),  # [S, K, ...]
      grad_outer=stage_major(zeros(outer, (S,), jnp.float32)),  # summed at the end
      loss=jnp.zeros(S, jnp.float32), metric=jnp.zeros(S, jnp.float32),
      stats=None if stats is None else stage_major(zeros(stats, (S, M))))
  where = lambda ok, tree: jax.tree.map(  # noqa: E731
      lambda a: jnp.where(ok, a, jnp.zeros_like(a)), tree)
  add = lambda acc, g: jax.tree.map(  # noqa: E731
      lambda a, b: a + b.astype(a.dtype), acc, g)

  def one_stage(s, params_s, loop_s, received, received_grad, t):
    # Forward of microbatch f: stage 0 embeds it, the others take what came.
    f = t - s
    ok_f = (f >= 0) & (f < M)
    f = jnp.clip(f, 0, M - 1)
    first = first_fn(outer, at(inputs_mb, f))
    x = jax.tree.map(lambda a, b: jnp.where(s == 0, a, b), first, received)
    stash = jax.tree.map(
        lambda b, v: b.at[f % W].set(jnp.where(ok_f, v, b[f % W])),
        loop_s["stash"], x)
    out, st, stage_loss = stage_fn(params_s, x, at(rows_mb, f))
    stats = loop_s["stats"]
    if stats is not None:
      stats = jax.tree.map(lambda a, v: a.at[f].set(jnp.where(ok_f, v, a[f])),
                           stats, st)
    # The last stage's microbatch leaves the model: its loss and gradient.
    last = ok_f & (s == S - 1)
    (loss, metric), last_vjp = jax.vjp(
        lambda o, c: last_fn(o, c, at(inputs_mb, f)), outer, out)
    g_last_outer, g_out = last_vjp((jnp.where(last, 1.0 / M, 0.0).astype(loss.dtype),
                                    jnp.zeros_like(metric)))
    # Backward of microbatch b, its forward recomputed from the stash.
    b = t - 2 * (S - 1) + s
    ok_b = (b >= 0) & (b < M)
    b = jnp.clip(b, 0, M - 1)
    g = where(ok_b, jax.tree.map(lambda a, c: jnp.where(s == S - 1, a, c),
                                 g_out, received_grad))

    def stage(p, x):
      y, _, stage_loss = stage_fn(p, x, at(rows_mb, b))
      return y, stage_loss
    _, stage_vjp = jax.vjp(stage, params_s, at(stash, b % W))
    g_params, g_x = stage_vjp((g, jnp.where(ok_b, 1.0 / M, 0.0).astype(jnp.float32)))
    # Stage 0's input gradient reaches the embedding.
    _, first_vjp = jax.vjp(lambda o: first_fn(o, at(inputs_mb, b)), outer)
    g_first, = first_vjp(where(ok_b & (s == 0), g_x))
    return dict(
        stash=stash, sent=out, grad_sent=g_x,
        grad_stacked=add(loop_s["grad_stacked"], where(ok_b, g_params)),
        grad_outer=add(add(loop_s["grad_outer"], where(last, g_last_outer)),
                       g_first),
        loss=(loop_s["loss"] + jnp.where(last, loss, 0) / M
              + jnp.where(ok_f, stage_loss, 0) / M),
        metric=loop_s["metric"] + jnp.where(last, metric, 0) / M, stats=stats)

  def iteration(loop, t):
    received = stage_major(jax.tree.map(lambda a: jnp.roll(a, 1, 0), loop["sent"]))
    received_grad = stage_major(jax.tree.map(lambda a: jnp.roll(a, -1, 0),
                                             loop["grad_sent"]))
    loop = jax.vmap(one_stage, in_axes=(0, 0, 0, 0, 0, None),
                    spmd_axis_name=pipe.axes if len(pipe.axes) > 1 else pipe.axes[0])(
        jnp.arange(S), params, loop, received, received_grad, t)
    return stage_major(loop), None

  loop, _ = jax.lax.scan(iteration, loop, jnp.arange(pipe.iterations))
  cast = lambda g, p: jax.tree.map(lambda a, b: a.astype(b.dtype), g, p)  # noqa: E731
  grad_outer = jax.tree.map(lambda g: jnp.sum(g, 0), loop["grad_outer"])
  grad_stacked = jax.tree.map(lambda g: g.reshape(units, *g.shape[2:]),
                              loop["grad_stacked"])
  stats = loop["stats"]
  if stats is not None:
    # [S, M, K, ...] -> [M, S*K, ...]: layer order.
    stats = jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(
        M, units, *a.shape[3:]), stats)
  return (jnp.sum(loop["loss"]), jnp.sum(loop["metric"]), stats,
          (cast(grad_outer, outer), cast(grad_stacked, stacked)))
