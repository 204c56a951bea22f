"""Gradient compression over the replica axis (`optim.compression`): Deep Gradient
Compression and top-k sparsification with error feedback.

A replica is one position on the `data` mesh axis: a full copy of the model,
itself sharded over `fsdp`, `expert` and `tensor`. Each replica computes the
gradient of its share of the batch, keeps per-replica state, and sends only a
fixed number k of (index, value) pairs per tensor; the replicas all-gather
those pairs and scatter their sum into the dense gradient the optimizer applies.
Nothing the size of a gradient crosses `data` (inside a replica, FSDP's
reduce-scatter stays dense).

Following the paper, replica r's share of the step's gradient is G_r = g_r / N
(g_r: the mean gradient over its rows, N replicas), so that sum_r G_r is the
gradient dense data parallelism applies. Per tensor and step (Lin et al., "Deep
Gradient Compression: Reducing the Communication Bandwidth for Distributed
Training", ICLR 2018, arXiv 1712.01887, Algorithm 1 and section 3):

  method=dgc (base optimizer: momentum SGD, `optim.name=sgd`):
    local_clip:          G_r <- G_r * min(1, C N^-1/2 / ||G_r||)  (C: optim.clip_norm;
                         the norm over all of replica r's tensors)
    momentum_correction: U_r <- m U_r + G_r; V_r <- V_r + U_r
                         (Nesterov: V_r <- V_r + m U_r + G_r); the optimizer then
                         applies the exchanged sum without momentum of its own
                         (otherwise V_r <- V_r + G_r and SGD's momentum acts on it)
    select:              the k entries of largest |V_r|; send (index, V_r[index])
    V_r <- V_r with the sent entries zeroed
    momentum_masking:    U_r <- U_r with the sent entries zeroed
  method=topk (any optimizer): V_r <- V_r + G_r (error feedback; without it
    V_r <- G_r), select and zero as above; the optimizer, including its global-norm
    clipping, applies the exchanged sum.

k = max(1, round(density * n)) for a tensor of n entries; a tensor stacked over
layers (`[layers, ...]`) is one tensor per layer. The density warms up
exponentially (`Compression.density_at`), each density being one compiled step.

Selection: exact (`lax.top_k`) by default. `sample_fraction` < 1 estimates the
threshold from a random sample of the tensor, then takes the exact top k of at
most 4k candidates above it (the paper's hierarchical selection, for backends
where a large top-k is slow); tensors too small for a sample to see about 8 of
the top k are selected exactly. On CPU the exact top-k is the faster
(benchmarks/README.md, "Gradient compression").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sharding.report import count

METHODS = ("none", "topk", "dgc")
REPLICA_AXIS = "data"
WARMUP_STAGES = 4     # densities 1/4, 1/16, 1/64, 1/256 (the paper's 75% ... 99.6%)
INDEX_BYTES = 4       # int32 indices
_MIN_SAMPLE_HITS = 8  # a sample must expect this many of the top k
_CANDIDATES = 4       # candidate buffer, in multiples of k


@dataclasses.dataclass(frozen=True)
class Compression:
  """`optim.compression` with the optimizer fields it reads."""
  method: str = "none"
  density: float = 0.001
  warmup_steps: int = 0
  sample_fraction: float = 1.0
  momentum_correction: bool = True
  local_clip: bool = True
  momentum_masking: bool = True
  error_feedback: bool = True
  momentum: float = 0.9      # optim.momentum
  nesterov: bool = False     # optim.nesterov
  clip_norm: float = 0.0     # optim.clip_norm

  @classmethod
  def from_config(cls, optim_cfg) -> "Compression":
    c = optim_cfg.get("compression") or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(c).items() if k in fields}
    return cls(**kw, momentum=float(optim_cfg.momentum),
               nesterov=bool(optim_cfg.nesterov), clip_norm=float(optim_cfg.clip_norm))

  @property
  def enabled(self) -> bool:
    return self.method != "none"

  def describe(self, replicas: int) -> str:
    """One line a run prints at its start: method, replicas, density and its
    warm-up, selection and the DGC/top-k options in force."""
    n = self.warmup_steps
    warmup = (f", warming up over {count(n, 'step')} from 1/4" if n and self.density < 0.25
              else " (no warm-up: the density is at least 1/4)" if n else "")
    select = ("exact top-k" if self.sample_fraction >= 1 else
              f"threshold from a {self.sample_fraction:g} sample")
    if self.method == "dgc":
      # momentum masking acts on the per-replica momentum correction keeps
      options = [name.replace("_", " ") for name in
                 ("momentum_correction", "local_clip", "momentum_masking")
                 if getattr(self, name) and (name != "momentum_masking"
                                             or self.momentum_correction)]
    else:
      options = ["error feedback"] if self.error_feedback else []
    return (f"compression: {self.method} over mesh.data ({replicas} replicas), density "
            f"{self.density:g} of each tensor's entries{warmup}; {select}"
            + "".join(f"; {o}" for o in options))

  @property
  def local_momentum(self) -> bool:
    """DGC's momentum correction: momentum runs per replica, before selection."""
    return self.method == "dgc" and self.momentum_correction

  def density_at(self, step: int) -> float:
    """The density at optimizer step `step`: during `warmup_steps`, four equal
    stages at 1/4, 1/16, 1/64 and 1/256 of the entries (the paper's 75%, 93.75%,
    98.4%, 99.6% sparsity), never below `density`; then `density`. A warm-up of
    fewer than 4 steps takes the first stages, a step each (none is skipped)."""
    if step >= self.warmup_steps:
      return self.density
    stages = min(WARMUP_STAGES, self.warmup_steps)
    stage = step * stages // self.warmup_steps
    return max(self.density, 0.25 ** (stage + 1))

  def densities(self) -> list[float]:
    """Every density a run uses, in order (one compiled step each)."""
    out = []
    for d in [self.density_at(s) for s in range(self.warmup_steps)] + [self.density]:
      if d not in out:
        out.append(d)
    return out


