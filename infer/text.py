"""Text in, text out: what `python -m experiment generate` runs. One prompt
streams its continuation (`generate_text`); a file of prompts is generated in
batches into JSON lines (`generate_file`). Both make every check before the
weights are read (`_prepare`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import sys
import time
import warnings
from typing import Callable, Sequence, TextIO

import jax
import numpy as np
from tqdm.auto import tqdm

import kernels
import sharding
from sharding.report import count
from infer.generate import PastContextWarning, check_batch, generate
from infer.kv_cache import CacheDoesNotFit, mesh_of
from infer.load import load
from infer.sampling import check_sampling, is_greedy
from train import output_path, run_config
from train.checkpoint import Checkpointer
from train.hf import stop_tokens
from train.stop_signal import StopOnSignal
from train.tokenizer import make_tokenizer

CONTEXT_IDS = 4  # prompt ids decoded with a continuation (`continuation`)


class _Printer:
  """Prints the prompt, then the continuation as ids arrive, holding back an
  incomplete character; a stop id ends the row unprinted. The continuation is
  the text the new ids add to the prompt (`continuation`). The prompt waits for
  the first id (or `close`), so an error before decoding (a cache that does not
  fit) prints nothing to `out`."""

  def __init__(self, tokenizer, out: TextIO, prompt: str, prompt_ids, stops):
    self.tokenizer, self.out, self.prompt = tokenizer, out, prompt
    self.context = [int(i) for i in prompt_ids[-CONTEXT_IDS:]]
    self.stops = set(stops)
    self.ids: list[int] = []
    self.printed = 0
    self.arrived = 0  # new ids so far
    self.first = self.last = 0.0  # when the first and the latest arrived (seconds)

  def text(self) -> str:
    """The continuation so far."""
    return continuation(self.tokenizer, self.context, self.ids)

  def close(self) -> None:
    self.out.write(self.prompt + self.text()[self.printed:] + "\n")
    self.prompt = ""

  def rate(self) -> str:
    """How many ids arrived, and the decode speed after the first (whose time
    holds the prefill and the compilations)."""
    n = self.arrived
    if n < 2:
      return count(n, "new token")
    return (f"{count(n, 'new token')}, {(n - 1) / (self.last - self.first):.1f}"
            " tokens/s after the first (prefill and compilation excluded)")

  def __call__(self, column) -> None:
    self.last = time.perf_counter()
    self.first = self.first if self.arrived else self.last
    self.arrived += 1
    self.out.write(self.prompt)
    self.prompt = ""
    if column[0] >= 0 and column[0] not in self.stops:
      self.ids.append(int(column[0]))
    text = self.text()
    if text.endswith("\ufffd"):
      text = text[:-1]
    self.out.write(text[self.printed:])
    self.out.flush()
    self.printed = len(text)


def continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
  """The text `new_ids` add after a prompt: decoded together with the prompt's
  last `CONTEXT_IDS` ids, so a tokenizer that spaces words by their neighbours
  (SentencePiece's leading space, a tokenizer.json without a decoder) spaces them
  as the whole text would, where the new ids alone lose the space."""
  context = [int(i) for i in prompt_ids[-CONTEXT_IDS:]]
  base, full = tokenizer.decode(context), tokenizer.decode(context + list(new_ids))
  return full[len(base):] if full.startswith(base) else tokenizer.decode(list(new_ids))


def _note(text: str) -> None:
  """Writes to stderr on process 0 (every process runs generate)."""
  if jax.process_index() == 0:
    sys.stderr.write(text)


def _prepare(workdir: str, config, prompts: Sequence[str], where: Callable[[int], str],
             flag: str, max_new_tokens: int, step: int | None):
  """What generating text from `prompts` needs, every check made before the
  weights are read: (model, tokenizer, prompt ids, stop ids). `where(i)` names
  prompt i in errors ("the prompt", "line 3 of prompts.txt"); `flag` is the
  command-line flag that gave the prompts. Prints the run, step and mesh, and
  warnings, to stderr (on process 0)."""
  wanted = config or run_config.load(workdir)
  if wanted.data.tokenizer == "none":
    raise sharding.ConfigError(
        "data.tokenizer", "data.tokenizer=none reads token ids, so it cannot encode "
        f"a text {flag}.", "pass the tokenizer that made the ids, "
        "--config.data.tokenizer=PATH/tokenizer.json (or give ids to infer.generate "
        "from Python).")
  tokenizer = make_tokenizer(wanted.data, require_eos=False)
  ids = [[int(i) for i in tokenizer.encode(p)] for p in prompts]
  for i, row in enumerate(ids):
    if not row:
      raise sharding.ConfigError(flag, f"{where(i)} encodes to no tokens.",
                                 f"give {where(i)} some text.")
  stops = stop_tokens(wanted.data, tokenizer)
  vocab = wanted.model.vocab_size
  bad = [t for t in stops if not 0 <= t < vocab]
  if bad:  # name the field that holds it: eos_id (or the tokenizer's), or stop_ids
    eos_bad = bool(stops) and stops[0] == bad[0] and bad[0] not in (
        wanted.data.get("stop_ids") or ())
    field = "data.eos_id" if eos_bad else "data.stop_ids"
    holder = ("data.eos_id" if wanted.data.get("eos_id") is not None
              else "the tokenizer's end-of-text id") if eos_bad else "data.stop_ids"
    raise sharding.ConfigError(
        field, f"the stop id {bad[0]} ({holder}) falls outside the model's vocabulary "
        f"[0, {vocab}).", f"pass an id of this model's vocabulary, e.g. "
        f"--config.{field}={'0' if eos_bad else '()'}")
  for i, row in enumerate(ids):
    if max(row) >= vocab:
      size = getattr(tokenizer, "vocab_size", None)
      raise sharding.ConfigError(
          "data.tokenizer", f"{where(i)} encodes to id {max(row)}, past the model's "
          f"vocabulary of {vocab}" + (f": the tokenizer has {size} ids, more than the "
                                      "model has rows" if size and size > vocab else "")
          + ".", "pass prompts whose tokens fall inside the model's vocabulary, or the "
          "model's own tokenizer, --config.data.tokenizer=PATH/tokenizer.json.")
  step = _step_to_read(workdir, wanted, step)  # a config error before loading
  model, saved = load(workdir, step=step, config=config)
  if config is not None:  # another run's config of the same shapes loads silently
    changed = [(f, a, b) for f, a, b, _ in run_config.trajectory_changes(
        run_config.read(workdir), json.loads(config.to_json()))
        if f.startswith("model.")]
    if changed:
      _note(
          "note: the model config differs from the run's (saved -> now), so the "
          "outputs can differ from the trained model's: " + "; ".join(
              f"{f}: {a!r} -> {b!r}" for f, a, b in changed) + "\n")
  mesh = mesh_of(model)
  asked = config.model.attention if config is not None else None
  _note(f"generating from step {step} of {workdir}"
        + (f" on {sharding.describe(mesh)}" if mesh is not None else "")
        + (f"; attention {saved.model.attention}, as model.attention="
           f"{asked} {kernels.not_served_because(asked)}"
           if asked and asked != saved.model.attention else "")
        + "\n")
  if not stops:
    _note("no stop token (data.eos_id is unset and the tokenizer names no "
          "end-of-text token): generating all --max_new_tokens; "
          "--config.data.eos_id=ID stops at one.\n")
  context = saved.model.max_position_embeddings
  longest = max(range(len(ids)), key=lambda i: len(ids[i]))
  if len(ids[longest]) + max_new_tokens > context:
    _note(
        f"warning: {len(ids[longest])} prompt tokens"
        + (f" ({where(longest)})" if len(ids) > 1 else "")
        + f" + up to {max_new_tokens} new ones run past "
        f"the model's context of {context} positions (model.max_position_embeddings); "
        "tokens beyond it are positions the model was not made for.\n")
  return model, tokenizer, ids, stops


@contextlib.contextmanager
def _noted_past_context():
  """`generate`'s PastContextWarning silenced: `_prepare` noted it once, naming
  the prompt."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", PastContextWarning)
    yield


