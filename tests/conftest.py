"""Every test process sees 8 CPU devices; set before jax is imported."""

import os
import re
import shlex
import sys

# Tests compile hundreds of tiny programs, where XLA:CPU's LLVM optimisation costs
# more than it saves: level 0 took test_hf + test_train_meshes + test_infer from
# 3m10s to 2m04s (same results; numerics do not depend on it). XLA:CPU's MLIR
# fusion emitters spent a quarter of a pipeline test's process time (perf) building
# an MLIR pipeline per fusion; its older LLVM emitters halve those compiles
# (4.1 -> 1.8 s, 4.8 -> 2.4 s) at the same step time. XLA:CPU also splits each
# program's LLVM module for parallel codegen, which only adds per-part overhead
# for programs this small while both cores run tests: one part took the user time
# of the pipeline-stage and optimizer tests from 149 to 132 s. Inherited by the
# CLI and multi-process tests' subprocesses.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_cpu_use_fusion_emitters=false"
                           " --xla_cpu_parallel_codegen_split_count=1").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Many tests compile the same small programs (in this process and in launcher
# subprocesses, which inherit the variables): share compiled executables.
# The process that makes the directory (pytest's, before xdist starts its workers)
# removes it at exit.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="rung-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"],
                  ignore_errors=True)
# Token caches (train/token_cache.py) go to a directory of the suite's own, removed
# the same way, not to the user's ~/.cache: the command line takes it from
# $XDG_CACHE_HOME, the library in this process from DEFAULT_CACHE_DIR (set below),
# notebook kernels from their own $HOME (test_notebooks).
if "RUNG_TEST_XDG_CACHE" not in os.environ:
  os.environ["RUNG_TEST_XDG_CACHE"] = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(
      prefix="rung-test-cache-")
  atexit.register(shutil.rmtree, os.environ["RUNG_TEST_XDG_CACHE"],
                  ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Both xdist workers (and notebook kernels) load libtpu for deviceless compiles.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

from experiment.host import one_blas_thread_per_cpu_device  # noqa: E402
from train import token_cache  # noqa: E402

one_blas_thread_per_cpu_device()  # before any LAPACK call; subprocesses inherit it

token_cache.DEFAULT_CACHE_DIR = os.path.join(os.environ["RUNG_TEST_XDG_CACHE"], "rung",
                                             "tokens")

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_config():
  """A GQA model small enough to compile in seconds, on the synthetic source."""
  from experiments import base
  c = base.get_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=8,
                 num_kv_heads=4, head_dim=8, d_ff=64)
  c.data.update(source="synthetic", seq_len=16)
  c.train.update(steps=3, batch_size=8, eval_every=0)
  c.optim.update(warmup_steps=1)
  c.log.update(every_steps=1, tensorboard=False, peak_flops=1e12)
  return c


def z_token_loss(logits, targets):
  """A token loss with a z-loss term, as `Decoder.loss` takes it: (loss, NLL)."""
  from train.step import cross_entropy
  nll, lse2 = cross_entropy(logits, targets)
  return nll + 0.1 * lse2, nll


def make_data_on(config, mesh_sizes=None):
  """train.data.make_data for `config` with the batch sharded as a training run on
  `mesh_sizes` (default data=8) would shard it."""
  import sharding
  from train.data import make_data
  from train.step import batch_sharding
  mesh = sharding.make_mesh({**dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                             **(mesh_sizes or {"data": 8})})
  return make_data(config, batch_sharding(mesh, sharding.normalize_rules(None),
                                          config.train.batch_size,
                                          config.data.seq_len))


