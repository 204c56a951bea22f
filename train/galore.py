"""GaLore per layer, with an exact (SVD) or randomized projector refresh.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507 (2024), Algorithm 2. For each matrix G_t in
R^{m x n} (m >= n: project the rows with P in R^{m x r}; else the columns with
P in R^{n x r}; shown for m >= n):

  every T steps (t % T == 0):  P_t = top-r left singular vectors of G_t   [m, r]
  R_t = P_t^T G_t                                low-rank gradient        [r, n]
  N_t = Adam(R_t)                                moments kept at [r, n]
  G~_t = alpha P_t N_t                           back to [m, n]

The state is optax.contrib's `GaLoreState` (count, base_optimizer_state,
projector) per leaf, and the update is optax.contrib.scale_by_galore's, except
for how P_t is found (`projector`):

- `"svd"`: `jnp.linalg.svd`, as the paper and optax do. Exact, but on TPU the
  SVD (QDWH + a divide-and-conquer eigh) compiles slowly in the matrix's smaller
  side: 4.7 s for one [2, 256, 512] SVD, 48 s at 512 x 512, 212 s at
  1024 x 1024, more than 300 s at 2048 x 2048 (v5p, libtpu 0.0.42.1, this
  2-core VM), so a 1B model's step did not compile in 21 min.
- `"randomized"` (default): randomized subspace iteration, Halko, Martinsson
  and Tropp, "Finding structure with randomness", SIAM Review 53(2), 2011,
  Algorithms 4.4 and 5.1: with k = r + `OVERSAMPLE` Gaussian probes Omega [n, k],
  Q = qr(G Omega), then `POWER_ITERATIONS` times Q = qr(G qr(G^T Q)); the SVD of
  the small B = Q^T G [k, n] gives P = Q U_B[:, :r]. Exact when rank(G) <= k
  (every test matrix here); the SVDs it compiles are k x k.

Either way each column of P is signed so its largest-magnitude entry is
positive: the update is sign-invariant within a refresh, and a fixed sign keeps
the moments (which GaLore carries across refreshes) in a reproducible frame.

Each stacked `[layers, (experts,) in, out]` tensor has one projector per layer
(its batch axes, `train.matrices.dims`); the step count is shared, so the
refresh is one `lax.cond` on it inside the jitted step (no recompilation). The
refresh is split over the mesh (`train.matrix_split.map_split`): each device
finds the projectors of its share of the matrices, whole, where every data
replica found every one (llama_tiny's 28 matrices at rank 128 on 8 CPU devices
sharing 2 cores, data=8: 1.33 s replicated, 0.22 s split; benchmarks/README.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from optax.contrib import GaLoreState

import sharding
from train import matrices, matrix_split

PROJECTORS = ("randomized", "svd")
OVERSAMPLE = 8         # Halko et al.'s p: extra probes beyond the rank
POWER_ITERATIONS = 2   # Halko et al.'s q: sharpens a slowly decaying spectrum


def _signed(p: jax.Array) -> jax.Array:
  """Columns of p [d, r] flipped so each one's largest-magnitude entry is > 0."""
  big = jnp.take_along_axis(p, jnp.argmax(jnp.abs(p), axis=0)[None], axis=0)
  return p * jnp.where(big < 0, -1.0, 1.0).astype(p.dtype)


def _svd_left(g: jax.Array, r: int) -> jax.Array:
  """Top-r left singular vectors of g [m, n]: [m, r]."""
  return jnp.linalg.svd(g, full_matrices=False)[0][:, :r]


def _randomized_left(g: jax.Array, r: int, key: jax.Array) -> jax.Array:
  """Top-r left singular vectors of g [m, n] by randomized subspace iteration
  (module docstring): [m, r]."""
  k = min(r + OVERSAMPLE, *g.shape)
  orth = lambda y: jnp.linalg.qr(y)[0]  # noqa: E731
  q = orth(g @ jax.random.normal(key, (g.shape[1], k), g.dtype))  # [m, k]
  for _ in range(POWER_ITERATIONS):
    q = orth(g @ orth(g.T @ q))
  return q @ jnp.linalg.svd(q.T @ g, full_matrices=False)[0][:, :r]


