"""DiLoCo and Streaming DiLoCo over the `diloco` mesh axis (config group `diloco`).

R replicas (positions on `diloco`, each a whole model sharded over the inner axes)
take inner optimizer steps on their own rows of the batch with no communication
over `diloco`. Every H steps a replica's outer gradient -- the outer (global)
parameters minus its own -- is averaged over the replicas and applied to the
outer parameters with an outer optimizer, SGD with Nesterov momentum; the
replicas then continue from the new outer parameters.

Streaming DiLoCo splits the parameters into F fragments of strided layers
(fragment p: layers p, p+F, p+2F, ...; the embedding, final norm and LM head
join fragment 0) and synchronises fragment p at steps t with t = p H/F (mod H),
so the peak bandwidth falls F-fold. With overlap tau > 0, the exchange started
at step t is applied at step t + tau (the replicas keep training meanwhile) and
merged with the local fragment by a mixing factor alpha. Outer gradients cross
`diloco` in float32, bfloat16 or E3M0 (4 bits), reduced in float32.

Per fragment p, at its sync step t (Douillard et al., "DiLoCo: Distributed
Low-Communication Training of Language Models", arXiv 2311.08105, Algorithm 1;
Douillard et al., "Streaming DiLoCo with overlapping communication", arXiv
2501.18512, Algorithm 1 and section 2):

  Delta_r     = theta_p - theta_{r,p}(t)              outer gradient of replica r
  Delta       = mean_r Q(Delta_r)                     (Q: the transport, below)
  m_p        <- mu m_p + Delta                         outer momentum
  theta_p    <- theta_p - lr (Delta + mu m_p)          (Nesterov; else lr m_p)
  theta_{r,p} <- theta_p                               tau = 0, at step t
  theta_{r,p} <- alpha theta_{r,p}(t + tau) + (1 - alpha) theta_p   tau > 0

Transport (`outer_dtype`): float32 is one all-reduce of the fragment. bfloat16
and e3m0 reduce in float32 without ever sending float32: each replica sends
1/R of every tensor's codes to each other replica (all-to-all), each replica
sums the R chunks it owns in float32, re-encodes the mean and all-gathers it
(a reduce-scatter + all-gather, each in the configured dtype). So Q(x) above is
Q2(mean_r Q1(x_r)): encoded twice, like a ring all-reduce in that dtype.

E3M0: a sign and 3 exponent bits, two values per byte; magnitudes
{0, 2^-6, ..., 2^-1, 1} times a per-tensor scale, the tensor's largest
magnitude (a per-layer scale for a stacked weight; for the second encoding the
largest magnitude of the mean, one max-reduce of a scalar per tensor); each
value rounds to the nearest magnitude.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from sharding.report import count

REPLICA_AXIS = "diloco"
OUTER_DTYPES = ("float32", "bfloat16", "e3m0")
E3M0_MAX_EXPONENT = 6  # nonzero magnitudes 2^-6 ... 2^0, codes 1 ... 7


@dataclasses.dataclass(frozen=True)
class DiLoCo:
  """The `diloco` config group and the replica count (`mesh.diloco`)."""
  replicas: int = 1
  sync_every: int = 100
  outer_lr: float = 0.7
  outer_momentum: float = 0.9
  nesterov: bool = True
  fragments: int = 1
  overlap_steps: int = 0
  alpha: float = 0.5
  outer_dtype: str = "float32"

  @classmethod
  def from_config(cls, config, replicas: int) -> "DiLoCo":
    c = config.get("diloco") or {}
    fields = {f.name for f in dataclasses.fields(cls)} - {"replicas"}
    return cls(replicas=int(replicas), **{k: v for k, v in dict(c).items()
                                          if k in fields})

  @property
  def enabled(self) -> bool:
    return self.replicas > 1

  def describe(self) -> str:
    """One line a run prints at its start: replicas, H, outer optimizer,
    fragments, overlap and the outer gradients' dtype."""
    h, f = self.sync_every, self.fragments
    outer = (f"outer SGD (lr {self.outer_lr:g}, momentum {self.outer_momentum:g}"
             f"{', nesterov' if self.nesterov and self.outer_momentum else ''})")
    every = f"{h / f:g} step{'' if h == f else 's'}"
    fragments = (f"{f} fragments (Streaming DiLoCo), one synchronised every {every} on "
                 "average" if f > 1 else "1 fragment (DiLoCo)")
    tau = self.overlap_steps
    overlap = (f"exchange overlaps tau={count(tau, 'inner step')}, alpha "
               f"{self.alpha:g}" if tau else "blocking exchange")
    return (f"diloco: {self.replicas} replicas over mesh.diloco, {outer} every "
            f"H={count(h, 'inner step')}; {fragments}; {overlap}; outer gradients sent as "
            f"{self.outer_dtype}")

  def late_sync_note(self, steps: int) -> str:
    """The start-line note for a run of `steps` <= sync_every steps: nothing
    synchronises before the last step."""
    return (f"note: diloco.sync_every={self.sync_every} is not below train.steps="
            f"{steps}: the replicas synchronise only at the last step, and every "
            "evaluation before it reads the outer parameters of step 0 (a "
            "smaller diloco.sync_every synchronises sooner)")

  def offset(self, p: int) -> int:
    """Fragment p synchronises after inner steps t with t % H == offset(p)."""
    return p * self.sync_every // self.fragments

  def syncs_at(self, done: int) -> list[int]:
    """Fragments whose synchronisation starts after `done` inner steps."""
    return [p for p in range(self.fragments)
            if done > 0 and done % self.sync_every == self.offset(p)]

  def events(self, done: int, total: int, landed: int = 0) -> list[tuple[str, int]]:
    """After inner step `done` (of `total`): ('sync', p) starts fragment p's
    exchange (and, blocking, applies it); ('merge', p) applies the exchange that
    started tau steps ago.

    The last step synchronises every fragment: exchanges in flight land, and each
    other fragment synchronises and is applied at once, so the outer parameters a
    run ends with (evaluated, saved, exported) hold all of its inner steps, also
    when train.steps is not a multiple of H. `landed`: the step a resumed run
    starts from when the run that saved it ended there; the exchanges it started
    landed in that ending and are not applied again."""
    tau = self.overlap_steps
    out = [("merge", p) for p in self.syncs_at(done - tau)
           if tau and done - tau > landed]
    out += [("sync", p) for p in self.syncs_at(done)]
    if done != total:
      return out
    inflight = [p for s in range(done - tau + 1, done + 1) if s > landed
                for p in self.syncs_at(s)] if tau else self.syncs_at(done)
    out += [("merge", p) for p in inflight] if tau else []
    for p in range(self.fragments):
      if p not in inflight:
        out += [("sync", p)] + ([("merge", p)] if tau else [])
    return out


