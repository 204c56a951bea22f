"""Document sources: files of text records, read one document at a time.

Every reader yields documents (str) in a fixed order: files sorted by path, records
in file order. `train.token_cache` tokenizes them once into one token stream.

A record that cannot be read (a malformed JSONL line, a record without
`data.text_field`, a null value) is a `ConfigError` naming the file and line / row,
or, with `data.skip_bad_records`, is skipped and counted. Bytes that are not valid
UTF-8 are decoded with replacement characters and counted.
"""

from __future__ import annotations

import codecs
import dataclasses
import fnmatch
import glob
import gzip
import itertools
import json
import os
import re
import zlib
from typing import Iterator

from sharding import ConfigError, flag

# Sources whose documents are tokenized into the token cache.
DOCUMENT_SOURCES = ("text", "jsonl", "parquet", "arrayrecord", "hf_disk")
# Sources whose records name their text's field (data.text_field).
TEXT_FIELD_SOURCES = ("jsonl", "parquet", "hf_disk")
# File name endings read when data.path is a directory (every file for `text`).
# A JSON \u escape of a UTF-16 surrogate: may decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_EXTENSIONS = {"jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
               "parquet": (".parquet",),
               "arrayrecord": (".array_record", ".arrayrecord")}


def source_of_path(path: str) -> str:
  """The data.source that reads `path`, guessed from its name: a known ending
  (`_EXTENSIONS`, `.bin` for tokens), a directory `datasets.save_to_disk` wrote
  (hf_disk), else text (any file, or a directory of them)."""
  name = path.lower().rstrip("/")
  for source, endings in (*_EXTENSIONS.items(), ("tokens", (".bin",))):
    if name.endswith(endings):
      return source
  if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                 for f in ("dataset_info.json", "state.json",
                                           "dataset_dict.json")):
    return "hf_disk"
  return "text"


def can_skip(data_cfg) -> bool:
  """Whether the source of `data_cfg` can meet a bad record (data.skip_bad_records
  acts): records with a text field, and token-id records (tokenizer=none), which
  can hold a partial id. A text file or a text ArrayRecord record is always a
  document."""
  return (data_cfg.source in TEXT_FIELD_SOURCES
          or data_cfg.source == "arrayrecord" and data_cfg.tokenizer == "none")


def field_prefix(data_cfg) -> str:
  """Where a source's settings live in the config: 'data.' for the single
  `data.source`, 'data.mixture.<name>.' for an entry of `data.mixture`. Errors
  about the source's path and text field name fields under it."""
  return getattr(data_cfg, "field_prefix", "data.")


def text_field_fix(prefix: str, own: bool, value: str) -> str:
  """How to make the source under `prefix` (`field_prefix`) read its text from
  field `value`: its override; for a mixture entry that sets no text_field of its
  own (`own` false; an override can change an entry's keys but not add one), the
  key in the config file's entry, or the shared data.text_field."""
  if own or prefix == "data.":
    return flag(f"config.{prefix}text_field", value)
  return (f"text_field=\"{value}\" in the {prefix[:-1]} entry of the config file "
          f"(it sets none, and an override cannot add it), or "
          f"{flag('config.data.text_field', value)} (read by every entry "
          "that sets none)")


def matching_files(path: str, names: str) -> list[str]:
  """The sorted files `path` names: an existing file as it is; the files whose
  names match `names` (e.g. '*.bin') under an existing directory, at any depth
  (`_walk`), whatever glob characters the directory's own name holds
  (`run[1]/`); otherwise `path` is a glob. A directory's or a glob's files under
  site-packages are left out (the default text source is the standard library's
  sources)."""
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    found = _walk(path, names)
  else:
    found = glob.glob(path, recursive=True)
  # One file reached by two names (a symlink beside its target) is read once.
  files, seen = [], set()
  for f in sorted(found):
    real = os.path.realpath(f)
    if (os.path.isfile(f) and f"{os.sep}site-packages{os.sep}" not in f
        and real not in seen):
      seen.add(real)
      files.append(f)
  return files


