"""optim.name / state_dtype / offload: each update against a NumPy reference of its
paper's rule, the same losses on a mesh as on 1 device, bit-exact resume, restore onto
another mesh, config errors.
The references below are written from the papers' update rules in float64, not
from rung's JAX code. Parameters (one of each layout rung stores):
  layers/mlp/up   [layers=2, in=4, out=6]       stacked: one matrix per layer
  layers/attn/q   [embed=6, heads=2, head_dim=2]  matrix [6, 4]
  layers/attn/o   [heads=2, head_dim=2, embed=6]  matrix [4, 6]
  norm/scale      [6]                            never a matrix: AdamW
"""

import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from sharding import ConfigError
from test_train_meshes import _losses, _with_mesh
from train.optimizer import make_optimizer, schedule
from train.validate import validate_config

SHAPES = {"layers/mlp/up": (2, 4, 6), "layers/attn/q": (6, 2, 2),
          "layers/attn/o": (2, 2, 6), "norm/scale": (6,)}
# name -> (batch axes, reduction axes, output axes) of the reference grouping
GROUPS = {"layers/mlp/up": ((0,), (1,), (2,)), "layers/attn/q": ((), (0,), (1, 2)),
          "layers/attn/o": ((), (0, 1), (2,))}
WD = 0.1
NS = (3.4445, -4.7750, 2.0315)


def _nest(flat):
  out = {}
  for k, v in flat.items():
    *path, leaf = k.split("/")
    d = out
    for p in path:
      d = d.setdefault(p, {})
    d[leaf] = v
  return out


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else
               {f"{prefix}{k}": v})
  return out


def _optim(name, **kw):
  from conftest import make_tiny_config
  o = make_tiny_config().optim
  o.update(name=name, clip_norm=0.0, weight_decay=WD, warmup_steps=1,
           decay_steps=8, learning_rate=0.05, galore_rank=2,
           galore_update_proj_gap=2, **kw)
  return o


def _ref_rate(o, steps: int, t: int) -> float:
  """The learning rate of update t (1-based, the metrics' step) from the schedule's
  definition: linear from 0 to the peak at step W, cosine to peak x min_lr_ratio
  at step D (decay_steps, else the run's steps), held there after."""
  d = o.decay_steps or steps
  w = min(o.warmup_steps, d - 1)
  peak, end = o.learning_rate, o.learning_rate * o.min_lr_ratio
  if t <= w:
    return peak * t / w
  frac = min(t - w, d - w) / (d - w)
  return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))


def _run_jax(o, params, grads):
  """Three updates with `o`; returns the updates [step][name] as float64."""
  tx = make_optimizer(o, 8)
  p = jax.tree.map(jnp.asarray, _nest(params))
  state, step, out = jax.jit(tx.init)(p), jax.jit(tx.update), []
  for g in grads:
    u, state = step(_nest(g), state, p)
    p = jax.tree.map(lambda a, b: a + b, p, u)
    out.append({k: np.asarray(v, np.float64) for k, v in _flat(u).items()})
  assert step._cache_size() == 1  # GaLore's projector refresh: no recompilation
  return out


# --- the references ---------------------------------------------------------------

def _matrices(x, name):
  """x -> [batch, in, out] per the reference grouping, and the inverse."""
  b, r, o = GROUPS[name]
  perm = b + r + o
  shape = [x.shape[a] for a in perm]
  nb = int(np.prod([x.shape[a] for a in b]))
  m = x.transpose(perm).reshape(nb, int(np.prod([x.shape[a] for a in r])), -1)
  inv = np.argsort(perm)
  return m, lambda y: y.reshape(shape).transpose(inv)


def _ns5(m):
  """Muon's Newton-Schulz quintic (Jordan 2024) on one [in, out] matrix."""
  t = m.shape[0] > m.shape[1]
  x = m.T if t else m
  x = x / (np.linalg.norm(x) + 1e-8)
  a, b, c = NS
  for _ in range(5):
    s = x @ x.T
    x = a * x + (b * s + c * s @ s) @ x
  return x.T if t else x


def _per_matrix(fn, x, name):
  m, back = _matrices(x, name)
  return back(np.stack([fn(mi) for mi in m]))


class _AdamW:
  """Loshchilov & Hutter 2019, Algorithm 2 (optax's eps outside the sqrt); the
  decoupled decay is added by the test."""

  def __init__(self, o):
    self.o, self.m, self.v = o, 0.0, 0.0

  def __call__(self, g, t):
    o = self.o
    self.m = o.b1 * self.m + (1 - o.b1) * g
    self.v = o.b2 * self.v + (1 - o.b2) * g * g
    mh, vh = self.m / (1 - o.b1 ** t), self.v / (1 - o.b2 ** t)
    return mh / (np.sqrt(vh) + o.eps)


def _ref_adamw(o, name):
  return _AdamW(o)


def _ref_sgd(o, name):
  """Momentum SGD (Sutskever et al. 2013, PyTorch form): b = mu b + g; Nesterov
  uses g + mu b."""
  state = {"b": 0.0}

  def f(g, t):
    state["b"] = o.momentum * state["b"] + g
    return g + o.momentum * state["b"] if o.nesterov else state["b"]
  return f


