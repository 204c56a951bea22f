"""Document sources (jsonl, parquet, arrayrecord, hf_disk, text), the token cache and
bad input: the same documents give the same token stream whatever the source."""

import json
import os
import shutil

import numpy as np
import pytest

import sharding
from conftest import make_data_on, run_cli, write_word_tokenizer
from train import data as data_lib
from train import token_cache
from train.tokenizer import ByteTokenizer

N_DOCS = 200


@pytest.fixture(scope="module")
def docs():
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "délta", "ε", "zeta\n", "eta", "θ→", "#", "x=1\n"]
  return [f"doc {i}: " + " ".join(rng.choice(words, size=rng.integers(1, 12)))
          for i in range(N_DOCS)]


def _write_all(docs, root):
  """The same documents as jsonl, parquet, arrayrecord, hf_disk and text files."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python.array_record_module import ArrayRecordWriter
  half = len(docs) // 2
  parts = [docs[:half], docs[half:]]
  paths = {}
  (root / "jsonl").mkdir()
  for k, part in enumerate(parts):
    with open(root / "jsonl" / f"part{k}.jsonl", "w") as f:
      for i, d in enumerate(part):
        f.write(json.dumps({"id": i, "text": d}) + "\n")
  paths["jsonl"] = str(root / "jsonl")
  (root / "parquet").mkdir()
  for k, part in enumerate(parts):
    pq.write_table(pa.table({"text": part, "n": list(range(len(part)))}),
                   root / "parquet" / f"part{k}.parquet", row_group_size=37)
  paths["parquet"] = str(root / "parquet" / "*.parquet")
  (root / "ar").mkdir()
  for k, part in enumerate(parts):
    w = ArrayRecordWriter(str(root / "ar" / f"part{k}.array_record"), "group_size:1")
    for d in part:
      w.write(d.encode("utf-8"))
    w.close()
  paths["arrayrecord"] = str(root / "ar")
  datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "hf"))
  paths["hf_disk"] = str(root / "hf")
  (root / "text").mkdir()
  for i, d in enumerate(docs):
    (root / "text" / f"doc{i:03d}.txt").write_text(d)
  paths["text"] = str(root / "text")
  return paths


@pytest.fixture(scope="module")
def corpus(docs, tmp_path_factory):
  pytest.importorskip("datasets")
  return _write_all(docs, tmp_path_factory.mktemp("corpus"))


def _config(tiny_config, source, path, cache_dir):
  tiny_config.data.update(source=source, path=str(path), seq_len=16,
                          eval_fraction=0.1, cache_dir=str(cache_dir))
  tiny_config.model.vocab_size = 256
  return tiny_config


def test_every_source_gives_the_same_stream_and_batch(tiny_config, corpus, docs,
                                                      tmp_path):
  streams, batches = {}, {}
  for source, path in corpus.items():
    c = _config(tiny_config, source, path, tmp_path / "cache")
    streams[source] = np.asarray(data_lib.token_stream(c.data, ByteTokenizer()))
    batches[source] = next(make_data_on(c).train)
  # The stream is the documents, each followed by eos 0, in the fixed shuffle.
  order = np.random.default_rng(0).permutation(N_DOCS)
  expected = b"".join(docs[i].encode() + b"\0" for i in order)
  assert streams["text"].tobytes() == expected
  for source in corpus:
    np.testing.assert_array_equal(streams[source], streams["text"], err_msg=source)
    for key in batches["text"]:
      np.testing.assert_array_equal(batches[source][key], batches["text"][key],
                                    err_msg=f"{source} {key}")
  # One cache per source (the key names the source kind), all complete.
  assert len([d for d in os.listdir(tmp_path / "cache") if not d.startswith(".")]) == 5


def _counting(monkeypatch):
  calls = []
  real = ByteTokenizer.encode_batch

  def encode_batch(self, texts):
    calls.append(len(texts))
    return real(self, texts)
  monkeypatch.setattr(ByteTokenizer, "encode_batch", encode_batch)
  return calls


def test_second_run_reuses_the_cache_without_tokenizing(tiny_config, corpus, tmp_path,
                                                        monkeypatch, capsys):
  c = _config(tiny_config, "jsonl", corpus["jsonl"], tmp_path / "cache")
  first = make_data_on(c)
  batches = [next(first.train) for _ in range(2)]
  assert "tokenized 200 documents of 2 files into" in capsys.readouterr().out

  def boom(*args):
    raise AssertionError("tokenized again")
  monkeypatch.setattr(ByteTokenizer, "encode_batch", boom)
  monkeypatch.setattr(ByteTokenizer, "encode", boom)
  second = make_data_on(c)
  assert "reusing the token cache" in capsys.readouterr().out
  assert isinstance(data_lib.token_stream(c.data, ByteTokenizer()), np.memmap)
  for b in batches:
    again = next(second.train)
    for key in b:
      np.testing.assert_array_equal(again[key], b[key])


def test_a_cache_takes_the_permissions_the_umask_gives(tiny_config, corpus, tmp_path):
  """From a trial: every cache directory was made 0700 (tempfile's), so a cache
  shared by a team could not be read by the others. It takes what the umask
  gives any new directory."""
  import stat
  c = _config(tiny_config, "jsonl", corpus["jsonl"], tmp_path / "cache")
  before = os.umask(0o022)
  try:
    from train.sources import list_files
    built = token_cache.load_or_build(c.data, list_files(corpus["jsonl"], "jsonl"),
                                      ByteTokenizer())
  finally:
    os.umask(before)
  assert stat.S_IMODE(os.stat(built.path).st_mode) == 0o755


def test_a_changed_file_or_tokenizer_rebuilds(tiny_config, docs, tmp_path,
                                              monkeypatch):
  src = tmp_path / "d.jsonl"
  src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  c = _config(tiny_config, "jsonl", src, tmp_path / "cache")
  calls = _counting(monkeypatch)
  a = np.asarray(data_lib.token_stream(c.data, ByteTokenizer()))
  data_lib.token_stream(c.data, ByteTokenizer())
  assert len(calls) == 1  # the second read came from the cache
  st = os.stat(src)
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
  data_lib.token_stream(c.data, ByteTokenizer())
  assert len(calls) == 2
  with open(src, "a") as f:  # new content
    f.write(json.dumps({"text": "one more"}) + "\n")
  b = np.asarray(data_lib.token_stream(c.data, ByteTokenizer()))
  assert len(calls) == 3 and len(b) == len(a) + len("one more") + 1
  # Another tokenizer (an HF tokenizer.json; then the same file edited) rebuilds.
  pytest.importorskip("tokenizers")
  write_word_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>", "[UNK]", "doc"])
  c.data.tokenizer = str(tmp_path / "tokenizer.json")
  key1 = token_cache.cache_key(c.data, [str(src)], 0)
  write_word_tokenizer(tmp_path / "tokenizer.json",  # the same file, edited
                       ["<|endoftext|>", "[UNK]", "doc", "more"])
  key2 = token_cache.cache_key(c.data, [str(src)], 0)
  c.data.tokenizer = "byte"
  assert len({key1, key2, token_cache.cache_key(c.data, [str(src)], 0)}) == 3
  # A copy of the same file elsewhere (import-hf keeps one in the run) shares it.
  shutil.copy(tmp_path / "tokenizer.json", tmp_path / "copy.json")
  c.data.tokenizer = str(tmp_path / "copy.json")
  assert token_cache.cache_key(c.data, [str(src)], 0) == key2


def test_byte_tokenizer_round_trips_text_and_shows_ids_past_the_bytes(docs):
  """decode(encode(text)) is the text (multi-byte characters included); eos (0) is
  dropped and an id of 256 or more (a larger model vocabulary) shows as U+FFFD
  where it stands, rather than vanishing."""
  tok = ByteTokenizer()
  for doc in docs[:20]:
    assert tok.decode(tok.encode(doc)) == doc
  ids = [*tok.encode("θ→ a"), 0, 300, *tok.encode("b"), 256, 511]
  assert tok.decode(ids) == "θ→ a\ufffdb\ufffd\ufffd"


def test_hf_tokenizer_shows_ids_past_its_vocabulary(tmp_path):
  """A model larger than its tokenizer.json (a padded vocabulary) can generate ids
  the tokenizer does not have: U+FFFD where each stands (tokenizers dropped them)."""
  from train.tokenizer import HFTokenizer
  tok = HFTokenizer(write_word_tokenizer(str(tmp_path / "tok.json"),
                                         ["</s>", "alpha", "beta", "[UNK]"]))
  assert tok.decode([1, 2]) == "alpha beta"
  assert tok.decode([1, 2, tok.vocab_size, 1, 4096]) == "alpha beta\ufffdalpha\ufffd"


def test_hf_tokenizer_encode_batch_matches_encode(tiny_config, docs, tmp_path):
  pytest.importorskip("tokenizers")
  from train.tokenizer import HFTokenizer
  write_word_tokenizer(tmp_path / "tokenizer.json",
                       ["<|endoftext|>", "[UNK]", "doc", "alpha", "beta", ":"])
  hf = HFTokenizer(str(tmp_path / "tokenizer.json"))
  batch = hf.encode_batch(docs[:20])
  for d, ids in zip(docs[:20], batch):
    np.testing.assert_array_equal(ids, hf.encode(d))
  src = tmp_path / "d.jsonl"
  src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]))
  c = _config(tiny_config, "jsonl", src, tmp_path / "cache")
  c.data.tokenizer = str(tmp_path / "tokenizer.json")
  stream = np.asarray(data_lib.token_stream(c.data, hf))
  assert stream.dtype == np.uint8 and len(stream) == sum(len(i) + 1 for i in batch)


def test_an_interrupted_build_leaves_nothing_trusted(tiny_config, docs, tmp_path,
                                                     monkeypatch):
  src = tmp_path / "d.jsonl"
  src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  cache = tmp_path / "cache"
  c = _config(tiny_config, "jsonl", src, cache)
  key = token_cache.cache_key(c.data, [str(src)], 0)
  # A run killed after writing everything but the rename left this behind.
  junk = cache / f".{key}.tmp-killed"
  junk.mkdir(parents=True)
  np.save(junk / "tokens.npy", np.zeros(10, np.uint8))
  np.save(junk / "offsets.npy", np.zeros(2, np.int64))
  (junk / "meta.json").write_text(json.dumps({"documents": 1, "tokens": 10,
                                              "skipped": 0, "replaced_utf8": 0}))
  # A run that dies mid-tokenization leaves no cache under the key.
  monkeypatch.setattr(token_cache, "_BATCH_DOCS", 50)
  real = ByteTokenizer.encode_batch
  calls = []

  def dies(self, texts):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(self, texts)
  monkeypatch.setattr(ByteTokenizer, "encode_batch", dies)
  with pytest.raises(KeyboardInterrupt):
    data_lib.token_stream(c.data, ByteTokenizer())
  assert not (cache / key).exists()
  monkeypatch.setattr(ByteTokenizer, "encode_batch", real)
  stream = np.asarray(data_lib.token_stream(c.data, ByteTokenizer()))
  assert len(stream) == sum(len(d.encode()) + 1 for d in docs)
  assert (cache / key / "meta.json").exists()


def _jsonl_with_bad_lines(tmp_path, docs):
  lines = [json.dumps({"text": d}) for d in docs[:30]]
  lines[4] = '{"text": "unterminated'             # line 5: not JSON
  lines[9] = json.dumps({"body": "no text field"})  # line 10: no `text`
  lines[14] = json.dumps({"text": None})           # line 15: null
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def test_bad_records_are_config_errors_naming_file_and_line(tiny_config, docs,
                                                           tmp_path, capsys):
  path = _jsonl_with_bad_lines(tmp_path, docs)
  c = _config(tiny_config, "jsonl", path, tmp_path / "cache")
  with pytest.raises(sharding.ConfigError) as err:
    make_data_on(c)
  assert err.value.field == "data.path"
  # the line's newline is not part of the record: an unterminated string, not a
  # control character
  assert f"{path}:5: not valid JSON (Unterminated string starting at: column 10)" \
      in err.value.problem
  assert "skip_bad_records=true" in err.value.fix
  assert not [d for d in os.listdir(tmp_path / "cache") if not d.startswith(".")]
  # Each kind of bad record, with its line, once the earlier ones are gone.
  lines = path.read_text().splitlines()
  lines[4] = json.dumps({"text": "fixed"})
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(sharding.ConfigError, match=f"{path}:10: the record has no "
                     r"'text' field \(its fields: \['body'\]\), though the 9 "
                     r"records before it have one\.") as err:
    make_data_on(c)
  # after records that held the field, the record is bad, not the field's name
  # (renaming it to 'body' would fail on line 1: a trial found that fix offered)
  assert err.value.field == "data.path"
  assert "text_field=" not in err.value.fix and err.value.fix.startswith("fix or")
  c.data.text_field = "body"
  with pytest.raises(sharding.ConfigError, match=f"{path}:1: the record has no "
                     "'body' field") as err:
    make_data_on(c)
  # on the first record, the field's name is likely wrong: the fix names one
  assert err.value.field == "data.text_field"
  assert err.value.fix.startswith("if the records hold their text in 'text', set "
                                  "--config.data.text_field=text; or fix")
  odd = tmp_path / "odd.jsonl"
  # a null is one bad record; a number is most likely the wrong field
  for record, problem, field in (
      ({"text": None}, "the record's 'text' is null.", "data.path"),
      ({"text": 42, "body": "x"}, "the record's 'text' is of type int, not text.",
       "data.text_field"),
      ([{"text": "a"}, {"text": "b"}], "the record is a list, not an object with a "
       "'text' field (JSON Lines holds one object per line; a JSON array of them is "
       "not JSON Lines).", "data.path")):
    odd.write_text(json.dumps(record) + "\n")
    c2 = _config(tiny_config, "jsonl", odd, tmp_path / "cache2")
    c2.data.text_field = "text"
    with pytest.raises(sharding.ConfigError) as err:
      make_data_on(c2)
    assert (err.value.problem, err.value.field) == (f"{odd}:1: {problem}", field)
    assert ("--config.data.text_field=body" in err.value.fix) == ("body" in record)
  # after one record that held text there: the record is bad, said with the count
  odd.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": 42}) + "\n")
  with pytest.raises(sharding.ConfigError) as err:
    make_data_on(c2)
  assert err.value.problem == (f"{odd}:2: the record's 'text' is of type int, not "
                               "text as in the record before it.")
  # skip_bad_records: the two bad lines are skipped, counted and logged.
  c = _config(tiny_config, "jsonl", path, tmp_path / "cache")
  c.data.update(text_field="text", skip_bad_records=True)
  capsys.readouterr()
  stream = np.asarray(data_lib.token_stream(c.data, ByteTokenizer()))
  assert "skipped 2 bad records" in capsys.readouterr().out
  assert int((stream == 0).sum()) == 28


def test_parquet_null_is_an_error_naming_the_row(tiny_config, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "p.parquet"
  pq.write_table(pa.table({"text": ["a b c"] * 40 + [None] + ["d"] * 10}), path,
                 row_group_size=16)
  c = _config(tiny_config, "parquet", path, tmp_path / "cache")
  with pytest.raises(sharding.ConfigError, match=f"{path}: row 40: the 'text' field "
                     "is null"):
    data_lib.token_stream(c.data, ByteTokenizer())
  c.data.text_field = "body"
  with pytest.raises(sharding.ConfigError, match="has no column 'body'") as err:
    data_lib.token_stream(c.data, ByteTokenizer())
  assert err.value.field == "data.text_field"


@pytest.mark.parametrize("damage", ["truncated_gzip", "corrupt_parquet"])
def test_a_damaged_file_is_an_error_naming_it(tiny_config, docs, tmp_path, damage):
  """A truncated .jsonl.gz (a partial download) ended the run in a bare
  "EOFError: Compressed file ended before the end-of-stream marker" that named no
  file; a corrupt parquet file in pyarrow's error. Both are a ConfigError naming
  the file, after the good file before it was read, and no cache is left."""
  import gzip
  good, bad = tmp_path / "a_good", tmp_path / "b_bad"
  if damage == "truncated_gzip":
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    good, bad = good.with_suffix(".jsonl.gz"), bad.with_suffix(".jsonl.gz")
    good.write_bytes(gzip.compress(lines))
    whole = gzip.compress(lines * 4)
    bad.write_bytes(whole[:len(whole) // 2])
    source, pattern = "jsonl", str(tmp_path / "*.jsonl.gz")
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    good, bad = good.with_suffix(".parquet"), bad.with_suffix(".parquet")
    pq.write_table(pa.table({"text": docs}), good)
    bad.write_bytes(b"not a parquet file" * 20)
    source, pattern = "parquet", str(tmp_path / "*.parquet")
  c = _config(tiny_config, source, pattern, tmp_path / "cache")
  with pytest.raises(sharding.ConfigError) as err:
    data_lib.token_stream(c.data, ByteTokenizer())
  assert err.value.field == "data.path"
  assert f"{bad} cannot be read" in str(err.value)
  assert not list((tmp_path / "cache").glob("*/meta.json"))


def test_no_documents_and_invalid_utf8(tiny_config, tmp_path, capsys):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  c = _config(tiny_config, "jsonl", empty, tmp_path / "cache")
  with pytest.raises(sharding.ConfigError, match="yielded no documents") as err:
    data_lib.token_stream(c.data, ByteTokenizer())
  assert err.value.field == "data.path"
  c.data.path = str(tmp_path / "nothing" / "*.jsonl")
  with pytest.raises(sharding.ConfigError, match="no files match"):
    data_lib.token_stream(c.data, ByteTokenizer())
  # hf_disk on an empty or missing directory: not "no files match" (it exists)
  (tmp_path / "blank").mkdir()
  for where, why in (("blank", "is not a directory written by datasets' save_to_disk "
                               r"\(it holds no files"),
                     ("absent", "needs the directory written by datasets' save_to_disk")):
    c.data.update(source="hf_disk", path=str(tmp_path / where), text_field="text")
    with pytest.raises(sharding.ConfigError, match=why) as err:
      data_lib.token_stream(c.data, ByteTokenizer())
    assert err.value.field == "data.path"
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "good.txt").write_bytes("ok é".encode())
  (tmp_path / "t" / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
  c.data.update(source="text", path=str(tmp_path / "t"))
  capsys.readouterr()
  stream = np.asarray(data_lib.token_stream(c.data, ByteTokenizer())).tobytes()
  out = capsys.readouterr().out
  assert "data: 1 document held bytes that are not UTF-8" in out
  assert "token ids" not in out  # one of two: text with a bad file
  assert "caf\ufffd au lait".encode() in stream and "ok é".encode() in stream
  # From a trial: records of token ids read as text trained on garbage with only
  # the count said; when most documents are not UTF-8, the line says what to set.
  (tmp_path / "ids").mkdir()
  for i in range(3):
    (tmp_path / "ids" / f"{i}.txt").write_bytes(np.arange(200, 260, dtype=np.uint16)
                                                 .tobytes())
  c.data.update(source="text", path=str(tmp_path / "ids"))
  data_lib.token_stream(c.data, ByteTokenizer())
  assert ("data: 3 documents held bytes that are not UTF-8; decoded with replacement "
          "characters (U+FFFD); most documents did: if the records hold token ids, not "
          "text, set --config.data.tokenizer=none" in capsys.readouterr().out)
  # JSON escapes: a surrogate pair is one character, a lone surrogate becomes U+FFFD.
  (tmp_path / "s.jsonl").write_text('{"text": "pair \\ud83d\\ude00"}\n'
                                    '{"text": "lone \\ud800!"}\n')
  c.data.update(source="jsonl", path=str(tmp_path / "s.jsonl"))
  stream = np.asarray(data_lib.token_stream(c.data, ByteTokenizer())).tobytes()
  assert "data: 1 document held bytes that are not UTF-8" in capsys.readouterr().out
  assert "pair \U0001f600".encode() in stream and "lone \ufffd".encode() in stream


def test_a_byte_order_mark_is_not_text(tiny_config, tmp_path):
  """From a trial (prompt files; the same kind in training data): a UTF-8 BOM,
  which Windows editors write, failed a .jsonl's first record as "not valid JSON"
  (or dropped it under skip_bad_records) and began a .txt's first document. Every
  text source now reads a file with one as the file without it; a BOM later in
  the text is kept (it is a character there)."""
  import gzip
  docs = ["first doc \ufeffwith a mark inside", "second"]
  bom = "\ufeff".encode()
  for source, name, encode in (
      ("text", "a.txt", lambda: docs[0].encode()),
      ("jsonl", "a.jsonl", lambda: "".join(json.dumps({"text": d}) + "\n"
                                             for d in docs).encode()),
      ("jsonl", "a.jsonl.gz", lambda: gzip.compress(
          bom + "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))):
    streams = []
    for marked in (False, True):
      folder = tmp_path / f"{name}-{marked}"
      folder.mkdir()
      raw = encode()
      if name.endswith(".gz"):  # the mark inside the compressed text
        raw = raw if marked else gzip.compress(gzip.decompress(raw)[len(bom):])
      elif marked:
        raw = bom + raw
      (folder / name).write_bytes(raw)
      c = _config(tiny_config, source, folder / name, tmp_path / "cache" / name)
      streams.append(np.asarray(data_lib.token_stream(c.data, ByteTokenizer())))
    np.testing.assert_array_equal(streams[1], streams[0], err_msg=name)
    assert "with a mark inside".encode() in streams[0].astype(np.uint8).tobytes()
    assert bom in streams[0].astype(np.uint8).tobytes()  # the one inside the text


def test_a_directory_s_files_are_each_read_once(tmp_path):
  """From a trial: a symbolic link to an ancestor directory made glob read the
  same file 41 times (down to the longest path), and a file reached by a second
  link was read twice; upper-case endings were left out. A directory is now
  walked entering each directory once (links to other directories are still
  followed), each file is read under its first name only, and endings match in
  any case; hidden files stay out, as glob leaves them."""
  from train.sources import list_files
  data, outside = tmp_path / "data", tmp_path / "outside"
  data.mkdir()
  outside.mkdir()
  for name in ("a.jsonl", "C.JSONL", ".hidden.jsonl", "notes.txt"):
    (data / name).write_text('{"text": "x"}\n')
  (outside / "x.jsonl").write_text('{"text": "y"}\n')
  (data / "self").symlink_to(data)  # a loop
  (data / "link.jsonl").symlink_to(data / "a.jsonl")  # the same file again
  (data / "more").symlink_to(outside)  # another directory: followed
  files = list_files(str(data), "jsonl")
  assert [os.path.relpath(f, data) for f in files] == ["C.JSONL", "a.jsonl",
                                                       os.path.join("more", "x.jsonl")]
  assert len(list_files(str(data / "*.jsonl"), "jsonl")) == 1  # a glob: a.jsonl


def test_validation_knows_the_new_sources(tiny_config):
  from train import validate
  c = tiny_config
  c.data.source = "csv"
  with pytest.raises(sharding.ConfigError, match="jsonl, parquet, arrayrecord, "
                     "hf_disk, tokens, synthetic"):
    validate.validate_config(c, 8)
  c.data.update(source="parquet", path=None)
  c.model.vocab_size = 256
  with pytest.raises(sharding.ConfigError, match="no path is set") as err:
    validate.validate_config(c, 8)
  assert err.value.field == "data.path"


def test_cli_reports_a_bad_record_before_training(docs, tmp_path, monkeypatch):
  """Also: with data.cache_dir unset, the command line tokenizes under
  $XDG_CACHE_HOME/rung/tokens."""
  path = _jsonl_with_bad_lines(tmp_path, docs)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  r = run_cli("train", "--config=experiments/llama_tiny.py",
              f"--workdir={tmp_path / 'run'}", "--config.data.source=jsonl",
              f"--config.data.path={path}", "--config.train.steps=1")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Config error in `data.path`" in r.stderr
  assert f"{path}:5" in r.stderr
  assert (tmp_path / "xdg" / "rung" / "tokens").is_dir()


def test_arrayrecord_token_id_records_match_the_text_stream(tiny_config, corpus, docs,
                                                            tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(tmp_path / "ids.array_record"), "group_size:1")
  for d in docs:  # the byte tokenizer's ids, stored as uint16 records
    w.write(np.frombuffer(d.encode(), np.uint8).astype(np.uint16).tobytes())
  w.close()
  c = _config(tiny_config, "arrayrecord", tmp_path / "ids.array_record",
              tmp_path / "cache")
  c.data.update(tokenizer="none", token_dtype="uint16", eos_id=0)
  d = make_data_on(c)
  assert d.tokenizer.eos_id == 0
  ids = np.asarray(data_lib.token_stream(c.data, d.tokenizer))
  c2 = _config(tiny_config.copy_and_resolve_references(), "text", corpus["text"],
               tmp_path / "cache")
  c2.data.update(tokenizer="byte", eos_id=None)
  text = np.asarray(data_lib.token_stream(c2.data, ByteTokenizer()))
  assert ids.dtype == np.uint16
  np.testing.assert_array_equal(ids, text)
  batch, batch2 = next(d.train), next(make_data_on(c2).train)
  for key in batch:
    np.testing.assert_array_equal(batch[key], batch2[key])
  c.data.eos_id = None
  from train import validate
  with pytest.raises(sharding.ConfigError, match="need the id that ends"):
    validate.validate_config(c, 8)


def test_ids_beyond_the_model_vocabulary_are_a_config_error(tiny_config, tmp_path):
  src = tmp_path / "d.jsonl"
  src.write_text("".join(json.dumps({"text": "é" * 40}) + "\n" for _ in range(40)))
  c = _config(tiny_config, "jsonl", src, tmp_path / "cache")
  c.model.vocab_size = 128  # the bytes of é are 195 and 169
  with pytest.raises(sharding.ConfigError, match="at least 196") as err:
    make_data_on(c)
  assert err.value.field == "model.vocab_size"
  c.model.vocab_size = 256
  assert next(make_data_on(c).train)["inputs"].max() == 195


# Where each kind of source's files are in `corpus`, and one file of each.
_DIRS = {"jsonl": "jsonl", "parquet": "parquet", "arrayrecord": "ar", "hf_disk": "hf",
         "text": "text"}
_ONE_FILE = {"jsonl": "jsonl/part1.jsonl", "parquet": "parquet/part1.parquet",
             "arrayrecord": "ar/part1.array_record", "text": "text/doc007.txt"}
_GLOB_NAMES = ("run[1]", "a?b", "c*d", "[x]")
# A name the glob each of those would be matches instead.
_DECOYS = {"run[1]": "run1", "a?b": "a-b", "c*d": "c-other-d", "[x]": "x"}


def _stream(tiny_config, source, path, cache):
  c = _config(tiny_config, source, path, cache)
  return np.asarray(data_lib.token_stream(c.data, ByteTokenizer()))


def test_an_existing_path_with_glob_characters_is_read_as_it_is(tiny_config, corpus,
                                                                 tmp_path):
  """A file or directory whose name holds [ ] * ? was read as a glob: "no files
  match" (or other files). An existing file is read as it is, an existing
  directory searched with its name escaped; only a path that does not exist is a
  glob. For every source that reads files, .bin files too."""
  import pathlib
  root = pathlib.Path(corpus["text"]).parent
  cache = tmp_path / "cache"
  for source, folder in _DIRS.items():
    want = _stream(tiny_config, source, root / folder, cache)
    for name in _GLOB_NAMES:
      shutil.copytree(root / folder, tmp_path / source / name)
      np.testing.assert_array_equal(
          _stream(tiny_config, source, tmp_path / source / name, cache), want,
          err_msg=f"{source} {name}")
    if source in _ONE_FILE:
      one = root / _ONE_FILE[source]
      want = _stream(tiny_config, source, one, cache)
      other = root / _ONE_FILE[source].replace("1", "0").replace("7", "0")
      ext = one.name[one.name.index('.'):]
      for name, decoy in (("shard[0]", "shard0"), ("a?b", "axb"), ("s*", "s-other")):
        copy = tmp_path / source / f"{name}{ext}"
        shutil.copy(one, copy)
        # a file the name would match instead, were it a glob
        shutil.copy(other, tmp_path / source / f"{decoy}{ext}")
        np.testing.assert_array_equal(_stream(tiny_config, source, copy, cache), want,
                                      err_msg=f"{source} {copy.name}")
  ids = np.arange(500, dtype=np.uint16) % 50
  for name in _GLOB_NAMES:
    (tmp_path / "bins" / name).mkdir(parents=True)
    ids.tofile(tmp_path / "bins" / name / "a.bin")
    ids.tofile(tmp_path / "bins" / f"{name}.bin")
    (ids + 1).tofile(tmp_path / "bins" / f"{_DECOYS[name]}.bin")
    c = _config(tiny_config, "tokens", tmp_path / "bins" / name, cache)
    for path in (tmp_path / "bins" / name, tmp_path / "bins" / f"{name}.bin"):
      c.data.path = str(path)
      np.testing.assert_array_equal(data_lib.token_stream(c.data, None), ids,
                                    err_msg=str(path))
  # a path that does not exist is still a glob
  c.data.path = str(tmp_path / "bins" / "a?b" / "*.bin")
  np.testing.assert_array_equal(data_lib.token_stream(c.data, None), ids)


def test_a_tilde_in_data_path_is_the_home_directory(tiny_config, corpus, tmp_path,
                                                    monkeypatch):
  """data.path='~/...' was searched as a directory named '~' ("no files match"),
  though data.cache_dir and data.tokenizer expand it. Every source, and the
  entries of a mixture."""
  import pathlib
  from ml_collections import ConfigDict
  root = pathlib.Path(corpus["text"]).parent
  home = tmp_path / "home"
  shutil.copytree(root, home / "corpus")
  (np.arange(500, dtype=np.uint16) % 50).tofile(home / "ids.bin")
  monkeypatch.setenv("HOME", str(home))
  cache = tmp_path / "cache"
  paths = {source: f"corpus/{folder}" for source, folder in _DIRS.items()}
  paths.update({"parquet": "corpus/parquet/*.parquet", "tokens": "ids.bin",
                "jsonl": "corpus/jsonl/part0.jsonl"})
  for source, path in paths.items():
    np.testing.assert_array_equal(
        _stream(tiny_config, source, f"~/{path}", cache),
        _stream(tiny_config, source, home / path, cache), err_msg=source)
  c = _config(tiny_config, "text", "unused", cache)
  c.data.path = None
  c.data.mixture = ConfigDict({
      name: dict(source=source, path=f"~/{paths[source]}", weight=1.0)
      for name, source in (("books", "text"), ("web", "jsonl"), ("ids", "tokens"))})
  d = make_data_on(c)
  assert [m.tokens for m in d.mixture] == [
      len(_stream(tiny_config, s, home / paths[s], cache))
      for s in ("text", "tokens", "jsonl")]  # books, ids, web


def test_a_tilde_in_data_tokenizer_is_the_home_directory(tiny_config, corpus, tmp_path,
                                                         monkeypatch):
  """make_tokenizer expanded `~` in data.tokenizer but the token cache's key read
  the file at ./~/tok.json: training on a text source crashed with
  FileNotFoundError. Every reader takes the path from `tokenizer_file`; the
  stream, the cache key and the run's recorded path equal the absolute path's."""
  from conftest import write_word_tokenizer
  from train import run_config, token_cache
  from train.tokenizer import make_tokenizer
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  write_word_tokenizer(home / "tok.json", ["[UNK]", *[chr(ord("a") + i) for i in range(26)]])
  streams = {}
  for given in ("~/tok.json", str(home / "tok.json")):
    c = _config(tiny_config, "text", corpus["text"], tmp_path / "cache")
    c.data.update(tokenizer=given, eos_id=0)
    streams[given] = (token_cache.tokenizer_identity(c.data),
                      np.asarray(data_lib.token_stream(c.data, make_tokenizer(c.data))))
    run_config.write(str(tmp_path / "run"), json.loads(c.to_json()))
    assert run_config.read(str(tmp_path / "run"))["data"]["tokenizer"] == str(
        home / "tok.json")
  (key_a, ids_a), (key_b, ids_b) = streams.values()
  assert key_a == key_b and len(ids_a) > 0
  np.testing.assert_array_equal(ids_a, ids_b)


def test_a_cache_is_keyed_only_by_the_settings_its_source_reads():
  """data.text_field and data.skip_bad_records keyed every source's token cache,
  so a change made for a mixture's jsonl entry tokenized its text, arrayrecord
  and token-id sources again. Each is part of the key of a source that reads it
  only; a source that does not is keyed as before this rule under the defaults,
  so caches built then stay valid."""
  import hashlib
  import types
  here = os.path.abspath(__file__)
  for source, tokenizer in (("text", "byte"), ("arrayrecord", "byte"),
                            ("arrayrecord", "none"), ("jsonl", "byte"),
                            ("parquet", "byte"), ("hf_disk", "byte")):
    base = dict(source=source, tokenizer=tokenizer, token_dtype="uint16",
                text_field="text", skip_bad_records=False)

    def key(**changes):
      view = types.SimpleNamespace(**{**base, **changes})
      return token_cache.cache_key(view, [here], 0)
    reads_field = source in ("jsonl", "parquet", "hf_disk")
    can_skip = reads_field or tokenizer == "none"
    assert (key(text_field="body") != key()) == reads_field, source
    assert (key(skip_bad_records=True) != key()) == can_skip, (source, tokenizer)
    st = os.stat(here)
    before = dict(version=1, source=source, text_field="text", skip=False,
                  files=[[here, st.st_size, st.st_mtime_ns]],
                  tokenizer=token_cache.tokenizer_identity(
                      types.SimpleNamespace(**base)), eos_id=0)
    assert key() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()
                                   ).hexdigest()[:32]


def test_a_dataset_dict_without_train_names_a_split_it_has(tiny_config, docs,
                                                           tmp_path):
  """The fix said "e.g. PATH/train", a directory that does not exist; it names
  the first split the DatasetDict holds, and following it reads that split."""
  import datasets
  from conftest import fix_alternatives
  from ml_collections import ConfigDict
  for k, splits in enumerate((["validation", "test"], ["test"], ["dev", "eval"])):
    path = tmp_path / f"dd{k}"
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": docs[:50]})
                          for s in splits}).save_to_disk(str(path))
    for prefix in ("data.", "data.mixture.web."):
      c = _config(tiny_config, "hf_disk", path, tmp_path / "cache")
      c.data.mixture = ConfigDict()
      if prefix != "data.":
        c.data.path = None
        c.data.mixture = ConfigDict({"web": dict(source="hf_disk", path=str(path),
                                                 weight=1.0)})
      with pytest.raises(sharding.ConfigError) as err:
        make_data_on(c)
      assert err.value.field == prefix + "path"
      ((flag,),) = fix_alternatives(err.value.fix)
      assert flag == f"--config.{prefix}path={path / splits[0]}", err.value.fix
      if prefix == "data.":
        c.data.path = flag.split("=", 1)[1]
      else:
        c.data.mixture.web.path = flag.split("=", 1)[1]
      assert next(make_data_on(c).train)["inputs"].shape == (8, 16)


@pytest.mark.parametrize("source", ["parquet", "hf_disk"])
def test_a_text_field_naming_a_column_of_no_text_lists_the_text_columns(
    tiny_config, docs, tmp_path, source):
  """A text_field naming a column of numbers or lists was a bad record per row,
  whose fix (skip_bad_records) skipped every row and then failed on "no
  documents". It is an error naming data.text_field whose fix names the text
  columns, as the JSONL reader's does; following it reads the documents."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  from conftest import fix_alternatives
  n = 60
  columns = {"n": list(range(n)), "body": docs[:n], "tags": [["a", "b"]] * n,
             "score": [0.5] * n, "title": [f"t{i}" for i in range(n)],
             "raw": [d.encode() for d in docs[:n]]}
  table = pa.table(columns)
  if source == "parquet":
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
  else:
    path = tmp_path / "hf"
    datasets.Dataset(table).save_to_disk(str(path))
  c = _config(tiny_config, source, path, tmp_path / "cache")
  for field in ("n", "tags", "score"):
    c.data.update(text_field=field, skip_bad_records=False)
    with pytest.raises(sharding.ConfigError) as err:
      make_data_on(c)
    assert err.value.field == "data.text_field", err.value
    assert f"column {field!r} holds" in err.value.problem and "not text" in (
        err.value.problem)
    assert "skip_bad_records" not in err.value.fix
    assert "its text columns: ['body', 'title', 'raw']" in err.value.fix
    ((flag,),) = fix_alternatives(err.value.fix)
    c.data.text_field = flag.split("=", 1)[1]
    assert c.data.text_field == "body"
    make_data_on(c)
  # with no text column at all, the fix says so
  numbers = pa.table({"n": list(range(n))})
  if source == "parquet":
    pq.write_table(numbers, path)
  else:
    path = tmp_path / "hf_numbers"
    datasets.Dataset(numbers).save_to_disk(str(path))
  c = _config(tiny_config, source, path, tmp_path / "cache")
  c.data.text_field = "n"
  with pytest.raises(sharding.ConfigError, match="it has no text column") as err:
    make_data_on(c)
  assert err.value.field == "data.text_field" and not fix_alternatives(err.value.fix)
