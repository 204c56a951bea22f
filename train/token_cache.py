"""Tokenize once: a document source becomes a token stream stored on disk.

The first run reads every document (`train.sources`), tokenizes it in batches of
1,024 documents (two batches at a time in worker threads, while the main thread
reads the next batch and writes the previous one) and writes, under
`data.cache_dir/<key>/`:

  tokens.npy   [num_tokens] uint8 / uint16 / uint32: the documents in a fixed
               shuffled order (numpy seed 0), each followed by the end-of-document
               id. Read back memory-mapped.
  offsets.npy  [num_documents + 1] int64: where each document starts in tokens.npy.
  meta.json    what was read: counts, the largest id, source, files, tokenizer,
               and `sha256`, the digest of tokens.npy's stream (a resumed run
               compares it to tell a same-size edit of its data).

`<key>` hashes the file list with sizes and modification times, the source kind,
text field and skip_bad_records (of the sources that read them:
`sources.TEXT_FIELD_SOURCES`, `sources.can_skip`), the tokenizer's identity (its
file's content hash, not its path: a copy, such as the one import-hf keeps in a
run, shares the cache; or 'byte') and the eos id, so a change to any of them
builds a new cache. The cache is written into a temporary directory and renamed
when complete: a run killed while tokenizing leaves only a temporary directory,
which no later run reads.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import jax
import numpy as np
from tqdm import tqdm

from sharding import ConfigError
from sharding.report import count, format_bytes
from train import sources
from train.tokenizer import is_byte, tokenizer_file

_VERSION = 1
_BATCH_DOCS = 1024
_WORKERS = 2  # batches tokenized at once (see _build)


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(msg)


# Where caches go when `data.cache_dir` is None. The command line resolves
# $XDG_CACHE_HOME into `data.cache_dir` (experiment/); the library reads no
# environment of its own.
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "rung", "tokens")


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def tokenizer_identity(data_cfg) -> str:
  """'byte', 'none:<token_dtype>', or 'tokenizer.json:' and the file's content
  hash (its path does not change what it encodes)."""
  if is_byte(data_cfg):
    return "byte"
  if data_cfg.tokenizer == "none":
    return f"none:{data_cfg.token_dtype}"
  return f"tokenizer.json:{_file_sha256(os.path.abspath(tokenizer_file(data_cfg.tokenizer)))}"


def cache_key(data_cfg, files: list[str], eos_id: int) -> str:
  """A hex digest of everything the token stream depends on (see module doc)."""
  stats = []
  for f in files:
    st = os.stat(f)
    stats.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
  # Only a source that reads a setting is keyed by it: a mixture's text source
  # keeps its cache when text_field changes for a jsonl entry. One that does not
  # is keyed by the setting's default, as every cache was before this rule, so
  # those caches stay valid.
  reads_field = data_cfg.source in sources.TEXT_FIELD_SOURCES
  skips = sources.can_skip(data_cfg)
  ident = dict(version=_VERSION, source=data_cfg.source,
               text_field=data_cfg.text_field if reads_field else "text",
               skip=bool(data_cfg.skip_bad_records) and skips,
               files=stats, tokenizer=tokenizer_identity(data_cfg), eos_id=int(eos_id))
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def stream_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype that holds ids below `vocab_size`."""
  for dtype in (np.uint8, np.uint16):
    if vocab_size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  return np.dtype(np.uint32)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == _BATCH_DOCS:
      yield batch
      batch = []
  if batch:
    yield batch


@dataclasses.dataclass
class Cached:
  """A token stream read from the cache."""
  tokens: np.ndarray   # [num_tokens], memory-mapped
  offsets: np.ndarray  # [num_documents + 1] int64
  meta: dict
  path: str
  reused: bool


def _reserve(path: str) -> None:
  """Allocates the whole of the (sparse) file at `path` on disk: writing a memory
  map past the free space kills the process with SIGBUS, where a reservation that
  does not fit raises OSError (ENOSPC) first. File systems without fallocate
  (EOPNOTSUPP, EINVAL) are left sparse."""
  if not hasattr(os, "posix_fallocate"):
    return
  fd = os.open(path, os.O_RDWR)
  try:
    os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
  except OSError as err:
    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
      raise
  finally:
    os.close(fd)