def _ref_muon(o, name):
  """Muon (Jordan 2024) as optax states it: M = b M + (1-b) G; Nesterov with bias
  correction, M^ = b M/(1-b^(t+1)) + (1-b) G/(1-b^t); O = NS5(M^) per matrix;
  update 0.2 sqrt(max(in, out)) O (Liu et al. 2025, Moonlight's RMS matching)."""
  b, state = o.momentum, {"m": 0.0}

  def f(g, t):
    state["m"] = b * state["m"] + (1 - b) * g
    mh = b * state["m"] / (1 - b ** (t + 1)) + (1 - b) * g / (1 - b ** t)

    def one(m):
      return 0.2 * np.sqrt(max(m.shape)) * _ns5(m)
    return _per_matrix(one, mh, name)
  return f


def _ref_normuon(o, name):
  """NorMuon (Li et al. 2025, arXiv 2510.05491, Algorithm 1) on W in R^{m x n},
  rows = output neurons. rung's [in, out] matrix is W^T, so a row of W is a column
  here:  M_t = b1 M + (1-b1) G;  O_t = NS5(M_t);  v_t = b2 v + (1-b2) mean over the
  input of O_t^2 (one per output neuron);  O^ = O_t / (sqrt(v_t) + eps);
  eta^ = 0.2 eta sqrt(m n) / ||O^||_F;  W -= eta lambda W + eta^ O^."""
  mom, _ = _matrices(np.zeros(SHAPES[name]), name)
  state = {"m": np.zeros_like(mom), "v": np.zeros((mom.shape[0], mom.shape[2]))}

  def f(g, t):
    gm, back = _matrices(g, name)                       # [batch, in, out]
    state["m"] = o.momentum * state["m"] + (1 - o.momentum) * gm
    out = []
    for i, m in enumerate(state["m"]):
      w = _ns5(m).T                                     # O_t as [out=m, in=n]
      state["v"][i] = (o.normuon_b2 * state["v"][i]
                       + (1 - o.normuon_b2) * (w * w).mean(axis=1))
      wh = w / (np.sqrt(state["v"][i])[:, None] + o.eps)
      out.append((0.2 * np.sqrt(w.size) / np.linalg.norm(wh) * wh).T)
    return back(np.stack(out))
  return f


def _sign_fixed(p):
  """Each column times the sign of its largest-magnitude entry (rung's convention
  for singular vectors, whose sign the SVD leaves free)."""
  return p * np.sign(p[np.abs(p).argmax(axis=0), np.arange(p.shape[1])])


def _ref_galore(o, name):
  """GaLore (Zhao et al. 2024, Algorithm 2) per matrix G [m, n]: every T steps
  U S V^T = SVD(G), P = U[:, :r] if m >= n (R = P^T G) else V[:, :r] (R = G P);
  N = Adam(R) (moments at R's shape); update alpha P N (or alpha N P^T). The
  randomized projector finds the same P here: every test matrix's rank is below
  its probe count."""
  nb = _matrices(np.zeros(SHAPES[name]), name)[0].shape[0]
  adams = [_AdamW(o) for _ in range(nb)]
  proj = [None] * nb

  def f(g, t):
    gm, back = _matrices(g, name)
    out = []
    for i, m in enumerate(gm):
      left = m.shape[0] >= m.shape[1]
      if (t - 1) % o.galore_update_proj_gap == 0:
        u, _, vt = np.linalg.svd(m, full_matrices=False)
        proj[i] = _sign_fixed(u[:, :o.galore_rank] if left else vt[:o.galore_rank].T)
      r = proj[i].T @ m if left else m @ proj[i]
      n = adams[i](r, t)
      out.append(o.galore_scale * (proj[i] @ n if left else n @ proj[i].T))
    return back(np.stack(out))
  return f


REFS = {"adamw": _ref_adamw, "sgd": _ref_sgd, "muon": _ref_muon,
        "normuon": _ref_normuon, "galore": _ref_galore}


@pytest.mark.parametrize("name,extra", [(n, {}) for n in REFS] +
                         [("galore", {"galore_projector": "svd"})])
def test_update_equals_numpy_reference_of_the_paper(name, extra):
  """Three updates of each optimizer (warmup then cosine, decoupled decay masked
  for the norm scale, GaLore refreshing its projectors at steps 1 and 3) against
  the float64 reference, rtol 1e-5. Muon's and NorMuon's orthogonalized matrices
  are compared to 1e-4 of the largest element instead: five Newton-Schulz
  iterations amplify float32 rounding across each matrix, so the same program
  lands 2.4e-5 or 2.8e-5 (of the matrix's scale) away from the reference
  depending only on XLA:CPU's fusion emitter, while a coefficient off by 0.1% is
  off by more than 1e-3."""
  o = _optim(name, **extra)
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
           for _ in range(3)]
  got = _run_jax(o, params, grads)
  matrix = name in ("muon", "normuon", "galore")
  refs = {k: (REFS[name] if matrix and k in GROUPS or not matrix else _ref_adamw)(o, k)
          for k in SHAPES}
  p = {k: v.astype(np.float64) for k, v in params.items()}
  for t, g in enumerate(grads, start=1):
    eta = _ref_rate(o, 8, t)
    for k in SHAPES:
      decay = WD * p[k] if "norm" not in k else 0.0  # decoupled, masked for norms
      want = -eta * (refs[k](g[k].astype(np.float64), t) + decay)
      atol = (1e-4 * np.abs(want).max() if name in ("muon", "normuon")
              and k in GROUPS else 1e-7)
      np.testing.assert_allclose(got[t - 1][k], want, rtol=1e-5, atol=atol,
                                 err_msg=f"{name} step {t} {k}")
      p[k] = p[k] + got[t - 1][k]


