"""Config fields a run does not read (`train.unread`): each rule is checked against
what the code computes (changing the field under the rule's condition leaves the
optimizer's updates, the compression exchange, the rotary frequencies or the
logits bit-identical, and changes them where the field is read); an override of
such a field is refused before anything compiles, with a fix that makes it act;
validation never asks for a value of a field the run does not read."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import sharding
from conftest import make_tiny_config
from sharding import ConfigError
from train import compression as comp_lib
from train.unread import RULES, read, unread_override

# A value each field can take that differs from experiments/base.py's default.
OTHER = {"optim.momentum": 0.5, "optim.nesterov": False, "optim.ns_steps": 3,
         "optim.muon_rms": 0.0, "optim.normuon_b2": 0.5, "optim.galore_rank": 1,
         "optim.galore_update_proj_gap": 1, "optim.galore_projector": "svd",
         "optim.galore_scale": 0.5, "optim.b1": 0.5, "optim.b2": 0.5,
         "optim.eps": 1e-3, "optim.matrices": r"mlp/up$"}
# For each optimizer field: (an optimizer that does not read it, one that does).
OPTIMIZERS = {"optim.momentum": ("adamw", "sgd"), "optim.nesterov": ("normuon", "muon"),
              "optim.ns_steps": ("galore", "normuon"),
              "optim.muon_rms": ("normuon", "muon"),
              "optim.normuon_b2": ("muon", "normuon"),
              "optim.galore_rank": ("muon", "galore"),
              "optim.galore_update_proj_gap": ("normuon", "galore"),
              "optim.galore_projector": ("adamw", "galore"),
              "optim.galore_scale": ("sgd", "galore"), "optim.b1": ("sgd", "adamw"),
              "optim.b2": ("sgd", "normuon"), "optim.eps": ("sgd", "adamw"),
              "optim.matrices": ("adamw", "muon")}


def _config(**fields):
  c = make_tiny_config()
  for path, value in fields.items():
    *groups, name = path.split(".")
    node = c
    for g in groups:
      node = node[g]
    node[name] = value
  return c


def test_every_optimizer_rule_is_what_the_update_does():
  """Under the optimizer that does not read a field, changing it leaves two
  updates bit-identical; under one that reads it, they change. The rule agrees
  with both (and every optimizer field of RULES is covered)."""
  from test_optimizers import SHAPES, _optim, _run_jax
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
           for _ in range(2)]
  ruled = {f for r in RULES for f in r.fields if f.startswith("optim.")
           and not f.startswith("optim.compression.")} - {"optim.clip_norm"}
  assert ruled == set(OPTIMIZERS)
  base = {}
  for field, (unread_by, read_by) in OPTIMIZERS.items():
    name = field.split(".")[1]
    for opt, expect_read in ((unread_by, False), (read_by, True)):
      assert read(_config(**{"optim.name": opt}), field) == expect_read, (field, opt)
      if opt not in base:
        base[opt] = _run_jax(_optim(opt), params, grads)
      o = _optim(opt)
      o[name] = OTHER[field]
      changed = _run_jax(o, params, grads)
      same = all(np.array_equal(a[k], b[k]) for a, b in zip(base[opt], changed)
                 for k in a)
      assert same == (not expect_read), (field, opt)


def _exchange(**kw):
  """One DGC/top-k replica step (2 replicas) twice in a row -> what was sent and
  the state, as NumPy."""
  c = comp_lib.Compression(**{"method": "dgc", "density": 0.25, "momentum": 0.9,
                              "clip_norm": 0.5, **kw})
  rng = np.random.default_rng(1)
  grads = {"w": jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)}
  state = jax.tree.map(lambda x: x[0], comp_lib.init_state(c, grads, 2))
  out = []
  with jax.set_mesh(sharding.make_mesh(dict(data=1), jax.devices()[:1])):
    for i in range(2):
      sent, state = comp_lib.replica_step(c, grads, state, 0.25, jax.random.key(i),
                                          {"w": 1}, 2)
      out.append(jax.tree.map(np.asarray, (sent, state)))
  return out


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("field,flip,where,unread", [
    ("momentum_correction", dict(momentum_correction=False), dict(method="topk"), True),
    ("momentum_correction", dict(momentum_correction=False), {}, False),
    ("local_clip", dict(local_clip=False), dict(method="topk"), True),
    ("local_clip", dict(local_clip=False), dict(clip_norm=0.0), True),
    ("local_clip", dict(local_clip=False), {}, False),
    ("momentum_masking", dict(momentum_masking=False), dict(method="topk"), True),
    ("momentum_masking", dict(momentum_masking=False),
     dict(momentum_correction=False), True),
    ("momentum_masking", dict(momentum_masking=False), {}, False),
])
def test_every_compression_rule_is_what_the_exchange_does(field, flip, where, unread):
  """A DGC option under top-k, momentum masking without momentum correction and
  the local clip without optim.clip_norm leave the exchange bit-identical; under
  DGC each changes it. The rule says the same of the config."""
  assert _same(_exchange(**where), _exchange(**where, **flip)) == unread
  fields = {f"optim.compression.{k}": v for k, v in where.items() if k != "clip_norm"}
  c = _config(**{"optim.name": "sgd", "optim.compression.method": "dgc",
                 "optim.clip_norm": where.get("clip_norm", 1.0), **fields})
  assert read(c, f"optim.compression.{field}") == (not unread)


def test_under_dgc_without_its_local_clip_nothing_reads_clip_norm():
  """DGC turns the optimizer's global clipping off and clips per replica only
  with local_clip: without it, optim.clip_norm changes neither the optimizer's
  update nor the exchange; with it, the exchange changes."""
  from test_optimizers import SHAPES, _optim, _run_jax
  rng = np.random.default_rng(2)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: 10 * rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}]
  runs = []
  for clip in (0.5, 0.01):
    o = _optim("sgd")
    o.clip_norm = clip
    o.compression.update(method="dgc", local_clip=False)
    runs.append(_run_jax(o, params, grads))
  assert all(np.array_equal(runs[0][0][k], runs[1][0][k]) for k in SHAPES)
  for local, unread in ((False, True), (True, False)):
    assert _same(_exchange(local_clip=local, clip_norm=0.5),
                 _exchange(local_clip=local, clip_norm=0.01)) == unread
    c = _config(**{"optim.name": "sgd", "optim.compression.method": "dgc",
                   "optim.compression.local_clip": local})
    assert read(c, "optim.clip_norm") == (not unread)


@pytest.mark.parametrize("rope_type", ["default", "linear", "llama3", "yarn"])
def test_every_rope_rule_is_what_the_frequencies_are(rope_type):
  """A rope field the rule calls unread leaves inv_freq and the cos/sin scale
  bit-identical under this rope_type; one it calls read changes them."""
  from model import ModelConfig
  base = dict(rope_type=rope_type, rope_factor=8.0, rope_original_max_positions=4096,
              head_dim=16)
  other = dict(rope_factor=4.0, rope_low_freq_factor=2.0, rope_high_freq_factor=8.0,
               rope_original_max_positions=1024, rope_beta_fast=16.0, rope_beta_slow=4.0,
               rope_attention_factor=1.5)

  def rotary(**kw):
    r = ModelConfig(**{**base, **kw}).rotary
    return r.inv_freq(16), r.scale

  for name, value in other.items():
    a, b = rotary(), rotary(**{name: value})
    same = np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert read(_config(**{"model.rope_type": rope_type}), f"model.{name}") != same, (
        rope_type, name)


def test_the_reference_attention_reads_no_tiles():
  """Tile sizes leave the reference attention bit-identical; flash reads them."""
  import kernels
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 32, 2, 8)), jnp.float32) for _ in "qkv")
  ref = [np.asarray(kernels.attention(q, k, v, impl="reference", block_sizes=b))
         for b in (None, (8, 8))]
  np.testing.assert_array_equal(*ref)
  for field in ("model.attention_block_q", "model.attention_block_kv"):
    assert not read(_config(**{"model.attention": "reference"}), field)
    assert read(_config(**{"model.attention": "flash"}), field)


def _logits(**moe):
  from model import Decoder, ModelConfig
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                    num_kv_heads=2, head_dim=8, d_ff=32, moe=dict(moe))
  m = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 12)), jnp.int32)
  return np.asarray(m(tokens))


def test_under_1f1b_without_evaluation_loss_chunks_change_nothing(tmp_path):
  """From a fresh-user trial: model.loss_chunks under the 1F1B schedule was
  accepted, though training never reads it there (each microbatch's loss runs
  inside the pipeline). Two steps with 1 and 2 chunks are bit-identical, so
  refusing the override (RULES) is right; with evaluation on, it is read."""
  import train
  c = _config(**{"pipeline.schedule": "1f1b", "pipeline.microbatches": 2,
                 "train.eval_every": 0, "train.steps": 2})
  for a in ("data", "fsdp", "tensor", "sequence", "expert", "stage", "diloco"):
    c.mesh[a] = 1
  losses = []
  for chunks in (1, 2):
    c.model.loss_chunks = chunks
    rows = train.train(c, str(tmp_path / str(chunks)), devices=jax.devices()[:1],
                       progress=False)
    losses.append([(r["loss"], r["grad_norm"]) for r in rows if "loss" in r])
  assert losses[0] == losses[1] and len(losses[0]) == 2
  assert not read(c, "model.loss_chunks")
  c.train.eval_every = 1
  assert read(c, "model.loss_chunks")


def test_every_moe_rule_is_what_the_model_computes():
  """A dense model's logits do not move with any model.moe field; a dropless
  model's do not move with capacity_factor, a capacity-dispatch model's do."""
  other = dict(top_k=1, every_k_layers=2, capacity_factor=0.5, shared_expert=True,
               aux_loss_weight=0.5, z_loss_weight=0.5, dispatch="dropless",
               renormalize=True)
  dense = _logits()
  for name, value in other.items():
    assert read(_config(), f"model.moe.{name}") is False
    np.testing.assert_array_equal(_logits(**{name: value}), dense, err_msg=name)
  for dispatch, unread in (("dropless", True), ("capacity", False)):
    moe = dict(num_experts=4, top_k=2, dispatch=dispatch)
    same = np.array_equal(_logits(**moe), _logits(**moe, capacity_factor=0.25))
    assert same == unread
    assert read(_config(**{f"model.moe.{k}": v for k, v in moe.items()}),
                "model.moe.capacity_factor") == (not unread)


def test_each_refusal_names_the_field_and_a_fix_that_makes_it_read():
  """For every rule and field: an override under the rule's condition is refused
  naming the field; each alternative of the fix, parsed as the launcher parses
  flags, gives a config of 8 devices that validates and reads the field (so the
  fix works as given), and an override of a field the run reads is not
  refused."""
  from conftest import assert_followed_fix_validates, fix_alternatives
  dgc = {"optim.name": "sgd", "optim.compression.method": "dgc"}
  conditions = {  # a config under each rule's condition (by its first field)
      "optim.compression.momentum_correction": {"optim.compression.method": "topk"},
      "optim.compression.momentum_masking": {
          **dgc, "optim.compression.momentum_correction": False},
      "optim.compression.local_clip": {**dgc, "optim.clip_norm": 0.0},
      "optim.clip_norm": {**dgc, "optim.compression.local_clip": False},
      "optim.b1": {"optim.name": "sgd"},
      "diloco.alpha": {"mesh.diloco": 2, "diloco.sync_every": 1},
      "diloco.nesterov": {"mesh.diloco": 2, "diloco.outer_momentum": 0.0},
      "model.moe.capacity_factor": {"model.moe.num_experts": 4,
                                    "model.moe.dispatch": "dropless"},
      "model.attention_block_q": {"model.attention": "reference"},
      "data.source": {"data.source": "jsonl"},
      # the overrides set a path; a text_field alone on synthetic or text (the
      # standard library when data.path is unset) needs one with the source.
      "data.path": {"data.source": "synthetic", "data.path": "docs.jsonl"},
      "data.text_field": {"data.source": "text", "model.vocab_size": 256},
      # microbatches=2 must divide a replica's batch: 16 over 8 replicas
      "pipeline.schedule": {"train.batch_size": 16},
      "model.loss_chunks": {"pipeline.schedule": "1f1b", "pipeline.microbatches": 2,
                            "train.batch_size": 16, "train.eval_every": 0}}
  firsts = [rule.fields[0] for rule in RULES]
  assert len(set(firsts)) == len(RULES) and set(conditions) <= set(firsts)
  where = [conditions.get(first, {}) for first in firsts]
  for i, rule in enumerate(RULES):
    config = _config(**where[i])
    if rule.fields[0] == "data.source":  # a mixture replaces data.source / path
      from ml_collections import ConfigDict
      config.data.mixture = ConfigDict({"web": dict(source="jsonl", path="a.jsonl",
                                                    weight=1.0)})
    assert rule.unread(config), i
    for field in rule.fields:
      *groups, name = field.split(".")
      node = config
      for g in groups:
        node = node[g]
      if node[name] is False:  # a switch turned off is accepted: turn it on
        node[name] = True
        assert rule.unread(config), (i, field)
      err = unread_override(config, ["train.steps", field])
      assert isinstance(err, ConfigError) and err.field == field, (i, field)
      assert f"drop --config.{field}" in err.fix
      followed = fix_alternatives(err.fix)
      if not followed:  # the mixture: set in a config file
        assert "data.mixture" in err.fix
        continue
      for flags_given in followed:
        fixed = assert_followed_fix_validates(config, flags_given, 8, err,
                                              also_read=(field,))
        assert read(fixed, field), (i, field, flags_given)
  assert unread_override(_config(), ["optim.b1", "model.rope_theta"]) is None


@pytest.mark.parametrize("field,bad,where", [
    ("optim.momentum", 1.5, {}), ("optim.galore_rank", 0, {}),
    ("optim.galore_projector", "qr", {}), ("optim.ns_steps", 0, {}),
    ("optim.muon_rms", -1.0, {}), ("optim.b2", 1.0, {"optim.name": "sgd"}),
    ("optim.matrices", "(", {}), ("diloco.alpha", 2.0, {}),
    ("diloco.alpha", 2.0, {"mesh.diloco": 2}),
    ("pipeline.schedule", "zigzag", {}), ("pipeline.repeats", 0, {}),
    ("train.eval_steps", -1, {}), ("optim.clip_norm", -1.0, {
        "optim.name": "sgd", "optim.compression.method": "dgc",
        "optim.compression.local_clip": False, "mesh.data": 2}),
    ("model.attention_block_q", -8, {"model.attention": "reference"}),
    ("model.moe.capacity_factor", 0.0, {"model.moe.num_experts": 4,
                                        "model.moe.dispatch": "dropless"}),
    ("data.token_dtype", "banana", {}),
    ("data.token_dtype", "float32", {"data.source": "text", "model.vocab_size": 256}),
])
def test_validation_leaves_unread_fields_alone(field, bad, where):
  """A value that would be refused where the field is read passes where it is
  not (otherwise the error's fix, an override of the field, would be refused as
  unread, and the user could satisfy neither)."""
  from train.validate import validate_config
  c = _config(**where, **{field: bad})
  assert not read(c, field)
  validate_config(c, 2)


def test_token_dtype_is_read_only_by_sources_of_token_ids():
  """data.token_dtype set for a source that reads no token ids (text through the
  byte tokenizer, jsonl, a mixture without a tokens entry) changed nothing and
  was accepted; it is refused like any unread override, with a fix that makes it
  read. .bin files, token-id records and a mixture's tokens entry read it."""
  from ml_collections import ConfigDict
  from conftest import assert_followed_fix_validates, fix_alternatives

  def mixture(*sources):
    return ConfigDict({f"s{i}": dict(source=s, path=f"p{i}", weight=1.0)
                       for i, s in enumerate(sources)})
  unread = [{"data.source": s, "data.path": "docs", "model.vocab_size": 256}
            for s in ("text", "jsonl", "parquet", "arrayrecord", "hf_disk")]
  unread += [{"data.source": "synthetic"},
             {"data.mixture": mixture("text", "jsonl"), "model.vocab_size": 256}]
  for where in unread:
    c = _config(**where, **{"data.token_dtype": "uint32"})
    assert not read(c, "data.token_dtype"), where
    err = unread_override(c, ["data.token_dtype"])
    assert err.field == "data.token_dtype" and "only source=tokens" in err.problem
    followed = fix_alternatives(err.fix)
    assert followed or "data.mixture" in err.fix, err.fix
    for flags_given in followed:
      assert_followed_fix_validates(c, flags_given, 8, err,
                                    also_read=("data.token_dtype",))
  for where in ({"data.source": "tokens", "data.path": "bins"},
                {"data.source": "arrayrecord", "data.path": "ids",
                 "data.tokenizer": "none", "data.eos_id": 0},
                {"data.mixture": mixture("text", "tokens"), "model.vocab_size": 256}):
    c = _config(**where, **{"data.token_dtype": "uint32"})
    assert read(c, "data.token_dtype") and not unread_override(c, ["data.token_dtype"])


