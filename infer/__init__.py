"""Serving trained models: load a run onto any mesh, generate with a KV cache."""

from infer.generate import PastContextWarning, generate
from infer.decode import decode_step
from infer.kv_cache import CacheDoesNotFit, init_cache
from infer.load import load
from infer.sampling import SamplingArgumentError, check_sampling, sample
