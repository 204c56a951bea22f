"""DiLoCo and Streaming DiLoCo (`mesh.diloco`, config group `diloco`) against a
NumPy reference written from the papers (Douillard et al., arXiv 2311.08105,
Algorithm 1; arXiv 2501.18512, Algorithm 1 and section 2), against data
parallelism, and in the compiled programs."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

import sharding
import train
from model import ModelConfig
from sharding.report import count
from train import diloco
from train.optimizer import make_optimizer
from train.state import init_state, model_spec, state_shardings

LEVELS = np.array([0.0] + [2.0 ** -j for j in range(6, -1, -1)], np.float32)


# --- the reference ------------------------------------------------------------------

def e3m0_round(rows: np.ndarray) -> np.ndarray:
  """Each row [tensors, n] scaled by its largest magnitude, every entry rounded
  to the nearest of +-{0, 2^-6, ..., 1}, scaled back (float32)."""
  scale = np.abs(rows).max(1, keepdims=True)
  scale = np.where(scale > 0, scale, 1).astype(np.float32)
  a = rows / scale
  nearest = LEVELS[np.argmin(np.abs(np.abs(a)[..., None] - LEVELS), -1)]
  return (np.sign(a) * nearest * scale).astype(np.float32)


def transported_mean(deltas: list[np.ndarray], tensors: int, dtype: str) -> np.ndarray:
  """The replicas' mean outer gradient as `dtype` carries it: each replica's
  gradient encoded, the mean taken in float32 and encoded again."""
  if dtype == "float32":
    return np.mean(deltas, 0, dtype=np.float32)
  if dtype == "bfloat16":
    down = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
  else:
    down = lambda x: e3m0_round(x.reshape(tensors, -1)).reshape(x.shape)  # noqa: E731
  total = np.zeros_like(deltas[0])
  for d in deltas:
    total += down(d)
  return down(total / np.float32(len(deltas)))


class StreamingDiLoCo:
  """Outer parameters, outer momentum and R replicas as {name: array}; fragment p
  holds layers l = p (mod F) of every `layers/` leaf and, for p = 0, the other
  leaves; it synchronises at steps t = p H / F (mod H), t > 0."""

  def __init__(self, params, R, H, F, tau, alpha, lr, mu, dtype):
    self.outer = {k: v.copy() for k, v in params.items()}
    self.m = {k: np.zeros_like(v) for k, v in params.items()}
    self.reps = [{k: v.copy() for k, v in params.items()} for _ in range(R)]
    self.R, self.H, self.F, self.tau, self.alpha, self.lr, self.mu = (
        R, H, F, tau, alpha, lr, mu)
    self.dtype, self.inflight = dtype, {}
    self.started_norms = []  # each outer gradient's L2 norm, in sync order

  def _index(self, name, p):
    if name.startswith("layers/"):
      return np.s_[p::self.F]
    return np.s_[:] if p == 0 else None

  def _syncs(self, t):
    return [p for p in range(self.F) if t > 0 and t % self.H == p * self.H // self.F]

  def _start(self, p):
    delta = {}
    for k in self.outer:
      i = self._index(k, p)
      if i is None:
        continue
      part = self.outer[k][i]
      tensors = part.shape[0] if k.startswith("layers/") else 1
      delta[k] = transported_mean([part - r[k][i] for r in self.reps], tensors,
                                  self.dtype)
    self.inflight[p] = delta
    self.started_norms.append(float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                                                 for g in delta.values()))))

  def _apply(self, p):
    for k, g in self.inflight.pop(p).items():
      i = self._index(k, p)
      self.m[k][i] = self.mu * self.m[k][i] + g
      self.outer[k][i] -= self.lr * (g + self.mu * self.m[k][i])  # Nesterov
      for r in self.reps:
        r[k][i] = (self.alpha * r[k][i] + (1 - self.alpha) * self.outer[k][i]
                   if self.tau else self.outer[k][i])

  def after_inner_step(self, t, total):
    for p in self._syncs(t - self.tau) if self.tau else []:
      if p in self.inflight:  # not when it landed at the end of an earlier run
        self._apply(p)
    for p in self._syncs(t):
      self._start(p)
      if not self.tau:
        self._apply(p)
    if t == total:  # every fragment lands: those in flight, then the others
      landed = set(self.inflight) | set(self._syncs(t))
      for p in list(self.inflight):
        self._apply(p)
      for p in range(self.F):
        if p not in landed:
          self._start(p)
          self._apply(p)


# --- schedule and encoding ---------------------------------------------------------

@pytest.mark.parametrize("H,F,tau,total", [(4, 2, 1, 9), (6, 3, 2, 13), (5, 1, 0, 10),
                                           (8, 4, 0, 8), (4, 1, 3, 7)])
def test_events_sync_each_fragment_every_H_steps_and_apply_it_tau_later(H, F, tau, total):
  d = diloco.DiLoCo(replicas=2, sync_every=H, fragments=F, overlap_steps=tau)
  events = [(t, *e) for t in range(1, total + 1) for e in d.events(t, total)]
  for p in range(F):
    starts = [t for t in range(1, total + 1) if t % H == p * H // F]
    # the last step synchronises a fragment not in flight then (nor just synced)
    if not starts or starts[-1] <= total - max(tau, 1):
      starts.append(total)
    assert [t for t, k, q in events if k == "sync" and q == p] == starts
    if tau:
      assert [t for t, k, q in events if k == "merge" and q == p] == [
          min(s + tau, total) for s in starts]
    else:
      assert not [e for e in events if e[1] == "merge"]
    if tau:  # in event order: never started twice before it lands
      kinds = [k for _, k, q in events if q == p]
      assert kinds == ["sync", "merge"] * (len(kinds) // 2)


@pytest.mark.parametrize("H,F,tau,first,second", [
    (4, 2, 1, 12, 16), (6, 3, 2, 13, 20), (5, 1, 0, 7, 10), (4, 1, 3, 9, 10),
    (4, 2, 1, 3, 4)])
def test_a_run_continued_past_its_end_applies_each_exchange_once(H, F, tau, first,
                                                                 second):
  """A run of `first` steps continued to `second` (the end's exchanges landed in
  the first run: `landed`): every exchange is applied exactly once, the
  continuation's own schedule is the uninterrupted one after `first`, and both
  runs end with every fragment synchronised."""
  d = diloco.DiLoCo(replicas=2, sync_every=H, fragments=F, overlap_steps=tau)
  one = [(t, *e) for t in range(1, first + 1) for e in d.events(t, first)]
  two = [(t, *e) for t in range(first + 1, second + 1)
         for e in d.events(t, second, landed=first)]
  for run in (one, one + two):
    for p in range(F):
      kinds = [k for _, k, q in run if q == p]
      if tau:  # sync, merge, sync, merge, ...: no exchange applied twice
        assert kinds == ["sync", "merge"] * (len(kinds) // 2)
      assert any(t == max(e[0] for e in run) and q == p for t, _, q in run)
  straight = [(t, *e) for t in range(first + 1, second + 1) for e in d.events(t, second)]
  # before its own last step, the continuation starts the uninterrupted run's syncs
  assert [e for e in two if e[1] == "sync" and e[0] < second] == [
      e for e in straight if e[1] == "sync" and e[0] < second]


def test_e3m0_rounds_to_the_nearest_level():
  x = np.random.default_rng(0).standard_normal((3, 500)).astype(np.float32)
  x[1] *= 1e-3
  x[2, :7] = [0, 1, -1, 2 ** -6, 2 ** -7, 0.75, -0.374]
  scale = np.abs(x).max(1, keepdims=True)
  codes = diloco.e3m0_encode(x / scale)
  assert codes.dtype == np.uint8 and int(codes.max()) <= 15
  got = np.asarray(diloco.e3m0_decode(codes)) * scale
  np.testing.assert_array_equal(got, e3m0_round(x))
  assert np.asarray(diloco._unpack(diloco._pack(codes))).tolist() == np.asarray(codes).tolist()


def test_regroup_restarts_replicas_from_the_outer_parameters():
  params = {"w": np.arange(3, dtype=np.float32)}
  opt = {"mu": np.array([[1, 2, 3], [3, 4, 5]], np.float32),
         "count": np.array([7, 7], np.int32)}
  saved = {"replicas": {"w": np.ones((2, 3), np.float32)},
           "momentum": {"w": np.full(3, 0.5, np.float32)}}
  opt4, state4 = diloco.regroup(params, opt, saved, diloco.DiLoCo(
      replicas=4, outer_momentum=0.9, overlap_steps=1))
  np.testing.assert_array_equal(state4["replicas"]["w"], np.tile(params["w"], (4, 1)))
  np.testing.assert_array_equal(opt4["mu"], np.tile([2, 3, 4], (4, 1)))
  np.testing.assert_array_equal(opt4["count"], [7, 7, 7, 7])
  np.testing.assert_array_equal(state4["momentum"]["w"], saved["momentum"]["w"])
  np.testing.assert_array_equal(state4["pending"]["w"], np.zeros(3))  # none saved
  opt1, state1 = diloco.regroup(params, opt, saved, diloco.DiLoCo(replicas=1))
  assert state1 is None and opt1["mu"].tolist() == [2, 3, 4] and opt1["count"] == 7


# --- the synchronisation programs against the reference ---------------------------

def _spec_and_mesh(mesh_sizes):
  from conftest import make_tiny_config
  c = make_tiny_config()
  spec = model_spec(ModelConfig.from_config(c.model), sharding.normalize_rules(None))
  return c, spec, sharding.make_mesh(mesh_sizes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "e3m0"])
def test_streaming_outer_parameters_equal_the_reference(dtype):
  """2 replicas (diloco=2, each over data=2 x tensor=2), 2 fragments, tau=1,
  alpha=0.5, 3 periods of H=4, then continued past that end to step 15 (the
  exchanges that landed at the end are not applied again); the inner steps are a
  fixed random walk applied from the host, so only the outer algorithm is under
  test."""
  c, spec, mesh = _spec_and_mesh(dict(diloco=2, data=2, tensor=2))
  d = diloco.DiLoCo(replicas=2, sync_every=4, outer_lr=0.7, outer_momentum=0.9,
                    nesterov=True, fragments=2, overlap_steps=1, alpha=0.5,
                    outer_dtype=dtype)
  tx = make_optimizer(c.optim, 10)
  state = init_state(spec, tx, mesh, 0, dl=d)
  shardings = state_shardings(spec, tx, mesh, dl=d)
  names = [sharding.path_name(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(spec.abstract_params)]
  flat = lambda tree: dict(zip(names, map(np.asarray, jax.tree.leaves(tree))))  # noqa: E731
  ref = StreamingDiLoCo(flat(jax.device_get(state.params)), 2, 4, 2, 1, 0.5, 0.7, 0.9,
                        dtype)
  frags = diloco.Fragments.of(spec.abstract_params, spec.logical, 2)
  programs, norms = {}, []
  rng = np.random.default_rng(1)
  runs = [(t, 12, 0) for t in range(1, 13)] + [(t, 15, 12) for t in range(13, 16)]
  for t, total, landed in runs:
    walk = {k: rng.standard_normal((2, *v.shape)).astype(np.float32) * 0.01
            for k, v in ref.outer.items()}
    for r in range(2):
      for k in walk:
        ref.reps[r][k] = ref.reps[r][k] + walk[k][r]
    reps = jax.tree.map(lambda x, w: np.asarray(x) + w,
                        jax.device_get(state.diloco["replicas"]),
                        jax.tree.unflatten(jax.tree.structure(spec.abstract_params),
                                           list(walk.values())))
    state = state.replace(diloco={**state.diloco, "replicas": jax.device_put(
        reps, shardings.diloco["replicas"])})
    for kind, p in d.events(t, total, landed):
      if (kind, p) not in programs:
        programs[kind, p] = diloco.make_sync(d, frags, spec.abstract_params, p, kind,
                                             shardings)
      with jax.set_mesh(mesh):
        state, metrics = programs[kind, p](state)
      if kind == "sync":
        norms.append(float(metrics["outer_grad_norm"]))
    ref.after_inner_step(t, total)
  # Each sync's metric: the norm of the mean outer gradient as received.
  np.testing.assert_allclose(norms, ref.started_norms,
                             rtol=1e-5 if dtype == "float32" else 1e-3)
  outer, reps = flat(jax.device_get(state.params)), jax.device_get(
      state.diloco["replicas"])
  pairs = [(outer[k], ref.outer[k], k) for k in names]
  for r in range(2):
    got = flat(jax.tree.map(lambda x: x[r], reps))
    pairs += [(got[k], ref.reps[r][k], f"replica {r} {k}") for k in names]
  for got, want, where in pairs:
    if dtype == "float32":
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=where)
      continue
    # A transported value that float32 rounding puts on the other side of a
    # low-precision rounding boundary (XLA may fuse a multiply-add that NumPy
    # rounds twice) moves its element by one step of the format: allow such
    # isolated flips, 1 element in 500 (a wrong rounding mode or scale moves
    # most elements).
    off = ~np.isclose(got, want, rtol=1e-5, atol=1e-6)
    assert off.sum() <= max(1, off.size // 500), (where, off.sum(), off.size)


# --- training ----------------------------------------------------------------------

def _config(mesh, steps=3, **fields):
  from conftest import make_tiny_config
  from test_train_meshes import _with_mesh
  c = _with_mesh(make_tiny_config(), **mesh)
  c.train.steps = steps
  c.optim.update(name="sgd", learning_rate=0.3, warmup_steps=0, min_lr_ratio=1.0,
                 weight_decay=0.0, momentum=0.0, clip_norm=0.0)
  c.diloco.update(fields)
  return c


def test_diloco_with_one_step_periods_is_data_parallelism(tmp_path):
  """sync_every=1, outer_lr=1, no outer momentum, inner SGD without momentum:
  the outer update is the mean of the replicas' SGD steps, so each step's logged
  outer-gradient norm is the learning rate times the data-parallel gradient's."""
  fields = dict(sync_every=1, outer_lr=1.0, outer_momentum=0.0)
  got = train.train(_config(dict(diloco=4, tensor=2), **fields), str(tmp_path / "diloco"),
                    progress=False)
  want = train.train(_config(dict(data=4, tensor=2), **fields), str(tmp_path / "data"),
                     progress=False)
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want],
                             rtol=1e-5)
  np.testing.assert_allclose([r["outer_grad_norm"] for r in got],
                             [r["learning_rate"] * r["grad_norm"] for r in want],
                             rtol=1e-4)
  assert all("outer_grad_norm" not in r for r in want)


