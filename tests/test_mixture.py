"""Data mixtures (data.mixture): shares by weight, exact resume, the per-source
fractions in metrics rows, and validation by field."""

import json

import numpy as np
import pytest
from ml_collections import ConfigDict

import sharding
import train
from train import data as data_lib
from train import data_schedule
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
  assert data_schedule.mixture_counts(7, [100, 100]) in ([4, 3], [3, 4])


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


def test_eval_shares_its_windows_by_weight_when_a_source_has_few(tiny_config, corpus,
                                                                tmp_path):
  """From a trial: grain's weighted mix of the held-out tails stopped at the
  source scarcest for its weight, so a heavily weighted source with one held-out
  window cut evaluation to one window, drawn from another source, and left itself
  unevaluated. The eval set now fills train.eval_steps x train.batch_size
  windows (or every held-out window), every source in it, the scarce one whole,
  the rest shared by weight."""
  few = tmp_path / "few"
  few.mkdir()
  for i, d in enumerate(_docs("books", 6, 7)):
    (few / f"b{i}.txt").write_text(d)
  c = _config(tiny_config, {**corpus, "books": str(few)}, tmp_path / "cache",
              books=2.0)
  c.train.update(eval_steps=4, batch_size=8)
  d = make_data_on(c)
  available = {m.name: m.eval_windows for m in d.mixture}
  assert 1 <= available["books"] < 4, available  # scarce for its weight
  rows = [(r, w) for b in d.eval_batches(c.train.eval_steps)
          for r, w in zip(b["inputs"], b["weights"]) if w.any()]
  counts = {name: sum(_source_of(r) == name for r, _ in rows) for name in WEIGHTS}
  assert len(rows) == min(32, sum(available.values()))
  assert counts["books"] == available["books"]  # all of it
  assert counts["code"] > counts["web"] > 0  # the rest by weight, 0.5 : 0.3
  assert data_lib.eval_share([1, 241, 656], [2.0, 0.5, 0.5], 8) == [1, 4, 3]


@pytest.mark.parametrize("seed", range(3))
def test_eval_share_fills_the_budget_with_every_source_it_can(seed):
  """`eval_share`'s properties over random sources: the total is the budget or
  every window; no source past its windows; every source with a window gets one
  while the budget lasts; a source below its windows gets at least its weight's
  share of what the full sources leave, less one for rounding."""
  rng = np.random.default_rng(seed)
  for _ in range(300):
    k = int(rng.integers(1, 6))
    available = [int(a) for a in rng.integers(0, 40, k)]
    weights = [float(w) for w in rng.uniform(0.05, 3.0, k)]
    budget = int(rng.integers(0, 150))
    n = data_lib.eval_share(available, weights, budget)
    assert sum(n) == min(budget, sum(available))
    assert all(0 <= x <= a for x, a in zip(n, available))
    if budget >= sum(a > 0 for a in available):
      assert all(x >= 1 for x, a in zip(n, available) if a)
    short = [i for i in range(k) if n[i] < available[i]]
    left = sum(n[i] for i in short)
    for i in short:
      share = left * weights[i] / sum(weights[j] for j in short)
      assert n[i] >= share - len(short), (available, weights, budget, n)


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
  source and its token counts. A resume on the same data says nothing; one after
  a same-size edit (one letter of a document changed) names the source too."""
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
  text = web.read_text()
  web.write_text(text.replace("w" * 200, "w" * 199 + "x"))
  c.train.steps = 4
  train.train(c, run, progress=False)
  out = capsys.readouterr().out
  assert (f"warning: the data changed since this run last started (web: the "
          f"same {after:,} tokens, other contents)") in out, out


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


# Batch sizes and mixture weights that change during a run (train.data_schedule).

def _grain_mix_of(proportions, n):
  import grain
  parts = [grain.MapDataset.range(k * 10**6, (k + 1) * 10**6)
           for k in range(len(proportions))]
  return [int(x) for x in grain.MapDataset.mix(parts, weights=proportions)[:n]]


def test_one_segment_selects_as_grain_mix():
  """A schedule of one segment is grain's own mix, element for element."""
  import grain
  from train.data_schedule import Schedule, ScheduledSelection, Segment
  for props in ([100, 100], [233, 100], [100, 250, 150], [100, 3400], [137, 100, 401]):
    names = [f"s{k}" for k in range(len(props))]
    sel = ScheduledSelection(names, Schedule([Segment(0, 0, 8, dict(zip(names, props)))]))
    parts = [grain.MapDataset.range(k * 10**6, (k + 1) * 10**6)
             for k in range(len(props))]
    mixed = grain.MapDataset.select_from_datasets(parts, sel)
    assert [int(x) for x in mixed[:3000]] == _grain_mix_of(props, 3000), props


