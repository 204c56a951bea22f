"""Input pipelines (grain): token streams packed into fixed-length windows.

Every source becomes one flat token stream with an end-of-document id between
documents: document sources (`text`, `jsonl`, `parquet`, `arrayrecord`, `hf_disk`;
readers in `train.sources`) are tokenized once into an on-disk token cache
(`train.token_cache`) and memory-mapped; `tokens` memory-maps .bin files. Windows
of `seq_len + 1` tokens are cut from it, so nothing is padded; each example
carries segment ids and positions that restart at document boundaries, so
attention never crosses documents. The last `eval_fraction` of the stream is held
out for evaluation; an evaluation reads its windows in order, the
last batch padded with rows of loss weight 0 (`weights`), so a held-out split
smaller than a batch is still evaluated, averaged over its real tokens only.

Mixtures (`data.mixture`): each named source becomes its own token stream (its own
token cache, one tokenizer for all) and its own windows and held-out tail. Each
source's training windows are shuffled (seeded by `train.seed` and the source's
stream number: its index among the sorted names when it joined the run) and
repeated, and they are interleaved in the proportions of the weights as
`grain.MapDataset.mix` would (`train.data_schedule`: a resume with other weights
continues each source where it stopped); every training example then carries
`source` (its index, sources numbered in name order). Evaluation mixes the
held-out tails the same way, in order.

Determinism: window order depends only on `train.seed` (and, for a mixture, its
entries). A process loads only the rows of each global batch that its devices
hold, so the global batch is the same whatever the number of processes.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import types
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from tqdm import tqdm

from sharding import ConfigError, flag
from sharding.report import count
from train import run_config, sources, token_cache
from train.data_schedule import Schedule, ScheduledSelection, Segment
from train.tokenizer import HFTokenizer, check_eos, is_byte, make_tokenizer

SOURCES = (*sources.DOCUMENT_SOURCES, "tokens", "synthetic")
# What an entry of data.mixture may hold, and the sources it may name.
MIXTURE_KEYS = ("source", "path", "text_field", "weight")
MIXTURE_SOURCES = (*sources.DOCUMENT_SOURCES, "tokens")
# Settings every source of a mixture shares with data.* (one tokenizer, one cache).
_SHARED = ("cache_dir", "skip_bad_records", "tokenizer", "eos_id", "token_dtype")


def default_text_path() -> str:
  """The Python standard library's own sources: text present on every machine."""
  return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")


def _token_files(path: str, field: str) -> list[str]:
  """The .bin files of `source=tokens`: a directory's `*.bin` files (any depth; a
  metadata file beside them is not read as ids) or the files a glob matches, in
  name order."""
  files = sources.matching_files(path, "*.bin")
  if not files:
    pattern = os.path.join(path, "**", "*.bin") if os.path.isdir(path) else path
    raise ConfigError(field, f"no files match {pattern!r}.",
                      "point it at a directory of .bin files or a glob of existing "
                      "files.")
  return files


def _read_tokens(files: list[str], dtype: str, field: str) -> tuple[np.ndarray, int]:
  """The files memory-mapped and concatenated, and their largest id (one pass over
  them: about 0.1 s per GB from the page cache here, a progress bar past 4 GB).
  A file that is not a whole number of ids is a ConfigError naming `field`."""
  itemsize = np.dtype(dtype).itemsize
  for f in files:
    size = os.path.getsize(f)
    if size % itemsize:
      raise ConfigError(field, f"{f} holds {count(size, 'byte')}, not a whole number of "
                        f"{dtype} ids ({itemsize} bytes each).",
                        "check the file, or set --config.data.token_dtype to the "
                        "dtype it was written in (uint16 or uint32).")
  arrays = [np.memmap(f, dtype=dtype, mode="r") for f in files if os.path.getsize(f)]
  if not arrays:
    raise ConfigError(field, f"the files ({files[0]}, ...) are empty.",
                      "point it at .bin files that hold token ids.")
  stream = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
  chunk = 1 << 26
  starts = range(0, len(stream), chunk)
  if stream.nbytes > 4 << 30 and jax.process_index() == 0:
    starts = tqdm(starts, desc="largest token id", unit="chunk", leave=False)
  return stream, max(int(stream[s:s + chunk].max()) for s in starts)


def make_example(window: np.ndarray, eos_id: int | None) -> dict[str, np.ndarray]:
  """window: [seq_len + 1] -> inputs, targets, positions, segment_ids: [seq_len]."""
  inputs, targets = window[:-1].astype(np.int32), window[1:].astype(np.int32)
  n = len(inputs)
  if eos_id is None:
    ends = np.zeros(n, bool)
  else:
    ends = inputs == eos_id
  # An end-of-document token belongs to the document it ends; the next one starts.
  starts = np.concatenate([[True], ends[:-1]])
  segment_ids = np.cumsum(starts).astype(np.int32)
  start_index = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
  positions = (np.arange(n) - start_index).astype(np.int32)
  return {"inputs": inputs, "targets": targets, "positions": positions,
          "segment_ids": segment_ids}


@dataclasses.dataclass
class Windows:
  """Random access to non-overlapping windows of a token stream."""
  tokens: np.ndarray
  seq_len: int
  eos_id: int | None

  def __len__(self) -> int:
    return self.count(len(self.tokens), self.seq_len)

  @staticmethod
  def count(tokens: int, seq_len: int) -> int:
    """Windows of `seq_len` + 1 in a stream of `tokens` (each shares its last
    token with the next)."""
    return max(tokens - 1, 0) // seq_len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    s = int(i) * self.seq_len
    return make_example(np.asarray(self.tokens[s:s + self.seq_len + 1]), self.eos_id)