def _build(data_cfg, files, tokenizer, tmp: str, dtype) -> dict:
  counts = sources.Counts()
  lengths = []
  raw_path = os.path.join(tmp, "natural.bin")
  start, num_tokens, max_id = time.perf_counter(), 0, int(tokenizer.eos_id)
  bar = tqdm(desc="tokenizing", unit="doc", disable=jax.process_index() != 0)

  def write(encoded: list, raw) -> None:
    """One batch's ids, each document followed by the eos id, in one write."""
    nonlocal num_tokens, max_id
    arrays = [np.asarray(ids) for ids in encoded]
    sizes = np.asarray([a.size for a in arrays], np.int64)
    flat = np.concatenate(arrays)
    if flat.size:
      max_id = max(max_id, int(flat.max()))
    if max_id > np.iinfo(dtype).max:
      raise ConfigError("data.tokenizer", f"it gave id {max_id}, beyond "
                        f"its vocabulary of {tokenizer.vocab_size}.",
                        "use a consistent tokenizer.json.")
    ends = np.cumsum(sizes + 1)
    out = np.full(int(ends[-1]), tokenizer.eos_id, dtype)
    is_id = np.ones(len(out), bool)
    is_id[ends - 1] = False
    out[is_id] = flat
    raw.write(out)
    lengths.extend((sizes + 1).tolist())
    num_tokens += len(out)
    bar.update(len(arrays))
    bar.set_postfix_str(
        f"{num_tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s")

  # One batch is tokenized in a worker thread (tokenizers' encode_batch runs
  # without the GIL, on all cores) while this thread reads and parses the next
  # and writes the one before.
  with bar, open(raw_path, "wb") as raw, ThreadPoolExecutor(_WORKERS) as pool:
    pending = collections.deque()
    for batch in _batches(sources.documents(data_cfg, files, counts)):
      pending.append(pool.submit(tokenizer.encode_batch, batch))
      if len(pending) > _WORKERS:
        write(pending.popleft().result(), raw)
    while pending:
      write(pending.popleft().result(), raw)
  if not lengths:
    prefix = sources.field_prefix(data_cfg)
    raise ConfigError(
        f"{prefix}path", f"the {data_cfg.source} source at {data_cfg.path!r} "
        f"yielded no documents ({count(len(files), 'file')}, "
        f"{count(counts.skipped, 'bad record')} skipped).",
        f"point {prefix}path at files that hold documents (and check "
        f"{prefix}text_field).")
  # A fixed shuffle of documents, so the held-out tail is a fair sample.
  lengths = np.asarray(lengths, np.int64)
  natural_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  order = np.random.default_rng(0).permutation(len(lengths))
  natural = np.memmap(raw_path, dtype=dtype, mode="r")
  out = np.lib.format.open_memmap(os.path.join(tmp, "tokens.npy"), mode="w+",
                                  dtype=dtype, shape=(num_tokens,))
  _reserve(os.path.join(tmp, "tokens.npy"))  # a full disk: OSError here, not SIGBUS
  offsets = np.zeros(len(lengths) + 1, np.int64)
  offsets[1:] = np.cumsum(lengths[order])
  for pos, i in zip(offsets[:-1], order):
    n, src = lengths[i], natural_starts[i]
    out[pos:pos + n] = natural[src:src + n]
  out.flush()
  digest = hashlib.sha256(out)  # about 0.7 s per GB here; tokenizing is far slower
  del out, natural
  os.remove(raw_path)
  np.save(os.path.join(tmp, "offsets.npy"), offsets)
  return dict(documents=counts.documents, tokens=int(num_tokens), max_id=max_id,
              skipped=counts.skipped, replaced_utf8=counts.replaced,
              source=data_cfg.source, text_field=data_cfg.text_field,
              tokenizer=tokenizer_identity(data_cfg), eos_id=int(tokenizer.eos_id),
              files=[os.path.abspath(f) for f in files], sha256=digest.hexdigest(),
              seconds=round(time.perf_counter() - start, 3))


# A partial cache untouched this long was left by a tokenization that was killed
# (one in progress writes its files continuously).
STALE_SECONDS = 3600


