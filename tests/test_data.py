"""Packing, determinism and sources of the input pipeline."""

import numpy as np
import pytest

import sharding
from sharding import ConfigError
from conftest import make_data_on, write_word_tokenizer
from train import data as data_lib
from train.step import batch_sharding


def test_example_segments_and_positions_restart_after_eos():
  ex = data_lib.make_example(np.array([5, 6, 0, 7, 8, 9, 0, 4, 3]), eos_id=0)
  np.testing.assert_array_equal(ex["inputs"], [5, 6, 0, 7, 8, 9, 0, 4])
  np.testing.assert_array_equal(ex["targets"], [6, 0, 7, 8, 9, 0, 4, 3])
  np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3])
  np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2, 3, 0])


@pytest.fixture
def text_dir(tmp_path):
  for i in range(20):
    (tmp_path / f"doc{i}.py").write_text(f"# document {i}\n" + "x = 1\n" * (i + 5))
  return tmp_path


def _text_config(tiny_config, path):
  tiny_config.data.update(source="text", path=str(path), seq_len=16, eval_fraction=0.1)
  tiny_config.model.vocab_size = 256
  return tiny_config


def test_text_pipeline_is_deterministic_per_seed(tiny_config, text_dir):
  c = _text_config(tiny_config, text_dir)
  a = [next(make_data_on(c).train)["inputs"] for _ in range(1)]
  d1, d2 = make_data_on(c), make_data_on(c)
  for _ in range(3):
    np.testing.assert_array_equal(next(d1.train)["inputs"], next(d2.train)["inputs"])
  c.train.seed = 1
  assert not np.array_equal(next(make_data_on(c).train)["inputs"], a[0])


def test_text_decodes_back_to_the_files(tiny_config, text_dir):
  c = _text_config(tiny_config, text_dir)
  d = make_data_on(c)
  batch = next(d.train)
  assert batch["inputs"].shape == (8, 16)
  text = d.tokenizer.decode(batch["inputs"][0])
  corpus = "".join((text_dir / f"doc{i}.py").read_text() for i in range(20))
  assert text.split("\x00")[0][:5] in corpus


def test_eval_batches_are_fixed_and_held_out(tiny_config, text_dir):
  c = _text_config(tiny_config, text_dir)
  d = make_data_on(c)
  first = [b["inputs"] for b in d.eval_batches(2)]
  second = [b["inputs"] for b in d.eval_batches(2)]
  assert len(first) >= 1
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_tokens_source_reads_bin_memmap(tiny_config, tmp_path, capsys):
  stream = np.arange(1000, dtype=np.uint16) % 50 + 1
  stream.tofile(tmp_path / "shard0.bin")
  c = tiny_config
  c.data.update(source="tokens", path=str(tmp_path / "*.bin"), token_dtype="uint16",
                eval_fraction=0.1)
  # without data.eos_id: one segment per window, and the log says so
  batch = next(make_data_on(c).train)
  assert (batch["segment_ids"] == batch["segment_ids"][:, :1]).all()
  assert "no data.eos_id, so its windows have no document boundaries" in (
      capsys.readouterr().out)
  c.data.eos_id = 50
  batch = next(make_data_on(c).train)
  assert "no document boundaries" not in capsys.readouterr().out
  assert (batch["segment_ids"] != batch["segment_ids"][:, :1]).any()
  # Every row is a window of consecutive stream tokens.
  rows = batch["inputs"]
  for row in rows:
    diffs = (np.diff(row.astype(int)) % 50)
    assert set(diffs) == {1}, row