# --- fragments -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fragments:
  """Which part of each parameter leaf fragment p holds: per fragment, per leaf
  (in tree order), None (none of it), or a slice of its leading `layers` axis
  (`slice(None)`: the whole leaf)."""
  treedef: Any
  parts: tuple[tuple[slice | None, ...], ...]

  @classmethod
  def of(cls, abstract_params, logical, fragments: int) -> "Fragments":
    leaves, treedef = jax.tree.flatten(abstract_params)
    names = jax.tree.leaves(logical, is_leaf=lambda a: isinstance(a, tuple))
    parts = []
    for p in range(fragments):
      parts.append(tuple(
          slice(p, None, fragments) if ax and ax[0] == "layers"
          else (slice(None) if p == 0 else None)
          for x, ax in zip(leaves, names)))
    return cls(treedef, tuple(parts))

  def take(self, tree, p: int, axis: int = 0) -> list[jax.Array]:
    """Fragment p of `tree`'s leaves (`axis`: the layers axis, 1 for replica
    stacks)."""
    lead = (slice(None),) * axis
    return [x[lead + (s,)] for x, s in zip(jax.tree.leaves(tree), self.parts[p])
            if s is not None]

  def put(self, tree, p: int, values: Sequence[jax.Array], axis: int = 0):
    """`tree` with fragment p replaced by `values` (as `take` returns them)."""
    lead = (slice(None),) * axis
    values, out = list(values), []
    for x, s in zip(jax.tree.leaves(tree), self.parts[p]):
      out.append(x if s is None else x.at[lead + (s,)].set(values.pop(0)))
    return jax.tree.unflatten(self.treedef, out)

  def layer_counts(self, abstract_params, p: int) -> list[int]:
    """Per leaf of fragment p, how many tensors it holds (its layers; 1 for a
    non-stacked leaf): each gets its own E3M0 scale."""
    leaves = jax.tree.leaves(abstract_params)
    return [len(range(*s.indices(x.shape[0]))) if s != slice(None) else 1
            for x, s in zip(leaves, self.parts[p]) if s is not None]

  def size(self, abstract_params, p: int) -> int:
    """Entries in fragment p."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract_params), self.parts[p]):
      if s is not None:
        rows = x.shape[0] if s == slice(None) else len(range(*s.indices(x.shape[0])))
        total += rows * math.prod(x.shape[1:])
    return total


# --- encoding --------------------------------------------------------------------

def e3m0_encode(a: jax.Array) -> jax.Array:
  """Magnitudes in [0, 1] (float) with signs -> 4-bit codes in uint8: bit 3 the
  sign, bits 0-2 the level j (0: zero; j >= 1: 2^(j-7)), the nearest level."""
  mag = jnp.abs(a)
  lo = jnp.clip(jnp.floor(jnp.log2(jnp.maximum(mag, 1e-30))) + 7, 0, 7)
  lo_val = jnp.where(lo == 0, 0.0, jnp.exp2(lo - 7))
  hi = jnp.minimum(lo + 1, 7)
  level = jnp.where(mag - lo_val <= jnp.exp2(hi - 7) - mag, lo, hi)
  return (level + 8 * (a < 0)).astype(jnp.uint8)


def e3m0_decode(codes: jax.Array) -> jax.Array:
  level = (codes & 7).astype(jnp.float32)
  mag = jnp.where(level == 0, 0.0, jnp.exp2(level - 7))
  return jnp.where(codes & 8, -mag, mag)


def _pack(codes: jax.Array) -> jax.Array:
  """[..., 2n] uint8 codes -> [..., n] bytes: byte i holds codes i and n + i. (Not
  neighbours: a trailing axis of 2 is tiled to 128 lanes on TPU, which made the
  transport's temporaries tens of times the fragment.)"""
  n = codes.shape[-1] // 2
  return codes[..., :n] | (codes[..., n:] << 4)


def _unpack(packed: jax.Array) -> jax.Array:
  return jnp.concatenate([packed & 15, packed >> 4], -1)


def _row_max(rows: list[jax.Array], row_axes: Sequence[tuple[str, ...]],
             over: tuple[str, ...] = ()) -> list[jax.Array]:
  """Per tensor's rows [g, n] (this device's shard of each row): the largest
  magnitude of the whole row, max-reduced over the mesh axes that split it
  (`row_axes`, per tensor) and `over`; 1 where it is 0 -> [g, 1]. One max-reduce
  per distinct set of axes, the tensors' maxima concatenated."""
  local = [jnp.max(jnp.abs(r), axis=1) for r in rows]  # [g]
  out = list(local)
  for axes in sorted(set(row_axes)):
    names = tuple(over) + tuple(axes)
    if not names:
      continue
    idx = [i for i, a in enumerate(row_axes) if a == axes]
    reduced = jax.lax.pmax(jnp.concatenate([local[i] for i in idx]), names)
    for i, piece in zip(idx, jnp.split(reduced, np.cumsum(
        [local[i].shape[0] for i in idx])[:-1].tolist())):
      out[i] = piece
  return [jnp.where(s > 0, s, 1.0)[:, None] for s in out]


# Codes per replica's chunk of an exchange are padded to a multiple of this (the
# TPU's 128 lanes): the TPU compiler turned an all-gather of a uint8 chunk that
# was not a multiple of 128 into an all-reduce of the gathered size, so each
# device received the codes twice (llama_tiny's fragment 0 in e3m0 on v5e:
# 1,205,820 bytes over `diloco` where the codes are 803,456). The all-to-all is
# padded alike; it costs under 128 bytes per chunk.
CHUNK_QUANTUM = 128


def _whole_tiles(x: jax.Array) -> jax.Array:
  """[..., n] -> [..., n rounded up to CHUNK_QUANTUM], zero-padded."""
  pad = -x.shape[-1] % CHUNK_QUANTUM
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def _mean_low_precision(xs: list[jax.Array], groups: Sequence[int], dtype: str,
                        replicas: int, row_axes: Sequence[tuple[str, ...]]
                        ) -> list[jax.Array]:
  """Inside shard_map over the whole mesh: this device's shard of this replica's
  tensors -> the shard of their means over the replicas, sent as `dtype` codes in
  one all-to-all over `diloco` (a reduce-scatter: each replica sums its 1/R of
  every shard in float32) and one all-gather of the re-encoded means; e3m0 adds
  an all-gather and a max-reduce of the scales (and, for tensors split over other
  axes, a max-reduce of each row's scale over them). Each device sends only its
  shard. `groups`: per tensor, how many rows (layers) each with its own scale;
  `row_axes`: per tensor, the mesh axes that split its rows."""
  e3m0 = dtype == "e3m0"
  quantum = 2 * replicas if e3m0 else replicas

  # Codes travel as unsigned integers: collectives move them without arithmetic,
  # so no backend widens them (XLA:CPU runs bfloat16 collectives in float32).
  def encode(v, scale):
    if not e3m0:
      return jax.lax.bitcast_convert_type(v.astype(jnp.bfloat16), jnp.uint16)
    return _pack(e3m0_encode(v / scale))

  def decode(codes, scale):
    if not e3m0:
      return jax.lax.bitcast_convert_type(codes, jnp.bfloat16).astype(jnp.float32)
    return e3m0_decode(_unpack(codes)) * scale

  def split(flat, sizes):  # [..., sum(sizes)] -> pieces
    return jnp.split(flat, np.cumsum(sizes)[:-1].tolist(), axis=-1)

  # This device's shard of each row, [groups, n] padded so each replica's chunk
  # of it is whole (and, for e3m0, an even number of codes).
  rows = [x.astype(jnp.float32).reshape(g, -1) for x, g in zip(xs, groups)]
  widths = [r.shape[1] for r in rows]
  rows = [jnp.pad(r, ((0, 0), (0, -r.shape[1] % quantum))) for r in rows]
  scales = _row_max(rows, row_axes) if e3m0 else [None] * len(rows)  # [g, 1]
  codes = [encode(r, s).reshape(g, replicas, -1)  # [g, replicas, c]
           for r, s, g in zip(rows, scales, groups)]
  send = jnp.concatenate([c.swapaxes(0, 1).reshape(replicas, -1) for c in codes], 1)
  got = jax.lax.all_to_all(_whole_tiles(send), REPLICA_AXIS, 0, 0,
                           tiled=True)[:, :send.shape[1]]  # [senders, total]
  parts = split(got, [c[:, 0].size for c in codes])
  if e3m0:  # [senders, sum(groups)]
    sent_scales = split(jax.lax.all_gather(
        jnp.concatenate([s[:, 0] for s in scales]), REPLICA_AXIS), list(groups))
  means = []
  for part, c, i in zip(parts, codes, range(len(codes))):
    part = part.reshape(replicas, c.shape[0], -1)  # [senders, g, c]
    scale = sent_scales[i][..., None] if e3m0 else None
    means.append(jnp.sum(decode(part, scale), 0) / replicas)  # [g, chunk]
  if e3m0:
    scales2 = _row_max(means, row_axes, over=(REPLICA_AXIS,))
  else:
    scales2 = [None] * len(means)
  back = [encode(m, s) for m, s in zip(means, scales2)]  # [g, c]
  mine = jnp.concatenate([b.reshape(-1) for b in back])  # [total]
  every = jax.lax.all_gather(_whole_tiles(mine), REPLICA_AXIS)[:, :mine.size]
  out = []
  for piece, b, s, x, n in zip(split(every, [b.size for b in back]), back, scales2,
                               xs, widths):
    full = piece.reshape(replicas, *b.shape).swapaxes(0, 1).reshape(b.shape[0], -1)
    out.append(decode(full, s)[:, :n].reshape(x.shape))
  return out


def mean_over_replicas(deltas: list[jax.Array], groups: Sequence[int], dtype: str,
                       specs: Sequence[P], stacked: Sequence[bool], mesh=None
                       ) -> list[jax.Array]:
  """Per-replica arrays [replicas, ...] sharded over `diloco` -> their float32
  means [...] (replicated over `diloco`), sent in `dtype` (module docstring).
  The only communication over `diloco` in a synchronisation.

  `specs`: each tensor's PartitionSpec without the replica dimension (its
  parameter's); every device encodes and sends only its own shard. `stacked`:
  per tensor, whether its leading axis is layers (rows with their own E3M0 scale,
  kept whole on each device) or the tensor is one row."""
  replicas = deltas[0].shape[0]
  layouts = []
  for x, spec, s in zip(deltas, specs, stacked):
    entries = list(spec) + [None] * (x.ndim - 1 - len(spec))
    if s:
      entries[0] = None  # a row per layer, its layers whole here
    axes = tuple(a for e in (entries[1:] if s else entries) if e is not None
                 for a in ((e,) if isinstance(e, str) else e))
    layouts.append((P(*entries), axes))
  row_axes = [axes for _, axes in layouts]

  def local(deltas):
    if dtype == "float32":
      return [jax.lax.psum(d[0].astype(jnp.float32), REPLICA_AXIS) / replicas
              for d in deltas]
    return _mean_low_precision([d[0] for d in deltas], groups, dtype, replicas,
                               row_axes)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=([P(REPLICA_AXIS, *spec) for spec, _ in layouts],),
                       out_specs=[spec for spec, _ in layouts],
                       check_vma=False)(deltas)