def _collectives(program, args, mesh, axis):
  from aot import costs as costs_lib
  with jax.set_mesh(mesh):
    text = program.lower(*args).compile().as_text()
  return [col for col in costs_lib.analyze(
      text, sharding.AXES, [mesh.shape[a] for a in sharding.AXES]).collectives
      if axis is None or axis in col.axes]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "e3m0"])
def test_only_the_sync_program_crosses_diloco_with_one_fragment(dtype):
  from aot.compile import _train_step
  c = _config(dict(diloco=2, data=2, tensor=2), fragments=2, overlap_steps=1,
              outer_dtype=dtype)
  c, spec, mesh = c, *_spec_and_mesh(c.mesh)[1:]
  step, args = _train_step(c, spec, mesh, sharding.normalize_rules(None))
  assert args[0].diloco is not None
  assert _collectives(step, args, mesh, "diloco") == []
  d = diloco.DiLoCo.from_config(c, 2)
  frags = diloco.Fragments.of(spec.abstract_params, spec.logical, 2)
  shardings = jax.tree.map(lambda x: x.sharding, args[0])
  merge = diloco.make_sync(d, frags, spec.abstract_params, 1, "merge", shardings)
  assert _collectives(merge, args[:1], mesh, "diloco") == []
  sync = diloco.make_sync(d, frags, spec.abstract_params, 1, "sync", shardings)
  over = _collectives(sync, args[:1], mesh, "diloco")
  # Each device sends only its (tensor-parallel) shard of the fragment, in every
  # dtype (the low-precision transport gathered whole tensors onto every device:
  # twice float32's bytes over diloco at tensor=2, and traffic over tensor).
  shards = frags.take(jax.tree.map(
      lambda x, s: np.empty(s.shard_shape(x.shape), np.int8),
      spec.abstract_params, shardings.params), 1)
  entries = sum(x.size for x in shards)
  assert entries < frags.size(spec.abstract_params, 1)
  rows = sum(frags.layer_counts(spec.abstract_params, 1))  # each padded to 4 entries
  if dtype == "float32":  # each device reduces its shard
    assert {col.kind for col in over} == {"all-reduce"}
    assert {col.dtypes for col in over} == {("f32",)}
    assert sum(col.bytes for col in over) == 4 * entries
  else:  # codes (bf16 bits, 4-bit pairs): all-to-all (reduce-scatter), all-gather
    code, size = {"bfloat16": ("u16", 2), "e3m0": ("u8", 0.5)}[dtype]
    codes = [col for col in over if col.dtypes == (code,)]
    assert {col.kind for col in codes} == {"all-to-all", "all-gather"}
    # (each replica's chunk padded to whole lanes of its uint16 / uint8 words:
    # diloco.CHUNK_QUANTUM)
    pad = 2 * diloco.CHUNK_QUANTUM * {"u16": 2, "u8": 1}[code]
    for kind in ("all-to-all", "all-gather"):  # one of each, all tensors together
      sent = [col.bytes for col in codes if col.kind == kind]
      assert len(sent) == 1 and size * entries <= sent[0] <= size * (entries + 3 * rows) + pad
    # e3m0: one all-gather of the replicas' scales, a max-reduce of the means'
    # (one per set of axes that split rows: here none or tensor); f32 per row
    scales = [col for col in over if col.dtypes != (code,)]
    assert all(col.dtypes == ("f32",) and col.bytes <= 4 * rows * 2 for col in scales)
    kinds = sorted(col.kind for col in scales)
    assert kinds == ([] if dtype == "bfloat16" else
                     ["all-gather"] + ["all-reduce"] * (len(kinds) - 1)), kinds
    assert len(kinds) <= (3 if dtype == "e3m0" else 0)
  # Over the other axes: scalars only (the norm's sum; e3m0's row maxima).
  others = [col for col in _collectives(sync, args[:1], mesh, None) if "diloco" not in col.axes]
  assert sum(col.bytes for col in others) <= 4 * (2 * rows + 1), others