@pytest.mark.parametrize("m,n", [(96, 64), (48, 80)])
def test_randomized_projector_finds_the_top_singular_subspace(m, n):
  """Halko et al.'s subspace iteration against NumPy's SVD, on spectra beyond the
  probe count: fast decay (s_i = 0.7^i) gives the same subspace; slow decay
  (s_i = 1/(1+i)) captures at least 99% of the best rank-r energy."""
  from train.galore import _randomized_left
  rng = np.random.default_rng(0)
  u = np.linalg.qr(rng.normal(size=(m, min(m, n))))[0]
  v = np.linalg.qr(rng.normal(size=(n, min(m, n))))[0]
  r, i = 8, np.arange(min(m, n))
  for s, same in ((0.7 ** i, True), (1 / (1 + i), False)):
    g = (u * s) @ v.T                                      # [m, n]
    p = np.asarray(_randomized_left(jnp.asarray(g, jnp.float32), r,
                                    jax.random.key(3)), np.float64)
    best = u[:, :r]
    assert p.shape == (m, r)
    np.testing.assert_allclose(p.T @ p, np.eye(r), atol=1e-5)
    if same:
      np.testing.assert_allclose(p @ p.T, best @ best.T, atol=1e-4)
    else:
      energy = np.linalg.norm(p.T @ g) ** 2 / np.linalg.norm(best.T @ g) ** 2
      assert 0.99 <= energy <= 1 + 1e-6, energy