def _step_to_read(workdir: str, config, step: int | None) -> int:
  """The checkpoint step generation reads: `step`, or the run's latest (a
  ConfigError when there is none, or not that one)."""
  ckpt = Checkpointer(workdir, (config or run_config.load(workdir)).checkpoint,
                      read_only=True)
  try:
    return ckpt.step_to_read(step)
  finally:
    ckpt.close()


def _cache_error(err: CacheDoesNotFit, max_new_tokens: int, flag: str,
                 rows: int = 1, longest: str = "") -> sharding.ConfigError:
  """The ConfigError for a cache of `rows` prompts (a batch) plus `max_new_tokens`
  that does not fit, with the largest --max_new_tokens or --batch_size that
  does (the prompts as the cache holds them: padded to the batch's longest, and
  to a multiple of the devices `length` is split over). `longest` names the
  batch's longest prompt, for when it alone does not fit."""
  prompt = err.length - max_new_tokens  # positions the padded prompts take
  fixes = []
  if err.positions > prompt:
    fixes.append(f"pass --max_new_tokens={err.positions - prompt} or fewer")
  if rows > err.split and err.rows:  # fewer rows per device help
    fixes.append(f"pass --batch_size={err.rows} or less")
  elif rows > err.split and err.positions_alone > prompt:
    fixes.append(f"pass --batch_size=1 --max_new_tokens="
                 f"{err.positions_alone - prompt} (or fewer)")
  if not fixes and longest:
    fixes.append(f"{longest} alone ({count(prompt, 'position')} as the cache holds it) "
                 f"does not fit even one row per device; shorten it or leave it out "
                 f"of {flag}")
  elif not fixes:
    alone = "prompts alone do" if rows > 1 else f"{prompt}-position prompt alone does"
    fixes.append(f"the {alone} not fit even one row per device; pass a shorter {flag}")
  return sharding.ConfigError("--max_new_tokens", str(err), ", or ".join(fixes) + ".")


