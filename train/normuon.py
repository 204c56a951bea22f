"""NorMuon: Muon's orthogonalised momentum, normalised per output neuron.

Li, Liu, Liang, Chen, Zhao, "NorMuon: Making Muon more efficient and scalable",
arXiv 2510.05491 (2025), Algorithm 1. For a weight W in R^{m x n} whose m rows are
the output neurons, at step t with gradient G_t:

  (1) M_t  = beta1 M_{t-1} + (1 - beta1) G_t                first moment
  (2) O_t  = NS5(M_t)                                       Muon's Newton-Schulz
  (3) v_t  = beta2 v_{t-1} + (1 - beta2) mean_cols(O_t * O_t)   v_t in R^m
  (4) O^_t = O_t / (sqrt(V_t) + eps)        V_t: v_t broadcast along each row
  (5) eta^ = 0.2 eta sqrt(m n) / ||O^_t||_F                 RMS matched to Adam
  (6) W_t  = W_{t-1} - eta lambda W_{t-1} - eta^ O^_t

with M_0 = 0, v_0 = 0 and no bias correction. rung stores weights as [.., in, out]
(`x @ W`), so an output neuron is an index over the output axes and the paper's
mean over columns is a mean over the reduction (input) axes; m n = in * out of the
matrix (per layer / expert: `train.matrices` gives the grouping). `scale_by_normuon`
returns 0.2 sqrt(m n) O^_t / ||O^_t||_F, steps (1)-(5) without eta; chain it with
`optax.add_decayed_weights` and `optax.scale_by_learning_rate` for (6), as
`train.optimizer` does.

Memory: M_t is parameter-shaped; v_t is the parameter's shape with 1 on the
reduction axes (one number per output neuron and layer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sharding
from train import matrices
from train.newton_schulz import orthogonalize


class NorMuonState(NamedTuple):
  mu: Any  # M_t, parameter-shaped
  nu: Any  # v_t, parameter shape with 1 on the reduction axes


def _nu_shape(shape, d: matrices.Dims):
  return tuple(1 if a in d.reduction else n for a, n in enumerate(shape))


def scale_by_normuon(b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8,
                     ns_steps: int = 5, rms: float = 0.2,
                     ) -> optax.GradientTransformation:
  """Steps (1)-(5) of NorMuon (module docstring) on every leaf, each a stack of
  matrices grouped by `train.matrices.dims`."""

  def init(params):
    def nu(path, p):
      d = matrices.dims(sharding.path_name(path), p.ndim)
      return jnp.zeros(_nu_shape(p.shape, d), p.dtype)
    return NorMuonState(jax.tree.map(jnp.zeros_like, params),
                        jax.tree_util.tree_map_with_path(nu, params))

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    out, new_mu, new_nu = [], [], []
    for (path, g), mu, nu in zip(leaves, mus, nus):
      d = matrices.dims(sharding.path_name(path), g.ndim)
      fan_in, fan_out = matrices.matrix_shape(g.shape, d)
      mu = b1 * mu + (1 - b1) * g                                   # (1)
      o = orthogonalize(mu, d, ns_steps)                            # (2)
      nu = b2 * nu + (1 - b2) * jnp.mean(o * o, axis=d.reduction,
                                         keepdims=True)             # (3)
      o_hat = o / (jnp.sqrt(nu) + eps)                              # (4)
      norm = jnp.sqrt(jnp.sum(o_hat * o_hat, axis=d.reduction + d.output,
                              keepdims=True))  # ||O^||_F per matrix: [batch.., 1, 1]
      scale = rms * (fan_in * fan_out) ** 0.5
      out.append((scale * o_hat / (norm + 1e-30)).astype(g.dtype))  # (5) / eta
      new_mu.append(mu)
      new_nu.append(nu)
    return (treedef.unflatten(out),
            NorMuonState(treedef.unflatten(new_mu), treedef.unflatten(new_nu)))

  return optax.GradientTransformation(init, update)