def _remove_stale_builds(root: str, now: float | None = None) -> None:
  """Removes the partial caches (`.<key>.tmp-*`) under `root` that no file was
  written to for STALE_SECONDS, and says how much that freed: a killed
  tokenization leaves one behind, as large as what it had written."""
  now = time.time() if now is None else now
  freed, removed = 0, 0
  for entry in os.scandir(root):
    if not (entry.name.startswith(".") and ".tmp-" in entry.name and entry.is_dir()):
      continue
    try:
      files = [f for f in os.scandir(entry.path) if f.is_file()]
      newest = max([entry.stat().st_mtime] + [f.stat().st_mtime for f in files])
      size = sum(f.stat().st_size for f in files)
    except OSError:  # removed meanwhile
      continue
    if now - newest > STALE_SECONDS:
      shutil.rmtree(entry.path, ignore_errors=True)
      freed, removed = freed + size, removed + 1
  if removed:
    _say(f"data: removed {count(removed, 'partial token cache')} that interrupted "
         f"tokenizations left in {root} ({format_bytes(freed)})")


def _unwritable(root: str, err: OSError) -> ConfigError:
  """The error for a token cache that could not be written (a full disk, a quota,
  a read-only file system), once the partial cache is removed."""
  try:
    free = f"; {format_bytes(shutil.disk_usage(root).free)} free there now"
  except OSError:
    free = ""
  full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
  return ConfigError(
      "data.cache_dir", f"writing the token cache into {root} failed: {err}{free} "
      "(nothing partial is left" + ("; building it takes about twice the token "
                                    "stream's size on disk)." if full else ")."),
      "free space there, or set --config.data.cache_dir to a directory on a disk "
      "with room." if full else "set --config.data.cache_dir to a directory you can "
      "write (it is made if missing), e.g. --config.data.cache_dir=~/.cache/rung/tokens.")


def load_or_build(data_cfg, files: list[str], tokenizer) -> Cached:
  """The token stream of `files` under data_cfg: from the cache if a complete one
  has this key, else tokenized now (progress bar) and stored. Logs one line either
  way; also logs how many bad records were skipped and how many documents held
  bytes that are not UTF-8. Raises ConfigError on bad records (see train.sources)
  and when the source yields no documents."""
  root = os.path.expanduser(data_cfg.cache_dir or DEFAULT_CACHE_DIR)
  key = cache_key(data_cfg, files, tokenizer.eos_id)
  final = os.path.join(root, key)
  meta_path = os.path.join(final, "meta.json")
  reused = os.path.exists(meta_path)
  if not reused:
    try:
      os.makedirs(root, exist_ok=True)
      _remove_stale_builds(root)
      tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root)
    except OSError as err:
      raise _unwritable(root, err) from None
    failed = None
    try:
      meta = _build(data_cfg, files, tokenizer, tmp, stream_dtype(tokenizer.vocab_size))
      with open(os.path.join(tmp, "meta.json"), "w") as f:  # written last
        json.dump(meta, f, indent=1)
      # mkdtemp's 0700 would keep a shared cache from the team: the umask decides
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o777 & ~umask)
      try:
        os.rename(tmp, final)
      except OSError:  # another process finished the same cache first
        if not os.path.exists(meta_path):
          raise
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:  # the sources' read errors are ConfigErrors already
      failed = err.with_traceback(None)  # its frames held the build's memory maps
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    if failed is not None:  # the maps are closed now, so removing frees the space
      shutil.rmtree(tmp, ignore_errors=True)
      raise _unwritable(root, failed)
  with open(meta_path) as f:
    meta = json.load(f)
  tokens = np.load(os.path.join(final, "tokens.npy"), mmap_mode="r")
  offsets = np.load(os.path.join(final, "offsets.npy"))
  if reused:
    _say(f"data: reusing the token cache {final} ({count(meta['documents'], 'document')}, "
         f"{count(meta['tokens'], 'token')})")
  else:
    _say(f"data: tokenized {count(meta['documents'], 'document')} of "
         f"{count(len(files), 'file')} into {count(meta['tokens'], 'token')} in "
         f"{meta['seconds']:.1f}s; cached in {final}")
  if meta["skipped"]:
    _say(f"data: skipped {count(meta['skipped'], 'bad record')} "
         "(data.skip_bad_records)")
  if meta["replaced_utf8"]:
    _say(f"data: {count(meta['replaced_utf8'], 'document')} held bytes that are not UTF-8; "
         "decoded with replacement characters (U+FFFD)"
         + ("; most documents did: if the records hold token ids, not text, set "
            "--config.data.tokenizer=none (and data.token_dtype)"
            if 2 * meta["replaced_utf8"] > meta["documents"] else ""))
  return Cached(tokens=tokens, offsets=offsets, meta=meta, path=final, reused=reused)