@pytest.mark.parametrize("projector", ["randomized", "svd"])
def test_galore_refresh_split_over_the_mesh_gives_one_devices_projectors(projector):
  """Every data replica found every layer's projector (and under FSDP the QR's
  operand was gathered): on 8 CPU devices sharing 2 cores llama_tiny's refresh
  took 1.33 s replicated over data=8, 0.22 s split. Split over the mesh
  (`train.matrix_split.map_split`), each device refreshes ceil(layers / split)
  whole matrices: the projectors equal one device's, and the loop over the
  matrices (`lax.map`, whose trip count XLA records) runs that share, not all
  of them. (XLA's cost analysis counts a loop body once, so FLOPs cannot show
  it.)"""
  import re

  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import sharding
  from train import galore, matrices, matrix_split
  name, (layers, m, n) = "layers/mlp/up", (20, 64, 96)  # 20 layers: padded to 24
  d = matrices.dims(name, 3)
  init, update = galore._batched(d, (layers, m, n), 8, 2, 0.25, optax.scale_by_adam(),
                                 projector)
  g = np.random.default_rng(0).normal(size=(layers, m, n)).astype(np.float32)
  refresh = jax.jit(lambda g: update(g, init(g))[1].projector)  # count 0: refresh

  def run(mesh, spec):  # -> (projectors, the compiled loops' trip counts)
    trips = lambda c: set(map(int, re.findall(  # noqa: E731
        r'known_trip_count":\{"n":"(\d+)"', c.as_text())))
    if mesh is None:
      compiled = refresh.lower(g).compile()
      return np.asarray(compiled(g)), trips(compiled)
    placed = jax.device_put(g, NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
      compiled = refresh.lower(placed).compile()
      return np.asarray(compiled(placed)), trips(compiled)
  one, loops = run(None, None)
  assert one.shape == (layers, n, 8) and layers in loops  # m < n: the columns' side
  for axes, spec in [(dict(data=8), P()), (dict(fsdp=2, tensor=4), P(None, "fsdp",
                                                                     "tensor")),
                     (dict(stage=2, data=4), P("stage"))]:
    mesh = sharding.make_mesh(axes, jax.devices()[:8])
    split = math.prod(mesh.shape[a] for a in matrix_split.split_axes(layers,
                                                                     mesh.abstract_mesh))
    assert split == 8, axes
    got, loops = run(mesh, spec)
    np.testing.assert_allclose(got, one, atol=1e-5, err_msg=str(axes))
    assert -(-layers // split) in loops and layers not in loops, (axes, loops)
  # Under DiLoCo's vmap over its replicas (spmd_axis_name), each replica's own
  # (a shard_map manual over the split axes alone failed to lower there); the
  # second replica's layers come reversed, and so do its projectors.
  mesh = sharding.make_mesh(dict(diloco=2, data=4), jax.devices()[:8])
  replicas = jax.device_put(np.stack([g, g[::-1]]), NamedSharding(mesh, P("diloco")))
  with jax.set_mesh(mesh):
    got = jax.jit(jax.vmap(lambda g: update(g, init(g))[1].projector,
                           spmd_axis_name="diloco"))(replicas)
  # (vmapped, the batched programs round differently: 1e-4 of entries of about
  # 0.1; a projector of another layer is off by its whole scale)
  np.testing.assert_allclose(np.asarray(got), np.stack([one, one[::-1]]), atol=1e-4)


# --- training on a mesh -------------------------------------------------------------

def _tiny(name, steps=3, **optim):
  from conftest import make_tiny_config
  c = make_tiny_config()
  c.optim.update(name=name, **{"galore_rank": 4, **optim})
  c.train.steps = steps
  return c


# AdamW's parity, resume and restore onto another mesh are test_train_meshes' and
# test_checkpoint's. GaLore runs its default randomized projector here: with
# galore_projector=svd, jax 0.10.2's XLA:CPU runtime deadlocks now and then in a
# program on 8 CPU devices (all 8 device threads wait in
# CpuPjRtRawLoadedExecutable::Execute with the thread pool idle); refreshing every
# step, the SVD hung in 5 of 32 three-step runs (and 2 of 11 on 2026-12-05), the
# randomized refresh in 0 of 24 (benchmarks/README.md).
EIGHT = dict(fsdp=2, tensor=2, data=2)


@pytest.mark.parametrize("name", ["sgd", "muon", "normuon", "galore"])
def test_same_losses_on_a_mesh_exact_resume_and_restore_elsewhere(name, tmp_path):
  """The mesh run gives 1 device's losses; 3 steps then a resume to 4 equal 4
  steps straight, bit for bit (moments, projectors and counters checkpointed);
  the step-3 checkpoint restored onto 1 device takes the same 4th step. All runs
  share decay_steps, so each mesh compiles one step. GaLore refreshes its
  projector every 2 steps, so the resumed step 4 uses the restored projector."""
  import shutil
  devices = jax.devices()[:1]
  one = lambda steps: _with_mesh(_tiny(name, steps, decay_steps=4,  # noqa: E731
                                       galore_update_proj_gap=2), data=1)
  mesh = lambda steps: _with_mesh(_tiny(name, steps, decay_steps=4,  # noqa: E731
                                        galore_update_proj_gap=2),
                                  **EIGHT)
  on = jax.devices()
  first = _losses(mesh(3), tmp_path / "run", on)
  np.testing.assert_allclose(first, _losses(one(3), tmp_path / "one", devices),
                             rtol=1e-4)
  shutil.copytree(tmp_path / "run", tmp_path / "moved")
  second = _losses(mesh(4), tmp_path / "run", on)
  whole = _losses(mesh(4), tmp_path / "whole", on)
  assert len(second) == 1 and list(first) + list(second) == list(whole)
  moved = _losses(one(4), tmp_path / "moved", devices)
  assert len(moved) == 1
  np.testing.assert_allclose(moved, whole[3:], rtol=1e-4)
  # Another optimizer's state cannot be resumed: named before anything compiles.
  other = _with_mesh(_tiny("adamw", 5, decay_steps=4), **EIGHT)
  with pytest.raises(ConfigError, match=r"optim\.name.*holds the state of "
                     rf"optim\.name='{name}', not 'adamw'.*init_from=") as err:
    _losses(other, tmp_path / "run", on)
  # Its fixes work as given: the saved optimizer resumes (as `second` did), or a
  # run in another directory starts from the parameters (once: it compiles).
  assert f"resume with --config.optim.name={name}, " in err.value.fix
  if name == "sgd":
    import re
    start = re.search(r"--workdir=NEW_RUN --config\.checkpoint\.init_from=(\S+)\.$",
                      err.value.fix).group(1)
    assert start == f"{tmp_path / 'run'}:4"  # the latest step
    other.checkpoint.init_from = start
    assert len(_losses(other, tmp_path / "new", on)) == 5


def test_offload_host_keeps_state_in_pinned_host_and_the_losses(tmp_path):
  """jax 0.10.2's CPU backend has pinned_host memory, so offload runs here for
  real: same losses as without it (the plain run is test_train_meshes' 1-device
  program, shared through the compilation cache)."""
  import sharding
  from model import ModelConfig
  from train.state import model_spec, state_shardings
  c = _with_mesh(_tiny("adamw"), data=1)
  plain = _losses(c, tmp_path / "plain", jax.devices()[:1])
  c.optim.offload = "host"
  np.testing.assert_array_equal(_losses(c, tmp_path / "host", jax.devices()[:1]),
                                plain)
  spec = model_spec(ModelConfig.from_config(c.model), sharding.normalize_rules(None))
  s = state_shardings(spec, make_optimizer(c.optim, 3),
                      sharding.make_mesh(c.mesh, jax.devices()[:1]))
  assert {x.memory_kind for x in jax.tree.leaves(s.opt_state)} == {"pinned_host"}
  assert "pinned_host" not in {x.memory_kind for x in jax.tree.leaves(s.params)}


def _opt_state(name, mesh_sizes=None, **optim):
  """(abstract optimizer state, its shardings) for the tiny model; nothing runs."""
  import sharding
  from model import ModelConfig
  from train.state import model_spec, state_shardings
  c = _with_mesh(_tiny(name, **optim), **(mesh_sizes or dict(data=8)))
  spec = model_spec(ModelConfig.from_config(c.model), sharding.normalize_rules(None))
  tx = make_optimizer(c.optim, 3)
  return (jax.eval_shape(tx.init, spec.abstract_params),
          state_shardings(spec, tx, sharding.make_mesh(c.mesh)).opt_state)


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["adamw", "muon", "normuon", "galore"])
def test_bfloat16_state_halves_the_moments(name):
  """Every parameter-derived buffer in bfloat16; only constants (Muon's
  Newton-Schulz coefficients) and counters keep their dtype."""
  f32, bf16 = _opt_state(name)[0], _opt_state(name, state_dtype="bfloat16")[0]

  def floats(t):
    return [x for p, x in jax.tree_util.tree_leaves_with_path(t)
            if jnp.issubdtype(x.dtype, jnp.floating)
            and "ns_coeffs" not in jax.tree_util.keystr(p)]
  assert {x.dtype for x in floats(bf16)} == {jnp.dtype(jnp.bfloat16)}
  assert _bytes(floats(bf16)) * 2 == _bytes(floats(f32))


def test_bfloat16_state_updates_close_to_float32():
  rng = np.random.default_rng(1)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
           for _ in range(3)]
  for name in ("adamw", "normuon"):
    a = _run_jax(_optim(name), params, grads)
    b = _run_jax(_optim(name, state_dtype="bfloat16"), params, grads)
    for k in SHAPES:
      np.testing.assert_allclose(b[2][k], a[2][k], rtol=0.1, atol=2e-3)


