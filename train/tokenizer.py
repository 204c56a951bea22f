"""Tokenizers: bytes (the default, no files needed) or an HF `tokenizers` JSON."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as ids 1..255; id 0 (NUL, absent from text) ends a document."""
  vocab_size = 256
  eos_id = 0

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8").replace(b"\0", b""), np.uint8)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", "replace")


class HFTokenizer:
  """A `tokenizers` tokenizer.json; `eos_id` from the file's end-of-text token."""

  _EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")

  def __init__(self, path: str, eos_id: int | None = None):
    from tokenizers import Tokenizer  # optional dependency
    self._tok = Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    if eos_id is None:
      ids = [self._tok.token_to_id(n) for n in self._EOS_NAMES]
      eos_id = next((i for i in ids if i is not None), None)
    if eos_id is None:
      raise ValueError(f"{path} names none of {self._EOS_NAMES}; set data.eos_id")
    self.eos_id = eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, np.uint32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def make_tokenizer(data_cfg):
  if data_cfg.tokenizer in (None, "", "byte"):
    return ByteTokenizer()
  return HFTokenizer(data_cfg.tokenizer, data_cfg.eos_id)