# --- state -----------------------------------------------------------------------

def state_names(d: DiLoCo) -> tuple[str, ...]:
  """`replicas` (every replica's parameters), `momentum` (the outer momentum,
  with outer_momentum > 0), `pending` (outer gradients in flight, with tau > 0)."""
  return (("replicas",) + (("momentum",) if d.outer_momentum else ())
          + (("pending",) if d.overlap_steps else ()))


def init_state(d: DiLoCo, params) -> dict:
  """Every replica starts from `params`; momentum and pending start at zero."""
  out = {"replicas": jax.tree.map(
      lambda x: jnp.broadcast_to(x, (d.replicas, *x.shape)), params)}
  for name in state_names(d)[1:]:
    out[name] = jax.tree.map(jnp.zeros_like, params)
  return out


def stacked_spec(spec: P) -> P:
  """A replica-stacked leaf's spec: `diloco` first, then the leaf's own."""
  return P(REPLICA_AXIS, *spec)


def state_specs(d: DiLoCo, param_specs) -> dict:
  is_spec = lambda s: isinstance(s, P)  # noqa: E731
  out = {"replicas": jax.tree.map(stacked_spec, param_specs, is_leaf=is_spec)}
  for name in state_names(d)[1:]:
    out[name] = param_specs
  return out


