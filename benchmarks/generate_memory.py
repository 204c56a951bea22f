"""Peak host memory of `infer.generate` against the size of its KV cache.

  python benchmarks/generate_memory.py [--rows=128 --new_tokens=1008]

A random 2-layer model (d_model 256, 4 kv heads of 64) on one CPU device
generates `--new_tokens` greedy tokens after 16-token prompts for `--rows`
rows: a float32 KV cache of rows x (16 + new_tokens) positions (512 MiB with
the defaults). The prompts are short so the prefill's own activations stay
small beside the cache. Reports the peak resident memory the generation added
(`ru_maxrss` after a small warm-up generation, so the runtime and the weights
are counted before) in MiB and in caches: about 2 while the prefilled cache
lived beside its heads-major decode copy, about 1 since the cache is made in the
decode form. One JSON line.
"""

from __future__ import annotations

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import common  # noqa: E402
from common import emit, run  # noqa: E402

_ROWS = flags.DEFINE_integer("rows", 128, "prompts generated together", lower_bound=1)
_NEW = flags.DEFINE_integer("new_tokens", 1008, "new tokens per row", lower_bound=1)
PROMPT = 16


def main(argv):
  del argv
  import jax
  import numpy as np
  from flax import nnx

  import infer
  from model import Decoder, ModelConfig
  cfg = ModelConfig(vocab_size=256, d_model=256, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=64, d_ff=512,
                    max_position_embeddings=PROMPT + _NEW.value)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  prompts = np.random.default_rng(0).integers(1, 256, (_ROWS.value, PROMPT)).tolist()
  cache = (2 * cfg.num_layers * _ROWS.value * (PROMPT + _NEW.value) * cfg.num_kv_heads
           * cfg.head_dim * 4)  # k and v, float32
  infer.generate(model, [p[:8] for p in prompts[:2]], max_new_tokens=2)  # warm-up
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  start = time.perf_counter()
  infer.generate(model, prompts, max_new_tokens=_NEW.value)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  emit(what="generate memory", date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
       processor=common.processor(), rows=_ROWS.value, prompt=PROMPT,
       new_tokens=_NEW.value, cache_mib=cache / 2**20,
       added_peak_mib=(peak - before) / 2**20, caches=(peak - before) / cache,
       seconds=seconds)


if __name__ == "__main__":
  run(main)
