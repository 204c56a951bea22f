"""Muon: momentum orthogonalised by Newton-Schulz, one matrix at a time.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024).
For a weight W with gradient G_t, at step t (count from 1):

  M_t = beta M_{t-1} + (1 - beta) G_t
  M^_t = M_t / (1 - beta^t)                                     (no Nesterov)
  M^_t = beta M_t / (1 - beta^(t+1)) + (1 - beta) G_t / (1 - beta^t)  (Nesterov)
  O_t = NS5(M^_t)

This is optax.contrib.scale_by_muon's update (its state, `MuonState`, too, so
checkpoints move between them) with its Newton-Schulz step replaced by
`train.newton_schulz.orthogonalize`, which splits the matrices over the mesh
instead of running every one on every device. Chain it with optax.contrib's
`scale_by_shape`, the decay and the learning rate, as `train.optimizer` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonState

import sharding
from train import matrices
from train.newton_schulz import NS_COEFFS, orthogonalize


def scale_by_muon(beta: float = 0.95, ns_steps: int = 5, nesterov: bool = True,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """O_t of the module docstring on every leaf, each a stack of matrices grouped
  by `train.matrices.dims` (its path names the grouping)."""

  def init(params):
    return MuonState(count=jnp.zeros([], jnp.int32),
                     mu=optax.tree.zeros_like(params),
                     ns_coeffs=jnp.asarray(NS_COEFFS))

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(
          lambda m, g: beta * m + (1 - beta) * g,
          optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
          optax.tree.bias_correction(updates, beta, count))
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count)
    out = jax.tree_util.tree_map_with_path(
        lambda path, m: orthogonalize(m, matrices.dims(sharding.path_name(path), m.ndim),
                                      ns_steps, state.ns_coeffs, eps), mu_hat)
    return out, MuonState(count=count, mu=mu, ns_coeffs=state.ns_coeffs)

  return optax.GradientTransformation(init, update)