def describe_regroup(saved: DiLoCo, d: DiLoCo) -> str:
  """What `regroup` does to a checkpoint saved in `saved`'s layout for a run in
  `d`'s, in one line for the log."""
  (before, old), (after, new) = layout(saved), layout(d)
  head = (f"holds {before} replicas, this run has "
          f"{after if d.enabled else 'none (mesh.diloco=1)'}" if before != after
          else "holds outer buffers this run's settings do not match")
  notes = []
  if d.enabled:
    why = {"pending": ("the outer gradients in flight", "overlap_steps"),
           "momentum": ("the outer momentum", "outer_momentum")}
    notes = [f"{what} {'are' if b == 'pending' else 'is'} dropped ({field} is 0 "
             "now)" for b, (what, field) in why.items() if b in old and b not in new]
    notes += [f"{what} {'start' if b == 'pending' else 'starts'} at zero"
              for b, (what, _) in why.items() if b in new and b not in old]
    if before != after:  # the buffers both layouts hold carry over
      notes += [f"{what} {'are' if b == 'pending' else 'is'} kept"
                + (" (applied when due)" if b == "pending" else "")
                for b, (what, _) in why.items() if b in new and b in old]
  who = "every replica restarts" if d.enabled else "the run continues"
  return (f"DiLoCo: the checkpoint {head}: {who} from the outer "
          "parameters (inner steps since the last synchronisation are dropped) "
          "with the mean of the saved inner optimizer states"
          + "".join(f"; {n}" for n in notes))


