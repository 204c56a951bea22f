"""Batched generation with a KV cache: one prefill, then a jitted decode loop."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.kv_cache import init_cache, mesh_of, split_cache, split_size
from infer.sampling import check_sampling, sample
from model import Decoder


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _prefill(graphdef, params, tokens, cache, lengths):
  """Prompts [batch, P] (right-padded) -> logits at each prompt's last token.

  The padding is masked (`Decoder`'s `mask`): MoE layers neither route it nor count
  it towards a row's capacity, so a row's logits do not depend on its batch-mates.
  Rows of length 0 (batch padding) are all padding."""
  model = nnx.merge(graphdef, params)
  mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
  logits, cache = model(tokens, cache=cache, prefill=True, mask=mask)
  last = logits[jnp.arange(tokens.shape[0]), jnp.maximum(lengths - 1, 0)]
  return last.astype(jnp.float32), cache


def _decode_step(model, layers, cache, logits, positions, done, key, i, sampling,
                 stops):
  """Samples one token per row from `logits`, then runs it through the model.
  Finished rows (and batch padding, done from the start) are masked: their tokens
  are not routed to experts."""
  token = sample(logits, jax.random.fold_in(key, i), *sampling)
  token = jnp.where(done, 0, token)
  done = done | jnp.isin(token, stops)
  logits, cache = model(token[:, None], positions[:, None], cache=cache,
                        layers=layers, mask=~done[:, None])
  return token, logits[:, 0].astype(jnp.float32), cache, done


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _decode_loop(graphdef, params, cache, logits, positions, done, key, max_new: int,
                 sampling: tuple, stops):
  """All new tokens in one jax.lax.while_loop: no Python between tokens. Rows
  `done` [batch] from the start (batch padding) emit nothing.

  The layers' weights and the cache are split per layer once, before the loop, and
  the layers run unrolled (`Decoder.split_layers`): no per-token weight copies.
  """
  model = nnx.merge(graphdef, params)
  batch = logits.shape[0]
  layers, cache = _decode_form(model, cache)

  def cond(carry):
    i, done = carry[0], carry[5]
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, cache, logits, positions, out, done = carry
    token, logits, cache, done_next = _decode_step(
        model, layers, cache, logits, positions, done, key, i, sampling, stops)
    out = out.at[:, i].set(jnp.where(done, -1, token))
    return i + 1, cache, logits, positions + 1, out, done_next

  out = jnp.full((batch, max_new), -1, jnp.int32)
  carry = (jnp.int32(0), cache, logits, positions, out, done)
  return jax.lax.while_loop(cond, body, carry)[4]


def _decode_form(model: Decoder, cache):
  """Per-layer weights and the split, heads-major cache: what the decode steps run
  on (`Decoder.split_layers`, `infer.kv_cache.split_cache`)."""
  return model.split_layers(), split_cache(cache, model.cfg.unit)


@functools.partial(jax.jit, static_argnums=0)
def _split(graphdef, params, cache):
  return _decode_form(nnx.merge(graphdef, params), cache)


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=3)
def _decode_one(graphdef, params, layers, cache, logits, positions, done, key, i,
                sampling, stops):
  model = nnx.merge(graphdef, params)
  return _decode_step(model, layers, cache, logits, positions, done, key, i,
                      sampling, stops)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def generate(model: Decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] = (),
             on_token: Callable[[np.ndarray], None] | None = None
             ) -> list[list[int]]:
  """New token ids for each prompt (lists of ids; lengths may differ).

  A row stops at `max_new_tokens` (>= 0; 0 returns empty lists without running the
  model) or after emitting one of `stop_tokens` (which is included in its output).
  Sampling arguments are those of `infer.sample`; a bad one (or a negative
  `max_new_tokens`) raises `SamplingArgumentError`, a ValueError naming it.
  The decode loop runs inside one while_loop; with `on_token` (streaming) it runs
  token by token and calls on_token with the [batch] new ids (-1 for finished rows)
  after each.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  check_sampling(temperature, top_k, top_p, max_new_tokens=max_new_tokens)
  if max_new_tokens == 0:
    return [[] for _ in prompts]
  graphdef, params = nnx.split(model)
  # Any batch on any mesh: the batch is padded to a multiple of the mesh axes
  # `batch` is split over with empty rows (length 0, all padding, done from the
  # start), and the prompts to a multiple of those `length` is split over; the
  # padding is masked out of the MoE layers and the rows dropped from the result.
  batch = len(prompts)
  rows = _round_up(batch, split_size(model, "batch"))
  longest = _round_up(max(len(p) for p in prompts), split_size(model, "length"))
  lengths = np.zeros((rows,), np.int32)
  tokens = np.zeros((rows, longest), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
    lengths[row] = len(p)
  padding = np.arange(rows) >= batch  # [rows]
  cache = init_cache(model, rows, longest + max_new_tokens)
  sampling = (float(temperature), top_k, top_p)
  stops = jnp.asarray(list(stop_tokens) or [-2], jnp.int32)
  key = jax.random.key(seed)
  mesh = mesh_of(model)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    logits, cache = _prefill(graphdef, params, tokens, cache, lengths)
    positions = jnp.asarray(lengths)
    if on_token is None:
      out = np.asarray(_decode_loop(graphdef, params, cache, logits, positions,
                                    jnp.asarray(padding), key, max_new_tokens,
                                    sampling, stops))
    else:
      layers, cache = _split(graphdef, params, cache)
      done = jnp.asarray(padding)
      was_done = padding
      columns = []
      for i in range(max_new_tokens):
        token, logits, cache, done = _decode_one(graphdef, params, layers, cache,
                                                 logits, positions, done, key, i,
                                                 sampling, stops)
        token_h, done_h = jax.device_get((token, done))  # one host sync per token
        column = np.where(was_done, -1, token_h)[:batch]  # real rows only
        columns.append(column)
        on_token(column)
        positions = positions + 1
        was_done = done_h
        if was_done.all():
          break
      out = np.stack(columns, axis=1)
  return [[int(t) for t in row if t >= 0] for row in out[:batch]]
