"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus).

The conventions follow transformers' logits warpers: temperature scales the logits
first, then top-k keeps the k likeliest tokens (`top_k` of 0, None or at least the
vocabulary means no truncation), then top-p keeps the smallest set of likeliest
tokens whose probability reaches `top_p` (Holtzman et al., 2020, "The Curious Case of
Neural Text Degeneration"). The likeliest token is always kept, so `top_p=0` and
`top_k=1` are greedy.
"""

from __future__ import annotations

import math
import numbers
import warnings

import jax
import jax.numpy as jnp


class SamplingArgumentError(ValueError):
  """A sampling argument out of its range; `argument` names it (the CLI flag has the
  same name)."""

  def __init__(self, argument: str, message: str):
    self.argument = argument
    super().__init__(message)


SEEDS = 2 ** 32  # JAX's PRNG keys hold 32-bit seeds: seed and seed + 2**32 collide


# max_new_tokens / seed not given to `check_sampling` (None is a value, refused)
_UNCHECKED = object()


def check_sampling(temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None,
                   max_new_tokens: int | None = _UNCHECKED, *,
                   seed: int | None = _UNCHECKED, warn_ignored: bool = False) -> None:
  """Raises SamplingArgumentError (a ValueError) naming the first bad argument:
  temperature must be a finite number >= 0, top_k an integer >= 0 (or None),
  top_p a number in [0, 1] (or None), max_new_tokens an integer >= 0 and seed
  an integer in [0, 2**32) (each checked only when given; None is refused).
  `warn_ignored` (what `generate` passes): a UserWarning when top_k or top_p
  would truncate but temperature 0 makes them moot. 0-d NumPy or JAX arrays
  count as the numbers they hold (`as_python`)."""
  temperature, top_k, top_p, max_new_tokens, seed = map(
      as_python, (temperature, top_k, top_p, max_new_tokens, seed))
  if max_new_tokens is not _UNCHECKED and not _is_count(max_new_tokens):
    raise SamplingArgumentError(
        "max_new_tokens", f"max_new_tokens={max_new_tokens!r} must be an integer "
        ">= 0 (0 returns no new tokens).")
  if seed is not _UNCHECKED and not (_is_count(seed) and seed < SEEDS):
    raise SamplingArgumentError(
        "seed", f"seed={seed!r} must be an integer in [0, 2**32): JAX's random keys "
        "hold 32 bits, so a larger seed would repeat a smaller one's samples.")
  if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
    raise SamplingArgumentError(
        "temperature", f"temperature={temperature!r} must be a finite number >= 0 "
        "(0 is greedy).")
  if top_k is not None and not _is_count(top_k):
    raise SamplingArgumentError(
        "top_k", f"top_k={top_k!r} must be an integer >= 0 (0 or None: no "
        "truncation; 1: greedy).")
  if top_p is not None and (not _is_number(top_p) or not 0.0 <= top_p <= 1.0):
    raise SamplingArgumentError(
        "top_p", f"top_p={top_p!r} must be a number in [0, 1] (1 or None: no "
        "truncation; 0: greedy).")
  ignored = [f"{name}={v}" for name, v, off in (("top_k", top_k, (None, 0)),
                                                 ("top_p", top_p, (None, 1, 1.0)))
             if v not in off]
  if warn_ignored and temperature == 0 and ignored:
    warnings.warn(f"{' and '.join(ignored)} has no effect at temperature 0, which "
                  "is greedy; pass a temperature > 0 to sample.", stacklevel=3)


def as_python(x):
  """A 0-d NumPy or JAX array (`jnp.float32(0.5)`) as the Python number it
  holds; anything else as it is."""
  return x.item() if getattr(x, "shape", None) == () and hasattr(x, "item") else x


def _is_count(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_greedy(temperature: float = 0.0, top_k: int | None = None,
              top_p: float | None = None) -> bool:
  """Whether these settings always pick the argmax."""
  return temperature == 0 or top_k == 1 or top_p == 0


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """logits: [batch, vocab] -> token ids [batch] (int32).

  temperature: >= 0; 0 is greedy (argmax). top_k: keep the k likeliest tokens; 0,
  None or >= vocab keeps all. top_p: keep the smallest set of likeliest tokens whose
  probability mass reaches top_p, in [0, 1]; the likeliest token is always kept.
  Raises SamplingArgumentError (a ValueError) naming a bad argument. A token whose
  logit is -inf is never sampled unless every logit of its row is.
  """
  check_sampling(temperature, top_k, top_p)
  logits = logits.astype(jnp.float32)
  if is_greedy(temperature, top_k, top_p):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  vocab = logits.shape[-1]
  # Shift so the best logit is 0 before scaling: a tiny temperature sends the others
  # to -inf instead of sending several to +inf.
  best = jnp.max(logits, axis=-1, keepdims=True)  # [batch, 1]
  logits = (logits - jnp.where(jnp.isfinite(best), best, 0.0)) / temperature
  if top_k and top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)  # [batch, vocab], likeliest first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly likelier tokens
    drop = (before >= top_p) & (jnp.arange(vocab) > 0)  # the likeliest always stays
    sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