def test_a_changed_schedule_reads_each_window_once_in_order():
  """Over random schedules (3 to 5 restarts changing the batch size, the weights,
  both or neither; sources joining and leaving): batches follow one another
  without a gap; every source's windows are read in order from its first, none
  twice or skipped; each change of weights draws in its own proportions
  (grain's arithmetic from its first window); `counts` tallies what was read."""
  from train.data_schedule import (Schedule, ScheduledSelection, continue_schedule,
                                   mixture_counts)
  rng = np.random.default_rng(0)
  for trial in range(20):
    segments, step, props, batch = [], 0, {"a": 100}, 8
    for k in range(int(rng.integers(3, 6))):
      if k == 0 or rng.random() < 0.6:
        names = sorted(rng.choice(["a", "b", "c", "d"], size=int(rng.integers(1, 4)),
                                  replace=False))
        props = {str(n): int(rng.integers(100, 400)) for n in names}
      batch = int(rng.choice([4, 8, 12])) if k == 0 or rng.random() < 0.6 else batch
      segments = continue_schedule(segments, step, batch, props)
      step += int(rng.integers(1, 30))
    schedule = Schedule(segments)
    # batches are contiguous: each starts where the one before ended
    ends = [schedule.first_window(b) for b in range(step + 1)]
    sizes = [s.batch_size for b in range(step)
             for s in [max((s for s in segments if s.start_step <= b),
                           key=lambda s: s.start_step)]]
    assert ends[0] == 0 and all(ends[b + 1] - ends[b] == sizes[b] for b in range(step))
    total = ends[-1]
    current = sorted(segments[-1].proportions)
    sel = ScheduledSelection(current, schedule)
    mixes = schedule.mixes
    starts = [m.start_window for m in mixes] + [total]
    read: dict[str, list[int]] = {}
    for mix, end in zip(mixes, starts[1:]):
      seen = {}
      for i in range(mix.start_window, end):
        try:
          k, pos = sel[i]
        except IndexError:  # a past source the mixture no longer has
          assert mix is not mixes[-1]
          continue
        read.setdefault(current[k], []).append(pos)
        seen[current[k]] = seen.get(current[k], 0) + 1
      names = sorted(mix.proportions)
      want = dict(zip(names, mixture_counts(end - mix.start_window,
                                            [mix.proportions[n] for n in names])))
      assert all(seen.get(n, 0) == want[n] for n in names if n in current), trial
    for name, positions in read.items():
      assert positions == list(range(len(positions))), (trial, name)
    counts = schedule.counts(total)
    assert all(counts[n] == len(read.get(n, [])) for n in current), trial
    assert sum(counts.values()) == total