def generate_text(workdir: str, config, prompt: str, *, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, step: int | None = None,
                  out: TextIO = sys.stdout) -> str:
  """Loads the run's latest checkpoint (or `step`) with `config` (the run's saved
  config with any overrides: the mesh to serve on, attention impl...), streams the
  continuation of `prompt` to `out` (without the stop id that ends it, as
  transformers' streamer skips special tokens), and returns it. Sampling arguments
  (`infer.check_sampling`), the prompt's ids and the stop ids are checked before
  anything is loaded; a KV cache past the free memory is a ConfigError naming
  --max_new_tokens before it is allocated, and nothing is printed to `out`."""
  check_sampling(temperature, top_k, top_p, max_new_tokens=max_new_tokens, seed=seed)
  model, tokenizer, (ids,), stops = _prepare(
      workdir, config, [prompt], lambda i: "the prompt", "--prompt", max_new_tokens,
      step)
  if jax.process_index() != 0:  # every process computes; process 0 prints
    out = io.StringIO()
  printer = _Printer(tokenizer, out, prompt, ids, stops)
  together = _stop_together("token")
  tokens = iter(range(max_new_tokens))

  def on_token(column: np.ndarray) -> None:
    printer(column)
    if together is not None and together.reached(next(tokens)):
      raise KeyboardInterrupt("stopped together")
  try:  # the printer keeps the new ids
    with _noted_past_context():
      generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature,
               top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stops,
               on_token=on_token)
  except CacheDoesNotFit as err:
    raise _cache_error(err, max_new_tokens, "--prompt") from None
  finally:
    if together is not None:
      together.restore()
  printer.close()
  _note(printer.rate() + "\n")
  return printer.text()


def _stop_together(boundary: str) -> StopOnSignal | None:
  """In several processes, a signal to any one stops every process at the same
  `boundary` ("batch", "token"): one stopping alone left the others waiting in
  the next one's collectives. None in one process, where Ctrl-C is a
  KeyboardInterrupt at once."""
  return StopOnSignal(boundary, saving=False) if jax.process_count() > 1 else None


