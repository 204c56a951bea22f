"""Data mixtures (data.mixture): shares by weight, exact resume, the per-source
fractions in metrics rows, and validation by field."""

import json

import numpy as np
import pytest
from ml_collections import ConfigDict

import sharding
import train
from train import data as data_lib
from train import validate
from conftest import make_data_on

# Each source writes its own bytes, so a window's content names its source.
ALPHABETS = {"books": "0123456789", "code": "ABCDEFGHIJ", "web": "klmnopqrst"}
WEIGHTS = {"books": 0.2, "code": 0.5, "web": 0.3}


def _docs(name, n, seed):
  rng = np.random.default_rng(seed)
  letters = list(ALPHABETS[name])
  return ["".join(rng.choice(letters, size=rng.integers(20, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """300 short documents per source: books as text files, code and web as jsonl."""
  root = tmp_path_factory.mktemp("mix")
  (root / "books").mkdir()
  for i, d in enumerate(_docs("books", 300, 0)):
    (root / "books" / f"b{i:03d}.txt").write_text(d)
  paths = {"books": str(root / "books")}
  for k, name in enumerate(("code", "web")):
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n"
                            for d in _docs(name, 300, k + 1)))
    paths[name] = str(path)
  return paths


def _mixture(corpus, weights=WEIGHTS):
  sources = {"books": "text", "code": "jsonl", "web": "jsonl"}
  return ConfigDict({name: dict(source=sources[name], path=corpus[name],
                                weight=w, **({} if name == "books" else
                                             {"text_field": "body"}))
                     for name, w in weights.items()})


def _config(tiny_config, corpus, cache_dir, **weights):
  c = tiny_config
  c.data.update(source="text", seq_len=16, eval_fraction=0.1,
                cache_dir=str(cache_dir))
  c.data.mixture = _mixture(corpus, {**WEIGHTS, **weights})
  c.model.vocab_size = 256
  return c


def _source_of(row):
  """The source whose alphabet holds every byte of `row` (eos 0 aside)."""
  text = bytes(int(i) for i in row if i).decode()
  names = [n for n, a in ALPHABETS.items() if set(text) <= set(a)]
  return names[0] if len(names) == 1 else None


def test_shares_over_10000_windows_follow_the_weights(tiny_config, corpus, tmp_path,
                                                      capsys):
  c = _config(tiny_config, corpus, tmp_path / "cache")
  c.train.batch_size = 80
  d = make_data_on(c)
  log = capsys.readouterr().out
  assert "a mixture of 3 sources" in log
  for name in WEIGHTS:  # per-source token counts at start
    assert f"  {name}: weight {WEIGHTS[name]:g}" in log
  names = [m.name for m in d.mixture]
  assert names == sorted(WEIGHTS)
  counts = np.zeros(3, int)
  for step in range(125):  # 10,000 windows
    batch = next(d.train)
    counts += np.bincount(batch["source"], minlength=3)
    if step < 3:  # each row's content comes from the source it is tagged with
      assert [_source_of(r) for r in batch["inputs"]] == [
          names[i] for i in batch["source"]]
  shares = counts / counts.sum()
  for name, share in zip(names, shares):
    assert abs(share - WEIGHTS[name]) < 0.02, (name, share)
  # The computed fractions (what metrics rows log) are the counted ones exactly.
  assert d.source_fractions(10_000) == {n: k / 10_000 for n, k in zip(names, counts)}
  # A source that is 2% of the mixture still gets its share.
  c2 = _config(tiny_config.copy_and_resolve_references(), corpus, tmp_path / "cache",
               books=0.02, code=0.68)
  c2.train.batch_size = 80
  d2 = make_data_on(c2)
  src = np.concatenate([next(d2.train)["source"] for _ in range(125)])
  assert abs(np.mean(src == 0) - 0.02 / 1.0) < 0.005


def test_source_fractions_count_every_prefix(tiny_config, corpus, tmp_path):
  d = make_data_on(_config(tiny_config, corpus, tmp_path / "cache"))
  seen = []
  for step in range(1, 40):
    seen.extend(next(d.train)["source"])
    counted = np.bincount(seen, minlength=3) / len(seen)
    got = d.source_fractions(step * 8)
    np.testing.assert_allclose([got[m.name] for m in d.mixture], counted, atol=1e-12)
  assert d.source_fractions(0) == {}
  assert data_lib.mixture_counts(7, [100, 100]) in ([4, 3], [3, 4])


def test_resume_continues_the_exact_batch_sequence(tiny_config, corpus, tmp_path):
  c = _config(tiny_config, corpus, tmp_path / "cache")
  whole = make_data_on(c)
  reference = [next(whole.train) for _ in range(12)]
  first = make_data_on(c)
  for _ in range(7):
    next(first.train)
  state = json.dumps(first.train.get_state())  # what the checkpoint stores
  resumed = make_data_on(c)
  resumed.train.set_state(json.loads(state))
  for ref in reference[7:]:
    got = next(resumed.train)
    for key in ref:
      np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
  # Another seed: another order.
  c.train.seed = 1
  assert not np.array_equal(next(make_data_on(c).train)["inputs"], reference[0]["inputs"])


def test_two_processes_read_the_rows_of_one_global_batch(tiny_config, corpus,
                                                         tmp_path, monkeypatch):
  c = _config(tiny_config, corpus, tmp_path / "cache")
  one = make_data_on(c)
  halves = []
  for rows in ((0, 4), (4, 8)):
    monkeypatch.setattr(data_lib, "process_rows", lambda *a, rows=rows: rows)
    halves.append(make_data_on(c))
  for _ in range(5):
    batch, a, b = next(one.train), next(halves[0].train), next(halves[1].train)
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), batch[key])