def test_resume_is_bit_exact_mid_exchange_and_onto_other_replica_counts(
    tmp_path, capsys):
  """H=4, F=2, tau=1: the save at step 4 falls while fragment 0's exchange is in
  flight. Resuming continues bit-exactly; onto 4 replicas or none, every replica
  restarts from the outer parameters."""
  import shutil
  import train
  c = _config(dict(diloco=2, data=2, tensor=2), steps=6, sync_every=4, fragments=2,
              overlap_steps=1, outer_dtype="e3m0")
  c.checkpoint.update(every_steps=4, async_save=False)
  c.train.update(eval_every=6, eval_steps=1)
  capsys.readouterr()
  straight = train.train(c, str(tmp_path / "straight"), progress=False)
  out = capsys.readouterr().out
  assert ("diloco: 2 replicas over mesh.diloco, outer SGD (lr 0.7, momentum 0.9, "
          "nesterov) every H=4 inner steps; 2 fragments (Streaming DiLoCo), one "
          "synchronised every 2 steps on average; exchange overlaps tau=1 inner step, "
          "alpha 0.5; outer gradients sent as e3m0\n") in out
  assert "(DiLoCo: these are the outer parameters; the 2 replicas' own" in out
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")  # preempted after 4
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  resumed = train.train(c, str(tmp_path / "resumed"), progress=False)
  key = lambda rows: [(r["step"], r.get("loss"), r.get("eval_loss"))  # noqa: E731
                      for r in rows if r["step"] > 4]
  assert key(resumed) == key(straight) and len(key(straight)) == 3
  # the copy's rows past step 4 (logged by the attempt preempted there) were
  # dropped: metrics.jsonl holds the uninterrupted run's trajectory, once
  from train.metrics import read_metrics
  rows = lambda w: [(r["step"], r.get("loss"), r.get("eval_loss"))  # noqa: E731
                    for r in read_metrics(str(tmp_path / w))]
  assert rows("resumed") == rows("straight")
  for replicas, devices in ((4, 8), (1, 2)):
    work = tmp_path / f"onto{replicas}"
    shutil.copytree(tmp_path / "straight", work)
    more = _config(dict(diloco=replicas, data=2), steps=8, sync_every=4,
                   fragments=2, overlap_steps=1, outer_dtype="e3m0")
    capsys.readouterr()
    rows = train.train(more, str(work), devices=jax.devices()[:devices],
                       progress=False)
    out = capsys.readouterr().out
    assert ("the checkpoint holds 2 replicas, this run has "
            + ("4: every replica restarts" if replicas == 4 else
               "none (mesh.diloco=1): the run continues")) in out
    assert [r["step"] for r in rows] == [7, 8]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_a_run_ends_synchronised_and_continues_without_reapplying(tmp_path,
                                                                 monkeypatch):
  """A run shorter than H (2 steps, H=3) still ends with its inner steps in the
  outer parameters: the eval after step 2 is not the step-0 one (it was: nothing
  had synchronised). Continued to 4 steps, the run is told its start is where the
  ended run's exchanges landed (`landed`, whose schedule the reference test
  checks)."""
  import train
  c = _config(dict(diloco=2, data=2, tensor=2), steps=2, sync_every=3,
              overlap_steps=1)
  c.train.update(eval_every=2, eval_steps=1)
  rows = train.train(c, str(tmp_path / "run"), progress=False)
  evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
  assert len(evals) == 2 and evals[1] < evals[0] - 1e-3
  calls = []
  events = diloco.DiLoCo.events
  monkeypatch.setattr(diloco.DiLoCo, "events", lambda self, done, total, landed=0: (
      calls.append((done, landed)) or events(self, done, total, landed)))
  c.train.steps = 4
  rows = train.train(c, str(tmp_path / "run"), progress=False)
  assert calls == [(3, 2), (4, 2)] and [r["step"] for r in rows if "loss" in r] == [3, 4]