def prompts_name(path: str) -> str:
  """`path` as messages name it: `-` is standard input."""
  return "standard input" if path == "-" else path


def read_prompts(path: str) -> list[tuple[int, str]]:
  """(line number, prompt) for each prompt in `path`: in a `.jsonl` file each
  non-blank line is a JSON string or an object with a "prompt" string; in any
  other file each non-blank line is one prompt (its newline dropped); `-` reads
  standard input so (one process only: each has its own). A line that is
  neither, or a file with none, is a ConfigError naming --prompts and the line."""
  if path == "-" and jax.process_count() > 1:
    raise sharding.ConfigError(
        "--prompts", "--prompts=- reads standard input, and each of the "
        f"{jax.process_count()} processes has its own.", "write the prompts to a file "
        "every process can read and pass --prompts=FILE.")
  name = prompts_name(path)
  try:
    # utf-8-sig: a leading byte-order mark (Windows editors write one) is not text
    if path == "-":  # as bytes, so newlines split as in a file
      text = (sys.stdin.buffer.read().decode("utf-8-sig")
              if hasattr(sys.stdin, "buffer") else sys.stdin.read().removeprefix("\ufeff"))
    else:
      with open(os.path.expanduser(path), encoding="utf-8-sig", newline="") as f:
        text = f.read()
    # lines end at \n (or \r\n) only: a form feed or U+2028 inside a prompt
    # (valid in JSON text) does not split it
    lines = [line.removesuffix("\r") for line in text.split("\n")]
  except (OSError, UnicodeDecodeError) as err:
    raise sharding.ConfigError("--prompts", f"cannot read {name}: {err}.",
                               "pass a UTF-8 text or JSONL file of prompts.") from None
  prompts = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if path.endswith(".jsonl"):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        raise sharding.ConfigError("--prompts", f"line {n} of {name} is not JSON "
                                   f"({err.msg}).", 'write one JSON object per line, '
                                   'e.g. {"prompt": "def main("}.') from None
      text = record.get("prompt") if isinstance(record, dict) else record
      if not isinstance(text, str):
        raise sharding.ConfigError(
            "--prompts", f"line {n} of {name} holds no \"prompt\" string: {line[:80]}",
            'write {"prompt": "..."} or a JSON string on each line.')
      line = text
    prompts.append((n, line))
  if not prompts:
    raise sharding.ConfigError("--prompts", f"{name} holds no prompts.",
                               "write one prompt per line.")
  return prompts


def _check_writable(output: str) -> None:
  """ConfigError naming --output_jsonl when `output` cannot be written (a
  directory without write permission, an immutable or read-only one): found
  before the model loads, not after the first batch. A new file is created and
  removed again, so a refused run leaves none (`train.output_path`)."""
  why = output_path.problem(output, "file")
  if why:
    raise sharding.ConfigError(
        "--output_jsonl", f"{why}.",
        "pass a path in a directory you can write, or leave --output_jsonl out to "
        "print the records.")


def settings_path(output: str) -> str:
  """Where `generate_file` keeps what decided `output`'s completions besides the
  prompts (`_settings`), for `resume` to check: `<output>.settings.json`."""
  return output + ".settings.json"


def _settings(step: int, rows: int, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, seed: int) -> dict:
  """The flags, by name, that can decide a file's completions, and the
  checkpoint step (`_decisive` says which do)."""
  return dict(step=step, max_new_tokens=max_new_tokens, temperature=float(temperature),
              top_k=top_k, top_p=top_p, seed=seed, batch_size=rows)


def _decisive(settings: dict) -> list[str]:
  """The `_settings` that decide the completions: greedy ones depend on the step
  and --max_new_tokens alone; sampled ones on all (batch b draws from
  SeedSequence([seed, b]))."""
  if is_greedy(settings.get("temperature"), settings.get("top_k"),
               settings.get("top_p")):
    return ["step", "max_new_tokens"]
  return list(settings)