@pytest.mark.parametrize("name", ["adamw", "sgd", "muon", "normuon", "galore"])
def test_state_sharded_over_every_axis_of_its_parameter(name):
  """ZeRO: every parameter-owned state leaf is cut into as many shards as its
  parameter, also where its shape differs (NorMuon's per-neuron moment, GaLore's
  [layers, m, rank] moments and projectors of a 4-D attention projection)."""
  import math
  import sharding
  from train.optimizer import _param_keys, owner
  from train.state import model_spec, param_shardings
  from model import ModelConfig
  mesh = dict(fsdp=2, tensor=2, data=2)
  shapes, s = _opt_state(name, mesh)
  c = _with_mesh(_tiny(name), **mesh)
  spec = model_spec(ModelConfig.from_config(c.model), sharding.normalize_rules(None))
  params = _param_keys(spec.abstract_params)
  pshard = _param_keys(param_shardings(spec, sharding.make_mesh(c.mesh)))
  shards = lambda x, sh: x.size // math.prod(sh.shard_shape(x.shape))  # noqa: E731
  owned = 0
  for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(shapes),
                           jax.tree.leaves(s)):
    key = owner(path, params)
    if key is None or not jnp.issubdtype(x.dtype, jnp.floating):
      assert sh.spec == jax.sharding.PartitionSpec()
      continue
    owned += 1
    assert shards(x, sh) == shards(params[key], pshard[key]), (
        jax.tree_util.keystr(path), x.shape, sh.spec, pshard[key].spec)
  assert owned >= len(params)


def test_state_spec_moves_a_projected_axis_onto_what_is_left():
  from jax.sharding import PartitionSpec as P
  from train.optimizer import state_spec
  sizes = dict(stage=2, fsdp=4, tensor=2)
  q = (4, 64, 8, 16)  # [layers, embed, heads, head_dim]
  qs = P("stage", "fsdp", "tensor", None)
  assert state_spec(q, q, qs, sizes) == qs  # Adam's moments
  assert state_spec((4, 1, 8, 16), q, qs, sizes) == P("stage", None, "tensor", "fsdp")
  assert state_spec((4, 64, 4), q, qs, sizes) == P("stage", ("fsdp", "tensor"), None)
  assert state_spec((4, 128, 4), q, qs, sizes) == P("stage", ("fsdp", "tensor"), None)
  assert state_spec((4, 3, 5), q, qs, sizes) == P(("stage", "tensor"), None, None)
  assert state_spec((3, 3, 5), q, qs, sizes) == P(None, None, None)  # indivisible


# --- config errors ------------------------------------------------------------------

def _error(config, monkeypatch=None) -> str:
  with pytest.raises(ConfigError) as e:
    validate_config(config, 8)
  return str(e.value)


