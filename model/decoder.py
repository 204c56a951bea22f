"""The decoder-only language model: embed -> scanned layers -> norm -> LM head."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
import optax

from kernels import flash
from kernels.cached import KVCache
from model import blocks, moe
from model.config import ModelConfig
from model.embedding import Embed
from model.linear import dense
from model.norms import RMSNorm
from model.params import param
from model import pipeline as pipeline_lib
from model.pipeline import Pipeline
from sharding import LogicalConstraint
from sharding.report import count

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # save_dots and the flash / ring kernels' output and log-sum-exp, so the backward
    # does not run the attention forward again (MaxText's `minimal_with_context`)
    "save_dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*flash.RESIDUAL_NAMES)),
    # save_dots' matmul outputs kept in pinned host memory between the forward and
    # the backward (MaxText's `*_offloaded` remat policies)
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
}


class Decoder(nnx.Module):
  """Llama-style decoder. Layers are stacked on a leading `layers` axis and scanned,
  so compile time does not grow with depth (`cfg.scan_layers=False` runs the same
  stacked parameters unrolled in the training and evaluation forward).

  `constrain` applies activation sharding by logical name (see
  `sharding.LogicalConstraint`); the default does nothing, so the model itself holds
  no parallelism plan. `pipeline` (model/pipeline.py) says how the training
  forward runs the layer stack: in stages over microbatches, or (default) as one
  scan; prefill and decoding always run it as one scan.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               constrain: LogicalConstraint = LogicalConstraint(),
               pipeline: Pipeline = Pipeline()):
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"Decoder takes a ModelConfig, not {type(cfg).__name__}: build "
                      "it with ModelConfig.from_config(config.model).")
    cfg.validate()  # a model built directly gets the launcher's checks
    self.cfg = cfg
    self.constrain = constrain
    self.pipeline = pipeline
    self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std,
                       dtype=cfg.dtype, param_dtype=cfg.params_dtype, rngs=rngs,
                       lookup=cfg.embed_lookup, constrain=constrain)

    # One scanned step: a layer, or in an MoE model with every_k_layers > 1 a
    # blocks.Unit of that many layers.
    @nnx.split_rngs(splits=cfg.num_layers // cfg.unit)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked(rngs):
      if cfg.unit > 1:
        return blocks.Unit(cfg, constrain=constrain, rngs=rngs)
      return blocks.Block(cfg, constrain=constrain, rngs=rngs,
                          moe=cfg.moe.num_experts > 0)

    self.layers = stacked(rngs)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                              param_dtype=cfg.params_dtype)
    if not cfg.tie_embeddings:
      self.head = param(rngs, nnx.initializers.normal(cfg.init_std),
                        (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                        cfg.params_dtype)

  # --- the three modes: forward (training, evaluation), prefill, decode step ---

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """tokens: [batch, length] ints -> logits [batch, length, vocab] (compute dtype).
    Ids must lie in [0, vocab_size): past the table the default gather lookup
    gives NaN logits (`jnp.take` fills), the one_hot lookup a zero embedding.

    positions default to 0..length-1; with `segment_ids` (packed sequences) tokens
    attend only within their segment and positions should restart per segment.
    `mask` [batch, length] bool, False at padding tokens: MoE layers do not route
    them and give them no expert capacity (attention needs no mask for
    right-padding, which is causal). None: every token is real.
    """
    return self.forward_and_aux(tokens, positions, segment_ids, mask)[0]

  def forward_and_aux(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None,
                      mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The training forward: (logits as `__call__` gives them, aux), aux holding an
    MoE model's router metrics (`moe.aggregate`: the auxiliary losses for the
    training loss, load and drops); {} for a dense model."""
    x, aux = self.hidden(tokens, positions, segment_ids, mask)
    return self._head(x), aux

  def loss(self, tokens: jax.Array, targets: jax.Array,
           positions: jax.Array | None = None,
           segment_ids: jax.Array | None = None, *,
           token_loss: Callable = lambda logits, targets: (_nll(logits, targets),) * 2):
    """The training loss of a batch: `token_loss` of the logits plus, for an MoE
    model, its router losses weighted by cfg.moe (aux_loss_weight, z_loss_weight).

    token_loss(logits [rows, length, vocab], targets [rows, length]) -> (loss,
    metric): float32 scalars, means over the rows given, so that the mean over
    equal microbatches is the batch's. The default is the mean next-token
    negative log-likelihood (nats) as both; training passes
    `train.step.loss_and_metrics`'s, which adds the z-loss. Returns (loss,
    (metric, aux)), aux as `forward_and_aux` gives it.

    Under the 1F1B pipeline schedule the whole batch's logits never exist: each
    microbatch's loss and its gradient are computed inside the pipeline loop
    (`pipeline.one_forward_one_backward`), and this function's VJP returns that
    gradient times the loss's cotangent; `metric` and `aux` then carry none.
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if self.pipeline.active and self.pipeline.schedule == "1f1b":
      return self._one_forward_one_backward(tokens, targets, positions, segment_ids,
                                            token_loss)
    x, aux = self.hidden(tokens, positions, segment_ids)
    loss, metric = self.head_chunk_sums(x, targets, token_loss)
    n = self.cfg.loss_chunks
    return loss / n + self._router_loss(aux), (metric / n, aux)

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None,
             mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """`forward_and_aux` up to the LM head: (the residual stream after the last
    layer [batch, length, embed], aux). `head_chunk_sums` takes it on."""
    if jnp.ndim(tokens) != 2:
      raise ValueError(f"tokens must be [batch, length] ids, got shape "
                       f"{jnp.shape(tokens)}; one sequence is tokens[None].")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    ctx = blocks.Context(positions, segment_ids, mask=_mask(mask, tokens))
    x, _, stats = self._hidden(tokens, ctx)
    return x, moe.aggregate(stats) if stats else {}

  def head_chunk_sums(self, x: jax.Array, rows: Any, fn: Callable) -> Any:
    """The sum over cfg.loss_chunks chunks of rows of fn(logits [rows/n, length,
    vocab], the chunk of `rows`), a pytree of float32 scalars. x: [batch, length,
    embed] from `hidden`; rows: arrays with a leading [batch] axis (targets,
    weights). Chunks take rows i, i+n, ... as microbatches do, so each keeps the
    batch's sharding; they run one after another, each chunk's logits recomputed
    in the backward, so the whole batch's logits never exist. With one chunk,
    fn(all logits, rows)."""
    n = self.cfg.loss_chunks
    if n == 1:
      return fn(self._head(x), rows)
    chunk = jax.checkpoint(lambda xc, rc: fn(self._head(xc), rc))
    chunks = pipeline_lib.microbatches((x, rows), n)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
        chunk, *jax.tree.map(lambda a: a[0], chunks)))

    def one(total, c):
      return jax.tree.map(jnp.add, total, chunk(*c)), None

    return jax.lax.scan(one, zeros, chunks)[0]

  def _router_loss(self, aux: dict) -> jax.Array | float:
    if not aux:
      return 0.0
    return (self.cfg.moe.aux_loss_weight * aux["moe_aux_loss"]
            + self.cfg.moe.z_loss_weight * aux["moe_z_loss"])

  def prefill(self, tokens: jax.Array, lengths: jax.Array,
              cache: KVCache | Sequence[KVCache], *,
              layers: Sequence[nnx.State] | None = None):
    """Prompts from position 0 into an empty cache.

    tokens: [batch, P] right-padded prompts, lengths: [batch] their lengths (0 for a
    padding row). `cache` is stacked, or in the decode program's form (`decode`:
    the layers run unrolled, over `layers` if given). Returns (logits [batch, P,
    vocab], cache holding the prompts, cache.lengths = lengths). The padding is
    masked out of MoE routing, so a row's logits do not depend on its batch-mates
    or on P. Raises ValueError when P is longer than the cache (its writes would
    land out of bounds).
    """
    x, cache = self._prefill_hidden(tokens, lengths, cache, layers)
    return self._head(x), cache

  def prefill_last(self, tokens: jax.Array, lengths: jax.Array,
                   cache: KVCache | Sequence[KVCache], *,
                   layers: Sequence[nnx.State] | None = None):
    """`prefill` for generation: (the logits of each prompt's last token [batch,
    vocab], cache). The LM head runs on that one position per row, so a long
    prompt's [batch, P, vocab] logits are never made. A padding row (length 0)
    gets position 0's."""
    x, cache = self._prefill_hidden(tokens, lengths, cache, layers)
    last = x[jnp.arange(x.shape[0]), jnp.maximum(lengths - 1, 0)]  # [batch, embed]
    return self._head(last[:, None])[:, 0], cache

  def _prefill_hidden(self, tokens, lengths, cache, layers=None):
    """-> (the residual stream after the last layer [batch, P, embed], cache with
    cache.lengths = lengths)."""
    split = not isinstance(cache, KVCache)
    max_length = (cache[0] if split else cache).max_length
    if tokens.shape[1] > max_length:
      raise ValueError(f"prompts of {count(tokens.shape[1], 'position')} do not fit "
                       f"a KV cache of {max_length}; make the cache at least that long.")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = positions < lengths[:, None]  # [batch, P]
    ctx = blocks.Context(positions, None, prefill=True, mask=mask)
    if split and layers is None:
      layers = self.split_layers()
    x, cache, _ = self._hidden(tokens, ctx, list(cache) if split else cache,
                               layers if split else None)
    lengths = lengths.astype(jnp.int32)
    if split:
      return x, [c.replace(lengths=lengths) for c in cache]
    return x, cache.replace(lengths=lengths)

  def decode(self, tokens: jax.Array, cache: KVCache | Sequence[KVCache], *,
             mask: jax.Array | None = None,
             layers: Sequence[nnx.State] | None = None):
    """New tokens [batch, t] at each row's next positions (cache.lengths onward),
    attending over everything cached before them. Returns (logits [batch, t,
    vocab], the cache advanced by t).

    `cache` is a stacked KVCache (the layers are scanned), or the decode program's
    form `cache.for_decoding(cfg.unit)`, one KVCache per scanned step: then the
    layers run unrolled over per-step weights, `layers` (default
    `split_layers()`; pass them split once, outside a token loop). `mask` [batch]
    or [batch, t], False for rows whose tokens are not real (finished or padding
    rows): MoE layers do not route them.

    Called eagerly (outside jit), a row whose tokens would run past the cache's
    max_length raises ValueError (its writes would land out of bounds); under jit
    the lengths are not known, and keeping them in bounds is the caller's part
    (`infer.generate` sizes the cache for prompt plus new tokens).
    """
    split = not isinstance(cache, KVCache)
    lengths = (cache[0] if split else cache).lengths
    max_length = (cache[0] if split else cache).max_length
    if not isinstance(lengths, jax.core.Tracer):
      end = int(jnp.max(lengths)) + tokens.shape[1]
      if end > max_length:
        raise ValueError(
            f"decoding {tokens.shape[1]} token(s) after {end - tokens.shape[1]} "
            f"cached positions runs past the KV cache's {max_length}; make the cache "
            f"at least {end} long.")
    positions = lengths[:, None] + jnp.arange(tokens.shape[1])  # [batch, t]
    if mask is not None and mask.ndim == 1:
      mask = mask[:, None]
    ctx = blocks.Context(positions, None, mask=_mask(mask, tokens))
    if split and layers is None:
      layers = self.split_layers()
    logits, cache, _ = self._run(tokens, ctx, list(cache) if split else cache,
                                 layers if split else None)
    advance = lambda c: c.replace(lengths=lengths + tokens.shape[1])  # noqa: E731
    return logits, [advance(c) for c in cache] if split else advance(cache)

  def _run(self, tokens, ctx: blocks.Context, cache=None, layers=None):
    """-> (logits, cache, MoE router stats or None)."""
    x, cache, stats = self._hidden(tokens, ctx, cache, layers)
    return self._head(x), cache, stats

  def _hidden(self, tokens, ctx: blocks.Context, cache=None, layers=None):
    """-> (the residual stream after the last layer [batch, length, embed], cache,
    MoE router stats or None)."""
    x = self.constrain(self.embed(tokens), ("batch", "length", "act_embed"))
    return self.run_layers(x, ctx, cache, layers)

  def _head(self, x: jax.Array) -> jax.Array:
    """[batch, length, embed] after the last layer -> logits [batch, length,
    vocab]."""
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = dense(x, self.head[...].astype(self.cfg.dtype))
    return self.constrain(logits, ("batch", "length", "act_vocab"))

  def split_layers(self) -> list[nnx.State]:
    """Each scanned step's parameters as separate arrays, for `layers=`.

    For generation: slice once, outside the token loop. Inside a scan, XLA:CPU
    copies every layer's weights out of the stacked arrays on every call; in
    matrix-vector decoding that copy costs about as much as the matmuls themselves
    (benchmarks/README.md, "Decode speed"). Unrolled layers also compile in time
    proportional to depth, which is why training scans unless
    `cfg.scan_layers=False`.
    """
    return self._unstacked(nnx.split(self.layers)[1])

  def _unstacked(self, state: nnx.State) -> list[nnx.State]:
    steps = self.cfg.num_layers // self.cfg.unit
    return [jax.tree.map(lambda p, i=i: p[i], state) for i in range(steps)]

  def run_layers(self, x: jax.Array, ctx: blocks.Context, cache=None,
                 layers: Sequence[nnx.State] | None = None):
    """Scans each run of same-kind layers (or, given per-layer `layers`, runs them
    one after another); ladder outputs still pending at a standard layer or at the
    end are added to the stream there.

    A stacked KV cache rides in the scan carry (each layer scatters its new rows
    into it), never in the scanned-over inputs and outputs: those would copy the
    cache every step. Unrolled, each step has its own KVCache and writes at its
    own layer 0.

    Also returns the MoE layers' router stats stacked in layer order (None for a
    dense model): scan outputs, one row per scanned step.
    """
    graphdef, state = nnx.split(self.layers)
    if self.pipeline.active and cache is None and layers is None:
      return self._pipelined(graphdef, state, x, ctx)
    if not self.cfg.scan_layers and cache is None and layers is None:
      layers = self._unstacked(state)
    pending = None  # (a, m) from a ladder segment
    stats = []
    unit = self.cfg.unit
    for kind, start, stop in self.cfg.segments():
      start, stop = start // unit, stop // unit  # scanned steps (validated whole)
      body = self._layer_body(graphdef, kind, ctx)

      def run(carry, cache, body=body, start=start, stop=stop):
        if layers is None:
          whole = (start, stop) == (0, self.cfg.num_layers // unit)
          segment = state if whole else jax.tree.map(lambda p: p[start:stop], state)
          return jax.lax.scan(body, (carry, cache),
                              (segment, jnp.arange(start, stop)))
        kvs, out = list(cache) if cache is not None else None, []
        for i in range(start, stop):
          (carry, kv), s = body((carry, None if kvs is None else kvs[i]),
                                (layers[i], 0))
          out.append(s)
          if kvs is not None:
            kvs[i] = kv
        if out[0] is None:
          return (carry, kvs), None
        return (carry, kvs), jax.tree.map(lambda *s: jnp.stack(s), *out)

      if kind == "ladder":
        a, m = pending or (jnp.zeros_like(x), jnp.zeros_like(x))
        ((x, a, m), cache), seg_stats = run((x, a, m), cache)
        pending = (a, m)
      else:
        if pending is not None:
          x = x + pending[0] + pending[1]
          pending = None
        (x, cache), seg_stats = run(x, cache)
      stats.append(seg_stats)
    if pending is not None:
      x = x + pending[0] + pending[1]
    if stats[0] is None:
      return x, cache, None
    return x, cache, jax.tree.map(lambda *s: jnp.concatenate(s), *stats)

  def _layer_body(self, graphdef, kind: str, ctx: blocks.Context):
    """The scan body of one scanned step of dataflow `kind`: ((carry, kv),
    (step parameters, step index)) -> ((carry, kv), MoE stats or None), under
    the model's remat policy."""
    step = blocks.RESIDUAL[kind]
    if self.cfg.unit > 1:
      step = functools.partial(blocks.through_unit, step)

    def body(carry, layer):
      carry, kv = carry
      layer_state, index = layer
      module = nnx.merge(graphdef, layer_state)
      carry, kv = step(module, carry, None if kv is None else (kv, index), ctx=ctx)
      return (carry, kv), blocks.moe_stats(module)

    if self.cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat],
                            prevent_cse=False)
    return body

  def _pipelined(self, graphdef, state, x: jax.Array, ctx: blocks.Context):
    """run_layers' training path under `self.pipeline` (one layer kind: checked
    by the config validation) -> (x, None, MoE stats merged over microbatches)."""
    (kind, _, _), = self.cfg.segments()
    rows = {"positions": ctx.positions, "segment_ids": ctx.segment_ids,
            "mask": ctx.mask}

    def stage(params, carry, rows):
      micro = blocks.Context(rows["positions"], rows["segment_ids"],
                             mask=rows["mask"])
      return self._scan_stage(graphdef, kind, micro, params, carry)

    carry, stats = pipeline_lib.run(self.pipeline, stage, state,
                                    _stage_carry(kind, x), rows)
    return (_stage_output(kind, carry), None,
            None if stats is None else moe.merge_microbatches(stats))

  def _scan_stage(self, graphdef, kind: str, ctx: blocks.Context, params, carry):
    """One pipeline stage: its scanned steps (`params`, leaves [K, ...]) over one
    microbatch's carry -> (carry, MoE stats [K, ...] or None)."""
    steps = jax.tree.leaves(params)[0].shape[0]
    (carry, _), stats = jax.lax.scan(self._layer_body(graphdef, kind, ctx),
                                     (carry, None),
                                     (params, jnp.zeros(steps, jnp.int32)))
    return carry, stats

  def _one_forward_one_backward(self, tokens, targets, positions, segment_ids,
                                token_loss):
    """`loss` under the 1F1B schedule: a function whose forward computes its own
    gradient (jax.custom_vjp), so the training step's jax.value_and_grad is
    unchanged."""
    graphdef, layers, outer = nnx.split(self, nnx.PathContains("layers"), ...)
    layers_def, _ = nnx.split(self.layers)
    (kind, _, _), = self.cfg.segments()
    units = self.cfg.num_layers // self.cfg.unit
    moe_cfg, constrain = self.cfg.moe, self.constrain
    scan_stage = self._scan_stage  # reads only static fields of self

    def value_and_grad(layers, outer, inputs):
      def model(o):
        return nnx.merge(graphdef, layers, o)

      def first_fn(o, inp):
        x = constrain(model(o).embed(inp["tokens"]), ("batch", "length", "act_embed"))
        return _stage_carry(kind, x)

      def last_fn(o, carry, inp):
        logits = model(o)._head(_stage_output(kind, carry))
        loss, metric = token_loss(logits, inp["targets"])
        return loss.astype(jnp.float32), metric.astype(jnp.float32)

      def stage_fn(params, carry, rows):
        ctx = blocks.Context(rows["positions"], rows["segment_ids"])
        carry, stats = scan_stage(layers_def, kind, ctx, params, carry)
        loss = jnp.zeros((), jnp.float32)
        if stats is not None:  # this stage's share of the mean over MoE units
          loss += (moe_cfg.aux_loss_weight * jnp.sum(stats["aux_loss"])
                   + moe_cfg.z_loss_weight * jnp.sum(stats["z_loss"])) / units
        return carry, stats, loss

      rows = {"positions": inputs["positions"], "segment_ids": inputs["segment_ids"]}
      loss, metric, stats, (g_outer, g_layers) = (
          pipeline_lib.one_forward_one_backward(
              self.pipeline, first_fn, stage_fn, last_fn, outer, layers["layers"],
              inputs, rows))
      aux = {} if stats is None else moe.aggregate(moe.merge_microbatches(stats))
      g_layers = jax.tree.unflatten(jax.tree.structure(layers),
                                    jax.tree.leaves(g_layers))
      return (loss, (metric, aux)), (g_layers, g_outer)

    @jax.custom_vjp
    def f(layers, outer, inputs):
      return value_and_grad(layers, outer, inputs)[0]

    def f_fwd(layers, outer, inputs):
      return value_and_grad(layers, outer, inputs)

    def f_bwd(grads, cotangent):
      g = cotangent[0]  # of the loss; metric and aux carry none
      return (*jax.tree.map(lambda x: x * g.astype(x.dtype), grads), None)

    f.defvjp(f_fwd, f_bwd)
    return f(layers, outer, {"tokens": tokens, "targets": targets,
                             "positions": positions, "segment_ids": segment_ids})


def _stage_carry(kind: str, x: jax.Array):
  """What travels between pipeline stages: the residual stream, and for ladder
  blocks the pending attention and MLP outputs too."""
  return (x, jnp.zeros_like(x), jnp.zeros_like(x)) if kind == "ladder" else x


def _stage_output(kind: str, carry) -> jax.Array:
  """The residual stream after the last stage (ladder's pending outputs land)."""
  return carry[0] + carry[1] + carry[2] if kind == "ladder" else carry


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean negative log-likelihood of `targets` [rows, length] under `logits`
  [rows, length, vocab], in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def _mask(mask: jax.Array | None, tokens: jax.Array) -> jax.Array | None:
  return None if mask is None else jnp.broadcast_to(mask, tokens.shape).astype(bool)