def _check_settings(output: str, now: dict) -> bool:
  """ConfigError naming --resume_output when `output`'s settings file holds other
  settings than `now`, with the flags that continue it; False when it has none
  (a file from before settings were kept, or one that was moved alone)."""
  path = settings_path(output)
  if not os.path.exists(path):
    return False
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as err:
    raise sharding.ConfigError(
        "--resume_output", f"{path}, the settings {output} was written with, cannot "
        f"be read ({err}).", f"delete {shlex.quote(path)} to continue {output} "
        "unchecked, or pass a new --output_jsonl.") from None
  wanted = _decisive(saved)  # a greedy file resumed sampled: what made it greedy too
  if len(wanted) < len(_decisive(now)):
    wanted += ["temperature", "top_k", "top_p"]
  differ = [k for k in wanted if saved.get(k) != now.get(k)]
  if not differ:
    return True

  def flags(values: dict) -> str:
    return " ".join(sharding.flag(k, values[k]) if values.get(k) is not None
                    else f"no --{k}" for k in differ)
  keep = [sharding.flag(k, saved[k]) for k in differ if saved.get(k) is not None]
  drop = [f"--{k}" for k in differ if saved.get(k) is None]
  back = " and ".join(([f"pass {' '.join(keep)}"] if keep else [])
                      + ([f"drop {' '.join(drop)}"] if drop else []))
  raise sharding.ConfigError(
      "--resume_output", f"{output} was written with {flags(saved)} ({path}), and "
      f"this run has {flags(now)}: its completions would not continue the file's.",
      f"{back} to continue it, or pass a new --output_jsonl.")


def _finished(output: str, lines: list[tuple[int, str]]) -> list[tuple[dict, int]]:
  """(record, the byte where its line ends) of each line of `output` (an earlier
  run's JSON lines), the completions of the first prompts of `lines` in order; a
  last line cut short by an interruption is dropped. Raises ConfigError when a
  record is not the prompt at its place."""
  with open(output, encoding="utf-8", newline="") as f:
    text = f.read()
  records, end = [], 0
  for k, line in enumerate(text.split("\n")[:text.count("\n")]):  # whole lines
    try:
      record = json.loads(line)
      matches = (isinstance(record, dict) and k < len(lines)
                 and [record.get("line"), record.get("prompt")] == list(lines[k]))
    except json.JSONDecodeError:
      matches = False
    if not matches:
      raise sharding.ConfigError(
          "--output_jsonl", f"line {k + 1} of {output} is not the completion of "
          + (f"prompt {k + 1} (line {lines[k][0]}) of --prompts" if k < len(lines)
             else f"any prompt (--prompts holds {len(lines)})")
          + ", so it was not written for these prompts.",
          "pass a new --output_jsonl path (or the --prompts file it was written for).")
    end += len(line.encode("utf-8")) + 1
    records.append((record, end))
  return records


def prompt_bucket(length: int, longest: int, least: int = 16) -> int:
  """The prompt positions a batch whose longest prompt has `length` tokens is
  padded to, in a file whose longest has `longest`: the next power of two, at
  least `least` and at most `longest`. A decode step reads the whole cache, so
  padding every batch to the file's longest line made a trial's 41 short prompts
  18x slower (6.3 s -> 113.8 s once one 8,000-character line joined them);
  powers of two compile at most log2(longest) programs."""
  return min(longest, max(least, 1 << (length - 1).bit_length()))


