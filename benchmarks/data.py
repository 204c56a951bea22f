"""Data pipeline speed: tokenizing into the token cache, and the training loop's
wait on the data iterator.

  python benchmarks/data.py [--small] [--mb=50] [--steps=30] [--repeats=3]
                            [--only_tokenize]

1. Generates a JSONL corpus (`--mb` MB of Zipf-distributed pseudo-words; 5 MB with
   `--small`) and trains a byte-level BPE tokenizer with `tokenizers` on a sample
   of it (vocabulary 4096).
2. Tokenization: rung's path (`train.token_cache.load_or_build` on a cold cache in
   a temporary directory: reading and parsing the JSONL, batched `encode_batch`,
   writing, the document shuffle) against `tokenizers`' `encode_batch` called
   directly on the same texts already in memory (one call; ids read out of every
   Encoding, which any user of the ids must do), `--repeats` times, back to back.
   Documents/s and tokens/s (tokens without the end-of-document ids) of each,
   their ratio, and the ratio of the best times over the repeats.
3. Data wait: `llama_tiny` (byte tokenizer) for `--steps` steps, evaluation and
   checkpoints off, on its default source (the standard library's text) and on a
   two-source mixture (that text and the generated corpus, 0.5 each). A wrapper
   around the data iterator (the loop is not changed) times every `next()`; the
   figure is the time blocked in `next()` over the run's time from the second
   `next()` to the end of training (steps 2..N; the first includes the
   compile). The loop dispatches steps ahead of the device between
   metric logs, so the interval between two `next()` calls is not a step's time;
   the mean step is that span over N - 1.

Prints one JSON line per measurement. Record results in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks.common import run, emit  # noqa: E402

_SMALL = flags.DEFINE_bool("small", False, "a 5 MB corpus and 12 training steps "
                           "(replaces --mb and --steps)")
_MB = flags.DEFINE_float("mb", 50.0, "corpus size in MB (without --small)", lower_bound=0.5)
_STEPS = flags.DEFINE_integer("steps", 30, "training steps per data-wait run",
                              lower_bound=2)
_VOCAB = flags.DEFINE_integer("vocab", 4096, "BPE vocabulary size (from the 256 bytes)",
                              lower_bound=256)
_REPEATS = flags.DEFINE_integer("repeats", 3, "tokenization comparisons", lower_bound=1)
_ONLY_TOKENIZE = flags.DEFINE_bool("only_tokenize", False, "skip the data-wait runs")


def make_corpus(path: str, megabytes: float, seed: int = 0) -> tuple[int, int]:
  """Writes JSONL documents {"id", "text"} of Zipf-distributed pseudo-words until
  `megabytes` MB; returns (documents, bytes of text)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
  words = ["".join(rng.choice(letters, size=rng.integers(1, 11)))
           for _ in range(20000)]
  p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
  p /= p.sum()
  target, size, docs = int(megabytes * 1e6), 0, 0
  with open(path, "w") as f:
    while size < target:
      ids = rng.choice(len(words), size=int(rng.integers(50, 600)), p=p)
      sentences = [" ".join(words[i] for i in ids[s:s + 12]).capitalize() + "."
                   for s in range(0, len(ids), 12)]
      text = " ".join(sentences)
      text = text.replace(". ", ".\n", int(rng.integers(0, 4)))
      f.write(json.dumps({"id": docs, "text": text}) + "\n")
      size += len(text)
      docs += 1
  return docs, size