def test_continue_schedule_keeps_what_a_resume_reached():
  from train.data_schedule import Segment, continue_schedule
  p1, p2, p3 = {"a": 100, "b": 100}, {"a": 300, "b": 100}, {"a": 100, "b": 300}
  assert continue_schedule([], 10, 8, p2) == [Segment(0, 0, 8, p2)]  # no record
  s = continue_schedule([Segment(0, 0, 8, p1)], 10, 8, p2)
  assert s == [Segment(0, 0, 8, p1), Segment(10, 80, 8, p2)]
  assert continue_schedule(s, 10, 8, p2) == s  # idempotent (every process applies it)
  assert continue_schedule(s, 20, 8, p2) == s  # same settings: no new segment
  # a larger batch from step 20 starts at the first window not yet read
  assert continue_schedule(s, 20, 16, p2)[-1] == Segment(20, 160, 16, p2)
  # a resume from an earlier checkpoint forgets the segments it never reached
  later = s + [Segment(20, 160, 8, p3)]
  assert continue_schedule(later, 15, 8, p3) == s + [Segment(15, 120, 8, p3)]
  assert continue_schedule(s, 5, 8, p1) == [Segment(0, 0, 8, p1)]


def _windows_by_source(d, batches, into):
  for _ in range(batches):
    b = next(d.train)
    for row, k in zip(b["inputs"], b["source"]):
      into.setdefault(d.mixture[k].name, []).append(row.tobytes())
  return into


def test_a_resume_with_other_weights_continues_every_source(tiny_config, corpus,
                                                            tmp_path):
  """7 batches of 8 at WEIGHTS, then 6 of 16 at other weights from the saved
  position: each source's windows are the next ones of its own stream
  (rebuilding the mix from window 0 re-read `code`'s and skipped `books`'s)."""
  from train.data_schedule import Segment, continue_schedule
  c1 = _config(tiny_config, corpus, tmp_path / "cache")
  first = make_data_on(c1)
  read = _windows_by_source(first, 7, {})
  state = json.dumps(first.train.get_state())
  c2 = _config(c1.copy_and_resolve_references(), corpus, tmp_path / "cache",
               books=0.6, code=0.1)
  c2.train.batch_size = 16
  resumed = make_data_on(c2)
  schedule = continue_schedule([Segment(0, 0, 8, first.proportions())], 7, 16,
                               resumed.proportions())
  assert schedule[-1] == Segment(7, 56, 16, resumed.proportions())
  resumed.schedule.reschedule(schedule)
  resumed.train.set_state(json.loads(state))
  _windows_by_source(resumed, 6, read)
  streams = _windows_by_source(make_data_on(c1), 60, {})
  for name, windows in read.items():
    assert windows == streams[name][:len(windows)], name
  # the shares: 56 windows at 0.2 / 0.5 / 0.3, then 96 at 0.6 / 0.1 / 0.3
  fractions = resumed.source_fractions(56 + 96)
  assert fractions == {n: len(read[n]) / 152 for n in WEIGHTS}
  assert fractions["books"] > 0.4 and fractions["code"] < 0.3


def test_a_resume_with_another_batch_size_reads_on_from_the_next_window(
    tiny_config, corpus, tmp_path):
  """One source, 5 batches of 8 then 4 of 16 (and 3 of 4): the windows read are
  the uninterrupted run's, in order, with no gap (the loader started at step x
  new batch: it skipped 40 windows, or with a smaller batch read 20 again)."""
  from train.data_schedule import Segment, continue_schedule
  c = _config(tiny_config, corpus, tmp_path / "cache")
  c.data.mixture = ConfigDict()
  c.data.update(source="jsonl", path=corpus["web"], text_field="body")
  whole = make_data_on(c)
  stream = np.concatenate([next(whole.train)["inputs"] for _ in range(20)])
  for batch in (16, 4):
    first = make_data_on(c)
    read = [next(first.train)["inputs"] for _ in range(5)]
    state = json.dumps(first.train.get_state())
    c2 = c.copy_and_resolve_references()
    c2.train.batch_size = batch
    resumed = make_data_on(c2)
    resumed.schedule.reschedule(continue_schedule([Segment(0, 0, 8)], 5, batch, {}))
    resumed.train.set_state(json.loads(state))
    read += [next(resumed.train)["inputs"] for _ in range(4)]
    read = np.concatenate(read)
    np.testing.assert_array_equal(read, stream[:len(read)])


