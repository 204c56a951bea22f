"""The jitted train and eval steps."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from optax.contrib import GaLoreState
from jax.sharding import Mesh, NamedSharding

import sharding
from train import compression, diloco
from model.pipeline import microbatches
from train.state import ModelSpec, TrainState, model_spec

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids: [batch, length]



def grad_norm(grads) -> jax.Array:
  """The gradients' global L2 norm, summed in float32 whatever their dtype (in
  bfloat16 the logged norm kept 8 bits of mantissa: 0.609375 two steps running)."""
  return optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))

def batch_sharding(mesh: Mesh, rules: sharding.Rules, batch_size: int,
                   seq_len: int) -> NamedSharding:
  """The sharding of a [batch_size, seq_len] batch of ids on `mesh`: `batch`
  and `length` over the mesh axes `rules` maps them to, each keeping only the
  leading axes whose sizes divide it (`sharding.logical_to_spec`), so a batch an
  axis does not divide is replicated over that axis. Training never meets one:
  validation refuses a batch that does not split over the data-parallel size."""
  spec = sharding.logical_to_spec(("batch", "length"), rules, mesh,
                                  (batch_size, seq_len))
  return NamedSharding(mesh, spec)


def cross_entropy(logits: jax.Array, targets: jax.Array):
  """Mean next-token NLL and mean log-partition squared (for the z-loss).

  logits: [batch, length, vocab] (any float dtype, upcast); targets: [batch, length].
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(lse - target_logit), jnp.mean(lse ** 2)


def loss_and_metrics(spec: ModelSpec, z_loss: float):
  """(params, batch) -> (loss, (nll, aux)). The loss adds the z-loss and, for an
  MoE model, its load-balancing and router z-losses (averaged over MoE layers,
  weighted by model.moe); aux holds the MoE metrics ({} for a dense model)."""

  def token_loss(logits, targets):
    nll, lse2 = cross_entropy(logits, targets)
    return nll + z_loss * lse2, nll

  def f(params, batch: Batch):
    return spec.model(params).loss(batch["inputs"], batch["targets"],
                                   batch["positions"], batch["segment_ids"],
                                   token_loss=token_loss)
  return f


def loss_fn(spec: ModelSpec, z_loss: float):
  """(params, batch) -> (loss, mean next-token NLL)."""
  f = loss_and_metrics(spec, z_loss)

  def g(params, batch: Batch):
    loss, (nll, _) = f(params, batch)
    return loss, nll
  return g


def moe_in_pipeline(spec: ModelSpec) -> bool:
  """An MoE model in pipeline microbatches: its expert dispatch inside the stage
  shard_map fails jax's varying-axes check once vmapped over the replicas
  (`spmd_axis_name`), so such a model accumulates in the plain step, which
  all-reduces each micro-batch's gradient over `data` (more bytes, same result)."""
  return bool(spec.cfg.moe.num_experts) and spec.pipeline.active


def _mean_grads(grad_fn, params, batch: Batch, accum: int, sharding):
  """(mean next-token NLL, MoE metrics, gradients), each a mean over `accum`
  micro-batches of `batch`, taken one after another.

  `sharding`: the parameters' shardings, in which each micro-batch's gradient
  and their sum are held. Where a replica computes its own gradient (vmapped over
  a replica axis) the compiler otherwise chose the layout and could keep the sum
  whole over `fsdp`; and a micro-batch starts only once the previous one's
  gradient is summed (an optimization barrier), where the compiler could unroll
  the loop and run both forward passes before either backward, holding two
  micro-batches' activations. Measured on 32B over two v5p slices with two
  micro-batches (`predict.py --program=maxtext`; benchmarks/README.md): 116.4
  GiB per chip without either, 82.4 with the barrier alone, 65.1 with both (one
  slice: 65.8). The barrier has a price where nothing overlapped: llama_1b
  (save_dots) on v5p:2x2x2, data=8, 16 micro-batches asks for 41.9 GiB instead
  of 37.3 (estimate 1735 ms instead of 1678). A barrier on the micro-batch alone,
  the sum passed by, costs nothing there but let rung's 32B program hold both
  micro-batches again (146 GiB)."""
  keep = functools.partial(jax.lax.with_sharding_constraint, shardings=sharding)
  if accum == 1:  # nothing summed (a constraint here changed XLA:CPU's rounding)
    (_, (nll, aux)), grads = grad_fn(params, batch)
    return nll, aux, grads

  def micro(carry, mb):  # MoE metrics too are means over micro-batches
    carry, mb = jax.lax.optimization_barrier((carry, mb))
    (_, out), g = grad_fn(params, mb)
    out, g = jax.tree.map(jnp.add, carry, (out, keep(g)))
    return (out, keep(g)), None
  shapes = jax.eval_shape(grad_fn, params,
                          jax.tree.map(lambda x: x[0], microbatches(batch, accum)))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                       (shapes[0][1], shapes[1]))
  zeros = (zeros[0], keep(zeros[1]))
  ((nll, aux), grads), _ = jax.lax.scan(micro, zeros, microbatches(batch, accum))
  return jax.tree.map(lambda x: x / accum, (nll, aux, grads))


