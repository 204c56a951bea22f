"""Batched generation with a KV cache: one prefill, then the decode program
(`infer.decode`) token by token or inside one while_loop."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import sharding
from infer import decode
from infer.kv_cache import check_cache, mesh_of, split_size
from infer.sampling import as_python, check_sampling
from model import Decoder


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(graphdef, params, layers, tokens, cache, lengths):
  """Prompts [batch, P] (right-padded) into the decode-form `cache` over the
  per-step weights `layers` -> (logits at each prompt's last token [batch, vocab]
  float32, cache). Rows of length 0 (batch padding) are all padding;
  `Decoder.prefill` masks padding out of MoE routing."""
  model = nnx.merge(graphdef, params)
  last, cache = model.prefill_last(tokens, lengths, cache, layers=layers)
  return decode.last_logits(model, last), cache


@functools.partial(jax.jit, static_argnums=(0, 7, 8), donate_argnums=3)
def _decode_loop(graphdef, params, layers, cache, logits, done, key, max_new: int,
                 sampling: tuple, stops):
  """All new tokens in one jax.lax.while_loop around `decode.step`, on the
  per-step weights `layers` and the decode-form `cache` (donated: the loop
  writes it in place): no Python between tokens. Rows `done` [batch] from the
  start (batch padding) emit nothing. Returns (new ids [batch, max_new], -1
  where a row had finished, cache)."""
  model = nnx.merge(graphdef, params)
  batch = logits.shape[0]

  def cond(carry):
    i, done = carry[0], carry[4]
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, cache, logits, out, done = carry
    token, logits, cache, done_next = decode.step(
        model, layers, cache, logits, done, key, i, sampling, stops)
    out = out.at[:, i].set(jnp.where(done, -1, token))
    return i + 1, cache, logits, out, done_next

  out = jnp.full((batch, max_new), -1, jnp.int32)
  carry = (jnp.int32(0), cache, logits, out, done)
  _, cache, _, out, _ = jax.lax.while_loop(cond, body, carry)
  return out, cache  # the cache out, so its buffer is the donated one's


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_list(x) -> bool:
  return (isinstance(x, Sequence) and not isinstance(x, (str, bytes))) or (
      hasattr(x, "tolist") and np.ndim(x) == 1)


def _token_ids(name: str, ids, vocab: int) -> list[int]:
  """ids as Python ints, or ValueError naming `name`: every id an integer (not a
  float, which would be truncated silently) in [0, vocab) (an id past the embedding
  table would give NaN logits)."""
  ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
  for t in ids:
    if not _is_int(t):
      raise ValueError(f"{name} holds {t!r}; token ids are integers.")
    if not 0 <= t < vocab:
      raise ValueError(f"{name} holds token id {t}, outside the model's vocabulary "
                       f"[0, {vocab})")
  return [int(t) for t in ids]


def _stop_list(stop_tokens) -> Sequence[int]:
  """`stop_tokens` as a sequence of ids (None is none; a set's order does not
  matter), else ValueError saying what to pass (one id alone is [id])."""
  if stop_tokens is None:
    return ()
  if isinstance(stop_tokens, (set, frozenset)):
    return list(stop_tokens)
  if _is_list(stop_tokens):
    return stop_tokens
  if _is_int(as_python(stop_tokens)):
    raise ValueError(f"stop_tokens={stop_tokens!r} is one id; stop_tokens is a list "
                     f"of token ids: pass [{int(as_python(stop_tokens))}].")
  raise ValueError(f"stop_tokens is a list of token ids (e.g. [2], or [] for none), "
                   f"not a {type(stop_tokens).__name__} ({stop_tokens!r})"
                   + ("; tokenize text first." if isinstance(stop_tokens, str) else "."))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _padded(model: Decoder, rows: int, length: int) -> tuple[int, int]:
  """(rows, prompt positions) `generate` runs `rows` prompts padded to `length`
  at: rows to a multiple of the devices `batch` is split over, positions to one
  of those `length` is split over."""
  return (_round_up(rows, split_size(model, "batch")),
          _round_up(length, split_size(model, "length")))


def check_batch(model: Decoder, rows: int, length: int, max_new_tokens: int) -> None:
  """Raises CacheDoesNotFit where `generate` of `rows` prompts of at most `length`
  tokens (or padded to them, `pad_to=(rows, length)`) and `max_new_tokens` would,
  allocating nothing: a caller running many batches refuses before the first."""
  rows, length = _padded(model, rows, length)
  check_cache(model, rows, length + max_new_tokens)


class PastContextWarning(UserWarning):
  """A prompt plus `max_new_tokens` runs past the model's
  `max_position_embeddings`: the positions beyond it are ones the model was not
  made for (it generates them all the same)."""


def generate(model: Decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] = (),
             on_token: Callable[[np.ndarray], None] | None = None,
             pad_to: tuple[int, int] | None = None) -> list[list[int]]:
  """New token ids for each prompt (lists of ids, lengths may differ, or a
  [batch, length] array of ids).

  A row stops at `max_new_tokens` (>= 0; 0 returns empty lists without running the
  model) or after emitting one of `stop_tokens` (which is included in its output).
  Prompt and stop ids outside [0, vocab_size) raise ValueError.
  Sampling arguments are those of `infer.sample`; a bad one (or a negative
  `max_new_tokens`) raises `SamplingArgumentError`, a ValueError naming it.
  A KV cache for the longest prompt plus `max_new_tokens` larger than the free
  memory raises `CacheDoesNotFit` (a ValueError) before anything is allocated;
  one past `model.cfg.max_position_embeddings` warns (`PastContextWarning`).
  The decode loop runs inside one while_loop; with `on_token` (streaming) it runs
  token by token and calls on_token with the [batch] new ids (-1 for finished rows)
  after each. `pad_to` (rows, prompt length): pad the batch and the prompts to at
  least these, so calls with fewer or shorter prompts reuse one compiled program
  (padding rows and positions are masked; the new ids are the same).
  """
  if hasattr(prompts, "tolist"):  # a [batch, length] array of ids
    prompts = prompts.tolist()
  if isinstance(prompts, str) or not _is_list(prompts) or (
      len(prompts) and not all(_is_list(p) for p in prompts)):
    raise ValueError("prompts is a list of prompts, each a list of token ids (one "
                     "prompt is [ids]); for text, tokenize first or use "
                     "infer.text.generate_text.")
  if not len(prompts):
    raise ValueError("prompts is empty; pass at least one prompt (a list of ids).")
  if pad_to is not None and not (_is_list(pad_to) and len(pad_to) == 2 and all(
      _is_int(as_python(n)) and as_python(n) >= 0 for n in pad_to)):
    raise ValueError(f"pad_to={pad_to!r} must be (rows, prompt length), two integers "
                     ">= 0, e.g. pad_to=(8, 64); or None (no padding).")
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  # 0-d arrays (jnp.float32(0.5)) as the numbers they hold: the sampling
  # arguments are static arguments of the compiled programs
  temperature, top_k, top_p, max_new_tokens, seed = map(
      as_python, (temperature, top_k, top_p, max_new_tokens, seed))
  vocab = model.cfg.vocab_size
  prompts = [_token_ids(f"prompt {row}", p, vocab) for row, p in enumerate(prompts)]
  stop_tokens = _stop_list(stop_tokens)
  _token_ids("stop_tokens", stop_tokens, vocab)
  check_sampling(temperature, top_k, top_p, max_new_tokens=max_new_tokens, seed=seed,
                 warn_ignored=True)
  if max_new_tokens == 0:
    return [[] for _ in prompts]
  context, longest_prompt = model.cfg.max_position_embeddings, max(map(len, prompts))
  if longest_prompt + max_new_tokens > context:
    warnings.warn(
        f"{longest_prompt} prompt tokens + up to {max_new_tokens} new ones run past the "
        f"model's context of {context} positions (max_position_embeddings); tokens "
        "beyond it are positions the model was not made for.", PastContextWarning,
        stacklevel=2)
  graphdef, params = nnx.split(model)
  # Any batch on any mesh: the batch is padded to a multiple of the mesh axes
  # `batch` is split over with empty rows (length 0, all padding, done from the
  # start), and the prompts to a multiple of those `length` is split over; the
  # padding is masked out of the MoE layers and the rows dropped from the result.
  batch = len(prompts)
  least_rows, least_length = pad_to or (0, 0)
  rows, longest = _padded(model, max(batch, least_rows),
                          max(least_length, *(len(p) for p in prompts)))
  lengths = np.zeros((rows,), np.int32)
  tokens = np.zeros((rows, longest), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
    lengths[row] = len(p)
  padding = np.arange(rows) >= batch  # [rows]
  sampling = (float(temperature), top_k, top_p)
  mesh = mesh_of(model)
  # Everything runs under the model's own mesh, whatever mesh the caller's
  # context holds (one made there failed to match the parameters).
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    # The cache is made in the decode form and prefilled in it: one copy.
    cache = decode.init_decode_cache(model, rows, longest + max_new_tokens)
    stops = jnp.asarray(decode.stop_ids(stop_tokens))
    key = jax.random.key(seed)
    layers = decode.split(graphdef, params)
    logits, cache = _prefill(graphdef, params, layers, tokens, cache, lengths)
    done = _rows(padding, mesh, model)
    if on_token is None:
      # (a batch split over processes is gathered: every process gets every row)
      out = sharding.to_host(_decode_loop(graphdef, params, layers, cache, logits,
                                          done, key, max_new_tokens, sampling, stops)[0])
    else:
      was_done = padding
      columns = []
      for i in range(max_new_tokens):
        token, logits, cache, done = decode.decode_step(
            graphdef, params, layers, cache, logits, done, key, np.int32(i),
            sampling, stops)
        token_h, done_h = sharding.to_host((token, done))  # one host sync per token
        column = np.where(was_done, -1, token_h)[:batch]  # real rows only
        columns.append(column)
        on_token(column)
        was_done = done_h
        if was_done.all():
          break
      out = np.stack(columns, axis=1)
  return [[int(t) for t in row if t >= 0] for row in out[:batch]]


def _rows(x: np.ndarray, mesh, model: Decoder) -> jax.Array:
  """A [batch] host array placed as the decode program takes it (split like the
  batch)."""
  if mesh is None:
    return jnp.asarray(x)
  spec = sharding.logical_to_spec(("batch",), model.constrain.rules, mesh, x.shape)
  return jax.device_put(x, NamedSharding(mesh, spec))