def test_training_resumed_with_other_batch_and_weights_logs_what_it_read(
    tiny_config, corpus, tmp_path, capsys):
  """End to end: the run's data_schedule.json, the resume's note, and
  data_fraction rows that count the windows read under both settings (they were
  recomputed as if the new weights had held from step 1)."""
  c = _config(tiny_config, corpus, tmp_path / "cache")
  c.train.steps = 2
  c.checkpoint.every_steps = 2
  run = str(tmp_path / "run")
  rows = train.train(c, run, progress=False)
  capsys.readouterr()
  c2 = c.copy_and_resolve_references()
  c2.train.update(steps=4, batch_size=16)
  c2.data.mixture.books.weight, c2.data.mixture.code.weight = 0.6, 0.1
  rows += train.train(c2, run, progress=False)
  out = capsys.readouterr().out
  # the steps of the metrics rows: step 3 is the first after the resume from 2
  assert ("data: train.batch_size 8 -> 16: step 3 reads on from training window 16, "
          "the first one not yet read; the mixture's weights changed; from step 3 "
          "(training window 16) the sources mix as books 60.0%, code 10.0%, web "
          "30.0%") in out, out
  segments, _ = data_schedule.read_schedule(run)
  assert [(s.start_step, s.start_window, s.batch_size) for s in segments] == [
      (0, 0, 8), (2, 16, 16)]
  from train.inspect_run import describe_run
  assert ("data schedule: from step 0 (window 0) 8 windows per step, books 20.0%, "
          "code 50.0%, web 30.0%; from step 2 (window 16) 16 windows per step, books "
          "60.0%, code 10.0%, web 30.0%") in describe_run(run)
  d1, d2 = make_data_on(c), make_data_on(c2)
  seen = []
  for step in range(4):
    if step == 2:
      d2.schedule.reschedule(segments)
      d2.train.set_state(d1.train.get_state())
    seen.extend(next((d1 if step < 2 else d2).train)["source"])
    counted = np.bincount(seen, minlength=3) / len(seen)
    for m, share in zip(d2.mixture, counted):
      assert rows[step][f"data_fraction/{m.name}"] == pytest.approx(share), step


def test_a_text_field_fix_for_an_entry_without_one_can_be_followed(tiny_config, corpus,
                                                                   tmp_path):
  """An entry that sets no text_field reads data.text_field; its error's fix named
  --config.data.mixture.<name>.text_field, which the launcher refuses (an override
  cannot add an entry's key). The fix now names the config file's entry or
  data.text_field, and following the latter works; the launcher's refusal of
  the entry's key says the same."""
  from experiment import config_errors
  c = _config(tiny_config, corpus, tmp_path / "cache")
  del c.data.mixture.web["text_field"]  # reads data.text_field, "text"; records: "body"
  with pytest.raises(sharding.ConfigError, match="no 'text' field") as err:
    make_data_on(c)
  assert err.value.field == "data.mixture.web.text_field"
  assert ('set text_field="body" in the data.mixture.web entry of the config file (it '
          "sets none, and an override cannot add it), or --config.data.text_field=body "
          "(read by every entry that sets none)") in err.value.fix
  assert "--config.data.mixture.web.text_field" not in err.value.fix
  refused = config_errors.unknown_key(["--config.data.mixture.web.text_field=body"], c)
  assert refused.field == "data.mixture.web.text_field"
  assert "sets no `text_field`" in refused.problem
  assert "--config.data.text_field=..." in refused.fix
  # an entry with its own text_field: the override exists, and is the fix
  assert config_errors.unknown_key(["--config.data.mixture.code.text_field=x"], c) is None
  c.data.text_field = "body"  # following the fix
  assert next(make_data_on(c).train)["inputs"].shape[0] == c.train.batch_size
  c.data.text_field = ""  # validation: an entry without a field to read
  err = _error(c)
  assert err.field == "data.mixture.web.text_field"
  assert "--config.data.text_field=text" in err.fix


