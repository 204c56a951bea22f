"""GaLore per layer: `optax.contrib.scale_by_galore`, vmapped over stacked layers.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507 (2024), Algorithm 2. For each matrix G_t in
R^{m x n} (m >= n: project the rows, else the columns; shown for m < n):

  every T steps (t % T == 0):  U, S, V^T = SVD(G_t);  P_t = V[:, :r]    [n, r]
  R_t = G_t P_t                                  low-rank gradient      [m, r]
  N_t = Adam(R_t)                                moments kept at [m, r]
  G~_t = alpha N_t P_t^T                         back to [m, n]

optax's GaLore takes whole tensors as one matrix (it has no batch axes), so each
stacked `[layers, (experts,) in, out]` tensor gets its own scale_by_galore vmapped
over the batch axes (`train.matrices.dims`): one projector per layer. The step
count stays unbatched, so the refresh is a `lax.cond` on it inside the jitted step
(one SVD every T steps, no recompilation).
"""

from __future__ import annotations

import jax
import optax
from optax.contrib import GaLoreDimensionNumbers, GaLoreState, scale_by_galore

import sharding
from train import matrices


def _one(d: matrices.Dims, rank: int, gap: int, scale: float,
         base: optax.GradientTransformation) -> tuple:
  """(init, update) of scale_by_galore for one leaf, vmapped over d.batch."""
  nb = len(d.batch)
  tx = scale_by_galore(rank=rank, update_proj_gap=gap, scale=scale,
                       base_optimizer=base,
                       weight_dimension_numbers=GaLoreDimensionNumbers(
                           tuple(a - nb for a in d.reduction),
                           tuple(a - nb for a in d.output)))
  axes = GaLoreState(count=None, base_optimizer_state=0, projector=0)
  init, update = tx.init, lambda g, s: tx.update(g, s)
  for _ in range(nb):
    init = jax.vmap(init, out_axes=axes)
    update = jax.vmap(update, in_axes=(0, axes), out_axes=(0, axes))
  return init, update


def scale_by_galore_per_layer(rank: int, update_proj_gap: int, scale: float,
                              base_optimizer: optax.GradientTransformation
                              ) -> optax.GradientTransformation:
  """GaLore (module docstring) on every leaf; state: a GaLoreState per leaf."""

  def fns(path, x, **_):
    d = matrices.dims(sharding.path_name(path), x.ndim)
    return _one(d, rank, update_proj_gap, scale, base_optimizer)

  def init(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: fns(p, x)[0](x), params)

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    states = treedef.flatten_up_to(state)
    out = [fns(p, g)[1](g, s) for (p, g), s in zip(leaves, states)]
    return (treedef.unflatten([u for u, _ in out]),
            treedef.unflatten([s for _, s in out]))

  return optax.GradientTransformation(init, update)