def test_tokens_ids_past_the_tokenizers_vocabulary_are_said(tiny_config, tmp_path,
                                                            capsys):
  """From the carried list: `tokens` files whose ids reach past data.tokenizer's
  vocabulary (but not model.vocab_size) trained silently; generation then could
  not decode them. The data line warns, naming both; ids within it say nothing."""
  from conftest import write_word_tokenizer
  tok = write_word_tokenizer(tmp_path / "tok.json", ["</s>"] + [f"w{i}" for i in range(39)])
  for top, warned in ((39, False), (45, True)):
    bins = tmp_path / f"ids{top}"
    bins.mkdir()
    (np.arange(1000, dtype=np.uint16) % top + 1).tofile(bins / "shard0.bin")
    c = tiny_config
    c.data.update(source="tokens", path=str(bins), token_dtype="uint16", eos_id=0,
                  tokenizer=tok, eval_fraction=0.1)
    next(make_data_on(c).train)
    said = capsys.readouterr().out
    assert (f"token ids reach {top}, past the 40 ids of data.tokenizer {tok}" in said
            ) == warned, said


def test_tokens_ids_past_the_vocabulary_and_files_that_are_not_ids(tiny_config,
                                                                   tmp_path):
  """`tokens` files were never scanned: ids at or past model.vocab_size trained to
  NaN losses with exit 0. A directory's metadata file was read as ids, and a file
  of an odd byte count was a raw numpy traceback."""
  tiny_config.model.vocab_size = 64
  stream = np.arange(1000, dtype=np.uint16) % 50 + 1
  stream[700] = 64  # the one id past the vocabulary
  stream.tofile(tmp_path / "shard0.bin")
  c = tiny_config
  c.data.update(source="tokens", path=str(tmp_path), token_dtype="uint16",
                eos_id=50, eval_fraction=0.1)
  with pytest.raises(sharding.ConfigError, match="token ids reach 64") as err:
    make_data_on(c)
  assert err.value.field == "model.vocab_size"
  assert "--config.model.vocab_size to at least 65" in str(err.value)
  c.model.vocab_size = 65  # the fix it gave
  reference = next(make_data_on(c).train)["inputs"]
  (tmp_path / "meta.json").write_text('{"a": 1}\n')  # 9 bytes
  np.testing.assert_array_equal(next(make_data_on(c).train)["inputs"], reference)
  (tmp_path / "shard1.bin").write_bytes(b"\x01\x00\x02")
  with pytest.raises(sharding.ConfigError, match=r"shard1.bin holds 3 bytes, not a "
                     r"whole number of uint16 ids \(2 bytes each\)") as err:
    make_data_on(c)
  assert err.value.field == "data.path" and "data.token_dtype" in err.value.fix
  (tmp_path / "shard1.bin").unlink()
  c.data.path = str(tmp_path / "*.json")
  with pytest.raises(sharding.ConfigError, match="meta.json holds 9 bytes"):
    make_data_on(c)


def test_a_tokenizer_larger_than_the_model_is_refused_before_tokenizing(
    tiny_config, text_dir, tmp_path, monkeypatch):
  """A tokenizer.json with more ids than model.vocab_size trained (only the ids
  the data used were checked), and generation then met the others."""
  from conftest import write_word_tokenizer
  from train import token_cache
  path = write_word_tokenizer(tmp_path / "tok.json",
                              ["<|endoftext|>"] + [f"w{i}" for i in range(99)])
  c = _text_config(tiny_config, text_dir)
  c.data.tokenizer, c.model.vocab_size = path, 64
  monkeypatch.setattr(token_cache, "load_or_build",
                      lambda *a, **k: pytest.fail("tokenized"))
  with pytest.raises(sharding.ConfigError) as err:
    make_data_on(c)
  assert err.value.field == "model.vocab_size"
  assert (f"64 is smaller than the vocabulary of data.tokenizer ({path}): 100 ids. "
          "Fix: set --config.model.vocab_size=100 (or more).") in str(err.value)


def test_process_rows_cover_the_global_batch_on_one_process():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=1, sequence=1, tensor=2))
  sh = batch_sharding(mesh, sharding.normalize_rules(None), 8, 16)
  assert data_lib.process_rows(sh, 8, 16) == (0, 8)


def test_missing_files_is_a_config_error(tiny_config, tmp_path):
  c = _text_config(tiny_config, tmp_path / "nothing_here")
  with pytest.raises(sharding.ConfigError, match="no files match"):
    make_data_on(c)


