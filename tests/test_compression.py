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
from train.optimizer import make_optimizer

R, STEPS, LR = 4, 5, 0.1
SHAPES = {"w": (2, 6, 5), "b": (40,)}  # w: 2 layers of 30 entries
GROUPS = {"w": 2, "b": 1}
DENSITY = 0.1  # k = 3 per layer of w, 4 of b


# --- the reference ------------------------------------------------------------------

def _top_k(row, k):
  return np.argsort(-np.abs(row), kind="stable")[:k]


def reference(method, *, momentum_correction=True, local_clip=True,
              momentum_masking=True, error_feedback=True, nesterov=False,
              optimizer="sgd", m=0.9, clip=0.5, grads, params):
  """Per step: what each replica sent {leaf: [(indices, values) per layer]}, the
  parameters after the update, the residuals V and velocities U."""
  V = [{n: np.zeros(s) for n, s in SHAPES.items()} for _ in range(R)]
  U = [{n: np.zeros(s) for n, s in SHAPES.items()} for _ in range(R)]
  w = {n: p.copy() for n, p in params.items()}
  mom = {n: np.zeros(s) for n, s in SHAPES.items()}  # the optimizer's own state
  nu = {n: np.zeros(s) for n, s in SHAPES.items()}
  out = []
  for t in range(STEPS):
    sent, total = [], {n: np.zeros(s) for n, s in SHAPES.items()}
    for r in range(R):
      G = {n: grads[t][r][n] / R for n in SHAPES}  # the paper's 1/(N b) scaling
      if method == "dgc" and local_clip:
        norm = np.sqrt(sum(np.sum(g ** 2) for g in G.values()))
        G = {n: g * min(1.0, clip / np.sqrt(R) / norm) for n, g in G.items()}
      for n in SHAPES:
        if method == "dgc" and momentum_correction:
          U[r][n] = m * U[r][n] + G[n]
          V[r][n] = V[r][n] + (m * U[r][n] + G[n] if nesterov else U[r][n])
        elif method == "dgc" or error_feedback:
          V[r][n] = V[r][n] + G[n]
        else:
          V[r][n] = G[n].copy()
      mine = {}
      for n in SHAPES:
        rows, urows = V[r][n].reshape(GROUPS[n], -1), U[r][n].reshape(GROUPS[n], -1)
        k = max(1, round(DENSITY * rows.shape[1]))
        mine[n] = []
        for row, urow, dense in zip(rows, urows, total[n].reshape(GROUPS[n], -1)):
          idx = _top_k(row, k)
          mine[n].append((idx, row[idx].copy()))
          dense[idx] += row[idx]
          row[idx] = 0
          if method == "dgc" and momentum_correction and momentum_masking:
            urow[idx] = 0
      sent.append(mine)
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
      elif method == "dgc" and momentum_correction:
        w[n] -= LR * g  # the momentum ran per replica
      else:
        mom[n] = m * mom[n] + g
        w[n] -= LR * (g + m * mom[n] if nesterov else mom[n])
    out.append(dict(sent=sent, params={n: x.copy() for n, x in w.items()},
                    residual=[{n: x.copy() for n, x in v.items()} for v in V],
                    velocity=[{n: x.copy() for n, x in u.items()} for u in U]))
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