@dataclasses.dataclass
class Synthetic:
  """A learnable pattern: each row counts from a random start with a random stride
  (mod vocab), so after two tokens the rest is predictable in context."""
  vocab_size: int
  seq_len: int
  seed: int
  size: int = 1 << 30

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, int(i)])
    start, stride = rng.integers(0, self.vocab_size), rng.integers(1, 8)
    window = (start + stride * np.arange(self.seq_len + 1)) % self.vocab_size
    return make_example(window, None)


@dataclasses.dataclass
class PaddedToBatches:
  """`examples` padded to whole batches of `batch_size`. Every example gets
  per-token loss `weights`: 1 for the real ones, 0 for the padding rows past the end
  (copies of earlier windows, so they are valid inputs that count for nothing)."""
  examples: Any
  batch_size: int

  def __len__(self) -> int:
    return -(-len(self.examples) // self.batch_size) * self.batch_size

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    n = len(self.examples)
    example = dict(self.examples[int(i) % n])
    example["weights"] = np.full(example["targets"].shape, float(int(i) < n),
                                 np.float32)
    return example


@dataclasses.dataclass
class ProcessRows:
  """The rows [lo, hi) of every global batch of `batch_size` from `examples`;
  global batch b starts at example `schedule.first_window(b)` when a schedule is
  given (a run whose batch size changed), else at b x batch_size."""
  examples: Any
  batch_size: int
  lo: int
  hi: int
  schedule: Schedule | None = None

  def __len__(self) -> int:
    return len(self.examples) // self.batch_size * (self.hi - self.lo)

  def __getitem__(self, n: int):
    rows = self.hi - self.lo
    b = n // rows
    first = self.schedule.first_window(b) if self.schedule else b * self.batch_size
    return self.examples[first + self.lo + n % rows]


@dataclasses.dataclass
class Tagged:
  """`examples` with each example's `source` (a scalar int32 index) added."""
  examples: Any
  index: int

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    example = dict(self.examples[int(i)])
    example["source"] = np.int32(self.index)
    return example


def eval_share(available: Sequence[int], weights: Sequence[float], budget: int
               ) -> list[int]:
  """How many held-out windows to evaluate from each mixture source: `budget`
  (train.eval_steps x train.batch_size) in all, or every window when there are
  fewer; each source first gets one while the budget lasts (heaviest first),
  then the rest is shared by weight, a source's share past its `available`
  windows going to the others. grain's weighted mix stopped at the source
  scarcest for its weight, so a source with few held-out windows shrank the
  whole evaluation, and a heavily weighted one could go unevaluated."""
  n = [0] * len(available)
  left = min(budget, sum(available))
  for i in sorted(range(len(n)), key=lambda i: -weights[i]):
    if left and available[i]:
      n[i], left = 1, left - 1
  while left:
    room = [i for i in range(len(n)) if n[i] < available[i]]
    total = sum(weights[i] for i in room)
    give = {i: min(available[i] - n[i], int(left * weights[i] / total)) for i in room}
    if not any(give.values()):  # shares below one: the most under-served source
      give = {min(room, key=lambda i: n[i] / weights[i]): 1}
    for i, g in give.items():
      n[i], left = n[i] + g, left - g
  return n


class Interleaved:
  """The first `counts[i]` examples of each of `sources`, interleaved evenly
  (example j of source i at (j + 1/2) / counts[i] of the way through), so any
  prefix of batches holds every source in its share."""

  def __init__(self, sources: Sequence[Any], counts: Sequence[int]):
    self.sources = sources
    self.order = sorted(((j + 0.5) / c, i, j) for i, c in enumerate(counts)
                        for j in range(c))

  def __len__(self) -> int:
    return len(self.order)

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    _, i, j = self.order[int(k)]
    return self.sources[i][j]


class SourceStream:
  """A mixture source's training windows, shuffled with the seed of its stream
  and repeated. The stream number comes from `schedule.streams` when the first
  window is read (fixed when the source joined the run: `train.data_schedule`),
  so a source keeps its order when others join or leave."""

  def __init__(self, windows: Any, name: str, schedule: Schedule, seed: int):
    self.windows, self.name, self.schedule, self.seed = windows, name, schedule, seed
    self._stream, self._ds = None, None

  def __len__(self) -> int:
    return sys.maxsize  # repeated

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    stream = self.schedule.streams[self.name]
    if stream != self._stream:
      shuffle_seed = int(np.random.SeedSequence([self.seed, stream]).generate_state(1)[0]
                         & 0x7FFFFFFF)
      self._ds = grain.MapDataset.source(self.windows).shuffle(seed=shuffle_seed).repeat()
      self._stream = stream
    return self._ds[int(i)]


def mixture_entries(data_cfg) -> list[tuple[str, float, Any]]:
  """[(name, weight, settings)] of `data.mixture`, sorted by name (a source's index
  is its position here); [] without a mixture. `settings` reads like `data` (the
  entry's source, path and text_field laid over the shared fields), and names its
  fields `data.mixture.<name>.*` in errors."""
  mixture = data_cfg.get("mixture") if hasattr(data_cfg, "get") else None
  if not mixture:
    return []
  out = []
  for name in sorted(mixture.keys()):
    entry = mixture[name]
    view = types.SimpleNamespace(
        **{k: data_cfg[k] for k in _SHARED}, source=entry["source"],
        path=entry["path"],
        text_field=entry.get("text_field") or data_cfg.text_field,
        text_field_own="text_field" in entry.keys(),
        field_prefix=f"data.mixture.{name}.")
    out.append((name, float(entry["weight"]), view))
  return out


def mixture_proportions(weights: list[float]) -> list[int]:
  """The integer proportions grain mixes with: weights scaled so the smallest is
  exactly 100, rounded (grain's own scaling leaves these unchanged)."""
  low = min(weights)
  return [max(1, round(w / low * 100)) for w in weights]


def token_stream(data_cfg, tokenizer) -> np.ndarray:
  """The whole corpus: see `corpus`."""
  return corpus(data_cfg, tokenizer)[0]


def corpus(data_cfg, tokenizer) -> tuple[np.ndarray, int | None, str | None]:
  """The whole corpus as one array [num_tokens], documents separated by the
  tokenizer's eos (`data.eos_id` for `tokens` files), its largest id and its
  identity for `data_changes`: 'sha256:' and the token stream's digest for a
  tokenized source (None for a cache built before rung recorded it), 'files:'
  and a digest of the .bin files' sizes and modification times for `tokens`
  (hashing them would read the whole corpus at every start).

  `tokens`: the .bin files memory-mapped and concatenated (`_read_tokens`; a
  directory gives its `*.bin` files). Every document source
  (`text`, `jsonl`, `parquet`, `arrayrecord`, `hf_disk`) is tokenized once into the
  token cache (`train.token_cache`) and read back memory-mapped, documents in a
  fixed shuffled order, so the same documents in the same order give the same
  stream whatever the source (files are read in name order). Raises ConfigError
  for missing files, bad records (unless `data.skip_bad_records`) and a source
  without documents. A `~` in the path is expanded."""
  path_field = sources.field_prefix(data_cfg) + "path"
  if data_cfg.path and os.path.expanduser(data_cfg.path) != data_cfg.path:
    data_cfg = copy.deepcopy(data_cfg)  # the readers take the path from it
    data_cfg.path = os.path.expanduser(data_cfg.path)
  if data_cfg.source == "tokens":
    if not data_cfg.path:
      raise ConfigError(path_field, "source 'tokens' needs .bin files.",
                        f"set --config.{path_field}=/dir/or/glob/*.bin.")
    files = _token_files(data_cfg.path, path_field)
    stream, max_id = _read_tokens(files, data_cfg.token_dtype, path_field)
    # A file read with another dtype than it was written in shows itself here.
    _say(f"data: {path_field}={data_cfg.path}: {count(len(files), '.bin file')} of "
         f"{data_cfg.token_dtype} ids, {count(len(stream), 'token')}, largest id "
         f"{max_id:,}")
    stats = [[os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    return stream, max_id, "files:" + hashlib.sha256(
        json.dumps(stats).encode()).hexdigest()
  if data_cfg.source == "hf_disk":
    if not data_cfg.path or not os.path.isdir(data_cfg.path):
      raise ConfigError(path_field, f"source 'hf_disk' needs the directory written "
                        f"by datasets' save_to_disk, got {data_cfg.path!r}.",
                        f"set --config.{path_field}=/path/to/saved_dataset.")
    files = sources.list_files(data_cfg.path, "hf_disk", path_field)
  else:
    files = sources.list_files(data_cfg.path or default_text_path(), data_cfg.source,
                               path_field)
  cached = token_cache.load_or_build(data_cfg, files, tokenizer)
  digest = cached.meta.get("sha256")
  return cached.tokens, cached.meta.get("max_id"), digest and f"sha256:{digest}"


@dataclasses.dataclass
class MixtureSource:
  """One source of `data.mixture` as loaded."""
  name: str
  weight: float
  proportion: int      # grain's integer mixing proportion (mixture_proportions)
  tokens: int          # tokens in its stream (training and held-out)
  identity: str | None  # of its stream's contents (`corpus`)
  train_windows: int
  eval_windows: int


@dataclasses.dataclass
class Data:
  """Train iterator (checkpointable grain iterator) and a fixed eval set.

  With a mixture, each training batch also holds `source`: [rows] int32, the index
  of the source each row was drawn from (`mixture` lists them in index order)."""
  train: Any
  eval_source: Any
  tokenizer: Any
  rows: tuple[int, int]  # this process's rows of each global batch
  batch_size: int
  mixture: list[MixtureSource] = dataclasses.field(default_factory=list)
  # Where each step's windows start and, in a mixture, which source each is
  # (the loop continues the run's schedule before the first batch is read).
  schedule: Schedule | None = None
  # Tokens in each source's stream ({} for synthetic data) and its contents'
  # identity (`corpus`): what `data_changes` compares against the run's last start.
  tokens: dict[str, int] = dataclasses.field(default_factory=dict)
  identities: dict[str, str | None] = dataclasses.field(default_factory=dict)

  def eval_batches(self, num_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """The same held-out batches every call (no shuffle): at most `num_batches`,
    fewer when the held-out windows run out. The last one may be partial: its
    missing rows are padding with `weights` 0, so a split smaller than one batch
    is evaluated too. Average the NLL with `weights` (over real tokens only)."""
    rows = self.rows[1] - self.rows[0]
    ds = grain.MapDataset.source(ProcessRows(
        PaddedToBatches(self.eval_source, self.batch_size), self.batch_size,
        *self.rows))
    n = min(num_batches, len(ds) // rows)
    ds = ds.batch(rows, drop_remainder=True)
    return (ds[i] for i in range(n))

  def source_fractions(self, num_examples: int) -> dict[str, float]:
    """{source name: fraction in [0, 1]} of the first `num_examples` global
    training windows (the first num_examples / batch_size batches, all processes
    together) that came from each mixture source; {} without a mixture or before
    the first window. Exact and computed, not counted: the same on every process
    and after a resume, under every weight the run's schedule has had. A source
    the run no longer mixes is left out."""
    if not self.mixture or num_examples <= 0:
      return {}
    counts = self.schedule.counts(num_examples)
    return {m.name: counts.get(m.name, 0) / num_examples for m in self.mixture}

  def proportions(self) -> dict[str, int]:
    """{source name: grain's integer proportion} of the mixture as configured
    ({} without one)."""
    return {m.name: m.proportion for m in self.mixture}


def process_rows(batch_sharding: jax.sharding.Sharding, global_batch: int,
                 seq_len: int) -> tuple[int, int]:
  """The contiguous global-batch rows this process's devices hold."""
  index_map = batch_sharding.addressable_devices_indices_map((global_batch, seq_len))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop
           for idx in index_map.values()]
  return min(starts), max(stops)


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(msg)


def _windows(view, tokenizer, config, what: str
             ) -> tuple[int, str | None, Windows, Windows]:
  """(tokens, identity (`corpus`), training windows, held-out windows) of one
  source; `what` names it in errors."""
  d = config.data
  stream, max_id, identity = corpus(view, tokenizer)
  if max_id is not None and max_id >= config.model.vocab_size:
    raise ConfigError(
        "model.vocab_size", f"{config.model.vocab_size} is too small for the "
        f"data: {what}'s token ids reach {max_id}"
        + ("." if view.source == "tokens" else
           f" (tokenizer vocabulary {tokenizer.vocab_size})."),
        f"set --config.model.vocab_size to at least {max_id + 1}.")
  if (view.source == "tokens" and max_id is not None and isinstance(tokenizer, HFTokenizer)
      and max_id >= tokenizer.vocab_size):  # ids another tokenizer made, likely
    _say(f"data: warning: {what}'s token ids reach {max_id:,}, past the "
         f"{tokenizer.vocab_size:,} ids of data.tokenizer {d.tokenizer}: generated text "
         "cannot decode them; pass the tokenizer that made the .bin files")
  split = int(len(stream) * (1 - d.eval_fraction))
  eos = d.eos_id if view.source == "tokens" else tokenizer.eos_id
  if eos is None:
    _say(f"data: {what} is read with no data.eos_id, so its windows have no "
         "document boundaries (attention and positions span each whole window); "
         "--config.data.eos_id=ID ends documents at that id")
  return (len(stream), identity, Windows(stream[:split], d.seq_len, eos),
          Windows(stream[split:], d.seq_len, eos))


def _mixture(config, entries, tokenizer, schedule: Schedule, num_devices: int):
  """(mixed training examples, mixed held-out examples, [MixtureSource]); the
  training examples are selected by `schedule`, which this sets to the weights'
  proportions from window 0. A source without a training window, or (with
  evaluation on) a held-out one, is a ConfigError whose fix names a
  data.seq_len at which it has both (validated on `num_devices`)."""
  d, seed = config.data, config.train.seed
  proportions = mixture_proportions([w for _, w, _ in entries])
  trains, evals, parts = [], [], []
  for index, ((name, weight, view), prop) in enumerate(zip(entries, proportions)):
    field = f"data.mixture.{name}"
    tokens, identity, train_src, eval_src = _windows(view, tokenizer, config, field)
    no_eval = len(eval_src) < 1 and config.train.eval_every
    if len(train_src) < 1 or no_eval:
      split = int(tokens * (1 - d.eval_fraction))  # a window needs seq_len + 1
      fits = min(split, tokens - split if config.train.eval_every else split) - 1
      shorter = _length_that_fits(config, fits, num_devices) if fits >= 8 else 0
      by_length = (f"use a shorter data.seq_len, --config.data.seq_len={shorter}, "
                   if shorter else "")
    if len(train_src) < 1:
      raise ConfigError(
          f"{field}.path", f"source {name!r} has {count(tokens, 'token')}: no training "
          f"window of data.seq_len + 1 = {d.seq_len + 1} tokens.",
          f"{by_length}give it more data, or drop it from the mixture.")
    if no_eval:
      raise ConfigError(
          "data.eval_fraction", f"{d.eval_fraction} of the {count(tokens, 'token')} of source "
          f"{name!r} is less than one window of data.seq_len + 1 = {d.seq_len + 1}, "
          "so it has nothing to evaluate (every source holds out its own tail).",
          f"{by_length}raise data.eval_fraction, give the source more data, or set "
          "--config.train.eval_every=0 to train without evaluation.")
    # Each source's own order: seeded by train.seed and its stream number.
    trains.append(grain.MapDataset.source(
        SourceStream(Tagged(train_src, index), name, schedule, seed)))
    evals.append(grain.MapDataset.source(Tagged(eval_src, index)))
    parts.append(MixtureSource(name, weight, prop, tokens, identity,
                               len(train_src), len(eval_src)))
  schedule.reschedule([Segment(0, 0, config.train.batch_size,
                                {p.name: p.proportion for p in parts})],
                      {p.name: i for i, p in enumerate(parts)})
  examples = grain.MapDataset.select_from_datasets(
      trains, ScheduledSelection([p.name for p in parts], schedule))
  picked = eval_share([p.eval_windows for p in parts], proportions,
                      config.train.eval_steps * config.train.batch_size)
  eval_mix = ([] if min(p.eval_windows for p in parts) < 1 else
              grain.MapDataset.source(Interleaved(evals, picked)))
  lines = [f"data: a mixture of {len(parts)} sources, one tokenizer "
           f"({d.tokenizer or 'byte'}); {count(len(eval_mix), 'held-out window')} "
           "for evaluation, shared by weight (" + ", ".join(
               f"{p.name} {n}" for p, n in zip(parts, picked)) + "):"]
  total = sum(proportions)
  for p in parts:
    share = p.proportion / total
    epochs = config.train.steps * config.train.batch_size * share / p.train_windows
    lines.append(f"  {p.name}: weight {p.weight:g} ({share:.1%} of training "
                 f"windows), {p.tokens:,} tokens, {p.train_windows:,} training / "
                 f"{count(p.eval_windows, 'held-out window')} of data.seq_len + 1 = "
                 f"{d.seq_len + 1} tokens; "
                 f"{epochs:.2f} epochs in train.steps={config.train.steps}")
  _say("\n".join(lines))
  return examples, eval_mix, parts


def read_options(prefetch_batches: int) -> grain.ReadOptions:
  """The loader reads `prefetch_batches` batches ahead in two threads (0: in the
  training thread). grain's default, 16 threads and 500 elements, would read 500
  *batches* ahead here (the dataset's elements are this process's batches): at
  256 x 2048 tokens, 8 MiB a batch, that is 4 GiB of host memory, and on a
  2-core machine its threads took a sixth of a short training run's time from
  the steps (benchmarks/README.md, "Data pipeline")."""
  return grain.ReadOptions(num_threads=min(2, prefetch_batches),
                           prefetch_buffer_size=prefetch_batches)


def _check_vocabulary(tokenizer, config) -> None:
  """A tokenizer.json with more ids than model.vocab_size is a ConfigError before
  anything is tokenized: ids the data happens not to use would still reach the
  model in generation (the data's own ids are checked once read)."""
  if (isinstance(tokenizer, HFTokenizer) and config.data.source != "synthetic"
      and tokenizer.vocab_size > config.model.vocab_size):
    raise ConfigError(
        "model.vocab_size", f"{config.model.vocab_size} is smaller than the "
        f"vocabulary of data.tokenizer ({config.data.tokenizer}): "
        f"{tokenizer.vocab_size} ids.",
        f"set --config.model.vocab_size={tokenizer.vocab_size} (or more).")


def _length_that_fits(config, fits: int, num_devices: int) -> int:
  """The longest data.seq_len of at least 8 and at most `fits` (the longest whose
  windows fill one batch, and leave a held-out window when evaluating:
  `_longest_fit`) that the config validates with (the sequence axis and the
  attention kernels divide it), powers of two first; 0 when none does."""
  powers = [2 ** k for k in range(fits.bit_length() - 1, 2, -1)]
  lengths = (powers + [n for n in range(fits, 7, -1) if n not in powers])[:64]
  return _first_that_validates(config, "seq_len", lengths, num_devices) or 0


def _first_that_validates(config, name: str, values, num_devices: int):
  """The first of `values` for data.`name` at which the config validates on
  `num_devices`; None when none does."""
  from train.validate import validate_config
  for value in values:
    c = copy.deepcopy(config)
    c.data[name] = value
    try:
      validate_config(c, num_devices)
    except ConfigError:
      continue
    return value
  return None


def _window_counts(tokens: int, fraction: float, seq_len: int) -> tuple[int, int]:
  """(training, held-out) windows of a stream of `tokens` under data.eval_fraction
  `fraction`, as `_windows` cuts them."""
  split = int(tokens * (1 - fraction))
  return Windows.count(split, seq_len), Windows.count(tokens - split, seq_len)


def _longest_fit(config, tokens: int) -> int:
  """The longest data.seq_len whose windows of a stream of `tokens` fill one
  training batch and, with evaluation on, leave one held-out window."""
  split = int(tokens * (1 - config.data.eval_fraction))
  longest = (split - 1) // config.train.batch_size
  return min(longest, tokens - split - 1) if config.train.eval_every else longest


# data.eval_fraction values a fix offers first.
_ROUND_FRACTIONS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


def _fraction_that_fits(config, tokens: int, num_devices: int) -> float | None:
  """The data.eval_fraction nearest the config's (a round one if any works) at
  which a stream of `tokens` gives one training batch of windows and, with
  evaluation on, a held-out window at the config's data.seq_len, and the config
  validates; None when none does."""
  d, batch = config.data, config.train.batch_size

  def fits(fraction: float) -> bool:
    train, held_out = _window_counts(tokens, fraction, d.seq_len)
    return train >= batch and (held_out >= 1 or not config.train.eval_every)

  now = max(d.eval_fraction, 1e-9)
  for candidates in (_ROUND_FRACTIONS, [k / 1000 for k in range(1, 1000)],
                     [k / 10000 for k in range(1, 10000)]):
    fraction = _first_that_validates(
        config, "eval_fraction",
        sorted(filter(fits, candidates), key=lambda f: abs(math.log(f / now))),
        num_devices)
    if fraction is not None:
      return fraction
  return None


def _corpus_too_small(config, tokens: int, train: int,
                      num_devices: int) -> ConfigError:
  """The error for a corpus of `tokens` whose `train` training windows fill no
  batch or, with evaluation on, whose held-out tail holds no window. Its fix
  offers a data.seq_len and a data.eval_fraction at which both fit (each
  validated), so following either works. The field named: data.eval_fraction
  when a fraction helps and the held-out tail is what is short, or the fraction
  holds out half the corpus or more, or no length helps; else data.seq_len when
  a length helps; else data.path (more data) or, for a short tail,
  data.eval_fraction."""
  d, batch = config.data, config.train.batch_size
  shorter = _length_that_fits(config, _longest_fit(config, tokens), num_devices)
  fraction = _fraction_that_fits(config, tokens, num_devices)
  window = f"data.seq_len + 1 = {d.seq_len + 1}"
  split = int(tokens * (1 - d.eval_fraction))
  if train < batch:
    problem = (f"the corpus has {count(tokens, 'token')}: "
               f"{count(train, 'training window')} of {window}, fewer than one "
               f"batch of train.batch_size={batch}"
               + (f" (data.eval_fraction={d.eval_fraction} holds out the rest)."
                  if fraction is not None and d.eval_fraction >= 0.5 else "."))
    by_fraction = (f"hold out less of it, --config.data.eval_fraction={fraction}"
                   if fraction is not None else "")
    rest = "use a smaller train.batch_size or more data."
  else:
    problem = (f"{d.eval_fraction} of the corpus's {count(tokens, 'token')} is "
               f"{count(tokens - split, 'held-out token')}, less than one window of "
               f"{window}, so there is nothing to evaluate.")
    by_fraction = (f"hold out more of it, --config.data.eval_fraction={fraction}"
                   if fraction is not None else "")
    rest = ("use more data, or set --config.train.eval_every=0 to train without "
            "evaluation.")
  held_back = (config.train.eval_every and shorter
               and tokens - split - 1 < (split - 1) // batch)
  by_length = (f"use a shorter data.seq_len, e.g. --config.data.seq_len={shorter}"
               + (f" (short enough for a window in the {count(tokens - split, 'token')}"
                  " held out)" if held_back else "") if shorter else "")
  if by_fraction and (not by_length or d.eval_fraction >= 0.5 or train >= batch):
    field, ways = "data.eval_fraction", [by_fraction, by_length]
  elif by_length:
    field, ways = "data.seq_len", [by_length, by_fraction]
  else:
    field = "data.path" if train < batch else "data.eval_fraction"
    ways = []
  ways = [w for w in ways if w]
  return ConfigError(field, problem, "; or ".join(ways + [rest]))


def make_data(config, batch_sharding: jax.sharding.Sharding) -> Data:
  """The training iterator and held-out set of `config.data` (a mixture when
  `data.mixture` is set). Tokenizes what the token cache lacks. Raises ConfigError
  for missing or bad input, a vocabulary too small for the ids, a source without
  one training window or (with evaluation on) without a held-out window."""
  d, seed, batch = config.data, config.train.seed, config.train.batch_size
  tokenizer = make_tokenizer(d)
  _check_vocabulary(tokenizer, config)
  entries = mixture_entries(d)
  if is_byte(d) and d.eos_id not in (None, 0) and any(
      view.source in sources.DOCUMENT_SOURCES
      for view in ([v for _, _, v in entries] or [d])):
    # an import-hf run without tokenizer.json keeps its model's eos id there
    _say(f"data: documents end with id 0, the byte tokenizer's; data.eos_id="
         f"{d.eos_id} is not written into them, only kept as the run's stop id "
         "(generation, export-hf); --config.data.eos_id=0 makes them one")
  mixture: list[MixtureSource] = []
  schedule = Schedule([Segment(0, 0, batch)])
  if entries:
    examples, eval_src, mixture = _mixture(config, entries, tokenizer, schedule,
                                           batch_sharding.mesh.devices.size)
  elif d.source == "synthetic":
    train_src = Synthetic(config.model.vocab_size, d.seq_len, seed)
    eval_src = Synthetic(config.model.vocab_size, d.seq_len, seed + 1)
  else:
    tokens, identity, train_src, eval_src = _windows(d, tokenizer, config,
                                                     "the corpus")
    if len(train_src) < batch or len(eval_src) < 1 and config.train.eval_every:
      raise _corpus_too_small(config, tokens, len(train_src),
                              batch_sharding.mesh.devices.size)
  if not entries:
    examples = grain.MapDataset.source(train_src).shuffle(seed=seed).repeat()
  if not entries and d.source != "synthetic":
    epochs = config.train.steps * batch / len(train_src)
    _say(f"data: {len(train_src):,} training / {count(len(eval_src), 'held-out window')} "
         f"of data.seq_len + 1 = {d.seq_len + 1} tokens; {epochs:.2f} epochs in "
         f"train.steps={config.train.steps}")
  lo, hi = process_rows(batch_sharding, batch, d.seq_len)
  train = (grain.MapDataset.source(ProcessRows(examples, batch, lo, hi, schedule))
           .batch(hi - lo, drop_remainder=True)
           .to_iter_dataset(read_options(d.prefetch_batches)))
  if entries:
    sizes = {m.name: m.tokens for m in mixture}
    identities = {m.name: m.identity for m in mixture}
  elif d.source == "synthetic":
    sizes, identities = {}, {}
  else:
    sizes, identities = {"the corpus": tokens}, {"the corpus": identity}
  return Data(train=iter(train), eval_source=eval_src, tokenizer=tokenizer,
              rows=(lo, hi), batch_size=batch, mixture=mixture, schedule=schedule,
              tokens=sizes, identities=identities)


# Each source's token count and contents' identity at a run's last start, in its
# workdir: {name: {"tokens": n, "identity": str or null}} (a bare count in runs
# from before identities were recorded).
TOKENS_FILE = "data_tokens.json"


def data_changes(workdir: str, tokens: dict[str, int],
                 identities: dict[str, str | None] | None = None) -> str | None:
  """What changed in the data since the run in `workdir` last started (its
  TOKENS_FILE against `tokens` and `identities`, `Data.tokens` and
  `Data.identities`), as a warning; None when nothing did or nothing was
  recorded. A source changed when its token count did, or its identity (a
  same-size edit; see `corpus`) where both starts recorded one. The shuffle spans
  each whole stream, so a resumed run reads the same windows as an uninterrupted
  one only on the same data."""
  try:
    with open(os.path.join(workdir, TOKENS_FILE)) as f:
      before = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(before, dict):
    return None
  identities = identities or {}
  # A source added to or dropped from a mixture changes no other's order
  # (train.data_schedule); a source whose documents changed does.
  changed = []
  for name, n in tokens.items():
    was = before.get(name)
    was_n, was_id = ((was.get("tokens"), was.get("identity"))
                     if isinstance(was, dict) else (was, None))
    now_id = identities.get(name)
    if not isinstance(was_n, int):
      continue
    if was_n != n:
      changed.append(f"{name}: {was_n:,} -> {n:,} tokens")
    elif was_id and now_id and was_id != now_id:
      what = ("its .bin files were rewritten" if now_id.startswith("files:")
              else "other contents")
      changed.append(f"{name}: the same {n:,} tokens, {what}")
  if not changed:
    return None
  return ("warning: the data changed since this run last started ("
          + "; ".join(changed) + "): its windows are shuffled over the whole "
          "stream, so from here the run reads another order than it would have; a "
          "resume is exact only on the same data.")


def record_tokens(workdir: str, tokens: dict[str, int],
                  identities: dict[str, str | None] | None = None) -> None:
  """Writes `tokens` and `identities` as the run's TOKENS_FILE (atomically), for
  `data_changes`."""
  identities = identities or {}
  run_config.write_atomically(os.path.join(workdir, TOKENS_FILE), json.dumps(
      {name: {"tokens": n, "identity": identities.get(name)}
       for name, n in tokens.items()}))


_MIXTURE_EXAMPLE = ('in the config file: c.data.mixture = ConfigDict({"code": '
                    'dict(source="text", path="/data/code", weight=0.7), "web": '
                    'dict(source="jsonl", path="/data/web", text_field="text", '
                    'weight=0.3)}).')


def _validate_mixture(config) -> list[tuple[str, str, Any, Any, bool]]:
  """[(field prefix, source, path, text_field, whether the entry sets its own
  text_field)] of every mixture entry, after
  checking names, keys, sources, paths and weights; [] without a mixture."""
  d = config.data
  mixture = d.get("mixture")
  if not mixture:
    return []
  if not hasattr(mixture, "keys"):
    raise ConfigError("data.mixture", f"must map source names to entries, got "
                      f"{type(mixture).__name__}.", _MIXTURE_EXAMPLE)
  if d.path:
    raise ConfigError("data.path", f"is {d.path!r} while data.mixture is set: a "
                      "mixture reads the path of each of its entries.",
                      "unset data.path, or make this path an entry of data.mixture.")
  out = []
  for name in sorted(mixture.keys()):
    entry, field = mixture[name], f"data.mixture.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
      raise ConfigError(field, "a source name may hold only letters, digits, _ and "
                        "- (it becomes the metrics key data_fraction/<name>).",
                        "rename the entry, e.g. 'web' or 'code_v2'.")
    if not hasattr(entry, "keys"):
      raise ConfigError(field, f"must be a dict of {', '.join(MIXTURE_KEYS)}, got "
                        f"{entry!r}.", _MIXTURE_EXAMPLE)
    for key in entry.keys():
      if key not in MIXTURE_KEYS:
        close = difflib.get_close_matches(key, MIXTURE_KEYS, 1)
        raise ConfigError(
            f"{field}.{key}", f"is not a field of a mixture entry (those are "
            f"{', '.join(MIXTURE_KEYS)})" +
            (f"; did you mean {close[0]!r}?" if close else "."),
            "remove it. The tokenizer, cache_dir, skip_bad_records, eos_id and "
            "token_dtype are shared by every source: set them in data.*.")
    for key in ("source", "path", "weight"):
      if entry.get(key) is None or entry.get(key) == "":
        raise ConfigError(f"{field}.{key}", "is missing: every mixture entry needs "
                          "a source, a path and a weight.", _MIXTURE_EXAMPLE)
    if entry["source"] not in MIXTURE_SOURCES:
      raise ConfigError(f"{field}.source", f"{entry['source']!r} is not one of "
                        f"{MIXTURE_SOURCES}.", "use one of "
                        f"{', '.join(MIXTURE_SOURCES)} (synthetic cannot be mixed).")
    weight = entry["weight"]
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not math.isfinite(weight) or weight <= 0):
      raise ConfigError(f"{field}.weight", f"must be a positive number, got "
                        f"{weight!r}.", "weights are relative: 0.7 and 0.3, or 7 "
                        "and 3, give the same mixture.")
    out.append((field + ".", entry["source"], entry["path"],
                entry.get("text_field") or d.text_field, "text_field" in entry.keys()))
  return out


# What data.token_dtype may be: ids are never negative or fractional.
TOKEN_DTYPES = ("uint8", "uint16", "uint32")


def _token_dtype_error(value) -> ConfigError:
  """data.token_dtype is not one of TOKEN_DTYPES: the fix names the unsigned type
  of the same size (files written as float32 or int32 hold uint32-sized ids)."""
  try:
    size = np.dtype(value).itemsize
  except TypeError:
    size = 2
  meant = {1: "uint8", 4: "uint32"}.get(size, "uint16")
  others = ", ".join(t for t in TOKEN_DTYPES if t != meant)
  return ConfigError(
      "data.token_dtype", f"{value!r} is not an unsigned integer type of token "
      f"ids, one of {', '.join(TOKEN_DTYPES)} (a file of ids read as another type "
      "trains on other ids, or on negative ones).",
      f"set --config.data.token_dtype={meant}, or {others}: the type the ids were "
      "written in.")


# An example path for each source that reads files, as a fix writes it.
_EXAMPLE_PATHS = {"jsonl": "FILE.jsonl", "parquet": "FILE.parquet",
                  "arrayrecord": "FILE.arrayrecord", "hf_disk": "DIR",
                  "tokens": "DIR/*.bin"}


def source_fix(config, source: str) -> str:
  """The flags that make `config` read `source`: data.source, and what that
  source needs besides that `config` lacks (a path for one that reads files; the
  byte tokenizer's 256 ids for a document source under a smaller model), so the
  fix does not lead to the next error."""
  d = config.data
  flags = [f"--config.data.source={source}"]
  if source in _EXAMPLE_PATHS and not d.path:
    flags.append(flag("config.data.path", _EXAMPLE_PATHS[source]))
  if (source in sources.DOCUMENT_SOURCES and is_byte(d)
      and config.model.vocab_size < 256):
    flags.append("--config.model.vocab_size=256")
  return " ".join(flags)


def validate(config) -> None:
  d = config.data
  checks = _validate_mixture(config)
  if not checks:
    if d.source not in SOURCES:
      # the source meant, with what it needs besides
      raise ConfigError.choice("data.source", d.source, SOURCES,
                               setting=lambda meant: source_fix(config, meant))
    checks = [("data.", d.source, d.path, d.text_field, True)]
  if d.seq_len < 2:
    raise ConfigError("data.seq_len", f"must be at least 2, got {d.seq_len}.",
                      "set --config.data.seq_len=256, for example.")
  if not (0 < d.eval_fraction < 1
          or d.eval_fraction == 0 and not config.train.eval_every):
    raise ConfigError("data.eval_fraction", f"must be in (0, 1) (or 0, training on "
                      f"all the data, with train.eval_every=0), got "
                      f"{d.eval_fraction}.", "set --config.data.eval_fraction=0.02"
                      + (", or --config.train.eval_every=0 to train on all the data "
                         "without evaluation" if d.eval_fraction == 0 else "") + ".")
  for prefix, source, path, text_field, own_text_field in checks:
    if source in ("jsonl", "parquet", "arrayrecord", "hf_disk") and not path:
      raise ConfigError(f"{prefix}path", f"source {source!r} reads files, but no "
                        "path is set.", f"set --config.{prefix}path to a file, "
                        "directory or glob (hf_disk: the directory given to "
                        "save_to_disk).")
    if source in ("jsonl", "parquet", "hf_disk") and not text_field:
      raise ConfigError(f"{prefix}text_field", f"source {source!r} needs the name "
                        "of the field that holds each record's text.",
                        f"set {sources.text_field_fix(prefix, own_text_field, 'text')}"
                        ", for example.")
    if d.tokenizer == "none" and source != "arrayrecord":
      raise ConfigError("data.tokenizer", f"'none' (records of token ids) works "
                        f"with source arrayrecord only, not {source!r}"
                        + ("" if prefix == "data." else f" ({prefix}source)") + ".",
                        "set a tokenizer (byte or a tokenizer.json), or use "
                        "--config.data.source=tokens for .bin files of token ids.")
  reads_ids = d.tokenizer == "none" or any(check[1] == "tokens" for check in checks)
  if reads_ids and d.token_dtype not in TOKEN_DTYPES:
    raise _token_dtype_error(d.token_dtype)
  if any(check[1] == "tokens" for check in checks) and d.eos_id is not None:
    # .bin files end documents with data.eos_id: an id the files' dtype cannot
    # hold, or past the model's vocabulary (generation stops on it), ends none.
    size = min(np.iinfo(d.token_dtype).max + 1, config.model.vocab_size)
    check_eos(d.eos_id, size, f"the ids of data.token_dtype {d.token_dtype} and "
              f"model.vocab_size {config.model.vocab_size}")
  if d.tokenizer == "none" and d.eos_id is None:
    raise ConfigError("data.eos_id", "token-id records (data.tokenizer=none) need "
                      "the id that ends each document.",
                      "set --config.data.eos_id to your tokenizer's end-of-text id.")
  if (any(check[1] in sources.DOCUMENT_SOURCES for check in checks)
      and is_byte(d)):
    if config.model.vocab_size < 256:
      raise ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller "
                        "than the 256 ids of the byte tokenizer.",
                        "set --config.model.vocab_size=256.")