def test_plan_refuses_the_mesh_sizes_and_remat_it_chooses_itself():
  """plan overwrites every mesh axis and the remat policy in each candidate (so
  `plan --config.mesh.tensor=4` planned as if it were absent): the override is
  refused, and the claim holds in plan's own code."""
  from aot.plan import _override, candidate_meshes
  from train.unread import PLAN_CHOOSES, unread_by_planning
  c = _config(**{"mesh.tensor": 4, "mesh.diloco": 2, "model.remat": "full"})
  for mesh in candidate_meshes(8):
    assert set(mesh) == set(sharding.AXES) and mesh["diloco"] == 1
    planned = _override(c, mesh, "save_dots")
    assert {a: planned.mesh[a] for a in sharding.AXES} == mesh
    assert planned.model.remat == "save_dots"
  for field in PLAN_CHOOSES:
    err = unread_by_planning(_config(), [field])
    assert err.field == field and "plan never reads it" in err.problem
  assert unread_by_planning(_config(), ["mesh.rules.batch", "model.num_layers"]) is None
  assert unread_by_planning(_config(), ["optim.galore_rank"]).field == "optim.galore_rank"
  # plan keeps the config's DiLoCo replicas, so it reads mesh.diloco and, with
  # more than one replica, the DiLoCo fields (the rule's own fix leads there)
  assert unread_by_planning(_config(), ["mesh.diloco"]) is None
  assert "pass --config.mesh.diloco=2" in unread_by_planning(
      _config(), ["diloco.sync_every"]).fix
  assert unread_by_planning(_config(**{"mesh.diloco": 2}), ["diloco.sync_every"]) is None


