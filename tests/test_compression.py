"""Gradient compression (`optim.compression`) against a NumPy reference of Deep
Gradient Compression written from the paper (Lin et al., ICLR 2018, Algorithm 1,
sections 3.1-3.3): 4 replicas, 5 steps, fixed per-replica gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sharding
from train import compression
from model import ModelConfig
from train.optimizer import make_optimizer
from train.state import model_spec

R, STEPS, LR = 4, 5, 0.1
SHAPES = {"w": (2, 6, 5), "b": (40,)}  # w: 2 layers of 30 entries
GROUPS = {"w": 2, "b": 1}
DENSITY = 0.1  # k = 3 per layer of w, 4 of b


# --- the reference ------------------------------------------------------------------

def _top_k(row, k):
  return np.argsort(-np.abs(row), kind="stable")[:k]


class PaperDGC:
  """The exchange of N workers, per the paper: each worker's share G = g / N of
  the gradient is (DGC) clipped to C N^-1/2, folded into its velocity U and
  accumulation V (momentum correction) or into V alone; the top `density` of
  each tensor of V by magnitude is sent and zeroed in V (and in U: momentum
  factor masking); the sum of what was sent is the applied gradient. `groups`
  splits a leaf into that many tensors (its layers)."""

  def __init__(self, shapes, groups, n, density, method, *, momentum_correction=True,
               local_clip=True, momentum_masking=True, error_feedback=True,
               nesterov=False, m=0.9, clip=0.5):
    self.shapes, self.groups, self.n, self.density = shapes, groups, n, density
    self.method, self.mc, self.clip_local = method, momentum_correction, local_clip
    self.masking, self.ef, self.nesterov, self.m, self.clip = (
        momentum_masking, error_feedback, nesterov, m, clip)
    self.V = [{k: np.zeros(s) for k, s in shapes.items()} for _ in range(n)]
    self.U = [{k: np.zeros(s) for k, s in shapes.items()} for _ in range(n)]

  def exchange(self, grads):
    """grads: per worker {name: mean gradient} -> ({name: summed sent values},
    per worker {name: [(indices, values) per tensor]})."""
    total = {k: np.zeros(s) for k, s in self.shapes.items()}
    sent = []
    for r, g in enumerate(grads):
      G = {k: np.asarray(g[k], np.float64) / self.n for k in self.shapes}
      if self.method == "dgc" and self.clip_local:
        norm = np.sqrt(sum(np.sum(x ** 2) for x in G.values()))
        G = {k: x * min(1.0, self.clip / np.sqrt(self.n) / norm) for k, x in G.items()}
      V, U = self.V[r], self.U[r]
      for k in self.shapes:
        if self.method == "dgc" and self.mc:
          U[k] = self.m * U[k] + G[k]
          V[k] = V[k] + (self.m * U[k] + G[k] if self.nesterov else U[k])
        elif self.method == "dgc" or self.ef:
          V[k] = V[k] + G[k]
        else:
          V[k] = G[k].copy()
      mine = {}
      for k in self.shapes:
        rows, urows = V[k].reshape(self.groups[k], -1), U[k].reshape(self.groups[k], -1)
        count = max(1, round(self.density * rows.shape[1]))
        mine[k] = []
        for row, urow, dense in zip(rows, urows, total[k].reshape(self.groups[k], -1)):
          idx = _top_k(row, count)
          mine[k].append((idx, row[idx].copy()))
          dense[idx] += row[idx]
          row[idx] = 0
          if self.method == "dgc" and self.mc and self.masking:
            urow[idx] = 0
      sent.append(mine)
    return total, sent


def reference(method, *, optimizer="sgd", m=0.9, clip=0.5, nesterov=False, grads,
              params, **switches):
  """Per step: what each replica sent, the parameters after the update, the
  residuals V and velocities U."""
  dgc = PaperDGC(SHAPES, GROUPS, R, DENSITY, method, m=m, clip=clip,
                 nesterov=nesterov, **switches)
  w = {n: p.copy() for n, p in params.items()}
  mom = {n: np.zeros(s) for n, s in SHAPES.items()}  # the optimizer's own state
  nu = {n: np.zeros(s) for n, s in SHAPES.items()}
  out = []
  for t in range(STEPS):
    total, sent = dgc.exchange(grads[t])
    if method == "topk":  # the optimizer's own global-norm clipping
      norm = np.sqrt(sum(np.sum(g ** 2) for g in total.values()))
      total = {n: g * min(1.0, clip / norm) for n, g in total.items()}
    for n in SHAPES:
      g = total[n]
      if optimizer == "adamw":  # optax.adam's bias-corrected moments, no decay
        mom[n] = 0.9 * mom[n] + 0.1 * g
        nu[n] = 0.95 * nu[n] + 0.05 * g ** 2
        mhat, vhat = mom[n] / (1 - 0.9 ** (t + 1)), nu[n] / (1 - 0.95 ** (t + 1))
        w[n] -= LR * mhat / (np.sqrt(vhat) + 1e-8)
      elif method == "dgc" and switches.get("momentum_correction", True):
        w[n] -= LR * g  # the momentum ran per replica
      else:
        mom[n] = m * mom[n] + g
        w[n] -= LR * (g + m * mom[n] if nesterov else mom[n])
    out.append(dict(sent=sent, params={n: x.copy() for n, x in w.items()},
                    residual=[{n: x.copy() for n, x in v.items()} for v in dgc.V],
                    velocity=[{n: x.copy() for n, x in u.items()} for u in dgc.U]))
  return out


# --- rung --------------------------------------------------------------------------

def _optim(method, optimizer="sgd", **switches):
  from experiments import base
  o = base.get_config().optim
  o.update(name=optimizer, learning_rate=LR, warmup_steps=0, min_lr_ratio=1.0,
           weight_decay=0.0, clip_norm=0.5, momentum=0.9, b1=0.9, b2=0.95,
           nesterov=switches.pop("nesterov", False))
  o.compression.update(method=method, density=DENSITY, sample_fraction=1.0,
                       **switches)
  return o


def run_rung(o, grads, params):
  """The same 5 steps through train.compression on a data=4 mesh."""
  mesh = sharding.make_mesh(dict(data=R, fsdp=1, expert=1, sequence=1, tensor=1),
                            jax.devices()[:R])
  c = compression.Compression.from_config(o)
  tx = make_optimizer(o, STEPS)
  per_replica = NamedSharding(mesh, P("data"))

  @jax.jit
  def step(params, opt_state, state, g):
    dense, state, sent = compression.compressed_gradient(
        c, g, state, DENSITY, jax.random.key(0), GROUPS)
    updates, opt_state = tx.update(dense, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, sent

  params = {n: jnp.asarray(x, jnp.float32) for n, x in params.items()}
  opt_state = tx.init(params)
  state = jax.device_put(compression.init_state(c, params, R), per_replica)
  out = []
  with jax.set_mesh(mesh):
    for t in range(STEPS):
      g = jax.device_put({n: np.stack([grads[t][r][n] for r in range(R)]).astype(
          np.float32) for n in SHAPES}, per_replica)
      params, opt_state, state, sent = step(params, opt_state, state, g)
      out.append(jax.device_get(dict(params=params, state=state, sent=sent)))
  return out


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  grads = [[{n: rng.normal(size=s) for n, s in SHAPES.items()} for _ in range(R)]
           for _ in range(STEPS)]
  return grads, {n: rng.normal(size=s) for n, s in SHAPES.items()}


CASES = {
    "dgc": dict(method="dgc"),
    "dgc_nesterov": dict(method="dgc", nesterov=True),
    "dgc_no_momentum_correction": dict(method="dgc", momentum_correction=False),
    "dgc_no_local_clip": dict(method="dgc", local_clip=False),
    "dgc_no_momentum_masking": dict(method="dgc", momentum_masking=False),
    "topk_adamw": dict(method="topk", optimizer="adamw"),
    "topk_without_error_feedback": dict(method="topk", error_feedback=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sent_update_and_state_equal_the_paper(case):
  kw = dict(CASES[case])
  method, optimizer = kw.pop("method"), kw.pop("optimizer", "sgd")
  grads, params = _problem()
  ref = reference(method, optimizer=optimizer, grads=grads, params=params, **kw)
  got = run_rung(_optim(method, optimizer, **kw), grads, params)
  for t, (a, b) in enumerate(zip(ref, got)):
    for r in range(R):
      for n in SHAPES:
        idx, val = b["sent"][n]
        for layer, (ridx, rval) in enumerate(a["sent"][r][n]):
          order = np.argsort(idx[r, layer])
          np.testing.assert_array_equal(idx[r, layer][order], np.sort(ridx),
                                        err_msg=f"step {t} replica {r} {n}")
          np.testing.assert_allclose(val[r, layer][order], rval[np.argsort(ridx)],
                                     rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b["state"]["residual"][n][r], a["residual"][r][n],
                                   rtol=1e-5, atol=1e-7)
        if "velocity" in b["state"]:
          np.testing.assert_allclose(b["state"]["velocity"][n][r],
                                     a["velocity"][r][n], rtol=1e-5, atol=1e-7)
    for n in SHAPES:
      np.testing.assert_allclose(b["params"][n], a["params"][n], rtol=1e-5, atol=1e-6,
                                 err_msg=f"parameters after step {t}")


def test_local_clip_and_masking_change_the_result():
  """The switches are not no-ops on this problem (the reference differs)."""
  grads, params = _problem()
  base = reference("dgc", grads=grads, params=params)[-1]["params"]["w"]
  for off in ("local_clip", "momentum_masking", "momentum_correction"):
    other = reference("dgc", grads=grads, params=params, **{off: False})
    assert not np.allclose(other[-1]["params"]["w"], base), off


def test_warmup_densities_follow_the_paper():
  c = compression.Compression(method="dgc", density=0.001, warmup_steps=8)
  got = [c.density_at(s) for s in range(10)]
  assert got == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.00390625,
                 0.00390625, 0.001, 0.001]
  assert c.densities() == [0.25, 0.0625, 0.015625, 0.00390625, 0.001]
  # A density above a stage's ends the ramp there.
  assert compression.Compression(density=0.05, warmup_steps=4).densities() == [
      0.25, 0.0625, 0.05]
  # Fewer steps than stages take the first stages in order, none skipped (2 steps
  # gave 1/4 then 1/64); and for any length the stages are equal to within a step.
  for n in range(1, 13):
    c = compression.Compression(method="dgc", density=1e-4, warmup_steps=n)
    got = [c.density_at(s) for s in range(n)]
    stages = sorted(set(got), reverse=True)
    assert stages == [0.25 ** (i + 1) for i in range(min(4, n))], (n, got)
    assert got == sorted(got, reverse=True)
    runs = [got.count(d) for d in stages]
    assert max(runs) - min(runs) <= 1, (n, got)


@pytest.mark.parametrize("seed", range(3))
def test_sampled_selection_finds_the_exact_top_k(seed):
  """The sampled threshold (about 2k candidates, at most 4k kept) then an exact top
  k of the candidates selects the same entries as a full sort."""
  n, k = 200_000, 200
  x = np.random.default_rng(seed).standard_t(3, size=n).astype(np.float32)
  idx, val = jax.jit(lambda x: compression.select(x, k, 0.05, jax.random.key(seed)))(x)
  np.testing.assert_array_equal(np.sort(np.asarray(idx)), np.sort(_top_k(x, k)))
  np.testing.assert_array_equal(np.asarray(val), x[np.asarray(idx)])


def test_traffic_counts_index_and_value_bytes():
  params = {"w": jax.ShapeDtypeStruct((2, 500), jnp.float32),
            "b": jax.ShapeDtypeStruct((10,), jnp.float32)}
  t = compression.traffic(params, {"w": 2, "b": 1}, 0.01)
  assert t["bytes_sent"] == 2 * 5 * 8 + 1 * 8  # k = 5 per layer, 1 for b (at least 1)
  assert t["dense_bytes"] == 1010 * 4
  assert t["compression_ratio"] == pytest.approx(1010 * 4 / 88)


def test_regroup_keeps_the_total_residual():
  state = {"residual": {"w": np.arange(24, dtype=np.float32).reshape(4, 6)}}
  out = compression.regroup(state, 2)["residual"]["w"]
  assert out.shape == (2, 6)
  np.testing.assert_allclose(out.sum(0), state["residual"]["w"].sum(0))


# --- training --------------------------------------------------------------------

def _dgc_config(mesh, steps=3, **compression_fields):
  from conftest import make_tiny_config
  from test_train_meshes import _with_mesh
  c = _with_mesh(make_tiny_config(), **mesh)
  c.train.steps = steps
  c.optim.update(name="sgd", learning_rate=0.5, warmup_steps=0, min_lr_ratio=1.0,
                 weight_decay=0.0, momentum=0.9, nesterov=False, clip_norm=1.0)
  c.optim.compression.update({**dict(method="dgc", density=0.05, sample_fraction=1.0),
                              **compression_fields})
  return c


def _simulate(config, replicas):
  """The run in one process on one device: each replica's gradient from rung's
  loss on its rows, the exchange by `PaperDGC`, plain SGD (the momentum is the
  replicas'). Returns per step: the loss, the replicas' mean gradient norm and
  the norm of the exchanged sum (what rung logs as grad_norm and
  exchanged_grad_norm)."""
  from conftest import make_data_on
  from train.state import init_state
  from train.step import loss_fn
  o = config.optim
  spec = model_spec(ModelConfig.from_config(config.model), sharding.normalize_rules(None))
  one = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                           jax.devices()[:1])
  params = jax.device_get(init_state(spec, make_optimizer(o, 1), one,
                                     config.train.seed).params)
  flat = {sharding.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  shapes = {n: x.shape for n, x in flat.items()}
  groups = {n: x.shape[0] if n.startswith("layers/") else 1 for n, x in flat.items()}
  dgc = PaperDGC(shapes, groups, replicas, o.compression.density, "dgc",
                 m=o.momentum, clip=o.clip_norm)
  grad = jax.jit(jax.value_and_grad(loss_fn(spec, 0.0), has_aux=True))
  data = make_data_on(config)  # one process: the global batch, any mesh
  w = {n: np.asarray(x, np.float64) for n, x in flat.items()}
  losses, norms, exchanged = [], [], []
  for _ in range(config.train.steps):
    batch = {k: v for k, v in next(data.train).items() if k != "source"}
    rows = len(batch["inputs"]) // replicas
    nlls, grads = [], []
    for r in range(replicas):
      part = {k: v[r * rows:(r + 1) * rows] for k, v in batch.items()}
      tree = jax.tree_util.tree_unflatten(
          jax.tree.structure(params), [w[n].astype(np.float32) for n in flat])
      (_, nll), g = grad(tree, part)
      nlls.append(float(nll))
      grads.append({sharding.path_name(p): np.asarray(x)
                    for p, x in jax.tree_util.tree_leaves_with_path(g)})
    losses.append(np.mean(nlls))
    norms.append(np.mean([np.sqrt(sum(np.sum(np.square(g[n], dtype=np.float64))
                                      for n in g)) for g in grads]))
    total, _ = dgc.exchange(grads)
    exchanged.append(np.sqrt(sum(np.sum(np.square(total[n])) for n in total)))
    for n in w:
      w[n] -= o.learning_rate * total[n]
  return np.array(losses), np.array(norms), np.array(exchanged)


@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, tensor=2, fsdp=2)],
                         ids=["data8", "data2_tensor2_fsdp2"])
def test_training_equals_the_numpy_simulation(mesh, tmp_path):
  """Losses, and the logged norms: grad_norm is the replicas' mean of their own
  gradients' norms (it was the norm of the exchanged sum, which under DGC grows
  with the accumulated velocity: a trial read it as divergence), and
  exchanged_grad_norm the norm of what the optimizer takes."""
  import train
  c = _dgc_config(mesh)
  rows = [r for r in train.train(c, str(tmp_path), progress=False) if "loss" in r]
  losses, norms, exchanged = _simulate(c, mesh["data"])
  np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=2e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in rows], norms, rtol=1e-4)
  np.testing.assert_allclose([r["exchanged_grad_norm"] for r in rows], exchanged,
                             rtol=1e-4)


@pytest.mark.parametrize("method,optimizer", [("topk", "adamw"), ("dgc", "sgd")])
def test_density_one_reproduces_uncompressed_training(method, optimizer, tmp_path):
  """Sending everything is data parallelism. (DGC's momentum masking would zero
  every velocity at density 1, so it is off here.)"""
  from test_train_meshes import _losses
  c = _dgc_config(dict(data=8), local_clip=False, momentum_masking=False)
  c.optim.update(name=optimizer, learning_rate=0.05, clip_norm=0.0)
  c.optim.compression.update(method=method, density=1.0)
  compressed = _losses(c, tmp_path / "compressed")
  c.optim.compression.method = "none"
  np.testing.assert_allclose(compressed, _losses(c, tmp_path / "dense"), rtol=1e-6)


def _over_data(config):
  """(collectives over `data` of the compiled train step, model spec)."""
  from aot import costs as costs_lib
  from aot.compile import _train_step
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.normalize_rules(None)
  spec = model_spec(ModelConfig.from_config(config.model), rules)
  step, args = _train_step(config, spec, mesh, rules)
  with jax.set_mesh(mesh):
    text = step.lower(*args).compile().as_text()
  return [col for col in costs_lib.analyze(
      text, sharding.AXES, [mesh.shape[a] for a in sharding.AXES]).collectives
      if "data" in col.axes], spec


def test_no_gradient_sized_collective_over_data():
  """data=8: over `data` the compiled step only all-gathers (index, value)
  buffers of k entries per tensor, and all-reduces two scalars (the loss and the
  replicas' mean gradient norm)."""
  c = _dgc_config(dict(data=8), density=0.01)
  over_data, spec = _over_data(c)
  group_tree = compression.groups(spec.abstract_params, spec.logical)
  largest_k = max(g * compression.k_for(x.size // g, 0.01) for x, g in zip(
      jax.tree.leaves(spec.abstract_params), jax.tree.leaves(group_tree)))
  for col in over_data:
    assert col.kind == "all-gather" or col.bytes <= 2 * 4, col
    assert col.bytes / col.count <= 8 * largest_k * 4, col  # [replicas, g, k] x 4 B


def test_accumulated_gradient_crosses_data_once():
  """Dense data parallelism with 4 micro-batches all-reduces the gradient once
  per step, not once per micro-batch."""
  c = _dgc_config(dict(data=8))
  c.optim.compression.method = "none"
  c.train.update(grad_accum_steps=4, batch_size=32)
  over_data, spec = _over_data(c)
  grad_bytes = sum(4 * x.size for x in jax.tree.leaves(spec.abstract_params))
  reduced = sum(col.bytes for col in over_data if col.kind == "all-reduce")
  assert grad_bytes <= reduced < 1.1 * grad_bytes


def test_warmup_resume_is_bit_exact_and_regroups_onto_fewer_replicas(tmp_path, capsys):
  import train
  c = _dgc_config(dict(data=8), steps=3, warmup_steps=1, density=0.01)
  c.checkpoint.update(every_steps=1, async_save=False)
  capsys.readouterr()
  straight = train.train(c, str(tmp_path / "straight"), progress=False)
  assert ("compression: dgc over mesh.data (8 replicas), density 0.01 of each "
          "tensor's entries, warming up over 1 step from 1/4; exact top-k; momentum "
          "correction; local clip; momentum masking\n") in capsys.readouterr().out
  # A one-step warm-up is the first stage (1/4) alone.
  assert [r["density"] for r in straight] == [0.25, 0.01, 0.01]
  # 4-byte values against 8-byte (index, value) pairs, k = round(0.01 n) per
  # layer's tensor (at least 1).
  spec = model_spec(ModelConfig.from_config(c.model), sharding.normalize_rules(None))
  dense = sent = 0
  for path, x in jax.tree_util.tree_leaves_with_path(spec.abstract_params):
    layers = x.shape[0] if sharding.path_name(path).startswith("layers/") else 1
    dense += 4 * x.size
    sent += 8 * layers * max(1, round(0.01 * x.size / layers))
  assert straight[-1]["bytes_sent"] == sent
  assert straight[-1]["compression_ratio"] == pytest.approx(dense / sent)
  c.train.steps = 1
  train.train(c, str(tmp_path / "resumed"), progress=False)
  c.train.steps = 3
  resumed = train.train(c, str(tmp_path / "resumed"), progress=False)
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[1:]]
  # Onto 4 replicas: the buffers are regrouped, the run goes on.
  c4 = _dgc_config(dict(data=4), steps=4, density=0.01)
  capsys.readouterr()
  more = train.train(c4, str(tmp_path / "straight"), devices=jax.devices()[:4],
                     progress=False)
  assert "compression state of 8 replicas regrouped onto 4" in capsys.readouterr().out
  assert [r["step"] for r in more] == [4] and np.isfinite(more[0]["loss"])