def test_hf_tokenizer_json(tiny_config, text_dir, tmp_path):
  pytest.importorskip("tokenizers")
  write_word_tokenizer(tmp_path / "tokenizer.json",
                       ["<|endoftext|>", "[UNK]", "x", "=", "1", "#"])
  c = _text_config(tiny_config, text_dir)
  c.data.tokenizer = str(tmp_path / "tokenizer.json")
  c.data.seq_len = 8
  d = make_data_on(c)
  assert d.tokenizer.eos_id == 0 and d.tokenizer.vocab_size == 6
  assert next(d.train)["inputs"].max() < 6
  # a missing file, or one that names no end-of-text token: config errors
  c.data.tokenizer = str(tmp_path / "missing.json")
  with pytest.raises(ConfigError, match="there is no tokenizer file at") as err:
    make_data_on(c)
  assert err.value.field == "data.tokenizer"
  # a file that is not a tokenizer (a JSONL record, say): was a bare Exception
  # from `tokenizers` without the path
  (tmp_path / "data.jsonl").write_text('{"text": "x = 1"}\n')
  c.data.tokenizer = str(tmp_path / "data.jsonl")
  with pytest.raises(ConfigError, match="data.jsonl is not a tokenizer file") as err:
    make_data_on(c)
  assert err.value.field == "data.tokenizer"
  c.data.tokenizer = write_word_tokenizer(tmp_path / "no_eos.json", ["[UNK]", "x"])
  with pytest.raises(ConfigError, match="names none of") as err:
    make_data_on(c)
  assert err.value.field == "data.eos_id"


@pytest.mark.parametrize("prefetch", [0, 3])
def test_loader_reads_at_most_prefetch_batches_ahead(tiny_config, text_dir, prefetch,
                                                     monkeypatch):
  """data.prefetch_batches bounds how far the loader reads ahead of the training
  loop (grain's default would read 500 batches ahead), and the batches are the
  same whatever it is."""
  import time
  c = _text_config(tiny_config, text_dir)
  c.data.prefetch_batches = 0  # no reader threads left running below
  want = make_data_on(c).train
  want = [next(want)["inputs"] for _ in range(2)]
  reads = []
  getitem = data_lib.ProcessRows.__getitem__
  monkeypatch.setattr(data_lib.ProcessRows, "__getitem__",
                      lambda self, n: reads.append((self, n)) or getitem(self, n))
  c.data.prefetch_batches = prefetch
  d = make_data_on(c)
  got = [next(d.train)["inputs"] for _ in range(2)]
  time.sleep(0.5)  # time for the reader threads to run ahead
  rows = c.train.batch_size  # one process holds every row
  # Only this loader's reads: an earlier test's reader threads may still run
  # (they read far ahead, never row 0 again) and see the patched class too.
  mine = next(s for s, n in reads if n == 0)
  assert 2 * rows <= sum(s is mine for s, _ in reads) <= (2 + prefetch) * rows
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)


def test_eval_fraction_zero_trains_on_everything_without_evaluation(tiny_config,
                                                                    text_dir):
  """data.eval_fraction=0 is allowed with train.eval_every=0: every token is a
  training token; with evaluation on it is a config error."""
  c = _text_config(tiny_config, text_dir)
  c.data.eval_fraction, c.train.eval_every = 0.0, 0
  d = make_data_on(c)
  assert len(d.eval_source) == 0
  c.data.eval_fraction = 0.1
  held = make_data_on(c)
  assert len(held.eval_source) > 0
  data_lib.validate(c)
  c.data.eval_fraction, c.train.eval_every = 0.0, 5
  with pytest.raises(ConfigError, match="or 0, training on all the data") as err:
    data_lib.validate(c)
  # From a trial: its one fix changed the fraction; the other, no evaluation,
  # is offered too, and each one passes.
  assert err.value.fix == ("set --config.data.eval_fraction=0.02, or "
                           "--config.train.eval_every=0 to train on all the data "
                           "without evaluation.")
  for field, value in (("data.eval_fraction", 0.02), ("train.eval_every", 0)):
    fixed = c.copy_and_resolve_references()
    group, name = field.split(".")
    fixed[group][name] = value
    data_lib.validate(fixed)