def test_an_outer_step_that_overflows_stops_the_run_before_it_is_saved(tmp_path):
  """From the crash trials' note: the divergence guard read only the inner step's
  loss and gradient norm, so an outer step that made the parameters non-finite
  was saved. An outer learning rate beyond float32 overflows the first sync
  (step 2) while step 2's inner loss is finite: the run stops with Diverged naming
  the state and the outer learning rate, and every kept checkpoint is finite."""
  from train.checkpoint import Checkpointer
  from train.loop import Diverged
  c = _config(dict(diloco=2, data=4), steps=4, sync_every=2, outer_lr=1e39,
              outer_momentum=0.0)
  c.checkpoint.update(every_steps=1, keep=3)
  c.log.every_steps = 1
  with pytest.raises(Diverged, match=r"^step 2: the training loss \(\S+\) and gradient "
                     r"norm \(\S+\) are finite but the state to be saved holds "
                     r"non-finite values .* Its last checkpoint, step 1, is kept: .*"
                     r"--config\.diloco\.outer_lr \(now 1e\+39\)\.$"):
    train.train(c, str(tmp_path), progress=False)
  ckpt = Checkpointer(str(tmp_path), c.checkpoint, read_only=True)
  assert ckpt.all_steps() == [1]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


# --- bad input ----------------------------------------------------------------------

