"""Tokenizers: bytes (the default, no files needed) or an HF `tokenizers` JSON."""

from __future__ import annotations

import os

import numpy as np

# data.tokenizer values that name no file: the byte tokenizer, or token ids.
BUILT_IN = (None, "", "byte", "none")


def tokenizer_file(value) -> str | None:
  """`data.tokenizer` when it names a tokenizer.json (not a BUILT_IN value), with
  `~` expanded: every reader of the path takes it from here."""
  return None if value in BUILT_IN else os.path.expanduser(str(value))


# What transformers' AutoTokenizer reads next to tokenizer.json (special tokens;
# the chat template, which transformers 5 saves as chat_template.jinja): kept
# with a run by import-hf (and by training, beside its copy of the tokenizer) and
# written back by export-hf.
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json")


def copy_extras(src_dir: str, dst_dir: str) -> list[str]:
  """Copies each TOKENIZER_EXTRAS file of `src_dir` that `dst_dir` lacks (through
  a temporary name, so a crash leaves no half file); returns the names copied."""
  import shutil
  copied = []
  for name in TOKENIZER_EXTRAS:
    src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
    if os.path.isfile(src) and not os.path.exists(dst):
      shutil.copyfile(src, dst + ".tmp")
      os.replace(dst + ".tmp", dst)
      copied.append(name)
  return copied


class ByteTokenizer:
  """UTF-8 bytes as ids 1..255; id 0 (NUL, absent from text) ends a document."""
  vocab_size = 256
  eos_id = 0

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8").replace(b"\0", b""), np.uint8)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids ([len_i] uint8), as `encode`."""
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """Text of byte ids; id 0 is dropped (`decode_in_vocabulary` for ids past 255)."""
    return decode_in_vocabulary(
        ids, self.vocab_size,
        lambda run: bytes(i for i in run if i).decode("utf-8", "replace"))


class UnreadableTokenizer(Exception):
  """A tokenizer file `tokenizers` cannot read (its message names the file)."""


class HFTokenizer:
  """A `tokenizers` tokenizer.json; `eos_id` from the file's end-of-text token
  (None when it names none and `require_eos` is False: generation and export
  need no end-of-text token, training on text does)."""

  _EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")

  def __init__(self, path: str, eos_id: int | None = None, require_eos: bool = True):
    from tokenizers import Tokenizer  # optional dependency
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception
      raise UnreadableTokenizer(f"{path} is not a tokenizer file `tokenizers` can "
                                f"read ({err})") from None
    self.vocab_size = self._tok.get_vocab_size()
    if eos_id is None:
      eos_id = self.named_eos_id()
    if eos_id is None and require_eos:
      raise ValueError(f"{path} names none of {self._EOS_NAMES}; set data.eos_id")
    self.eos_id = eos_id

  def named_eos_id(self) -> int | None:
    """The id of the first end-of-text token of `_EOS_NAMES` the file has."""
    ids = [self._tok.token_to_id(n) for n in self._EOS_NAMES]
    return next((i for i in ids if i is not None), None)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, np.uint32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids ([len_i] uint32), as `encode`, tokenized in parallel by
    `tokenizers`' Rust threads."""
    return [np.asarray(e.ids, np.uint32) for e in self._tok.encode_batch(texts)]

  def decode(self, ids) -> str:
    """Text of `ids` (`decode_in_vocabulary` for ids past the tokenizer's)."""
    return decode_in_vocabulary(ids, self.vocab_size, self._tok.decode)


def decode_in_vocabulary(ids, vocab_size: int, decode) -> str:
  """`decode` of each run of ids below `vocab_size`, with U+FFFD (as for invalid
  UTF-8) where an id at or past it stands: a model whose vocabulary is larger than
  its tokenizer's (padded, or read without its tokenizer) can generate such ids,
  and both tokenizers dropped them silently."""
  parts, run = [], []
  for i in map(int, ids):
    if i < vocab_size:
      run.append(i)
    else:
      parts += [decode(run), "\ufffd"]
      run = []
  return "".join(parts) + decode(run)


class TokenIds:
  """`data.tokenizer=none`: records already hold token ids, raw `dtype` arrays
  (ArrayRecord only). `eos_id` (data.eos_id) ends each document; `vocab_size` is
  the dtype's range. There is no text to encode or decode."""

  def __init__(self, dtype: str, eos_id: int):
    self.dtype = np.dtype(dtype)
    self.vocab_size = int(np.iinfo(self.dtype).max) + 1
    self.eos_id = eos_id

  def encode(self, text: str) -> np.ndarray:
    raise ValueError("data.tokenizer=none reads token ids; it cannot encode text")

  def encode_batch(self, records: list[bytes]) -> list[np.ndarray]:
    """Each record's bytes as [len_i] ids of `dtype`."""
    return [np.frombuffer(r, self.dtype) for r in records]

  def decode(self, ids) -> str:
    return " ".join(str(int(i)) for i in ids)


def is_byte(data_cfg) -> bool:
  """Whether `data_cfg.tokenizer` names the byte tokenizer (unset, "" or "byte")."""
  return data_cfg.tokenizer in (None, "", "byte")


def make_tokenizer(data_cfg, require_eos: bool = True):
  """ByteTokenizer for `byte`, TokenIds for `none`, else an HFTokenizer; a
  ConfigError naming data.tokenizer when its file is missing, or data.eos_id
  when it names no eos and `require_eos` (training; generation and export pass
  False and get eos_id None)."""
  if is_byte(data_cfg):
    return ByteTokenizer()
  if data_cfg.tokenizer == "none":
    ids = TokenIds(data_cfg.token_dtype, data_cfg.eos_id)
    check_eos(data_cfg.eos_id, ids.vocab_size, f"the range of data.token_dtype "
              f"{data_cfg.token_dtype}")
    return ids
  from sharding import ConfigError
  path = tokenizer_file(data_cfg.tokenizer)
  if not os.path.isfile(path):
    raise ConfigError("data.tokenizer", f"there is no tokenizer file at {path}.",
                      "pass the path of the tokenizer.json, "
                      "--config.data.tokenizer=PATH/tokenizer.json.")
  try:
    tokenizer = HFTokenizer(path, data_cfg.eos_id, require_eos)
  except UnreadableTokenizer as err:
    raise ConfigError("data.tokenizer", f"{err}.", "pass the path of a model's "
                      "tokenizer.json (the file `tokenizers` saves).") from None
  except ValueError as err:  # no end-of-text token
    raise ConfigError("data.eos_id", str(err) + ".", "set --config.data.eos_id to "
                      "the id that ends a document.") from None
  check_eos(data_cfg.eos_id, tokenizer.vocab_size, f"the vocabulary of {path}",
            tokenizer.named_eos_id())
  return tokenizer


def check_eos(eos_id: int | None, size: int, vocabulary: str,
              named: int | None = None) -> None:
  """data.eos_id outside the tokenizer's `size` ids is a ConfigError: documents
  would end in an id the tokenizer cannot decode (and the model's vocabulary
  check would blame model.vocab_size). `named`: the end-of-text id the tokenizer
  names, if any."""
  if eos_id is not None and not 0 <= eos_id < size:
    from sharding import ConfigError
    raise ConfigError(
        "data.eos_id", f"{eos_id} is outside {vocabulary}, ids [0, {size}).",
        f"leave data.eos_id unset: the tokenizer names its end-of-text token, id "
        f"{named}." if named is not None else
        f"pass the id that ends a document, one of [0, {size}).")