def _walk(directory: str, pattern: str) -> list[str]:
  """The files under `directory` whose names match `pattern`, following symbolic
  links to directories but entering each directory once (a link to an ancestor
  made glob read the same files over and over, down to the longest path); hidden
  files and directories are left out, as glob leaves them."""
  found, entered = [], set()
  for root, dirs, names in os.walk(directory, followlinks=True):
    real = os.path.realpath(root)
    if real in entered:
      dirs[:] = []
      continue
    entered.add(real)
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [os.path.join(root, n) for n in names
              if not n.startswith(".") and fnmatch.fnmatch(n, pattern)]
  return found


def list_files(path: str, source: str, field: str = "data.path") -> list[str]:
  """The sorted files `path` names (`matching_files`): a file, a directory
  (searched recursively; for jsonl / parquet / arrayrecord only files with their
  extensions) or a glob. Raises ConfigError naming `field` when nothing matches."""
  exts = _EXTENSIONS.get(source) if os.path.isdir(path) else None
  files = [f for f in matching_files(path, "*")
           if exts is None or f.lower().endswith(exts)]  # C.JSONL too
  if source == "arrayrecord" and not os.path.isdir(path):
    # ArrayRecord shards are often named name.array_record-00000-of-00008.
    files = [f for f in files if not f.endswith((".idx", ".crc"))]
  if not files and source == "hf_disk":  # an existing directory (data.py checks)
    raise ConfigError(field, f"{path!r} is not a directory written by datasets' "
                      "save_to_disk (it holds no files).",
                      "point it at the directory given to Dataset.save_to_disk.")
  if not files:
    raise ConfigError(field, f"no files match {path!r}"
                      + (f" with an ending in {exts}." if exts else "."),
                      "point it at a file, a directory or a glob of existing files.")
  return files


@dataclasses.dataclass
class Counts:
  """What reading found: documents, bad records skipped, documents that held
  bytes that are not UTF-8 (decoded with U+FFFD)."""
  documents: int = 0
  skipped: int = 0
  replaced: int = 0


class _Reader:
  def __init__(self, data_cfg, counts: Counts):
    self.skip = bool(data_cfg.skip_bad_records)
    self.text_field = data_cfg.text_field or "text"
    self.texts = 0  # records read so far that held text in text_field
    self.token_ids = data_cfg.tokenizer == "none"
    self.token_dtype = data_cfg.token_dtype
    self.counts = counts
    self.prefix = field_prefix(data_cfg)
    self.own_text_field = getattr(data_cfg, "text_field_own", True)

  def text_field_fix(self, value: str) -> str:
    return text_field_fix(self.prefix, self.own_text_field, value)

  def bad(self, where: str, problem: str, field: str = "path",
          fix: str = "") -> None:
    """A record that cannot be used: raise (naming `field` of the data config,
    with `fix` before the general one), or count it when skipping."""
    if not self.skip:
      raise ConfigError(
          f"{self.prefix}{field}", f"{where}: {problem}",
          fix + "fix or remove the record, or set "
          "--config.data.skip_bad_records=true to skip such records (their count "
          "is logged).")
    self.counts.skipped += 1

  def decode(self, raw: bytes) -> str:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      self.counts.replaced += 1
      return raw.decode("utf-8", errors="replace")

  def clean(self, text: str) -> str:
    """`text` with lone surrogates (from JSON escapes) made U+FFFD, counted."""
    try:
      text.encode("utf-8")
      return text
    except UnicodeEncodeError:
      self.counts.replaced += 1
      return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")

  def field(self, record, where: str) -> str | None:
    """record[text_field] as str, or None (after `bad`) when it has none."""
    if not isinstance(record, dict):
      self.bad(where, f"the record is a {type(record).__name__}, not an object with "
               f"a {self.text_field!r} field" + (
                   " (JSON Lines holds one object per line; a JSON array of them "
                   "is not JSON Lines)." if isinstance(record, list) else "."))
      return None
    value = record.get(self.text_field)
    if isinstance(value, (bytes, str)):
      self.texts += 1
      return self.decode(value) if isinstance(value, bytes) else value
    # Before any record held text there, the field name is likely wrong; after,
    # this record is (renaming the field would fail on the records before it).
    texts = [k for k, v in record.items() if isinstance(v, str)]
    field, other_field = ("text_field", f"if the records hold their text in {texts[0]!r}, "
                          f"set {self.text_field_fix(texts[0])}; or "
                          ) if texts and not self.texts else ("path", "")
    before = ("the record before it" if self.texts == 1 else
              f"the {self.texts} records before it")
    if self.text_field not in record:
      earlier = (f", though {before} {'has' if self.texts == 1 else 'have'} one"
                 if self.texts else "")
      self.bad(where, f"the record has no {self.text_field!r} field (its fields: "
               f"{sorted(record)[:8]}){earlier}.", field, other_field)
    elif value is None:  # one record without text
      self.bad(where, f"the record's {self.text_field!r} is null.")
    else:  # a field of another kind: most likely not the text field
      earlier = f" as in {before}" if self.texts else ""
      self.bad(where, f"the record's {self.text_field!r} is of type "
               f"{type(value).__name__}, not text{earlier}.", field, other_field)
    return None