def _error(config):
  from train.validate import validate_config
  with pytest.raises(sharding.ConfigError) as e:
    validate_config(config, 8)
  return e.value


@pytest.mark.parametrize("fields,field", [
    (dict(outer_dtype="int4"), "diloco.outer_dtype"),
    (dict(sync_every=0), "diloco.sync_every"),
    (dict(sync_every=6, fragments=4), "diloco.fragments"),
    (dict(sync_every=4, fragments=4), "diloco.fragments"),  # 2 layers
    (dict(sync_every=4, overlap_steps=4), "diloco.overlap_steps"),
    (dict(alpha=1.5, overlap_steps=1), "diloco.alpha"),  # (read only with overlap)
    (dict(outer_momentum=1.0), "diloco.outer_momentum"),
    (dict(outer_lr=0.0), "diloco.outer_lr"),
])
def test_config_errors_name_the_field(fields, field):
  """... and every fix each offers in flags works as given."""
  from conftest import assert_fixes_validate
  assert assert_fixes_validate(_config(dict(diloco=2, data=4), **fields)).field == field


def test_replicas_must_split_the_batch_first_and_hold_the_whole_model():
  c = _config(dict(diloco=2, data=4))
  c.mesh.rules = dict(sharding.DEFAULT_RULES, batch=("data", "diloco"))
  assert _error(c).field == "mesh.rules.batch"
  c.mesh.rules = dict(sharding.DEFAULT_RULES, embed=("diloco",))
  assert _error(c).field == "mesh.rules.embed"
  c = _config(dict(diloco=2, data=4))
  c.optim.compression.method = "topk"
  assert _error(c).field == "optim.compression.method"