def replica_rules(rules, axis: str = REPLICA_AXIS):
  """The logical rules without `axis` (default `data`): the mesh one replica's
  model sees."""
  return tuple((name, tuple(a for a in axes if a != axis)) for name, axes in rules)


def params_split_over_replicas(rules, logical, axis: str = REPLICA_AXIS
                               ) -> list[str]:
  """Logical parameter axes the rules split over `axis` (sorted); a replica holds
  the whole model only when there are none, and the batch's first split is over
  `axis` (`replica_view_problem`)."""
  table = dict(rules)
  used = {name for axes in jax.tree.leaves(logical, is_leaf=lambda a: isinstance(a, tuple))
          for name in axes}
  return sorted(n for n in used if axis in table.get(n, ()))


def replica_view_problem(rules, logical, axis: str = REPLICA_AXIS,
                         sizes=None) -> str | None:
  """Why a replica of mesh axis `axis` (default `data`) cannot compute its own
  gradient (None when it can): the batch must be split over `axis` before any
  other axis (of size > 1 in `sizes`, when given), and no parameter over `axis`."""
  batch = [a for a in dict(rules).get("batch", ())
           if sizes is None or sizes[a] > 1 or a == axis]
  if batch[:1] != [axis]:
    return "batch"
  split = params_split_over_replicas(rules, logical, axis)
  return split[0] if split else None


def groups(abstract_params, logical) -> Any:
  """Per leaf, how many tensors it holds: its leading dimension when that is the
  layer stack (`layers`), else 1."""
  return jax.tree.map(lambda x, ax: x.shape[0] if ax and ax[0] == "layers" else 1,
                      abstract_params, logical, is_leaf=lambda a: isinstance(a, tuple))


def k_for(n: int, density: float) -> int:
  """Entries sent per tensor of n entries."""
  return max(1, min(n, int(round(density * n))))


