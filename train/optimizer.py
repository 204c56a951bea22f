"""AdamW with linear warmup, cosine decay, global-norm clipping and a decay mask."""

from __future__ import annotations

import re

import jax
import optax

import sharding


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay over `optim.decay_steps` (default: the run's
  steps). Setting it lets a run be extended or stopped early on the same curve."""
  o = optim_cfg
  total_steps = o.decay_steps or total_steps
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=o.learning_rate * o.min_lr_ratio)


def decay_mask(params, no_decay: str):
  """True for parameters that get weight decay: those whose '/'-joined path matches
  none of the comma-separated regexes in `no_decay` (default: norm scales)."""
  patterns = [re.compile(p) for p in no_decay.split(",") if p.strip()]

  def keep(path, _):
    name = sharding.path_name(path)
    return not any(p.search(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  o = optim_cfg
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
      optax.adamw(schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay,
                  mask=lambda p: decay_mask(p, o.no_decay)),
  )