def make_train_step(spec: ModelSpec, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, train_cfg,
                    state_sharding: TrainState, data_sharding: NamedSharding, *,
                    comp: compression.Compression | None = None,
                    density: float | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Jitted (state, batch) -> (state, metrics), donating state. Call it (or lower
  it) under jax.set_mesh so activation constraints see the mesh.

  Per-replica gradients: with gradient compression (`comp` enabled), and with
  gradient accumulation over several `data` replicas, each replica's gradient
  is computed on its rows alone (vmapped over the replica dimension), so nothing
  crosses `data` per micro-batch. Compressed, the replicas then exchange it at
  `density` (default: `comp.density`; each density is its own program);
  accumulated, they all-reduce it once, where the plain step would all-reduce
  every micro-batch's gradient (16x the bytes for llama_1b's 16 micro-batches).

  Metrics: `loss`, `learning_rate` and `grad_norm`, the L2 norm of the gradient
  the optimizer takes; compressed, the mean gradient is never formed, so
  `grad_norm` is the replicas' mean of their own gradients' norms (as DiLoCo's
  is) and `exchanged_grad_norm` the norm of the exchanged sparse sum the optimizer
  takes (under DGC, momentum-corrected velocity accumulated over steps: it grows
  as the residual does, and is not a gradient norm).
  """
  accum = train_cfg.grad_accum_steps
  compressed = comp is not None and comp.enabled
  replicas = data_sharding.mesh.shape[compression.REPLICA_AXIS]
  per_replica = compressed or (
      accum > 1 and replicas > 1 and not moe_in_pipeline(spec)
      and compression.replica_view_problem(
          spec.rules, spec.logical, sizes=data_sharding.mesh.shape) is None)
  # The model as one replica sees it: no `data` in its constraints.
  grad_fn = jax.value_and_grad(loss_and_metrics(
      model_spec(spec.cfg, compression.replica_rules(spec.rules), spec.pipeline)
      if per_replica
      else spec, train_cfg.z_loss), has_aux=True)
  if compressed:
    group_tree = compression.groups(spec.abstract_params, spec.logical)
    density = comp.density if density is None else density

  def step(state: TrainState, batch: Batch):
    comp_state = state.compression
    if per_replica:  # [replicas, ...]: nothing summed over `data` yet
      rows = jax.tree.map(lambda x: x.reshape(replicas, -1, *x.shape[1:]), batch)
      nll, aux, grads = jax.vmap(
          lambda b: _mean_grads(grad_fn, state.params, b, accum,
                                 state_sharding.params),
          spmd_axis_name=compression.REPLICA_AXIS)(rows)
      nll, aux = jax.tree.map(lambda x: jnp.mean(x, 0), (nll, aux))
      if compressed:
        key = jax.random.fold_in(jax.random.key(train_cfg.seed), state.step)
        own_norm = jnp.mean(jax.vmap(grad_norm, spmd_axis_name=compression.REPLICA_AXIS)(
            grads))  # each replica's gradient, before the exchange
        grads, comp_state, _ = compression.compressed_gradient(
            comp, grads, comp_state, density, key, group_tree)
      else:
        grads = jax.tree.map(lambda g: jnp.mean(g, 0), grads)
      grads = jax.lax.with_sharding_constraint(grads, state_sharding.params)
    else:
      nll, aux, grads = _mean_grads(grad_fn, state.params, batch, accum,
                                    state_sharding.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": nll, "grad_norm": grad_norm(grads),
               "learning_rate": lr_schedule(state.step), **aux}
    if compressed:
      metrics.update(grad_norm=own_norm, exchanged_grad_norm=metrics["grad_norm"])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      compression=comp_state), metrics

  return jax.jit(step, in_shardings=(state_sharding, data_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)


def make_inner_step(spec: ModelSpec, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, train_cfg,
                    state_sharding: TrainState, data_sharding: NamedSharding
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """DiLoCo's inner step, jitted (state, batch) -> (state, metrics), donating
  state: every replica (`state.diloco['replicas']`, `state.opt_state`, stacked
  over `diloco`) takes one optimizer step on its own rows of the batch. Nothing
  crosses `diloco`: the loss and gradient norm come back per replica
  ([replicas], sharded over `diloco`) for the host to average."""
  accum = train_cfg.grad_accum_steps
  mesh = data_sharding.mesh
  replicas = mesh.shape[diloco.REPLICA_AXIS]
  grad_fn = jax.value_and_grad(loss_and_metrics(
      model_spec(spec.cfg, compression.replica_rules(spec.rules, diloco.REPLICA_AXIS),
                 spec.pipeline),
      train_cfg.z_loss), has_aux=True)

  def one(params, opt_state, rows: Batch):
    nll, aux, grads = _mean_grads(grad_fn, params, rows, accum,
                                  state_sharding.params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            {"loss": nll, "grad_norm": grad_norm(grads), **aux})

  def step(state: TrainState, batch: Batch):
    rows = jax.tree.map(lambda x: x.reshape(replicas, -1, *x.shape[1:]), batch)
    opt_state, opt_axes = _shared_counts(state.opt_state)
    params, opt_state, metrics = jax.vmap(
        one, in_axes=(0, opt_axes, 0), out_axes=(0, opt_axes, 0),
        spmd_axis_name=diloco.REPLICA_AXIS)(
            state.diloco["replicas"], opt_state, rows)
    opt_state = jax.tree.map(  # stored [replicas], as every replica's state
        lambda axis, x: x if axis == 0 else jnp.broadcast_to(x, (replicas,)),
        opt_axes, opt_state, is_leaf=lambda axis: axis is None)
    metrics["learning_rate"] = lr_schedule(state.step)
    extra = {**state.diloco, "replicas": params}
    return state.replace(step=state.step + 1, opt_state=opt_state,
                         diloco=extra), metrics

  # Metrics: the compiler keeps them [replicas] sharded over `diloco`.
  return jax.jit(step, in_shardings=(state_sharding, data_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)


def _is_galore(x) -> bool:
  return isinstance(x, GaLoreState)


def _shared_counts(opt_state):
  """(opt_state with each GaLore step count taken from replica 0, the vmap axes
  that leave those counts unbatched). The replicas step together, so their
  counts are equal; a batched count would turn GaLore's refresh `lax.cond` into
  a select that runs the refresh (QR / SVD of every matrix) on every step, not
  every update_proj_gap steps (a trial: 5.0 s steps against AdamW's 0.23 s)."""
  axes = jax.tree.map(
      lambda x: GaLoreState(None, 0, 0) if _is_galore(x) else 0, opt_state,
      is_leaf=_is_galore)
  shared = jax.tree.map(lambda x: x._replace(count=x.count[0]) if _is_galore(x)
                        else x, opt_state, is_leaf=_is_galore)
  return shared, axes


def make_eval_step(spec: ModelSpec, param_sharding, data_sharding,
                   sources: int = 0):
  """Jitted (params, batch) -> (next-token NLL summed with batch['weights'] [batch,
  length], sum of the weights). Rows of weight 0 pad a partial eval batch: they
  count in neither sum and MoE layers do not route them, so the eval loss (total
  NLL / total weight) is the mean over real tokens alone. Call it under
  jax.set_mesh.

  `sources` > 0 (a data mixture): batch['source_ids'] [batch, length] int32 says
  which source each token came from, and both sums are [sources] vectors, one
  entry per source (their totals are the sums above)."""

  def weighted_nll(logits, rows):
    targets, weights = rows[:2]
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets)  # [rows, length]
    if not sources:
      return jnp.sum(nll * weights)
    return _per_source(nll * weights, rows[2])

  def _per_source(values, ids):  # [rows, length] -> [sources]
    return jnp.einsum("rl,rls->s", values, jax.nn.one_hot(ids, sources))

  def f(params, batch: Batch):
    weights = batch["weights"].astype(jnp.float32)
    model = spec.model(params)
    x, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                        mask=weights > 0)
    rows = (batch["targets"], weights) + ((batch["source_ids"],) if sources else ())
    # over model.loss_chunks chunks of rows, as the training loss
    return (model.head_chunk_sums(x, rows, weighted_nll),
            _per_source(weights, batch["source_ids"]) if sources
            else jnp.sum(weights))

  return jax.jit(f, in_shardings=(param_sharding, data_sharding))