def traffic(abstract_params, group_tree, density: float) -> dict[str, float]:
  """Per replica and step: `bytes_sent` (its (index, value) pairs), `dense_bytes`
  (the gradient it would send uncompressed) and `compression_ratio`."""
  sent = dense = 0.0
  for x, g in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(group_tree)):
    n = math.prod(x.shape) // g
    item = np.dtype(x.dtype).itemsize
    sent += g * k_for(n, density) * (INDEX_BYTES + item)
    dense += g * n * item
  return {"density": density, "bytes_sent": sent, "dense_bytes": dense,
          "compression_ratio": dense / sent}


# --- per-replica state ----------------------------------------------------------

def state_names(c: Compression) -> tuple[str, ...]:
  """The per-replica buffers: the residual (DGC's accumulation V) and, with
  momentum correction, the velocity U."""
  return ("residual", "velocity") if c.local_momentum else ("residual",)


def init_state(c: Compression, params, replicas: int) -> dict:
  """Zeros `[replicas, *param.shape]` per buffer (`state_names`)."""
  zeros = lambda: jax.tree.map(  # noqa: E731
      lambda x: jnp.zeros((replicas, *x.shape), x.dtype), params)
  return {name: zeros() for name in state_names(c)}


def state_specs(c: Compression, param_specs) -> dict:
  """PartitionSpec per state leaf: `data` on the replica dimension, then the
  parameter's own spec."""
  spec = lambda s: P(REPLICA_AXIS, *s)  # noqa: E731
  return {name: jax.tree.map(spec, param_specs, is_leaf=lambda s: isinstance(s, P))
          for name in state_names(c)}


def regroup(state: dict, replicas: int) -> dict:
  """State saved with another replica count -> `replicas` replicas, keeping each
  buffer's total over replicas (the gradient mass not yet sent): every replica
  starts from the old total / `replicas` (NumPy arrays in, NumPy arrays out)."""
  return jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x).sum(0) / replicas,
                                (replicas, *x.shape[1:])).astype(x.dtype), state)


# --- selection --------------------------------------------------------------------