def test_the_launcher_refuses_an_unread_override_before_compiling(tmp_path):
  """`train` with a DGC option under top-k exits 2 with the field and the fix,
  and writes nothing to the workdir."""
  from conftest import run_cli_many
  workdir = tmp_path / "run"
  procs = run_cli_many([
      ("train", "--config=experiments/llama_tiny.py", f"--workdir={workdir}",
       "--config.optim.compression.method=topk", f"{dashes}config.optim.compression."
       "momentum_masking=true") for dashes in ("--", "-")])  # absl takes both
  for proc in procs:
    assert proc.returncode == 2, proc.stderr
    assert ("Config error in `optim.compression.momentum_masking`: "
            "--config.optim.compression.momentum_masking is set but this run never "
            "reads it: it is a DGC option, and optim.compression.method is 'topk'."
            in proc.stderr), proc.stderr
    assert "--config.optim.compression.method=dgc" in proc.stderr
  assert not workdir.exists()


def test_nesterov_at_momentum_zero_is_unread_and_the_update_agrees():
  """A trial's `--config.optim.momentum=0` printed "sgd (momentum 0, nesterov)":
  the look-ahead is a multiple of the momentum, so at 0 the update is bit-identical
  with and without it (sgd and muon), the rule calls it unread, and the line no
  longer claims it."""
  from test_optimizers import SHAPES, _optim, _run_jax
  rng = np.random.default_rng(3)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
           for _ in range(2)]
  for name in ("sgd", "muon"):
    for momentum, unread in ((0.0, True), (0.9, False)):
      runs = []
      for nesterov in (True, False):
        o = _optim(name)
        o.update(momentum=momentum, nesterov=nesterov)
        runs.append(_run_jax(o, params, grads))
      assert _same(*runs) == unread, (name, momentum)
      c = _config(**{"optim.name": name, "optim.momentum": momentum})
      assert read(c, "optim.nesterov") == (not unread)
  err = unread_override(_config(**{"optim.name": "sgd", "optim.momentum": 0.0,
                                   "optim.nesterov": True}), ["optim.nesterov"])
  assert "optim.momentum is 0" in err.problem and "--config.optim.momentum=0.9" in err.fix