def test_cli_bad_fragments_exits_2_before_compiling(tmp_path):
  from conftest import run_cli
  r = run_cli("train", "--config=experiments/llama_tiny.py", f"--workdir={tmp_path}",
              "--config.mesh.diloco=2", "--config.diloco.sync_every=10",
              "--config.diloco.fragments=3")
  assert r.returncode == 2, r.stderr[-2000:]
  assert ("Config error in `diloco.fragments`: 3 fragments cannot be spaced evenly "
          "in the 10 steps of diloco.sync_every. Fix: set --config.diloco.fragments=2 "
          "(it divides 10), or --config.diloco.sync_every=12 (a multiple of 3)."
          ) in " ".join(r.stderr.split()), r.stderr[-2000:]


@pytest.mark.parametrize("sync_every,fragments,layers", [
    (10, 3, 4), (1, 2, 4), (7, 4, 4), (9, 6, 4), (12, 5, 8), (5, 3, 2)])
def test_fragments_that_do_not_space_evenly_get_fixes_that_work(sync_every,
                                                                fragments, layers):
  """Each flag the fix names validates when followed: a fragment count that
  divides sync_every and fits the model's layers, or a sync_every that holds
  the fragments (offered only where the model has that many layers)."""
  from conftest import assert_fixes_validate
  c = _config(dict(diloco=2, data=4), sync_every=sync_every, fragments=fragments)
  c.model.num_layers = layers
  err = assert_fixes_validate(c)
  assert err.field == "diloco.fragments"
  assert f"{count(sync_every, 'step')} of diloco.sync_every" in err.problem
  assert ("--config.diloco.sync_every=" in err.fix) == (fragments <= layers)