def test_eval_mixes_every_sources_held_out_tail(tiny_config, corpus, tmp_path):
  c = _config(tiny_config, corpus, tmp_path / "cache")
  d = make_data_on(c)
  first, again = list(d.eval_batches(4)), list(d.eval_batches(4))
  assert len(first) == 4
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  rows = np.concatenate([b["inputs"] for b in first])
  assert {_source_of(r) for r in rows} == set(WEIGHTS)
  assert all(m.eval_windows > 0 for m in d.mixture)


def test_metrics_rows_carry_the_fraction_of_each_source(tiny_config, corpus,
                                                        tmp_path):
  c = _config(tiny_config, corpus, tmp_path / "cache")
  c.checkpoint.every_steps = 0  # nothing to resume here
  rows = train.train(c, str(tmp_path / "run"), progress=False)
  assert [r["step"] for r in rows] == [1, 2, 3]
  d = make_data_on(c)  # the same batches, counted
  seen = []
  for r in rows:
    seen.extend(next(d.train)["source"])
    counted = np.bincount(seen, minlength=3) / len(seen)
    for m, share in zip(d.mixture, counted):
      assert r[f"data_fraction/{m.name}"] == pytest.approx(share)
    assert np.isfinite(r["loss"])


def _error(config):
  with pytest.raises(sharding.ConfigError) as err:
    validate.validate_config(config, 8)
  return err.value


def test_validation_names_the_field(tiny_config, corpus, tmp_path):
  base = _config(tiny_config, corpus, tmp_path / "cache")
  validate.validate_config(base, 8)
  cases = [  # (set, remove, field named, text in the message)
      ({"weight": 0.0}, (), "data.mixture.web.weight", "positive"),
      ({"weight": -1.0}, (), "data.mixture.web.weight", "positive"),
      ({}, ("weight",), "data.mixture.web.weight", "is missing"),
      ({}, ("source",), "data.mixture.web.source", "is missing"),
      ({}, ("path",), "data.mixture.web.path", "is missing"),
      ({"source": "synthetic"}, (), "data.mixture.web.source", "synthetic"),
      ({"wieght": 1.0}, (), "data.mixture.web.wieght", "did you mean 'weight'"),
      ({"tokenizer": "x.json"}, (), "data.mixture.web.tokenizer", "shared"),
  ]
  for change, remove, field, text in cases:
    c = base.copy_and_resolve_references()
    entry = {**c.data.mixture.web.to_dict(), **change}
    for key in remove:
      del entry[key]
    c.data.mixture.web = ConfigDict(entry)
    err = _error(c)
    assert err.field == field, (change, remove, str(err))
    assert text in err.problem + err.fix, (change, remove, str(err))
  c = base.copy_and_resolve_references()
  c.data.path = corpus["web"]
  assert _error(c).field == "data.path"
  c = base.copy_and_resolve_references()
  c.data.mixture.web.text_field = ""
  c.data.text_field = ""
  assert _error(c).field == "data.mixture.web.text_field"