def test_a_switch_turned_off_where_nothing_reads_it_is_accepted():
  """`--config.optim.compression.momentum_masking=false` with momentum correction
  off asks for what the run does anyway: accepted (a trial's ablation script set
  every switch and was refused). Turned on, it is refused. Checked for every
  boolean field of every rule, under that rule's condition."""
  conditions = {"optim.compression.momentum_masking": {
      "optim.name": "sgd", "optim.compression.method": "dgc",
      "optim.compression.momentum_correction": False}}
  seen = 0
  for rule in RULES:
    for field in rule.fields:
      config = _config(**conditions.get(field, {}))
      try:
        value = config
        for name in field.split("."):
          value = value[name]
      except (KeyError, AttributeError):
        continue
      if not isinstance(value, bool) or not rule.unread(config):
        continue
      seen += 1
      for setting, refused in ((False, False), (True, True)):
        c = _config(**conditions.get(field, {}), **{field: setting})
        if rule.unread(c):
          assert (unread_override(c, [field]) is not None) == refused, (field, setting)
  assert seen >= 5  # the DGC switches, error feedback, nesterov, MoE switches


def test_skip_bad_records_is_read_only_by_sources_with_records():
  """data.skip_bad_records set for text files (or a mixture of them) changed
  nothing and was accepted; it is refused like any unread override. jsonl,
  parquet, hf_disk and token-id records read it, alone or in a mixture."""
  from ml_collections import ConfigDict

  def mixture(*sources):
    return ConfigDict({f"s{i}": dict(source=s, path=f"p{i}", weight=1.0)
                       for i, s in enumerate(sources)})
  for where, mix, unread in [({"data.source": "text"}, None, True),
                             ({"data.source": "arrayrecord"}, None, True),
                             ({"data.source": "arrayrecord", "data.tokenizer": "none",
                               "data.eos_id": 0}, None, False),
                             ({"data.source": "jsonl"}, None, False),
                             ({"data.source": "parquet"}, None, False),
                             ({}, ("text", "tokens"), True),
                             ({}, ("text", "hf_disk"), False)]:
    c = _config(**where, **{"data.skip_bad_records": True})
    if mix:
      c.data.mixture = mixture(*mix)
    assert read(c, "data.skip_bad_records") == (not unread), (where, mix)
    err = unread_override(c, ["data.skip_bad_records"])
    assert (err is not None) == unread, (where, mix, err)
    if err is not None and mix:
      assert "entry to data.mixture" in err.fix