def train_tokenizer(corpus: str, out: str, vocab: int,
                    sample_docs: int = 2000) -> str:
  """A byte-level BPE tokenizer.json trained on the first `sample_docs` documents."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  texts = []
  with open(corpus) as f:
    for line in f:
      texts.append(json.loads(line)["text"])
      if len(texts) == sample_docs:
        break
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  path = os.path.join(out, "tokenizer.json")
  tok.save(path)
  return path


def bench_tokenize(corpus: str, tokenizer_path: str, work: str):
  from tokenizers import Tokenizer

  from experiments import base
  from train import sources, token_cache
  from train.tokenizer import make_tokenizer

  with open(corpus) as f:
    texts = [json.loads(line)["text"] for line in f]
  mb = sum(len(t) for t in texts) / 1e6
  tok = Tokenizer.from_file(tokenizer_path)
  tok.encode_batch(texts[:64])  # warm up the thread pool
  d = base.get_config().data
  d.update(source="jsonl", path=corpus, tokenizer=tokenizer_path)
  files = sources.list_files(corpus, "jsonl")
  rung_tok = make_tokenizer(d)
  best = {"direct": float("inf"), "rung": float("inf")}
  for repeat in range(_REPEATS.value):  # direct, then rung, measured back to back
    t = time.perf_counter()
    encodings = tok.encode_batch(texts)
    encode_only = time.perf_counter() - t
    direct_tokens = sum(len(e.ids) for e in encodings)
    direct = time.perf_counter() - t
    del encodings
    best["direct"] = min(best["direct"], direct)
    emit(measurement="tokenize", path="tokenizers encode_batch (direct)",
         repeat=repeat, documents=len(texts), megabytes=round(mb, 1),
         tokens=direct_tokens, seconds=round(direct, 3),
         encode_batch_only_s=round(encode_only, 3),
         docs_per_s=round(len(texts) / direct),
         tokens_per_s=round(direct_tokens / direct))

    d.cache_dir = os.path.join(work, f"cache-{repeat}")  # cold every time
    t = time.perf_counter()
    cached = token_cache.load_or_build(d, files, rung_tok)
    rung = time.perf_counter() - t
    best["rung"] = min(best["rung"], rung)
    docs = cached.meta["documents"]
    tokens = cached.meta["tokens"] - docs  # without the end-of-document ids
    assert tokens == direct_tokens, (tokens, direct_tokens)
    emit(measurement="tokenize", path="rung token_cache (cold)", repeat=repeat,
         documents=docs, megabytes=round(mb, 1), tokens=tokens,
         seconds=round(rung, 3), docs_per_s=round(docs / rung),
         tokens_per_s=round(tokens / rung), ratio_to_direct=round(direct / rung, 3))
    shutil.rmtree(d.cache_dir, ignore_errors=True)
  # The machine is shared and noisy: compare the best of the repeats.
  emit(measurement="tokenize_best", repeats=_REPEATS.value,
       direct_docs_per_s=round(len(texts) / best["direct"]),
       rung_docs_per_s=round(len(texts) / best["rung"]),
       direct_tokens_per_s=round(direct_tokens / best["direct"]),
       rung_tokens_per_s=round(direct_tokens / best["rung"]),
       ratio_to_direct=round(best["direct"] / best["rung"], 3))


class TimedIterator:
  """Wraps a checkpointable iterator; records (start, end) of every next()."""

  def __init__(self, it):
    self.it, self.calls = it, []

  def __iter__(self):
    return self

  def __next__(self):
    t = time.perf_counter()
    out = next(self.it)
    self.calls.append((t, time.perf_counter()))
    return out

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def bench_wait(name: str, steps: int, work: str, mixture=None):
  import train
  from experiments import llama_tiny
  from ml_collections import ConfigDict
  from train import loop

  c = llama_tiny.get_config()
  c.train.update(steps=steps, eval_every=0)
  c.checkpoint.every_steps = 0
  c.log.tensorboard = False
  c.data.cache_dir = os.path.join(work, "cache")
  if mixture:
    c.data.mixture = ConfigDict(mixture)
  timed = []
  real = loop.make_data

  def make_data(config, sharding):
    data = real(config, sharding)
    data.train = TimedIterator(data.train)
    timed.append(data.train)
    return data

  loop.make_data = make_data
  try:
    # Tokenizing (into the token cache) happens in make_data, before the first
    # next(): it is not part of the wait measured here.
    t = time.perf_counter()
    rows = train.train(c, os.path.join(work, f"run-{name}"), progress=False)
    end = time.perf_counter()
  finally:
    loop.make_data = real
  calls = timed[0].calls
  # Steps 2..N: from the second next() to the end of training (which waits for
  # the last step); every next() in that span blocked the loop for its time.
  span = end - calls[1][0]
  waits = [e - s for s, e in calls[1:]]
  row = dict(measurement="data_wait", data=name, steps=steps,
             mean_step_s=round(span / (steps - 1), 4),
             mean_next_ms=round(1e3 * sum(waits) / len(waits), 3),
             max_next_ms=round(1e3 * max(waits), 3),
             wait_fraction=round(sum(waits) / span, 5),
             final_loss=round(rows[-1]["loss"], 4), wall_s=round(end - t, 1))
  row.update({k: round(v, 4) for k, v in rows[-1].items()
              if k.startswith("data_fraction/")})
  emit(**row)


def main(argv):
  del argv
  import jax
  import tokenizers

  from train import data as data_lib
  mb = 5.0 if _SMALL.value else _MB.value
  steps = 12 if _SMALL.value else _STEPS.value
  with open("/proc/cpuinfo") as f:
    cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
               platform.processor())
  from importlib.metadata import version
  emit(measurement="machine", cpu=cpu, cores=os.cpu_count(),
       python=sys.version.split()[0], jax=jax.__version__, grain=version("grain"),
       tokenizers=tokenizers.__version__, corpus_mb=mb, steps=steps)
  work = tempfile.mkdtemp(prefix="rung-bench-data-")
  try:
    corpus = os.path.join(work, "corpus.jsonl")
    t = time.perf_counter()
    docs, size = make_corpus(corpus, mb)
    gen = time.perf_counter() - t
    t = time.perf_counter()
    tok = train_tokenizer(corpus, work, _VOCAB.value)
    emit(measurement="setup", documents=docs, megabytes=round(size / 1e6, 1),
         generate_s=round(gen, 1), bpe_train_s=round(time.perf_counter() - t, 1),
         vocab=_VOCAB.value)
    bench_tokenize(corpus, tok, work)
    if _ONLY_TOKENIZE.value:
      return
    bench_wait("stdlib text", steps, work)
    bench_wait("mixture stdlib 0.5 + corpus 0.5", steps, work, mixture={
        "stdlib": dict(source="text", path=data_lib.default_text_path(),
                       weight=0.5),
        "corpus": dict(source="jsonl", path=corpus, weight=0.5)})
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  run(main)