def regroup(params, opt_state, state: dict | None, d: DiLoCo):
  """A checkpoint of another replica count (NumPy trees; `opt_state` stacked
  [old replicas, ...] when `state` is not None) -> (opt_state, state) for `d`:
  every replica restarts from the outer parameters `params` (inner progress since
  the last synchronisation is dropped) with the mean of the old replicas' inner
  optimizer states; outer momentum and pending outer gradients are kept where
  `d` has them (zeros where the checkpoint has none)."""
  if state is not None:
    opt_state = jax.tree.map(
        lambda x: np.asarray(x.mean(0) if np.issubdtype(x.dtype, np.floating)
                             else x[0], x.dtype), opt_state)
  if not d.enabled:
    return opt_state, None
  new = {"replicas": jax.tree.map(
      lambda x: np.broadcast_to(x, (d.replicas, *x.shape)), params)}
  for name in state_names(d)[1:]:
    new[name] = (state or {}).get(name) or jax.tree.map(np.zeros_like, params)
  stacked = jax.tree.map(lambda x: np.broadcast_to(x, (d.replicas, *np.shape(x))),
                         opt_state)
  return stacked, new


# --- the programs ----------------------------------------------------------------

def outer_step(d: DiLoCo, frags: Fragments, p: int, params, state: dict,
               delta: list[jax.Array]):
  """Applies the mean outer gradient `delta` of fragment p: (params, state) with
  fragment p of the outer parameters, outer momentum and replicas updated."""
  theta = frags.take(params, p)
  if d.outer_momentum:
    tx = optax.trace(decay=d.outer_momentum, nesterov=d.nesterov)
    step, trace = tx.update(delta, optax.TraceState(
        trace=frags.take(state["momentum"], p)))
    state = {**state, "momentum": frags.put(state["momentum"], p, trace.trace)}
  else:
    step = delta
  theta = [t - (d.outer_lr * s).astype(t.dtype) for t, s in zip(theta, step)]
  local = frags.take(state["replicas"], p, axis=1)
  if d.overlap_steps:
    merged = [d.alpha * r + (1 - d.alpha) * t[None] for r, t in zip(local, theta)]
  else:
    merged = [jnp.broadcast_to(t[None], r.shape) for r, t in zip(local, theta)]
  state = {**state, "replicas": frags.put(
      state["replicas"], p, [m.astype(r.dtype) for m, r in zip(merged, local)],
      axis=1)}
  return frags.put(params, p, theta), state