def test_diloco_fields_are_read_only_with_replicas():
  """docs/configuration.md: `diloco.*` is read only when mesh.diloco > 1; a config
  with fields that would not fit is refused only then."""
  from train.validate import validate_config
  c = _config(dict(data=8), sync_every=10, fragments=3)
  assert validate_config(c, 8)["diloco"] == 1
  c.mesh.update(diloco=2, data=4)
  assert _error(c).field == "diloco.fragments"


def test_the_start_line_counts_steps_in_words():
  """One inner step and one step per fragment read in the singular ("H=1
  inner steps" before)."""
  D = diloco.DiLoCo
  assert "every H=1 inner step; 1 fragment (DiLoCo);" in D(replicas=2,
                                                           sync_every=1).describe()
  assert ("every H=2 inner steps; 2 fragments (Streaming DiLoCo), one synchronised "
          "every 1 step on average;") in D(replicas=2, sync_every=2,
                                           fragments=2).describe()


def test_a_run_shorter_than_sync_every_says_it_synchronises_only_at_the_end(
    tmp_path, capsys):
  """sync_every above train.steps was accepted without a word: the replicas met
  only at the last step and every evaluation before it read step 0's outer
  parameters (a trial's step-10 eval repeated step 0's loss)."""
  from train import train
  c = _config(dict(diloco=2, data=4), steps=2, sync_every=3)
  train(c, str(tmp_path / "run"), progress=False)
  out = capsys.readouterr().out
  assert ("note: diloco.sync_every=3 is not below train.steps=2: the replicas "
          "synchronise only at the last step") in out
  c = _config(dict(diloco=2, data=4), steps=2, sync_every=1)
  train(c, str(tmp_path / "other"), progress=False)
  assert "is not below train.steps" not in capsys.readouterr().out


def test_a_changed_layout_says_what_is_kept_and_dropped():
  """Changing overlap_steps alone was reported as a replica count change."""
  D = diloco.DiLoCo
  line = diloco.describe_regroup(D(replicas=4, overlap_steps=1), D(replicas=4))
  assert "replicas, this run" not in line
  assert line.endswith("; the outer gradients in flight are dropped "
                       "(overlap_steps is 0 now)")
  line = diloco.describe_regroup(D(replicas=4, outer_momentum=0.0),
                                 D(replicas=2, overlap_steps=2))
  assert "holds 4 replicas, this run has 2" in line
  assert line.endswith("; the outer gradients in flight start at zero; the outer "
                       "momentum starts at zero")
  # Another replica count with the same buffers: they carry over, and the line
  # says so (a trial read it as silent about the exchange in flight).
  line = diloco.describe_regroup(D(replicas=4, overlap_steps=1), D(replicas=2,
                                                                   overlap_steps=1))
  assert line.endswith("; the outer gradients in flight are kept (applied when "
                       "due); the outer momentum is kept")


