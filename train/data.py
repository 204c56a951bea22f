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

Determinism: window order depends only on `train.seed`. A process loads only the
rows of each global batch that its devices hold, so the global batch is the same
whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
from typing import Any, Iterator

import grain
import jax
import numpy as np

from sharding import ConfigError
from train import sources, token_cache
from train.tokenizer import make_tokenizer

SOURCES = (*sources.DOCUMENT_SOURCES, "tokens", "synthetic")


def default_text_path() -> str:
  """The Python standard library's own sources: text present on every machine."""
  return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")


def _expand(path: str, field: str) -> list[str]:
  if os.path.isdir(path):
    path = os.path.join(path, "**", "*")
  files = sorted(f for f in glob.glob(path, recursive=True)
                 if os.path.isfile(f) and f"{os.sep}site-packages{os.sep}" not in f)
  if not files:
    raise ConfigError(field, f"no files match {path!r}.",
                      "point it at a directory or glob of existing files.")
  return files


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
    return (len(self.tokens) - 1) // self.seq_len

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
  """The rows [lo, hi) of every global batch of `batch_size` from `examples`."""
  examples: Any
  batch_size: int
  lo: int
  hi: int

  def __len__(self) -> int:
    return len(self.examples) // self.batch_size * (self.hi - self.lo)

  def __getitem__(self, n: int):
    rows = self.hi - self.lo
    return self.examples[n // rows * self.batch_size + self.lo + n % rows]


def token_stream(data_cfg, tokenizer) -> np.ndarray:
  """The whole corpus: see `corpus`."""
  return corpus(data_cfg, tokenizer)[0]


def corpus(data_cfg, tokenizer) -> tuple[np.ndarray, int | None]:
  """The whole corpus as one array [num_tokens], documents separated by the
  tokenizer's eos (`data.eos_id` for `tokens` files), and its largest id (None
  for `tokens`, which is not scanned).

  `tokens`: the .bin files memory-mapped and concatenated. Every document source
  (`text`, `jsonl`, `parquet`, `arrayrecord`, `hf_disk`) is tokenized once into the
  token cache (`train.token_cache`) and read back memory-mapped, documents in a
  fixed shuffled order, so the same documents give the same stream whatever the
  source. Raises ConfigError for missing files, bad records (unless
  `data.skip_bad_records`) and a source without documents."""
  if data_cfg.source == "tokens":
    if not data_cfg.path:
      raise ConfigError("data.path", "source 'tokens' needs .bin files.",
                        "set --config.data.path=/dir/or/glob/*.bin.")
    arrays = [np.memmap(f, dtype=data_cfg.token_dtype, mode="r")
              for f in _expand(data_cfg.path, "data.path")]
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), None
  if data_cfg.source == "hf_disk":
    if not data_cfg.path or not os.path.isdir(data_cfg.path):
      raise ConfigError("data.path", f"source 'hf_disk' needs the directory written "
                        f"by datasets' save_to_disk, got {data_cfg.path!r}.",
                        "set --config.data.path=/path/to/saved_dataset.")
    files = sources.list_files(data_cfg.path, "text")
  else:
    files = sources.list_files(data_cfg.path or default_text_path(), data_cfg.source)
  cached = token_cache.load_or_build(data_cfg, files, tokenizer)
  return cached.tokens, cached.meta.get("max_id")


@dataclasses.dataclass
class Data:
  """Train iterator (checkpointable grain iterator) and a fixed eval set."""
  train: Any
  eval_source: Any
  tokenizer: Any
  rows: tuple[int, int]  # this process's rows of each global batch
  batch_size: int

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


def process_rows(batch_sharding: jax.sharding.Sharding, global_batch: int,
                 seq_len: int) -> tuple[int, int]:
  """The contiguous global-batch rows this process's devices hold."""
  index_map = batch_sharding.addressable_devices_indices_map((global_batch, seq_len))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop
           for idx in index_map.values()]
  return min(starts), max(stops)