def test_an_eos_id_outside_the_tokenizer_is_a_config_error(tiny_config, text_dir,
                                                            tmp_path):
  """data.eos_id past the tokenizer's ids was read, tokenized and then blamed on
  model.vocab_size ("token ids reach 300"), whose fix trained on an id the
  tokenizer cannot decode; now data.eos_id is named before anything is read."""
  pytest.importorskip("tokenizers")
  c = _text_config(tiny_config, text_dir)
  c.data.seq_len = 8
  for words, named in ((["<|endoftext|>", "[UNK]", "x"], 0), (["[UNK]", "x", "y"], None)):
    c.data.tokenizer = write_word_tokenizer(tmp_path / f"t{len(words)}{named}.json", words)
    for eos in (3, 300, -1):
      c.data.eos_id = eos
      with pytest.raises(ConfigError) as err:
        make_data_on(c)
      assert err.value.field == "data.eos_id"
      assert f"{eos} is outside the vocabulary of {c.data.tokenizer}, ids [0, 3)" in (
          err.value.problem)
      assert (f"tokenizer names its end-of-text token, id {named}" if named is not None
              else "one of [0, 3)") in err.value.fix
    c.data.eos_id = 2  # inside: trains
    assert next(make_data_on(c).train)["inputs"].max() < 3


def test_a_run_keeps_its_tokenizer_when_the_original_moves(tiny_config, text_dir,
                                                           tmp_path):
  """config.json records the tokenizer's path; after the file moved, generate
  failed and suggested the byte tokenizer (garbage for a BPE model). Training
  now keeps a copy in the run, which generation reads."""
  import io
  import shutil

  import infer.text
  import train
  from train import run_config
  pytest.importorskip("tokenizers")
  words = ["<|endoftext|>", "[UNK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
  (tmp_path / "tok").mkdir()
  original = write_word_tokenizer(tmp_path / "tok" / "tokenizer.json", words)
  c = _text_config(tiny_config, text_dir)
  c.data.update(tokenizer=original, seq_len=8)
  c.train.update(steps=1, eval_every=0)
  run = tmp_path / "run"
  train.train(c, str(run), progress=False)
  assert (run / "tokenizer.json").read_bytes() == open(original, "rb").read()
  shutil.move(str(tmp_path / "tok"), str(tmp_path / "moved"))
  assert run_config.load(str(run)).data.tokenizer == str(run / "tokenizer.json")
  text = infer.text.generate_text(str(run), None, "a b", max_new_tokens=2,
                                  out=io.StringIO())
  assert isinstance(text, str)
  # with neither the file nor a copy, the fix names the tokenizer, not "byte"
  (run / "tokenizer.json").unlink()
  with pytest.raises(ConfigError, match="there is no tokenizer file at") as err:
    infer.text.generate_text(str(run), None, "a b", max_new_tokens=2, out=io.StringIO())
  assert "byte" not in err.value.fix


@pytest.mark.parametrize("over", ["natural.bin", "tokens.npy"])
def test_a_token_cache_that_cannot_be_written_is_a_config_error(tiny_config, text_dir,
                                                                tmp_path, over):
  """A full disk while tokenizing raised a bare OSError, or, in the memory-mapped
  shuffled copy, killed the process with SIGBUS (exit 135, seen on a full tmpfs),
  leaving its partial cache behind. Writes fail for real here (a per-file size
  limit, RLIMIT_FSIZE, under which the first file or the second crosses it): a
  ConfigError names data.cache_dir, nothing partial is left, and the cache builds
  the same once there is room."""
  import glob
  import os
  import resource
  import signal

  from train import token_cache
  from train.tokenizer import ByteTokenizer
  c = _text_config(tiny_config, text_dir)
  files = sorted(glob.glob(str(text_dir / "*.py")))
  c.data.cache_dir = str(tmp_path / "roomy")
  roomy = token_cache.load_or_build(c.data, files, ByteTokenizer())
  size = roomy.meta["tokens"]  # bytes: byte ids are stored as uint8
  c.data.cache_dir = str(tmp_path / "full")
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  try:  # natural.bin: `size` bytes; tokens.npy: a 128-byte header and `size` bytes
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (size // 2 if over == "natural.bin" else size + 64, hard))
    with pytest.raises(sharding.ConfigError) as err:
      token_cache.load_or_build(c.data, files, ByteTokenizer())
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)
  assert err.value.field == "data.cache_dir"
  assert (f"writing the token cache into {tmp_path / 'full'} failed: [Errno 27] File "
          "too large") in str(err.value), str(err.value)
  assert "set --config.data.cache_dir to a directory on a disk with room" in str(err.value)
  assert os.listdir(tmp_path / "full") == []
  again = token_cache.load_or_build(c.data, files, ByteTokenizer())
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(roomy.tokens))