def test_config_errors_name_the_field_and_fix(monkeypatch):
  c = _tiny("lion")
  assert _error(c) == (
      "Config error in `optim.name`: 'lion' is not one of adamw, sgd, muon, "
      "normuon, galore. Fix: set --config.optim.name to one of them.")
  c = _tiny("galore", galore_rank=40)
  assert _error(c) == (
      "Config error in `optim.galore_rank`: is 40, larger than the smaller side of "
      "layers/attn/k's [32, 32] matrices (shape (2, 32, 4, 8)), the smallest "
      "optim.matrices names. Fix: set --config.optim.galore_rank=32 (or less), or "
      "leave layers/attn/k out of optim.matrices.")
  c = _tiny("adamw", offload="host")
  validate_config(c, 8)  # the CPU backend has pinned_host memory
  monkeypatch.setattr("train.validate.host_memory_kinds", lambda: ["device"])
  assert _error(c) == (
      "Config error in `optim.offload`: is 'host', but the cpu backend has no "
      "'pinned_host' memory (its memory kinds: device). Fix: set "
      "--config.optim.offload=none, or run on a backend with host memory (TPU, GPU).")
  c = _tiny("galore", galore_projector="lanczos")
  assert _error(c) == (
      "Config error in `optim.galore_projector`: 'lanczos' is not one of "
      "randomized, svd. Fix: set --config.optim.galore_projector to one of them.")
  c = _tiny("muon", matrices="norm")
  assert "matches final_norm/scale of shape (32,), which is not a matrix" in _error(c)


def test_cli_unknown_optimizer_exits_2(tmp_path):
  from conftest import run_cli
  r = run_cli("train", "--config=experiments/llama_tiny.py",
              f"--workdir={tmp_path}", "--config.optim.name=Muonn")
  assert r.returncode == 2, r.stderr[-2000:]
  assert ("Config error in `optim.name`: 'Muonn' is not one of adamw, sgd, muon, "
          "normuon, galore. Fix: set --config.optim.name=muon (or another of those)."
          in r.stderr + r.stdout)


def test_a_warmup_longer_than_the_schedule_is_cut_and_said():
  """`optim.warmup_steps` beyond the schedule's length (a 10-step fine-tune on the
  default 100) is cut to length - 1; the note names both and the steps it takes,
  and the schedule peaks exactly there. A warmup that fits says nothing. Steps are
  the metrics' (update n is step n): the last step of the schedule takes the final
  rate (a trial found a 10-step run cut to 9 warmup steps ending at the peak,
  its one decay step past the run's end), and step 1 is not 0."""
  import re

  from train.optimizer import warmup_note
  for warmup, steps, decay in [(100, 10, None), (50, 30, 20), (5, 10, None),
                               (19, 40, 20), (20, 40, 20), (100, 2, None)]:
    o = _optim("adamw")
    o.warmup_steps, o.decay_steps = warmup, decay
    lr = schedule(o, steps)
    length = decay or steps
    rates = [float(lr(n - 1)) for n in range(1, length + 1)]  # steps 1..length
    peak = 1 + int(np.argmax(rates))
    assert rates[-1] == pytest.approx(o.learning_rate * o.min_lr_ratio)
    assert rates[0] > 0
    np.testing.assert_allclose(rates, [_ref_rate(o, steps, n)
                                       for n in range(1, length + 1)], rtol=1e-6)
    note = warmup_note(o, steps)
    if warmup < length:
      assert note == "" and peak == warmup
      continue
    assert f"optim.warmup_steps={warmup} does not fit a learning-rate schedule of " \
        f"{length} steps" in note
    taken = re.search(r"warmup takes (\d+) (steps?)", note)
    assert int(taken[1]) == peak and taken[2] == ("step" if peak == 1 else "steps")
    assert peak == length - 1 and rates[peak - 1] == pytest.approx(o.learning_rate)
    # the suggested warm-up fits the schedule and warms up (a trial's 2-step run
    # was offered warmup_steps=0)
    suggested = int(re.search(r"warmup_steps \(e\.g\. (\d+)\)", note)[1])
    assert 1 <= suggested <= length - 1


def test_a_resume_past_the_schedule_says_the_rate_it_runs_at():
  """From a trial: a run resumed at step 22 with optim.decay_steps lowered to 20
  said nothing of it. The note appears exactly when the schedule ended before the
  resume, and names the rate the remaining steps take (the schedule's own)."""
  from train.optimizer import resume_note
  o = _optim("adamw")
  o.warmup_steps, o.decay_steps = 3, 20
  lr = schedule(o, 30)
  for step in range(0, 31):
    note = resume_note(o, 30, step)
    assert bool(note) == (20 <= step < 30), step
    if note:
      end = float(lr(step))  # the rate of step + 1
      assert end == pytest.approx(o.learning_rate * o.min_lr_ratio)
      assert note.endswith(f"steps {step + 1} to 30 run at its final rate {end:g}")
      assert (("where this run resumes" in note) == (step == 20)
              and ("before this resume" in note) == (step > 20)), note