def make_data(config, batch_sharding: jax.sharding.Sharding) -> Data:
  d, seed, batch = config.data, config.train.seed, config.train.batch_size
  tokenizer = make_tokenizer(d)
  if d.source == "synthetic":
    train_src = Synthetic(config.model.vocab_size, d.seq_len, seed)
    eval_src = Synthetic(config.model.vocab_size, d.seq_len, seed + 1)
  else:
    stream, max_id = corpus(d, tokenizer)
    if max_id is not None and max_id >= config.model.vocab_size:
      raise ConfigError(
          "model.vocab_size", f"{config.model.vocab_size} is too small for the "
          f"data: its token ids reach {max_id} (tokenizer vocabulary "
          f"{tokenizer.vocab_size}).",
          f"set --config.model.vocab_size to at least {max_id + 1}.")
    split = int(len(stream) * (1 - d.eval_fraction))
    eos = d.eos_id if d.source == "tokens" else tokenizer.eos_id
    train_src = Windows(stream[:split], d.seq_len, eos)
    eval_src = Windows(stream[split:], d.seq_len, eos)
    if len(train_src) < batch:
      raise ConfigError(
          "data.path", f"the corpus has {len(stream)} tokens: {len(train_src)} "
          f"training windows of {d.seq_len + 1}, fewer than one batch of "
          f"train.batch_size={batch}.",
          "use more data, a shorter data.seq_len or a smaller train.batch_size.")
    if len(eval_src) < 1 and config.train.eval_every:
      raise ConfigError(
          "data.eval_fraction", f"{d.eval_fraction} of the corpus's {len(stream)} "
          f"tokens is {len(stream) - split} held-out tokens, less than one window "
          f"of data.seq_len + 1 = {d.seq_len + 1}, so there is nothing to evaluate.",
          "raise data.eval_fraction, use more data or a shorter data.seq_len, or "
          "set --config.train.eval_every=0 to train without evaluation.")
  lo, hi = process_rows(batch_sharding, batch, d.seq_len)
  examples = grain.MapDataset.source(train_src).shuffle(seed=seed).repeat()
  train = (grain.MapDataset.source(ProcessRows(examples, batch, lo, hi))
           .batch(hi - lo, drop_remainder=True)
           .to_iter_dataset())
  return Data(train=iter(train), eval_source=eval_src, tokenizer=tokenizer,
              rows=(lo, hi), batch_size=batch)


def validate(config) -> None:
  d = config.data
  if d.source not in SOURCES:
    raise ConfigError("data.source", f"{d.source!r} is not one of {SOURCES}.",
                      f"set --config.data.source to one of {', '.join(SOURCES)}.")
  if d.seq_len < 2:
    raise ConfigError("data.seq_len", f"must be at least 2, got {d.seq_len}.",
                      "set --config.data.seq_len=256, for example.")
  if not 0 < d.eval_fraction < 1:
    raise ConfigError("data.eval_fraction", f"must be in (0, 1), got "
                      f"{d.eval_fraction}.", "set it to e.g. 0.02.")
  if d.source in ("jsonl", "parquet", "arrayrecord", "hf_disk") and not d.path:
    raise ConfigError("data.path", f"source {d.source!r} reads files, but no path "
                      "is set.", "set --config.data.path to a file, directory or "
                      "glob (hf_disk: the directory given to save_to_disk).")
  if d.source in ("jsonl", "parquet", "hf_disk") and not d.text_field:
    raise ConfigError("data.text_field", f"source {d.source!r} needs the name of "
                      "the field that holds each record's text.",
                      "set --config.data.text_field=text, for example.")
  if d.tokenizer == "none" and d.source != "arrayrecord":
    raise ConfigError("data.tokenizer", f"'none' (records of token ids) works with "
                      f"source arrayrecord only, not {d.source!r}.",
                      "set a tokenizer (byte or a tokenizer.json), or use "
                      "--config.data.source=tokens for .bin files of token ids.")
  if d.tokenizer == "none" and d.eos_id is None:
    raise ConfigError("data.eos_id", "token-id records (data.tokenizer=none) need "
                      "the id that ends each document.",
                      "set --config.data.eos_id to your tokenizer's end-of-text id.")
  if (d.source in sources.DOCUMENT_SOURCES and d.tokenizer in (None, "", "byte")):
    if config.model.vocab_size < 256:
      raise ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller "
                        "than the 256 ids of the byte tokenizer.",
                        "set --config.model.vocab_size=256.")