def test_a_cache_dir_that_cannot_be_a_directory_is_offered_one_that_can(
    tiny_config, text_dir, tmp_path):
  """From a trial: a data.cache_dir under a file ([Errno 20]) was told to free
  space, the fix of a full disk. It is told to pass a directory it can write,
  and the example given builds the cache."""
  import glob
  import re

  from train import token_cache
  from train.tokenizer import ByteTokenizer
  c = _text_config(tiny_config, text_dir)
  files = sorted(glob.glob(str(text_dir / "*.py")))
  (tmp_path / "a_file").write_text("x")
  c.data.cache_dir = str(tmp_path / "a_file" / "cache")
  with pytest.raises(sharding.ConfigError) as err:
    token_cache.load_or_build(c.data, files, ByteTokenizer())
  assert err.value.field == "data.cache_dir" and "[Errno 20] Not a directory" in str(
      err.value)
  assert "free space" not in err.value.fix and "twice" not in str(err.value)
  example = re.search(r"--config\.data\.cache_dir=(\S+)\.$", err.value.fix).group(1)
  assert example == "~/.cache/rung/tokens"
  monkeypatch = pytest.MonkeyPatch()  # the example under a home of our own
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  try:
    c.data.cache_dir = example
    built = token_cache.load_or_build(c.data, files, ByteTokenizer())
  finally:
    monkeypatch.undo()
  assert built.path.startswith(str(tmp_path / "home" / ".cache" / "rung" / "tokens"))


def test_a_build_removes_partial_caches_that_killed_tokenizations_left(
    tiny_config, text_dir, tmp_path, capsys):
  """A tokenization killed mid-way (SIGKILL) leaves its `.<key>.tmp-*` directory,
  as large as what it wrote, and nothing removed it. A build removes those no file
  was written to for an hour, says so, and leaves a fresh one (a build in progress
  elsewhere) and complete caches alone."""
  import glob
  import os
  import time

  from train import token_cache
  from train.tokenizer import ByteTokenizer
  c = _text_config(tiny_config, text_dir)
  root = tmp_path / "cache"
  c.data.cache_dir = str(root)
  files = sorted(glob.glob(str(text_dir / "*.py")))
  kept = root / "0123abcd"  # a complete cache of other data
  for name, age in ((".aaaa.tmp-killed", 2 * token_cache.STALE_SECONDS),
                    (".bbbb.tmp-running", 60), ("0123abcd", 10 * token_cache.STALE_SECONDS)):
    (root / name).mkdir(parents=True)
    (root / name / "natural.bin").write_bytes(b"\0" * 3000)
    old = time.time() - age
    os.utime(root / name / "natural.bin", (old, old))
    os.utime(root / name, (old, old))
  token_cache.load_or_build(c.data, files, ByteTokenizer())
  assert not (root / ".aaaa.tmp-killed").exists()
  assert (root / ".bbbb.tmp-running").exists() and kept.exists()
  assert (f"data: removed 1 partial token cache that interrupted tokenizations left in "
          f"{root} (2.9 KiB)") in capsys.readouterr().out