def test_a_resume_on_another_schedule_says_the_rate_and_warmup_that_moved():
  """A run trained 50 steps with the default 100 warm-up steps (cut to 49) and
  resumed with train.steps=200 warms up again from step 51: nothing said so. The
  note appears exactly when step + 1's rate differs between the saved schedule and
  the new one, gives both (each the schedule's own), and the two warm-ups when
  they differ; checked over lengths, warm-ups, decay_steps and peak rates."""
  import re
  import types

  from train.optimizer import _warmup, rate_change_note
  o = _optim("adamw")
  cases = 0
  for (saved_steps, total, warmup, decay, saved_lr) in [
      (50, 200, 100, None, None), (50, 50, 10, None, None), (40, 80, 10, 80, None),
      (40, 80, 10, None, 1e-3), (30, 60, 5, 30, None), (20, 20, 5, None, 1e-3)]:
    o.warmup_steps, o.decay_steps = warmup, decay
    saved = dict(learning_rate=saved_lr or o.learning_rate, warmup_steps=warmup,
                 min_lr_ratio=o.min_lr_ratio, decay_steps=None)
    old = types.SimpleNamespace(**saved)
    for step in range(1, saved_steps + 1):
      note = rate_change_note(saved, saved_steps, o, total, step)
      was, now = float(schedule(old, saved_steps)(step)), float(schedule(o, total)(step))
      if step >= total or math.isclose(was, now, rel_tol=1e-6):
        assert note == "", (saved_steps, total, step, note)
        continue
      cases += 1
      assert note.startswith(f"note: step {step + 1} takes learning rate {now:g}, "
                             f"where the saved run's schedule gave it {was:g}")
      warmups = (_warmup(old, saved_steps), _warmup(o, decay or total))
      moved = re.search(r"warm-up (\d+) steps? -> (\d+)", note)
      assert (moved is not None) == (warmups[0] != warmups[1])
      if moved:
        assert (int(moved[1]), int(moved[2])) == warmups
        assert ("warm up again" in note) == (warmups[0] <= step < warmups[1])
  assert cases > 100
  assert rate_change_note({}, None, o, 80, 10) == ""  # no saved length: nothing to say


@pytest.mark.parametrize("name", ["adamw", "sgd", "muon", "normuon", "galore"])
def test_the_optimizer_line_says_the_schedule_the_run_follows(name):
  """The run's `optimizer:` line names the update and, for the matrix optimizers,
  the parameters it takes; its warmup, peak, final rate and last step are the
  schedule's own (checked against `schedule` for several lengths)."""
  import re

  from train.optimizer import describe
  for warmup, steps, decay in [(100, 10, None), (5, 40, None), (10, 40, 25),
                               (100, 2, None)]:
    o = _optim(name)
    o.warmup_steps, o.decay_steps = warmup, decay
    line = describe(o, steps)
    assert line.startswith(f"optimizer: {name} (")
    assert (f" on {o.matrices}, adamw" in line) == (name in ("muon", "normuon", "galore"))
    m = re.search(r"learning rate (\S+), warmup (\d+) steps?, cosine to (\S+) at "
                  r"step (\d+)", line)
    assert "1 steps" not in line
    peak, w, end, last = float(m[1]), int(m[2]), float(m[3]), int(m[4])
    rate = lambda n: float(schedule(o, steps)(n - 1))  # noqa: E731  (step n)
    assert rate(w) == pytest.approx(peak) and rate(w - 1) < peak
    assert rate(last) == pytest.approx(end, rel=1e-4) and rate(last - 1) > end
    assert last == (decay or steps)  # the run's last step, when it ends the schedule


def test_the_lines_say_the_clipping_and_options_in_force():
  """From a trial of DGC ablations: with DGC's local clip off the line still said
  "global-norm clip 1 per replica" (nothing clips then; with it on each replica
  clips at clip_norm / sqrt(replicas)); "momentum masking" was listed without
  momentum correction, where it does nothing; "warming up from 1/4" at a density
  of 1/4 or more, where there is no warm-up; GaLore's projector and Muon's update
  scaling, which change the update, were not named."""
  from train.compression import Compression
  from train.optimizer import describe
  o = _optim("sgd")
  o.clip_norm = 1.0
  o.compression.update(method="dgc", density=0.01, warmup_steps=4)
  assert "global-norm clip 1 / sqrt(replicas) = 0.5 per replica before DGC" in describe(
      o, 10, replicas=4)
  o.compression.update(local_clip=False, momentum_correction=False)
  assert "; no clipping (DGC's local_clip is off);" in describe(o, 10, replicas=4)
  line = Compression.from_config(o).describe(4)
  assert "momentum masking" not in line and "warming up over 4 steps from 1/4" in line
  o.compression.update(momentum_correction=True, density=0.5)
  line = Compression.from_config(o).describe(4)
  assert line.endswith("momentum correction; momentum masking")
  assert "(no warm-up: the density is at least 1/4)" in line
  o.compression.method = "none"
  assert "; global-norm clip 1;" in describe(o, 10, replicas=4)
  g = _optim("galore")
  g.galore_projector = "svd"
  assert "galore (rank " in describe(g, 10) and "svd projection every" in describe(g, 10)
  m = _optim("muon")
  m.muon_rms = 0.0
  assert "width scaling sqrt(max(1, out/in))" in describe(m, 10)
  m.muon_rms = 0.2
  assert "update RMS 0.2: scale 0.2 x sqrt(max(in, out))" in describe(m, 10)
  # Nesterov looks ahead along the momentum: at momentum 0 the line does not claim it
  for name in ("sgd", "muon"):
    o = _optim(name)
    o.nesterov = True
    assert ", nesterov" in describe(o, 10)
    o.momentum = 0.0
    assert "momentum 0" in describe(o, 10) and "nesterov" not in describe(o, 10)


