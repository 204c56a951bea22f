"""The decode program: one new token per row, on the decode form of the model.

The decode form is per-step weights (`Decoder.split_layers`) and one heads-major
`KVCache` per scanned step (`KVCache.for_decoding`), made once per generation
(`split`). Inside a scan XLA:CPU copies every layer's weights out of the stacked
arrays on every token, so the decode form runs the layers unrolled over separate
arrays instead (benchmarks/README.md, "Decode speed").

`infer.generate` runs `step` token by token through `decode_step` (streaming) or
inside one while_loop; `python -m experiment compile --what=decode` compiles
`decode_step` on `abstract_inputs`, the same arguments with the same shardings, so
its memory, FLOP and collective report is the served program's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import sharding
from infer.kv_cache import check_cache
from infer.sampling import sample
from kernels.cached import KVCache
from model import Decoder

GREEDY = (0.0, None, None)  # (temperature, top_k, top_p)


def step(model: Decoder, layers, cache: list[KVCache], logits: jax.Array,
         done: jax.Array, key: jax.Array, i: jax.Array, sampling: tuple,
         stops: jax.Array):
  """Samples one token per row from `logits` [batch, vocab], then runs it through
  the model. Returns (token [batch], next logits [batch, vocab] float32, cache,
  done [batch]). Finished rows (and batch padding, done from the start) emit 0 and
  are masked: their tokens are not routed to experts."""
  token = sample(logits, jax.random.fold_in(key, i), *sampling)
  token = jnp.where(done, 0, token)
  done = done | jnp.isin(token, stops)
  logits, cache = model.decode(token[:, None], cache, mask=~done, layers=layers)
  return (model.constrain(token, ("batch",)), last_logits(model, logits[:, 0]),
          cache, model.constrain(done, ("batch",)))


def last_logits(model: Decoder, logits: jax.Array) -> jax.Array:
  """[batch, vocab] float32 logits, sharded as the decode program takes them."""
  return model.constrain(logits.astype(jnp.float32), ("batch", "act_vocab"))


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=3)
def decode_step(graphdef, params, layers, cache, logits, done, key, i,
                sampling: tuple, stops):
  """`step` as one program: (graphdef, params, per-step weights, decode-form cache,
  logits, done, key, token index, sampling (static), stop ids) -> (token, logits,
  cache, done). The cache is donated."""
  return step(nnx.merge(graphdef, params), layers, cache, logits, done, key, i,
              sampling, stops)


@functools.partial(jax.jit, static_argnums=0)
def split(graphdef, params):
  """The per-step weights (`Decoder.split_layers`), made once per generation."""
  return nnx.merge(graphdef, params).split_layers()


@functools.lru_cache(maxsize=16)  # one compile per cache shape and layout
def empty_cache(cache: KVCache, unit: int):
  """A program (no arguments) that makes the decode form of an empty cache:
  zeros laid out as the abstract position-major `cache` (sharded
  ShapeDtypeStructs, `infer.kv_cache.cache_struct`), turned heads-major and split
  per scanned step of `unit` layers (`KVCache.for_decoding`). Made in that form,
  the prompts are prefilled straight into it: no second, position-major copy is
  alive beside it."""
  def zeros(s):
    z = jnp.zeros(s.shape, s.dtype)
    return z if s.sharding is None else jax.lax.with_sharding_constraint(z, s.sharding)
  return jax.jit(lambda: jax.tree.map(zeros, cache).for_decoding(unit))


def init_decode_cache(model: Decoder, batch: int, max_length: int) -> list[KVCache]:
  """The empty decode-form cache `infer.generate` prefills and decodes in, on the
  model's mesh: `empty_cache` of `infer.kv_cache.check_cache` (which raises
  CacheDoesNotFit before allocating one larger than the free memory)."""
  return empty_cache(check_cache(model, batch, max_length), model.cfg.unit)()


def _abstract(shapes, compiled):
  """Output `shapes` (jax.eval_shape) as ShapeDtypeStructs with the `compiled`
  program's output shardings."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, compiled.output_shardings)


def abstract_inputs(graphdef, params, cache: KVCache, mesh, rules, vocab: int,
                    sampling: tuple = GREEDY, num_stops: int = 1, *,
                    unit: int = 1) -> tuple:
  """`decode_step`'s arguments for abstract `params` and `cache` (sharded
  ShapeDtypeStructs) of a model scanning `unit` layers a step, with the
  shardings `infer.generate` gives them: the per-step weights and the
  decode-form cache as `split` and `empty_cache` lay them out, logits and done
  split like the batch. What `compile --what=decode` compiles."""
  layers = _abstract(jax.eval_shape(functools.partial(split, graphdef), params),
                     split.lower(graphdef, params).compile())
  make = empty_cache(cache, unit)
  split_cache = _abstract(jax.eval_shape(make), make.lower().compile())
  batch = cache.lengths.shape[0]

  def placed(shape, dtype, names):
    spec = sharding.logical_to_spec(names, rules, mesh, shape)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

  key = jax.eval_shape(lambda: jax.random.key(0))
  return (graphdef, params, layers, split_cache,
          placed((batch, vocab), jnp.float32, ("batch", "act_vocab")),
          placed((batch,), jnp.bool_, ("batch",)),
          placed(key.shape, key.dtype, ()),
          placed((), jnp.int32, ()), sampling,
          placed((num_stops,), jnp.int32, ()))


def stop_ids(stop_tokens) -> np.ndarray:
  """The stop ids as decode_step takes them ([-2], which no token is, for none)."""
  return np.asarray(list(stop_tokens) or [-2], np.int32)