def _without_bom(raw: bytes) -> bytes:
  """`raw` without a leading UTF-8 byte-order mark, which editors on Windows
  write: it marks the encoding, it is not text (a .jsonl's first record failed
  to parse, a .txt's first document began with it)."""
  return raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw


def _text(reader: _Reader, files: list[str]) -> Iterator[str]:
  for f in files:
    with open(f, "rb") as fh:
      # Universal newlines, as text-mode reading gives.
      text = reader.decode(_without_bom(fh.read()))
      yield text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl(reader: _Reader, files: list[str]) -> Iterator[str]:
  for f in files:
    with (gzip.open if f.lower().endswith(".gz") else open)(f, "rb") as fh:
      for line_no, line in enumerate(fh, 1):
        line = _without_bom(line) if line_no == 1 else line
        if not line.strip():
          continue
        where = f"{f}:{line_no}"
        try:
          record = json.loads(reader.decode(line).rstrip("\r\n"))
        except json.JSONDecodeError as err:
          reader.bad(where, f"not valid JSON ({err.msg}: column {err.colno}).")
          continue
        text = reader.field(record, where)
        if text is not None:
          yield reader.clean(text) if _SURROGATE_ESCAPE.search(line) else text


def _column(reader: _Reader, values, where_row, start: int) -> Iterator[str]:
  """Values of one text column: str, bytes (decoded) or None (a bad record)."""
  for j, value in enumerate(values):
    if isinstance(value, bytes):
      value = reader.decode(value)
    if value is None:
      reader.bad(where_row(start + j), f"the {reader.text_field!r} field is null.")
      continue
    if not isinstance(value, str):
      reader.bad(where_row(start + j), f"the {reader.text_field!r} field is "
                 f"{type(value).__name__}, not text.", "text_field",
                 f"name a text column, {reader.text_field_fix('NAME')}; or ")
      continue
    yield value


def check_text_column(schema, where: str, text_field: str, prefix: str = "data.",
                      own_text_field: bool = True) -> None:
  """A ConfigError naming `prefix`text_field unless the arrow `schema` (of the
  parquet file or saved dataset `where`) has a string or binary (decoded as
  UTF-8) column `text_field`: a column of numbers or lists holds no document
  (skipping such rows as bad records would skip them all). The fix names its
  text columns, as the JSONL reader's does."""
  import pyarrow as pa

  def is_text(t) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))
  texts = [f.name for f in schema if is_text(f.type)]
  named = (f"name a column that holds text: "
           f"{text_field_fix(prefix, own_text_field, texts[0])}"
           + (f" (its text columns: {texts[:8]})." if len(texts) > 1 else ".")
           if texts else "point the path at data with a column of text.")
  if text_field not in schema.names:
    raise ConfigError(f"{prefix}text_field", f"{where} has no column {text_field!r}; "
                      f"its columns: {schema.names[:8]}.", named)
  if not is_text(schema.field(text_field).type):
    raise ConfigError(f"{prefix}text_field", f"{where}'s column {text_field!r} holds "
                      f"{schema.field(text_field).type}, not text"
                      + ("" if texts else " (it has no text column)") + ".", named)


def _parquet(reader: _Reader, files: list[str]) -> Iterator[str]:
  import pyarrow.parquet as pq
  for f in files:
    pf = pq.ParquetFile(f)
    check_text_column(pf.schema_arrow, f, reader.text_field, reader.prefix,
                      reader.own_text_field)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[reader.text_field]):
      values = batch.column(0).to_pylist()
      yield from _column(reader, values, lambda r, f=f: f"{f}: row {r}", row)
      row += len(values)