def select(x: jax.Array, k: int, sample_fraction: float, key: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
  """(indices [k] int32, values [k]) of the k entries of x [n] of largest magnitude.

  Exact (`lax.top_k`) unless a sample of `sample_fraction * n` entries expects at
  least 8 of the top k: then the threshold is the sample's 2k-quantile (about 2k
  entries pass it), and the top k of the first 4k entries above it are taken.
  Slots not filled (fewer than k candidates) hold index n and value 0.
  """
  n = x.shape[0]
  if k >= n:
    return jnp.arange(n, dtype=jnp.int32), x
  mag = jnp.abs(x)
  s = min(n, int(math.ceil(sample_fraction * n)))
  if s >= n or k * s / n < _MIN_SAMPLE_HITS:
    _, idx = jax.lax.top_k(mag, k)
    return idx.astype(jnp.int32), x[idx]
  sample = mag[jax.random.randint(key, (s,), 0, n)]
  rank = min(s, int(math.ceil(2 * k * s / n)))
  threshold = jax.lax.top_k(sample, rank)[0][-1]
  cand = jnp.nonzero(mag >= threshold, size=_CANDIDATES * k, fill_value=n)[0]
  cmag = jnp.where(cand < n, mag[jnp.minimum(cand, n - 1)], -1.0)
  _, j = jax.lax.top_k(cmag, k)
  idx = cand[j].astype(jnp.int32)
  return idx, jnp.where(idx < n, x[jnp.minimum(idx, n - 1)], 0)


def _select_groups(x: jax.Array, g: int, k: int, sample_fraction: float, key
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [g * n ...] as g tensors -> (indices [g, k], values [g, k], the mask of sent
  entries in x's shape)."""
  # [groups, n], whole on every device of the replica: selection is per tensor,
  # and XLA partitions top_k and nonzero over a sharded operand very slowly.
  flat = jax.lax.with_sharding_constraint(x.reshape(g, -1), P())
  keys = jax.random.split(key, g)
  idx, val = jax.vmap(lambda row, kk: select(row, k, sample_fraction, kk))(flat, keys)
  sent = jax.vmap(
      lambda i: jnp.zeros(flat.shape[1], bool).at[i].set(True, mode="drop"))(idx)
  return idx, val, sent.reshape(x.shape)


# --- one replica's step, the exchange ----------------------------------------------

def replica_step(c: Compression, grads, state: dict, density: float, key,
                 group_tree, replicas: int):
  """One replica: its mean gradient `grads` and state (no replica dimension) ->
  (sent: per leaf (indices [groups, k], values [groups, k]), new state)."""
  G = jax.tree.map(lambda g: g / replicas, grads)
  if c.method == "dgc" and c.local_clip and c.clip_norm:
    limit = c.clip_norm / math.sqrt(replicas)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(G)))
    G = jax.tree.map(lambda g: g * jnp.minimum(1.0, limit / norm), G)
  new = dict(state)
  if c.local_momentum:
    m = c.momentum
    new["velocity"] = U = jax.tree.map(lambda u, g: m * u + g, state["velocity"], G)
    step = (jax.tree.map(lambda u, g: m * u + g, U, G) if c.nesterov else U)
    V = jax.tree.map(jnp.add, state["residual"], step)
  elif c.method == "dgc" or c.error_feedback:
    V = jax.tree.map(jnp.add, state["residual"], G)
  else:
    V = G

  leaves, treedef = jax.tree.flatten(V)
  out = [_select_groups(v, g, k_for(v.size // g, density), c.sample_fraction,
                        jax.random.fold_in(key, i))
         for i, (v, g) in enumerate(zip(leaves, jax.tree.leaves(group_tree)))]
  sent = treedef.unflatten([(i, v) for i, v, _ in out])
  mask = treedef.unflatten([m for _, _, m in out])
  zero_sent = lambda x, m: jnp.where(m, 0, x)  # noqa: E731
  new["residual"] = jax.tree.map(zero_sent, V, mask)
  if c.local_momentum and c.momentum_masking:
    new["velocity"] = jax.tree.map(zero_sent, new["velocity"], mask)
  return sent, new


def densify(gathered, like) -> Any:
  """The sum of every replica's sent values, scattered into zeros shaped like
  `like`'s leaves (indices n, unfilled slots, are dropped)."""
  def one(pair, x):
    idx, val = pair  # [replicas, groups, k]
    r, g, k = idx.shape
    idx = idx.transpose(1, 0, 2).reshape(g, r * k)
    val = val.transpose(1, 0, 2).reshape(g, r * k)
    rows = jnp.arange(g)[:, None]
    dense = jnp.zeros((g, x.size // g), val.dtype).at[rows, idx].add(val, mode="drop")
    return dense.reshape(x.shape)
  return jax.tree.map(one, gathered, like, is_leaf=lambda t: isinstance(t, tuple))


def compressed_gradient(c: Compression, grads, state: dict, density: float, key,
                        group_tree, mesh=None):
  """Per-replica gradients (leading replica dimension, sharded over `data`) ->
  (the exchanged dense gradient, new state, what each replica sent).

  Runs inside a `shard_map` manual over `data` alone (the other axes stay
  automatic, so a replica's tensors keep their FSDP / tensor sharding): each
  replica selects locally, then the replicas all-gather their (indices, values)
  -- the only communication over `data` for gradients -- and scatter the sum.
  `key` seeds the sampled selection; each replica and tensor folds in its index.
  (check_vma=False: jax types all_gather's result as varying over `data`, though
  every replica holds the same.)
  """
  replicas = jax.tree.leaves(grads)[0].shape[0]

  def local(grads, state):
    r = jax.lax.axis_index(REPLICA_AXIS)
    squeeze = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
    sent, state = replica_step(c, squeeze(grads), squeeze(state), density,
                               jax.random.fold_in(key, r), group_tree, replicas)
    gathered = jax.tree.map(
        lambda x: jax.lax.all_gather(x, REPLICA_AXIS, axis=0), sent)
    dense = densify(gathered, squeeze(grads))
    expand = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
    return dense, expand(state), expand(sent)

  return jax.shard_map(local, mesh=mesh, in_specs=P(REPLICA_AXIS),
                       out_specs=(P(), P(REPLICA_AXIS), P(REPLICA_AXIS)),
                       axis_names={REPLICA_AXIS}, check_vma=False)(grads, state)