def _leaf(d: matrices.Dims, shape: tuple[int, ...], rank: int, scale: float,
          base: optax.GradientTransformation, projector: str):
  """(init, project, update) of GaLore for one matrix of `shape` with no batch
  axes, its reduction and output axes as `d` says: project(g, count) finds a
  fresh P; update(g, state, p) applies this step's P."""
  perm = d.reduction + d.output
  m, n = matrices.matrix_shape(shape, d)
  left, r = m >= n, min(rank, m, n)
  inverse = tuple(perm.index(a) for a in range(len(shape)))

  def to_2d(x):    # [m, n], rows the reduction (input) axes
    return x.transpose(perm).reshape(m, n)

  def from_2d(x):
    return x.reshape([shape[a] for a in perm]).transpose(inverse)

  def low_rank(p, g2):  # [r, n] or [m, r]
    return p.T @ g2 if left else g2 @ p

  def project(g, count):  # a fresh P for g [shape]: [m, r] or [n, r]
    g2 = to_2d(g)
    g32 = (g2 if left else g2.T).astype(jnp.float32)  # the side P spans first
    if projector == "svd":
      p = _svd_left(g32, r)
    else:
      p = _randomized_left(g32, r, jax.random.fold_in(jax.random.key(0), count))
    return _signed(p).astype(g2.dtype)

  def init(x):
    p = jnp.zeros((m if left else n, r), x.dtype)
    return GaLoreState(count=jnp.zeros([], jnp.int32),
                       base_optimizer_state=base.init(low_rank(p, to_2d(x))),
                       projector=p)

  def update(g, state, p):  # p: this step's projector (fresh or state's)
    g2 = to_2d(g)
    n_t, base_state = base.update(low_rank(p, g2), state.base_optimizer_state)
    full = p @ n_t if left else n_t @ p.T
    return (from_2d(scale * full).astype(g.dtype),
            GaLoreState(optax.safe_increment(state.count), base_state, p))

  return init, project, update


def _batched(d: matrices.Dims, shape, rank: int, gap: int, scale: float,
             base: optax.GradientTransformation, projector: str) -> tuple:
  """(init, update) of `_leaf` over d.batch: one projector per layer, one
  shared count, so the refresh is a single `lax.cond` on it.

  The refresh runs each device's share of the layers (`matrix_split.map_split`)
  one after another (`lax.map`), not vmapped: a batched QR or SVD inside a
  conditional deadlocked XLA:CPU's thread pool when two devices shared two cores
  (train.galore tests); the refresh is one step in `gap`, so the loop costs
  little anywhere.
  """
  nb = len(d.batch)
  unbatched = matrices.Dims((), tuple(a - nb for a in d.reduction),
                            tuple(a - nb for a in d.output))
  init, project, apply = _leaf(unbatched, shape[nb:], rank, scale, base,
                               projector)
  axes = GaLoreState(count=None, base_optimizer_state=0, projector=0)
  for _ in range(nb):
    init = jax.vmap(init, out_axes=axes)
    apply = jax.vmap(apply, in_axes=(0, axes, 0), out_axes=(0, axes))

  def refresh(g, count):  # g [*batch, *matrix] -> P [*batch, d, r]
    flat = g.reshape((-1, *g.shape[nb:]))  # [matrices, *matrix]
    p = matrix_split.map_split(
        lambda share: jax.lax.map(lambda a: project(a, count), share), flat)
    return p.reshape((*g.shape[:nb], *p.shape[1:]))

  def update(g, state):
    p = jax.lax.cond(state.count % gap == 0,
                     lambda: refresh(g, state.count), lambda: state.projector)
    return apply(g, state, p)

  return init, update


def scale_by_galore_per_layer(rank: int, update_proj_gap: int, scale: float,
                              base_optimizer: optax.GradientTransformation,
                              projector: str = "randomized"
                              ) -> optax.GradientTransformation:
  """GaLore (module docstring) on every leaf; state: a GaLoreState per leaf.

  rank: r (clipped to each matrix's smaller side); update_proj_gap: T, steps
  between refreshes; scale: alpha; projector: "randomized" or "svd".
  """
  if projector not in PROJECTORS:
    raise ValueError(f"projector {projector!r} is not one of {PROJECTORS}")

  def fns(path, x):
    d = matrices.dims(sharding.path_name(path), x.ndim)
    return _batched(d, x.shape, rank, update_proj_gap, scale, base_optimizer,
                    projector)

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