def test_a_stream_s_identity_follows_its_contents_not_its_files(tiny_config, tmp_path):
  """`corpus`'s identity, which a resume compares to tell a same-size edit: a
  tokenized source's is the SHA-256 of the stream it reads (the same after its
  files are only touched and re-tokenized; another after one letter changes);
  a `tokens` source's changes when its .bin files are rewritten at the same size."""
  import hashlib
  import os
  from train.tokenizer import make_tokenizer
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(5):
    (docs / f"d{i}.txt").write_text(f"document {i} " * 10)
  d = tiny_config.data
  d.update(source="text", path=str(docs), cache_dir=str(tmp_path / "cache"))
  tok = make_tokenizer(d)
  stream, _, identity = data_lib.corpus(d, tok)
  assert identity == "sha256:" + hashlib.sha256(np.asarray(stream).tobytes()).hexdigest()
  os.utime(docs / "d3.txt", ns=(1, 1))  # a new cache key, the same documents
  assert data_lib.corpus(d, tok)[2] == identity
  (docs / "d3.txt").write_text("document 3 " * 9 + "documenT 3 ")
  stream2, _, edited = data_lib.corpus(d, tok)
  assert len(stream2) == len(stream) and edited != identity
  bins = tmp_path / "bins"
  bins.mkdir()
  (np.arange(100, dtype=np.uint16) % 7).tofile(bins / "a.bin")
  d.update(source="tokens", path=str(bins), token_dtype="uint16")
  first = data_lib.corpus(d, tok)[2]
  assert first.startswith("files:") and data_lib.corpus(d, tok)[2] == first
  (np.arange(100, dtype=np.uint16) % 5).tofile(bins / "a.bin")
  os.utime(bins / "a.bin", ns=(2, 2))  # a rewrite (mtime resolution varies)
  assert data_lib.corpus(d, tok)[2] != first


def _id_source(config, kind, path):
  """`config` reading token ids of `kind`: .bin files, token-id ArrayRecord
  records, or a mixture holding a tokens entry."""
  from ml_collections import ConfigDict
  d = config.data
  if kind == "tokens":
    d.update(source="tokens", path=str(path))
  elif kind == "records":
    d.update(source="arrayrecord", path=str(path), tokenizer="none", eos_id=0)
  else:
    d.mixture = ConfigDict({"ids": dict(source="tokens", path=str(path), weight=1.0),
                            "docs": dict(source="text", path=str(path), weight=1.0)})
    config.model.vocab_size = 256
  return config


@pytest.mark.parametrize("kind", ["tokens", "records", "mixture"])
def test_token_dtype_must_be_an_unsigned_integer_type(tiny_config, tmp_path, kind):
  """data.token_dtype was never checked: 'banana' was a raw numpy TypeError (exit
  1), float32 over uint32 files trained on id 0 everywhere, and int16 trained on
  negative ids. Any type but uint8 / uint16 / uint32 is a config error naming the
  field; its fix, the unsigned type of the same size (so the files still split
  into whole ids), validates."""
  from conftest import assert_fixes_validate
  from train.validate import validate_config
  c = _id_source(tiny_config, kind, tmp_path)
  for bad, meant in (("banana", "uint16"), ("float32", "uint32"), ("int16", "uint16"),
                     ("int32", "uint32"), ("int8", "uint8"), ("float16", "uint16"),
                     ("uint64", "uint16"), (">u2", "uint16"), ("", "uint16")):
    c.data.token_dtype = bad
    err = assert_fixes_validate(c)
    assert err.field == "data.token_dtype", (bad, err)
    assert f"set --config.data.token_dtype={meant}," in err.fix, (bad, err.fix)
    assert "uint8" in str(err) and "uint32" in str(err)
  for good in ("uint8", "uint16", "uint32"):
    c.data.token_dtype = good
    validate_config(c, 8)