def test_inspect_says_how_the_run_trains(tmp_path):
  """`inspect` gives the optimizer, DiLoCo and compression lines the run printed
  at its start (it showed the model alone), and the batch, its accumulation
  micro-batches and the mesh it was saved with (a resume elsewhere plans with
  them: pipeline microbatches must divide each replica's micro-batch)."""
  from train import inspect_run, run_config
  from train.compression import Compression
  from train.optimizer import describe
  c = _config(dict(diloco=2, data=4), sync_every=4, fragments=2, overlap_steps=1)
  c.train.update(batch_size=16, grad_accum_steps=2)
  run_config.write(str(tmp_path), c)
  text = inspect_run.describe_run(str(tmp_path))
  seq = c.data.seq_len
  assert (f"training: 3 steps of batch_size 16 x seq_len {seq} ({16 * seq:,} tokens a "
          "step) in 2 gradient-accumulation micro-batches; mesh diloco=2 data=4\n"
          ) in text, text
  one = c.copy_and_resolve_references()
  one.mesh.update(diloco=1, data=1)
  run_config.write(str(tmp_path / "one"), one)
  assert "; mesh of one device\n" in inspect_run.describe_run(str(tmp_path / "one"))
  assert describe(c.optim, c.train.steps) in text
  assert diloco.DiLoCo.from_config(c, 2).describe() in text
  assert "compression" not in text and "pipeline" not in text
  c.mesh.update(diloco=1, data=8)
  c.optim.compression.method = "topk"
  run_config.write(str(tmp_path), c)
  text = inspect_run.describe_run(str(tmp_path))
  assert Compression.from_config(c.optim).describe(8) in text and "diloco" not in text


def test_e3m0_packing_needs_no_padded_temporaries_on_tpu():
  """Packing two codes per byte through a trailing axis of 2 made the TPU lay that
  axis over 128 lanes (64x the bytes: llama_1b's sync asked for 12 GB of
  temporaries). Compiled for a v5e chip, packing and unpacking 8 rows of 2**20
  codes needs at most a few copies of them."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from aot import topology_devices
  mesh = jax.sharding.Mesh(np.array(topology_devices("v5e:2x4")[:1]), ("x",))
  codes = jax.ShapeDtypeStruct((8, 2 ** 20), jnp.uint8,
                               sharding=NamedSharding(mesh, PartitionSpec()))
  round_trip = jax.jit(lambda c: diloco._unpack(diloco._pack(c ^ 1)) ^ 1)
  temporaries = round_trip.lower(codes).compile().memory_analysis().temp_size_in_bytes
  assert temporaries <= 4 * 8 * 2 ** 20, temporaries


def test_galore_under_diloco_refreshes_only_every_gap_steps():
  """The replicas' inner step is vmapped over their optimizer states, which made
  GaLore's step count a batched value and its refresh `lax.cond` a select that
  ran the refresh (an SVD per matrix) on every step: 5.0 s steps against AdamW's
  0.23 s in a trial. The count is shared, so the compiled inner step keeps the
  conditional (its skipped branch costs nothing), and one step moves the stored
  [replicas] counts together."""
  from aot.compile import _train_step
  c = _config(dict(diloco=2, data=2, tensor=2), sync_every=4)
  c.optim.update(name="galore", galore_rank=4, galore_update_proj_gap=5,
                 galore_projector="svd")
  spec, mesh = _spec_and_mesh(c.mesh)[1:]
  step, args = _train_step(c, spec, mesh, sharding.normalize_rules(None))
  text = step.lower(*args).as_text()
  assert "stablehlo.case" in text or "stablehlo.if" in text
  from optax.contrib import GaLoreState
  counts = jax.tree.leaves(jax.tree.map(
      lambda s: s.count if isinstance(s, GaLoreState) else None, args[0].opt_state,
      is_leaf=lambda x: isinstance(x, GaLoreState)))
  assert counts and all(x.shape == (2,) for x in counts)  # stored per replica