def _error(config):
  from train.validate import validate_config
  with pytest.raises(sharding.ConfigError) as e:
    validate_config(config, 8)
  return e.value


def test_config_errors_name_the_field_and_fix():
  c = _dgc_config(dict(data=1, fsdp=8))
  e = _error(c)
  assert e.field == "optim.compression.method" and "mesh.data=1" in str(e)
  assert "--config.mesh.data=8 --config.mesh.fsdp=1" in str(e)
  for density in (0.0, 1.5):
    c = _dgc_config(dict(data=8), density=density)
    assert _error(c).field == "optim.compression.density"
  c = _dgc_config(dict(data=8))
  c.optim.name = "adamw"
  e = _error(c)
  assert e.field == "optim.compression.method" and "optim.name=sgd" in str(e)
  c = _dgc_config(dict(data=8), error_feedback=False)
  assert _error(c).field == "optim.compression.error_feedback"
  c = _dgc_config(dict(data=8))
  c.optim.compression.method = "powersgd"
  assert _error(c).field == "optim.compression.method"
  c = _dgc_config(dict(data=8))
  c.mesh.rules = dict(sharding.DEFAULT_RULES, embed=("data",))
  assert _error(c).field == "mesh.rules.embed"


def test_cli_compression_without_replicas_exits_2(tmp_path):
  from conftest import run_cli
  r = run_cli("train", "--config=experiments/llama_tiny.py", f"--workdir={tmp_path}",
              "--config.optim.name=sgd", "--config.optim.compression.method=dgc",
              "--config.mesh.data=1", "--config.mesh.fsdp=-1")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "optim.compression.method" in r.stderr and "mesh.data=1" in r.stderr