def test_a_mixture_entry_s_text_field_is_read_only_by_sources_with_fields():
  """From a trial: --config.data.mixture.code.text_field=zzz on a `text` entry
  ran as if it did something, where data.text_field under source=text is
  refused. Each entry's text_field is now read by its own source only."""
  from ml_collections import ConfigDict
  c = _config()
  c.data.mixture = ConfigDict({
      "code": dict(source="text", path="p0", weight=1.0),
      "ids": dict(source="arrayrecord", path="p1", weight=1.0),
      "web": dict(source="jsonl", path="p2", weight=1.0, text_field="body")})
  for name, unread in (("code", True), ("ids", True), ("web", False)):
    field = f"data.mixture.{name}.text_field"
    assert read(c, field) == (not unread), name
    err = unread_override(c, [field])
    assert (err is not None) == unread, (name, err)
    if err is not None:
      source = c.data.mixture[name].source
      assert err.field == field and (
          f"and data.mixture.{name}.source is {source!r}" in err.problem)
      assert err.fix == (f"drop --config.{field}, or set data.mixture.{name}.source "
                         "to one of those in the config file.")


@pytest.mark.parametrize("name,source", [
    ("corpus.txt", "text"), ("notes.md", "text"), ("docs.jsonl", "jsonl"),
    ("docs.jsonl.gz", "jsonl"), ("part.parquet", "parquet"), ("ids.bin", "tokens"),
    ("shard.array_record", "arrayrecord"), ("texts/", "text"), ("saved/", "hf_disk")])
def test_a_path_under_the_synthetic_source_gets_the_source_that_reads_it(
    name, source, tmp_path):
  """data.path under source=synthetic was told to pass data.source=jsonl whatever
  the file: a corpus.txt then failed "not valid JSON". The fix names the source
  for the path's kind (a directory `datasets` saved: hf_disk), and a text_field
  given with a text file still asks for records that name one."""
  path = tmp_path / name
  if name.endswith("/"):
    path.mkdir()
    if source == "hf_disk":
      (path / "dataset_info.json").write_text("{}")
  err = unread_override(_config(**{"data.source": "synthetic", "data.path": str(path)}),
                        ["data.path"])
  assert f"--config.data.source={source}" in err.fix, err.fix
  assert "--config.data.path=" not in err.fix  # the path is already given
  err = unread_override(_config(**{"data.source": "synthetic", "data.path": str(path),
                                   "data.text_field": "body"}), ["data.text_field"])
  want = source if source in ("jsonl", "parquet", "hf_disk") else "jsonl"
  assert f"--config.data.source={want}" in err.fix, err.fix