def test_a_bad_record_names_the_mixture_entry(tiny_config, corpus, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"body": "ok"}) + "\n{not json\n")
  c = _config(tiny_config, corpus, tmp_path / "cache")
  c.data.mixture.web.path = str(bad)
  with pytest.raises(sharding.ConfigError) as err:
    make_data_on(c)
  assert err.value.field == "data.mixture.web.path"
  assert f"{bad}:2: not valid JSON" in err.value.problem
  c.data.mixture.web.update(path=corpus["web"], text_field="text")
  with pytest.raises(sharding.ConfigError, match="no 'text' field") as err:
    make_data_on(c)
  assert err.value.field == "data.mixture.web.text_field"
  # The fix names the entry's own field (data.text_field would be overridden by it)
  # and works: the records' text is under "body".
  assert "--config.data.mixture.web.text_field=body" in err.value.fix
  c.data.mixture.web.text_field = "body"
  assert next(make_data_on(c).train)["inputs"].shape[0] == c.train.batch_size


def test_a_mixture_run_reloads_from_its_saved_config(tiny_config, corpus, tmp_path):
  """experiments/saved.py (run_config over the defaults) gives back the mixture a
  run saved, whole: the table is replaced, not merged into the defaults' empty one."""
  from experiments import saved
  from train import run_config
  config = _config(tiny_config, corpus, tmp_path / "cache")
  run_config.write(str(tmp_path / "run"), config)
  loaded = saved.get_config(str(tmp_path / "run"))
  assert loaded.data.mixture.to_dict() == config.data.mixture.to_dict()
  validate.validate_config(loaded, 8)  # the reloaded mixture is a valid config


def test_a_resume_on_changed_data_says_which_source_changed(tiny_config, corpus,
                                                            tmp_path, capsys):
  """Documents appended to a source between runs changed the shuffle of its
  windows without a word (the run resumed "exactly"); now the resume names the
  source and its token counts. A resume on the same data says nothing."""
  import shutil
  web = tmp_path / "web.jsonl"
  shutil.copy(corpus["web"], web)
  c = _config(tiny_config, dict(corpus, web=str(web)), tmp_path / "cache")
  c.train.steps = 1
  run = str(tmp_path / "run")
  train.train(c, run, progress=False)
  c.train.steps = 2
  train.train(c, run, progress=False)
  assert "the data changed" not in capsys.readouterr().out
  before = make_data_on(c).tokens["web"]
  with open(web, "a") as f:
    f.write(json.dumps({"body": "w" * 200}) + "\n")
  after = make_data_on(c).tokens["web"]
  assert after > before
  c.train.steps = 3
  train.train(c, run, progress=False)
  out = capsys.readouterr().out
  assert (f"warning: the data changed since this run last started (web: "
          f"{before:,} -> {after:,} tokens): its windows are shuffled") in out, out


def test_eval_rows_give_each_source_s_loss(tiny_config, corpus, tmp_path):
  """Eval rows carry `eval_loss/<name>`: the mean NLL over that source's held-out
  tokens in the evaluated batches, as a float64 NumPy log-softmax of the saved
  model's logits gives it; `eval_loss` stays the mean over all of them."""
  import infer
  c = _config(tiny_config, corpus, tmp_path / "cache")
  c.train.update(steps=2, eval_every=2, eval_steps=3)
  run = str(tmp_path / "run")
  rows = train.train(c, run, progress=False)
  last = [r for r in rows if "eval_loss" in r][-1]
  assert last["step"] == 2
  model, _ = infer.load(run)  # the step-2 parameters
  d = make_data_on(c)
  sums = {m.name: [0.0, 0.0] for m in d.mixture}
  for b in d.eval_batches(3):
    logits = np.asarray(model(b["inputs"], b["positions"], b["segment_ids"]),
                        np.float64)  # [rows, length, vocab]
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    nll = logz - np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    for row, source in enumerate(b["source"]):
      s = sums[d.mixture[source].name]
      s[0] += float((nll[row] * b["weights"][row]).sum())
      s[1] += float(b["weights"][row].sum())
  for name, (total, tokens) in sums.items():
    assert tokens > 0
    assert last[f"eval_loss/{name}"] == pytest.approx(total / tokens, rel=1e-4)
  assert last["eval_loss"] == pytest.approx(
      sum(s[0] for s in sums.values()) / sum(s[1] for s in sums.values()), rel=1e-4)
  # ten-letter alphabets on one byte vocabulary: each source has its own loss
  assert len({round(last[f"eval_loss/{n}"], 3) for n in sums}) == 3