def generate_file(workdir: str, config, prompts_path: str, *,
                  output: str | None = None, batch_size: int = 8,
                  max_new_tokens: int = 256, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  step: int | None = None, progress: bool = True,
                  resume: bool = False, out: TextIO = sys.stdout) -> list[dict]:
  """Continues every prompt of `prompts_path` (`read_prompts`), `batch_size` at a
  time, and writes one JSON line per prompt, in the file's order, to `output`
  (a new file; else `out`): {"line": its line in the prompts file, "prompt",
  "completion" (without the stop id that ends it), "new_tokens" (ids generated,
  the stop id included), "stopped" (whether a stop id ended it, not
  --max_new_tokens)}. Returns the records. Lines are written as each batch
  finishes, so an interrupted run keeps the finished ones.

  Every batch is padded to `batch_size` rows and its prompts to a length bucket
  (`prompt_bucket`), so a few programs serve them all and batches of short
  prompts do not pay for the file's longest. The cache of the largest bucket is
  checked before the first batch. Batch b samples with the seed
  `SeedSequence([seed, b])` draws (greedy decoding ignores it), so rows of
  different batches do not share random draws. Checks as `generate_text`; an
  `output` that exists is refused (nothing is overwritten), and none is created
  before the first batch has finished.

  `resume`: an `output` an interrupted run left is continued instead. Its
  records must be this file's first prompts, in order (else ConfigError); whole
  batches of `batch_size` are kept and the rest generated, from the batch after
  them, so the file ends as an uninterrupted run's would. What decides the
  completions besides the prompts (`_settings`: the checkpoint step,
  `max_new_tokens`, and for sampling `top_k`, `top_p`, `seed` and `batch_size`)
  is written next to `output` (`settings_path`) with its first batch; a resume
  with other settings is a ConfigError naming the flags that continue it.
  Process 0 reads it and tells the others."""
  check_sampling(temperature, top_k, top_p, max_new_tokens=max_new_tokens, seed=seed)
  if batch_size < 1:
    raise sharding.ConfigError("--batch_size", f"is {batch_size}; it is how many "
                               "prompts generate together.", "pass --batch_size=8.")
  output = None if output == "-" else output  # "-": standard output
  # a device or a pipe: written as it comes, no settings file, nothing to resume
  stream = bool(output) and output_path.is_stream(output)
  if stream and resume:
    raise sharding.ConfigError(
        "--resume_output", f"{output} is a device or a pipe, so no interrupted run "
        "left anything there to continue.", "drop --resume_output, or pass the "
        "file an interrupted run wrote.")
  if output and os.path.isdir(output):
    raise sharding.ConfigError("--output_jsonl", f"{output} is a directory.",
                               "pass the path of a file, e.g. "
                               f"{shlex.quote(os.path.join(output, 'completions.jsonl'))}.")
  if output and os.path.exists(output) and not resume and not stream:
    raise sharding.ConfigError("--output_jsonl", f"{output} exists; nothing is "
                               "overwritten.", "pass a new path, delete it first, or "
                               "pass --resume_output to continue it.")
  parent = os.path.dirname(os.path.abspath(output)) if output else None
  if parent and not os.path.isdir(parent):
    raise sharding.ConfigError(
        "--output_jsonl", f"its directory {parent} does not exist.",
        f"create it first (mkdir -p {shlex.quote(parent)}), or pass a path in an "
        "existing directory.")
  lines = read_prompts(prompts_path)
  writer = jax.process_index() == 0  # every process computes; one writes
  if writer and output:
    _check_writable(output)
  rows = min(batch_size, len(lines))
  if output:
    step = _step_to_read(workdir, config, step)
    settings = _settings(step, rows, max_new_tokens, temperature, top_k, top_p, seed)
  finished, kept = [], 0  # [(record, where its line ends)], prompts kept
  if resume and output:
    refused = None
    if writer and os.path.exists(output):
      try:
        finished = _finished(output, lines)
        if not _check_settings(output, settings):
          _note(f"note: {settings_path(output)} is missing, so the settings "
                f"{output} was written with are not checked.\n")
      except sharding.ConfigError as err:
        refused = err
    # Whole batches only: batch b's seed is SeedSequence([seed, b]).
    kept = -1 if refused else len(finished) // rows * rows
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      kept = int(multihost_utils.broadcast_one_to_all(np.int64(kept)))
    if kept < 0:
      raise refused or sharding.ConfigError(
          "--output_jsonl", "process 0 refused to continue it (its error says why).",
          "see process 0's error.")
    finished = finished[:kept]
  texts = [t for _, t in lines]
  model, tokenizer, ids, stops = _prepare(
      workdir, config, texts, lambda i: f"line {lines[i][0]} of {prompts_name(prompts_path)}",
      "--prompts", max_new_tokens, step)
  longest = max(map(len, ids))
  buckets = [prompt_bucket(max(map(len, ids[start:start + rows])), longest)
             for start in range(0, len(ids), rows)]  # [batches]

  def too_large(err: CacheDoesNotFit, prompts: range) -> sharding.ConfigError:
    """The refusal of a batch of `prompts`, naming its longest line."""
    i = max(prompts, key=lambda i: len(ids[i]))
    return _cache_error(err, max_new_tokens, "--prompts", rows,
                        f"line {lines[i][0]} of {prompts_name(prompts_path)}")
  left = range(kept, len(ids))
  if left:  # the largest cache of the batches left, before the first runs
    i = max(left, key=lambda i: len(ids[i]))  # its bucket is the largest left
    try:
      check_batch(model, rows, buckets[i // rows], max_new_tokens)
    except CacheDoesNotFit as err:
      raise too_large(err, left) from None
  sink, records = None, [record for record, _ in finished]
  continued = resume and output and writer and os.path.exists(output)
  if continued:
    sys.stderr.write(f"continuing {output}: the first {kept} of "
                     f"{count(len(ids), 'prompt')} are kept\n")

  def open_output():
    """The file, opened at the first finished batch (a refused one writes
    nothing); a continued one cut after its kept lines."""
    if not output:
      return out
    if stream:
      return open(output, "w", encoding="utf-8")
    if not continued or not os.path.exists(settings_path(output)):
      with open(settings_path(output) + ".tmp", "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
      os.replace(settings_path(output) + ".tmp", settings_path(output))
    if not continued:
      return open(output, "x", encoding="utf-8")
    f = open(output, "r+", encoding="utf-8")
    f.truncate(finished[-1][1] if finished else 0)
    f.seek(0, os.SEEK_END)
    return f
  together = _stop_together("batch")
  try:
    bar = tqdm(total=len(ids), initial=kept, desc="generate", unit="prompt",
               disable=not progress or not writer, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 60)
    for b, start in enumerate(range(0, len(ids), rows)):
      if start < kept:
        continue
      if together is not None and together.reached(b):
        raise KeyboardInterrupt("stopped together")
      batch = ids[start:start + rows]
      batch_seed = int(np.random.SeedSequence([seed, b]).generate_state(1)[0])
      try:
        with _noted_past_context():
          new = generate(model, batch, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=batch_seed, stop_tokens=stops,
                         pad_to=(rows, buckets[b]))
      except CacheDoesNotFit as err:  # the free memory shrank since the check
        raise too_large(err, range(start, start + len(batch))) from None
      for i, (prompt_ids, new_ids) in enumerate(zip(batch, new)):
        stopped = bool(new_ids) and new_ids[-1] in stops
        shown = new_ids[:-1] if stopped else new_ids
        line, text = lines[start + i]
        record = dict(line=line, prompt=text,
                      completion=continuation(tokenizer, prompt_ids, shown),
                      new_tokens=len(new_ids), stopped=stopped)
        records.append(record)
      if writer:
        sink = sink or open_output()
        for record in records[start:]:
          sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()
      bar.update(len(batch))
    if writer and continued and sink is None:  # every batch was kept: drop a cut line
      sink = open_output()
    bar.close()
  except KeyboardInterrupt:
    if writer:
      sys.stderr.write(f"\ninterrupted after {len(records)} of {count(len(ids), 'prompt')}"
                       + (f"; {output} holds the finished ones (--resume_output "
                          "continues it)" if output and records and not stream
                          else "") + ".\n")
    raise
  finally:
    if together is not None:
      together.restore()
    if output and sink is not None:
      sink.close()
  if output and writer:
    sys.stderr.write(f"wrote {len(records) - kept} completions to {output}"
                     + (f" ({len(records)} in all)" if kept else "") + "\n")
  return records