def make_sync(d: DiLoCo, frags: Fragments, abstract_params, p: int, kind: str,
              state_sharding):
  """Jitted state -> (state, metrics) for ('sync' | 'merge', fragment p), donating
  the state.

  sync: the replicas' mean outer gradient of fragment p (the program's only
  communication over `diloco`); blocking (tau = 0) it is applied at once, else
  kept in `pending`. Its metrics: `outer_grad_norm`, the L2 norm of that mean as
  received (float32 scalar, replicated). merge: applies `pending`'s fragment p
  (no communication; no metrics).
  """
  groups = frags.layer_counts(abstract_params, p)
  parts = [s for s in frags.parts[p] if s is not None]
  specs = [sh.spec for sh, s in zip(jax.tree.leaves(state_sharding.params),
                                    frags.parts[p]) if s is not None]
  stacked = [s != slice(None) for s in parts]
  replicated = jax.sharding.NamedSharding(jax.tree.leaves(state_sharding)[0].mesh, P())

  def sync(state):
    params, extra = state.params, state.diloco
    if kind == "sync":
      deltas = [t[None] - r for t, r in zip(frags.take(params, p),
                                            frags.take(extra["replicas"], p, axis=1))]
      delta = mean_over_replicas(deltas, groups, d.outer_dtype, specs, stacked)
      metrics = {"outer_grad_norm": optax.tree.norm(delta)}
      if d.overlap_steps:
        extra = {**extra, "pending": frags.put(
            extra["pending"], p,
            [x.astype(t.dtype) for x, t in zip(delta, frags.take(params, p))])}
        return state.replace(diloco=extra), metrics
    else:
      delta = [x.astype(jnp.float32) for x in frags.take(extra["pending"], p)]
      metrics = {}
    params, extra = outer_step(d, frags, p, params, extra, delta)
    return state.replace(params=params, diloco=extra), metrics

  return jax.jit(sync, in_shardings=(state_sharding,),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


def metric_name(d: DiLoCo, p: int) -> str:
  """The metrics.jsonl key of fragment p's outer-gradient norm: `outer_grad_norm`
  with one fragment, `outer_grad_norm/fragment_<p>` with several."""
  return "outer_grad_norm" if d.fragments == 1 else f"outer_grad_norm/fragment_{p}"


def layout(d: DiLoCo | None) -> tuple[int, tuple[str, ...]]:
  """(replicas, buffers) of a state: what a checkpoint's structure depends on."""
  return (d.replicas, state_names(d)) if d is not None and d.enabled else (1, ())


def with_layout(d: DiLoCo, replicas: int | None, buffers: Sequence[str]) -> DiLoCo:
  """`d` reshaped to a saved layout (`replicas` None: saved without DiLoCo)."""
  return dataclasses.replace(
      d, replicas=replicas or 1,
      outer_momentum=(d.outer_momentum or 0.9) if "momentum" in buffers else 0.0,
      overlap_steps=(d.overlap_steps or 1) if "pending" in buffers else 0)