def test_sources_joining_or_leaving_leave_the_others_order_alone(tiny_config, corpus,
                                                                  tmp_path):
  """From a trial: each source's shuffle was seeded by its position among the
  sorted names, so adding `books` (sorted first) or removing it re-shuffled `code`
  and `web`, which then re-read windows they had given. Each source's stream
  number is now fixed when it joins; the others continue their own streams."""
  from train.data_schedule import Segment, continue_schedule, continue_streams
  pair = {"code": 0.5, "web": 0.5}
  for before, after in ((pair, WEIGHTS), (WEIGHTS, pair)):
    c1 = _config(tiny_config.copy_and_resolve_references(), corpus, tmp_path / "cache")
    c1.data.mixture = _mixture(corpus, before)
    first = make_data_on(c1)
    read = _windows_by_source(first, 7, {})
    state = json.dumps(first.train.get_state())
    streams = continue_streams({}, sorted(before))
    c2 = _config(tiny_config.copy_and_resolve_references(), corpus, tmp_path / "cache")
    c2.data.mixture = _mixture(corpus, after)
    resumed = make_data_on(c2)
    streams = continue_streams(streams, sorted(after))
    assert streams == ({"code": 0, "web": 1, "books": 2} if len(after) == 3
                       else {"books": 0, "code": 1, "web": 2})
    resumed.schedule.reschedule(
        continue_schedule([Segment(0, 0, 8, first.proportions())], 7, 8,
                          resumed.proportions()), streams)
    resumed.train.set_state(json.loads(state))
    _windows_by_source(resumed, 6, read)
    streams_before = _windows_by_source(make_data_on(c1), 40, {})
    for name in ("code", "web"):
      assert read[name] == streams_before[name][:len(read[name])], (before, name)


def test_a_source_added_or_dropped_is_not_called_changed_data(tmp_path):
  """The changed-data warning ("from here the run reads another order") was given
  for a source added to a mixture (0 -> N tokens) or dropped ("-> gone"): neither
  changes another source's order now; a source whose documents changed still is."""
  data_lib.record_tokens(str(tmp_path), {"code": 100, "web": 200})
  assert data_lib.data_changes(str(tmp_path), {"code": 100, "web": 200, "books": 50}) is None
  assert data_lib.data_changes(str(tmp_path), {"web": 200}) is None
  assert "code: 100 -> 120 tokens" in data_lib.data_changes(
      str(tmp_path), {"code": 120, "books": 50})


def test_a_same_size_edit_is_told_by_the_stream_s_identity(tmp_path):
  """A source edited to the same token count resumed without the warning (only
  counts were compared). Identities are compared where both starts have one: a
  cache from before they were recorded (None) and a run's file of bare counts
  (written before identities) are compared by count alone."""
  run = str(tmp_path)
  data_lib.record_tokens(run, {"code": 100, "web": 200},
                         {"code": "sha256:aa", "web": None})
  same = {"code": 100, "web": 200}
  assert data_lib.data_changes(run, same, {"code": "sha256:aa", "web": "sha256:cc"}) is None
  assert "(code: the same 100 tokens, other contents)" in data_lib.data_changes(
      run, same, {"code": "sha256:bb", "web": "sha256:cc"})
  assert data_lib.data_changes(run, same, {"code": None, "web": None}) is None
  (tmp_path / data_lib.TOKENS_FILE).write_text(json.dumps(same))  # an older run
  assert data_lib.data_changes(run, same, {"code": "sha256:bb"}) is None
  assert "code: 100 -> 101 tokens" in data_lib.data_changes(run, {"code": 101})