def write_word_tokenizer(path, words) -> str:
  """A word-level tokenizer.json over `words` (id = position; the first should be
  the end-of-text token), whitespace pre-tokenized; returns its path."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                   unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))
  return str(path)


@pytest.fixture
def tiny_config():
  return make_tiny_config()


def run_cli(*args, timeout=300, unset=(), input=None):
  """Runs `python -m experiment ...` with 8 CPU devices (without the environment
  variables in `unset`, `input` on its standard input); returns
  CompletedProcess."""
  import subprocess
  env = {k: v for k, v in os.environ.items() if k not in unset}
  env["PYTHONPATH"] = REPO
  return subprocess.run([sys.executable, "-m", "experiment", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout,
                        input=input)


def run_cli_many(arg_lists, timeout=300):
  """`run_cli` for many command lines that end before any device work (config
  errors, help): one interpreter imports the launcher, a forked child runs each
  (tests/cli_fork.py) -> a CompletedProcess per command line."""
  import json
  import subprocess
  with tempfile.NamedTemporaryFile("w", suffix=".json") as cases:
    json.dump([list(a) for a in arg_lists], cases)
    cases.flush()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "cli_fork.py"),
                           cases.name], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return [subprocess.CompletedProcess(a, r["returncode"], r["stdout"], r["stderr"])
          for a, r in zip(arg_lists, json.loads(proc.stdout))]


# One --config override as a fix message writes it: a quoted, parenthesised or
# plain value (a plain one ends at a space, comma, semicolon or closing bracket).
_FIX_FLAG = re.compile(r"--config\.[\w.]+=(?:\"[^\"]*\"|'[^']*'|\([^)]*\)|[^\s,;)]+)")


def fix_alternatives(fix: str) -> list[list[str]]:
  """The `--config.*` flags of each alternative a ConfigError's fix offers ("set
  A, or B C.", "A (or B)"), as a shell would pass them; alternatives in words
  alone are left out."""
  out = []
  for part in re.split(r",? or |; | \(or ", fix):
    flags = [shlex.split(f.rstrip("."))[0] for f in _FIX_FLAG.findall(part)]
    if flags:
      out.append(flags)
  return out


def assert_fixes_validate(config, num_devices: int = 8):
  """`config` is refused with a ConfigError, and each alternative of its fix,
  parsed as the launcher parses --config overrides (ml_collections' config
  flags), gives a config that validates and reads every field the fix sets (the
  launcher refuses an override the run would not read): a fix the user follows
  works. Returns the error."""
  import copy

  import train
  from sharding import ConfigError
  with pytest.raises(ConfigError) as err:
    train.validate_config(copy.deepcopy(config), num_devices)
  for flags_given in fix_alternatives(err.value.fix):
    assert_followed_fix_validates(config, flags_given, num_devices, err.value)
  return err.value


def assert_followed_fix_validates(config, flags_given: list[str], num_devices: int,
                                  err, also_read: tuple[str, ...] = ()):
  """`config` with `flags_given` (one alternative of `err`'s fix) parsed as the
  launcher parses --config overrides (ml_collections' config flags) validates,
  and the run reads every field the flags set and `also_read`. Returns that
  config."""
  import copy

  from absl import flags
  from ml_collections import config_flags

  import train
  from sharding import ConfigError
  from train.unread import unread_override
  argv = ["rung", *flags_given]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", copy.deepcopy(config),
                                  flag_values=values, sys_argv=argv)
  values(argv)
  fields = [f.split("=")[0].removeprefix("--config.") for f in flags_given]
  try:
    train.validate_config(values.config, num_devices)
    refused = unread_override(values.config, [*also_read, *fields])
    if refused:
      raise refused
  except ConfigError as after:
    pytest.fail(f"the fix {' '.join(flags_given)} of\n  {err}\nleads to\n  {after}")
  return values.config


# Files whose tests take longest (multi-process runs, notebooks, subprocess CLIs,
# deviceless TPU compiles), longest first. They are collected first, so with
# `-n 2 --dist worksteal` the two workers end on short tests instead of one
# waiting for the other's last long one.
_LONGEST_FIRST = ("test_pipeline.py", "test_multihost.py", "test_preemption.py",
                  "test_notebooks.py",
                  "test_gpu_check.py", "test_plan.py", "test_diloco.py",
                  "test_kernels_training.py", "test_hf.py", "test_optimizers.py",
                  "test_compression.py", "test_kernels_backends.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