def test_galore_refresh_on_devices_sharing_cores_finishes(tmp_path):
  """llama_tiny with GaLore over fsdp=2 hung for good in its first refresh
  (XLA:CPU's thread pool deadlocked in a batched QR inside the refresh's
  conditional while the devices shared this machine's cores); the refresh now
  runs the layers one at a time. Two refreshes in 3 steps, on all 8 devices.
  The svd projector takes the same path (69 s here, so measured by hand:
  benchmarks/README.md)."""
  from conftest import run_cli
  args = ("train", "--config=experiments/llama_tiny.py", f"--workdir={tmp_path}",
          "--config.train.steps=3", "--config.optim.warmup_steps=1",
          "--config.train.eval_every=0", "--config.optim.name=galore",
          "--config.optim.galore_rank=32", "--config.optim.galore_update_proj_gap=2",
          "--config.mesh.fsdp=2", "--config.data.source=synthetic",
          "--config.data.seq_len=64", "--config.train.batch_size=8",
          "--config.log.peak_flops=1e12", "--config.checkpoint.every_steps=0")
  import subprocess
  try:
    proc = run_cli(*args, timeout=150)
  except subprocess.TimeoutExpired:
    pytest.fail("GaLore's training run hung (no exit in 150 s)")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "3/3" in proc.stderr
  # every_steps=0 saves nothing, not even at the end: the run says so at start
  assert "checkpoint.every_steps=0: this run saves no checkpoint" in proc.stdout
  assert not (tmp_path / "checkpoints").exists() or not any(
      (tmp_path / "checkpoints").iterdir())


def test_resume_refuses_only_changes_to_the_saved_optimizer_state():
  """A field of an optimizer or compression method that is off on both sides
  (GaLore's rank, the matrices under AdamW, DGC's momentum correction under top-k)
  changes nothing saved; the same field where it is used is a config error whose
  fix pastes into a shell. From a fresh-user trial: a top-k run resumed onto
  pipeline stages was refused (compression and stages do not combine), its fix
  method=none was refused by this check, whose fix (resume with top-k) led back
  to the first refusal; it now offers only the new run, and says why."""
  import json
  import shlex
  import types
  from ml_collections import ConfigDict
  from train.loop import _optimizer_state_changes
  from experiments import base

  def config(**fields):
    c = base.get_config()
    for k, v in fields.items():
      group, _, name = k.rpartition("__")
      (c.optim[group] if group else c.optim)[name] = v
    return c

  def optim(**fields):  # as the checkpoint saved it
    return json.loads(ConfigDict({"optim": config(**fields).optim}).to_json())

  def check(saved, new, **mesh):
    ckpt = types.SimpleNamespace(saved_config=lambda step: saved,
                                 directory="/runs/a b/checkpoints")
    c = config(**new)
    c.mesh.update(mesh)
    return _optimizer_state_changes(ckpt, 2, c, 8)

  regex = "attn/(q|k)$"
  for saved, new in [(dict(name="adamw"), dict(name="adamw", galore_rank=64)),
                     (dict(name="adamw"), dict(name="adamw", matrices=regex)),
                     (dict(compression__method="topk"),
                      dict(compression__method="topk",
                           compression__momentum_correction=False))]:
    assert check(optim(**saved), new) == ""
  with pytest.raises(ConfigError, match="optim.galore_rank=128, not 64"):
    check(optim(name="galore"), dict(name="galore", galore_rank=64))
  with pytest.raises(ConfigError) as err:
    check(optim(name="muon", matrices=regex), dict(name="muon"))
  words = shlex.split(err.value.fix)
  assert f"--config.optim.matrices={regex}," in words
  assert "--config.checkpoint.init_from=/runs/a b:2." in words
  with pytest.raises(ConfigError) as err:
    check(optim(compression__method="topk"), dict(compression__method="none"),
          stage=2, data=4, fsdp=1)
  assert err.value.fix.startswith("start a new run from its parameters")
  assert ("--config.optim.compression.method=topk, which this run refuses: optim."
          "compression.method is 'topk': gradient compression and pipelining do not "
          "combine") in err.value.fix


@pytest.mark.parametrize("d_ff,kv_heads,rank", [(16, 4, 40), (64, 1, 40), (24, 2, 20),
                                                (64, 4, 33)])
def test_a_galore_rank_too_large_names_the_smallest_matrix_and_a_rank_that_fits(
    d_ff, kv_heads, rank):
  """The rank must fit every matrix optim.matrices names: the error names the
  smallest (not the first too small for it), its fix validates, and the limit
  `galore_rank_limit` gives is the smallest side of any named matrix."""
  from conftest import assert_fixes_validate, fix_alternatives
  from train.validate import galore_rank_limit
  c = _tiny("galore", galore_rank=rank)
  c.model.update(d_ff=d_ff, num_kv_heads=kv_heads)
  smallest = min(32, d_ff, kv_heads * c.model.head_dim)  # d_model is 32
  assert galore_rank_limit(c) == smallest
  err = assert_fixes_validate(c)
  assert err.field == "optim.galore_rank"
  assert [f"--config.optim.galore_rank={smallest}"] in fix_alternatives(err.fix)