def test_rescaled_weights_are_not_a_trajectory_change(tiny_config, corpus, tmp_path):
  """Weights are relative: 0.3 / 0.7 resumed as 0.6 / 1.4 mix alike, and were
  reported as a change of the trajectory; other proportions still are."""
  from train import run_config
  c = _config(tiny_config, corpus, tmp_path / "cache", books=0.2, code=0.5, web=0.3)
  saved = json.loads(c.to_json())
  for scale in (2.0, 10.0):
    c2 = c.copy_and_resolve_references()
    for name in WEIGHTS:
      c2.data.mixture[name].weight = c.data.mixture[name].weight * scale
    fields = [f for f, *_ in run_config.trajectory_changes(saved, json.loads(c2.to_json()))]
    assert not [f for f in fields if f.startswith("data.mixture")], (scale, fields)
  c2 = c.copy_and_resolve_references()
  c2.data.mixture.books.weight = 0.4
  fields = [f for f, *_ in run_config.trajectory_changes(saved, json.loads(c2.to_json()))]
  assert fields == ["data.mixture.books.weight"]


def test_a_change_for_one_entry_rebuilds_only_the_caches_that_read_it(
    tiny_config, corpus, tmp_path):
  """data.text_field and data.skip_bad_records keyed every source's token cache:
  following a jsonl entry's fix (--config.data.text_field=...) tokenized the
  unchanged text source again (hours on a large corpus). Only the sources that
  read a setting are rebuilt when it changes."""
  import os
  web = tmp_path / "web.jsonl"
  web.write_text("".join(json.dumps({"body": d, "title": d[:10]}) + "\n"
                         for d in _docs("web", 300, 2)))
  cache = tmp_path / "cache"
  c = _config(tiny_config, corpus, cache)
  del c.data.mixture.web["text_field"]  # reads data.text_field
  c.data.mixture.web.path = str(web)
  paths = {name: os.path.abspath(e.path) for name, e in c.data.mixture.items()}

  def built():
    """{cache directory: the mixture entry it holds}."""
    out = {}
    for key in os.listdir(cache):
      if not key.startswith("."):
        with open(cache / key / "meta.json") as f:
          files = json.load(f)["files"]
        out[key] = next(n for n, p in paths.items() if files[0].startswith(p))
    return out
  c.data.text_field = "body"
  make_data_on(c)
  before = built()
  assert sorted(before.values()) == ["books", "code", "web"]
  for change, rebuilt in (({"text_field": "title"}, ["web"]),
                          ({"skip_bad_records": True}, ["code", "web"]),
                          ({"text_field": "body"}, ["web"])):
    c.data.update(**change)
    make_data_on(c)
    now = built()
    assert sorted(now[k] for k in set(now) - set(before)) == rebuilt, change
    before = now


def test_a_source_too_short_for_a_window_gets_a_seq_len_that_fits(tiny_config, corpus,
                                                                  tmp_path):
  """A mixture source without a training window, or without a held-out one, was
  told "use a shorter data.seq_len" in words. The fix now names the length, and
  following it the mixture loads with a training and a held-out window in every
  source (its windows at the new length)."""
  from conftest import assert_followed_fix_validates, fix_alternatives
  for size, seq_len, field in [(80, 128, "data.mixture.tiny.path"),  # no training
                               (150, 64, "data.eval_fraction"),  # no held-out
                               (600, 128, "data.eval_fraction")]:
    tiny = tmp_path / f"tiny{size}.txt"
    tiny.write_text("tiny " * (size // 5))
    c = _config(tiny_config.copy_and_resolve_references(), corpus, tmp_path / "cache")
    c.data.seq_len = seq_len
    c.train.eval_every = 2  # every source holds out a window
    c.data.mixture.tiny = ConfigDict(dict(source="text", path=str(tiny), weight=1.0))
    with pytest.raises(sharding.ConfigError) as err:
      make_data_on(c)
    assert err.value.field == field, str(err.value)
    followed = [f for f in fix_alternatives(err.value.fix)
                if any("seq_len" in flag for flag in f)]
    assert followed, err.value.fix
    fixed = assert_followed_fix_validates(c, followed[0], 8, err.value)
    assert fixed.data.seq_len < seq_len
    d = make_data_on(fixed)
    assert min(m.train_windows for m in d.mixture) >= 1
    assert min(m.eval_windows for m in d.mixture) >= 1