def test_a_bad_token_dtype_exits_2_before_reading_the_files(tmp_path):
  from conftest import run_cli_many
  (np.arange(100, dtype=np.uint32)).tofile(tmp_path / "a.bin")
  common = ["train", "--config=experiments/llama_tiny.py", "--config.data.source=tokens",
            f"--config.data.path={tmp_path}", f"--workdir={tmp_path / 'run'}"]
  results = run_cli_many([common + [f"--config.data.token_dtype={t}"]
                          for t in ("banana", "float32")])
  for r in results:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Config error in `data.token_dtype`" in r.stderr
    assert "Traceback" not in r.stderr
  assert "--config.data.token_dtype=uint32" in results[1].stderr


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_the_tokens_source_logs_its_tokens_and_largest_id(tiny_config, tmp_path,
                                                          capsys, dtype):
  """The start log of source=tokens gave no token count nor largest id, so files
  read with another dtype than they were written in did not show themselves."""
  top = np.iinfo(dtype).max
  stream = np.arange(3000, dtype=np.int64) % 40
  stream[1234] = top
  stream.astype(dtype).tofile(tmp_path / "a.bin")
  c = tiny_config
  c.model.vocab_size = int(top) + 1
  c.data.update(source="tokens", path=str(tmp_path), token_dtype=dtype,
                eval_fraction=0.1)
  make_data_on(c)
  assert (f"data.path={tmp_path}: 1 .bin file of {dtype} ids, 3,000 tokens, "
          f"largest id {top:,}") in capsys.readouterr().out


def test_an_eos_id_the_byte_tokenizer_does_not_write_is_said(tiny_config, text_dir,
                                                              tmp_path, capsys):
  """The byte tokenizer ends every document with 0 whatever data.eos_id says, and
  the other value was accepted silently. It is kept (an import-hf run without
  tokenizer.json holds its model's eos id there, which generation and export
  use, and its printed fine-tune line must run) and the data line says documents
  end with 0, for text sources alone or in a mixture; 0, unset and a
  tokenizer.json's eos say nothing."""
  from ml_collections import ConfigDict
  c = _text_config(tiny_config, text_dir)
  said = "data: documents end with id 0, the byte tokenizer's; data.eos_id="
  for mixture in (False, True):
    if mixture:
      c.data.path = None
      c.data.mixture = ConfigDict({
          "docs": dict(source="text", path=str(text_dir), weight=1.0),
          "more": dict(source="text", path=str(text_dir), weight=1.0)})
    for eos, says in ((7, True), (255, True), (None, False), (0, False)):
      c.data.eos_id = eos
      capsys.readouterr()
      make_data_on(c)
      assert (f"{said}{eos} is not written" in capsys.readouterr().out) == says, eos
  c.data.update(tokenizer=write_word_tokenizer(tmp_path / "t.json",
                                                ["<|endoftext|>", "[UNK]", "x"]),
                eos_id=0)
  c.data.mixture = ConfigDict()
  c.data.path = str(text_dir)
  capsys.readouterr()
  make_data_on(c)
  assert said not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["tokens", "mixture"])
def test_a_tokens_eos_id_outside_the_dtype_or_the_vocabulary_is_refused(
    tiny_config, tmp_path, kind):
  """source=tokens took any data.eos_id: one past its dtype's range ends no
  document, one past the model's vocabulary is a stop id generation refuses. It
  is checked as tokenizer=none checks its eos (`check_eos`)."""
  from train.validate import validate_config
  c = _id_source(tiny_config, kind, tmp_path)
  vocab = c.model.vocab_size
  for dtype, eos in (("uint16", 70000), ("uint8", 300), ("uint16", vocab),
                     ("uint32", vocab + 5), ("uint16", -1)):
    c.data.update(token_dtype=dtype, eos_id=eos)
    with pytest.raises(ConfigError) as err:
      validate_config(c, 8)
    assert err.value.field == "data.eos_id", (dtype, eos, err.value)
    size = min(vocab, np.iinfo(dtype).max + 1)
    assert f"{eos} is outside the ids of data.token_dtype {dtype} and " in (
        err.value.problem) and f"ids [0, {size})" in err.value.problem
  # (beside a byte-tokenized source, the eos is the byte tokenizer's: 0)
  for eos in (0, None) + ((vocab - 1,) if kind == "tokens" else ()):
    c.data.update(token_dtype="uint16", eos_id=eos)
    validate_config(c, 8)