def _arrayrecord(reader: _Reader, files: list[str]) -> Iterator[str | bytes]:
  """UTF-8 text records; with tokenizer=none, raw token-id records (bytes)."""
  import grain
  import numpy as np
  itemsize = np.dtype(reader.token_dtype).itemsize if reader.token_ids else 1
  for f in files:
    src = grain.sources.ArrayRecordDataSource([f])
    for start in range(0, len(src), 1024):
      records = src.__getitems__(list(range(start, min(start + 1024, len(src)))))
      for j, record in enumerate(records):
        record = bytes(record)
        if not reader.token_ids:
          yield reader.decode(record)
        elif len(record) % itemsize:
          reader.bad(f"{f}: record {start + j}", f"{len(record)} bytes is not a "
                     f"whole number of {reader.token_dtype} token ids.")
        else:
          yield record


def hf_dataset(path: str, text_field: str = "text", prefix: str = "data.",
               own_text_field: bool = True):
  """The `datasets.Dataset` saved at `path` (a DatasetDict gives its `train`
  split). Raises ConfigError when `datasets` is missing or the path holds none,
  naming `prefix`path or `prefix`text_field (prefix: see `field_prefix`;
  `own_text_field`: see `text_field_fix`)."""
  try:
    import datasets
  except ImportError:
    raise ConfigError("data.source", "hf_disk needs the `datasets` library.",
                      "pip install 'datasets>=5.2,<6' (what rung's [data] extra "
                      "installs).") from None
  try:
    ds = datasets.load_from_disk(path)
  except FileNotFoundError as err:
    raise ConfigError(f"{prefix}path", f"{path!r} is not a directory written by "
                      f"datasets' save_to_disk ({err}).",
                      "point it at the directory given to Dataset.save_to_disk.")
  if isinstance(ds, datasets.DatasetDict):
    if "train" not in ds:
      splits = list(ds)
      raise ConfigError(f"{prefix}path", f"{path!r} holds splits {splits}, no "
                        "'train'.", "point it at one split's directory, e.g. "
                        f"{flag(f'config.{prefix}path', os.path.join(path, splits[0]))}."
                        if splits else "point it at a dataset that holds documents.")
    ds = ds["train"]
  check_text_column(ds.data.schema, f"the dataset at {path!r}", text_field, prefix,
                    own_text_field)
  return ds


def _hf_disk(reader: _Reader, path: str) -> Iterator[str]:
  ds = hf_dataset(path, reader.text_field, reader.prefix,
                  reader.own_text_field).select_columns(
      [reader.text_field])
  row = 0
  for batch in ds.iter(batch_size=1024):
    values = batch[reader.text_field]
    yield from _column(reader, values, lambda r: f"{path}: row {r}", row)
    row += len(values)


def _read_errors() -> tuple[type[BaseException], ...]:
  """What reading a damaged file raises: I/O errors, a truncated gzip stream
  (EOFError), a corrupt deflate stream (zlib.error), and pyarrow's errors."""
  errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
  try:
    import pyarrow
    errors += (pyarrow.ArrowException,)
  except ImportError:
    pass
  return errors


def _file(read, reader: _Reader, f: str) -> Iterator[str | bytes]:
  """read(reader, [f]); a file that cannot be read is a ConfigError naming it (a
  truncated .jsonl.gz ended the run in a bare EOFError that named no file)."""
  try:
    yield from read(reader, [f])
  except _read_errors() as err:
    raise ConfigError(
        f"{reader.prefix}path", f"{f} cannot be read ({type(err).__name__}: "
        f"{err}).", "replace the file (a truncated download or a damaged copy?) or "
        "leave it out of the path; data.skip_bad_records skips records, not "
        "files.") from None


def documents(data_cfg, files: list[str], counts: Counts) -> Iterator[str | bytes]:
  """Every document of the source (str; for arrayrecord with tokenizer=none the
  record's raw token-id bytes), in file order, counted into `counts`.

  Raises ConfigError (naming the file and line or row) on a bad record unless
  `data.skip_bad_records`."""
  reader = _Reader(data_cfg, counts)
  kind = data_cfg.source
  if kind == "hf_disk":
    it = _hf_disk(reader, data_cfg.path)
  else:
    read = {"text": _text, "jsonl": _jsonl, "parquet": _parquet,
            "arrayrecord": _arrayrecord}[kind]
    it = itertools.chain.from_iterable(_file(read, reader, f) for f in files)
  for doc in it:
    counts.documents += 1
    yield doc
