"""Text in, streamed text out: what `python -m experiment generate` runs."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import sharding
from infer.generate import generate
from infer.kv_cache import CacheDoesNotFit, mesh_of
from infer.load import load
from infer.sampling import check_sampling
from train import run_config
from train.checkpoint import Checkpointer
from train.hf import stop_tokens
from train.tokenizer import make_tokenizer


class _Printer:
  """Prints the prompt, then the continuation as ids arrive, holding back an
  incomplete character; a stop id ends the row unprinted. The continuation is
  the text the new ids add to the prompt's last `CONTEXT` ids, decoded together:
  a tokenizer that spaces words by their neighbours (SentencePiece's leading
  space, a tokenizer.json without a decoder) spaces them as the whole text
  would, where the new ids alone lost the space. The prompt waits for the first
  id (or `close`), so an error before decoding (a cache that does not fit) prints
  nothing to `out`."""

  CONTEXT = 4

  def __init__(self, tokenizer, out: TextIO, prompt: str, prompt_ids, stops):
    self.tokenizer, self.out, self.prompt = tokenizer, out, prompt
    self.context = [int(i) for i in prompt_ids[-self.CONTEXT:]]
    self.base = tokenizer.decode(self.context)
    self.stops = set(stops)
    self.ids: list[int] = []
    self.printed = 0

  def text(self) -> str:
    """The continuation so far."""
    full = self.tokenizer.decode(self.context + self.ids)
    if full.startswith(self.base):
      return full[len(self.base):]
    return self.tokenizer.decode(self.ids)  # a decoder that rewrites the context

  def close(self) -> None:
    self.out.write(self.prompt + self.text()[self.printed:] + "\n")
    self.prompt = ""

  def __call__(self, column) -> None:
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
  wanted = config or run_config.load(workdir)
  if wanted.data.tokenizer == "none":
    raise sharding.ConfigError(
        "data.tokenizer", "data.tokenizer=none reads token ids, so it cannot encode "
        "a text --prompt.", "pass the tokenizer that made the ids, "
        "--config.data.tokenizer=PATH/tokenizer.json (or give ids to infer.generate "
        "from Python).")
  tokenizer = make_tokenizer(wanted.data, require_eos=False)
  ids = [int(i) for i in tokenizer.encode(prompt)]
  if not ids:
    raise sharding.ConfigError("--prompt", "the prompt encodes to no tokens.",
                               "pass a non-empty --prompt.")
  stops = stop_tokens(wanted.data, tokenizer)
  vocab = wanted.model.vocab_size
  bad = [t for t in stops if not 0 <= t < vocab]
  if bad:  # name the field that holds it: eos_id (or the tokenizer's), or stop_ids
    eos_bad = bool(stops) and stops[0] == bad[0] and bad[0] not in (
        wanted.data.get("stop_ids") or ())
    field = "data.eos_id" if eos_bad else "data.stop_ids"
    where = ("data.eos_id" if wanted.data.get("eos_id") is not None
             else "the tokenizer's end-of-text id") if eos_bad else "data.stop_ids"
    raise sharding.ConfigError(
        field, f"the stop id {bad[0]} ({where}) falls outside the model's vocabulary "
        f"[0, {vocab}).", f"pass an id of this model's vocabulary, e.g. "
        f"--config.{field}={'0' if eos_bad else '()'}")
  if max(ids) >= vocab:
    size = getattr(tokenizer, "vocab_size", None)
    raise sharding.ConfigError(
        "data.tokenizer", f"the prompt encodes to id {max(ids)}, past the model's "
        f"vocabulary of {vocab}" + (f": the tokenizer has {size} ids, more than the "
                                    "model has rows" if size and size > vocab else "")
        + ".", "pass a prompt whose tokens fall inside the model's vocabulary, or the "
        "model's own tokenizer, --config.data.tokenizer=PATH/tokenizer.json.")
  ckpt = Checkpointer(workdir, wanted.checkpoint, read_only=True)
  step = ckpt.step_to_read(step)  # a config error before anything is loaded
  ckpt.close()
  model, saved = load(workdir, step=step, config=config)
  if config is not None:  # another run's config of the same shapes loads silently
    changed = [(f, a, b) for f, a, b, _ in run_config.trajectory_changes(
        run_config.read(workdir), json.loads(config.to_json()))
        if f.startswith("model.")]
    if changed:
      sys.stderr.write(
          "note: the model config differs from the run's (saved -> now), so the "
          "outputs can differ from the trained model's: " + "; ".join(
              f"{f}: {a!r} -> {b!r}" for f, a, b in changed) + "\n")
  mesh = mesh_of(model)
  asked = config.model.attention if config is not None else None
  sys.stderr.write(f"generating from step {step} of {workdir}"
                   + (f" on {sharding.describe(mesh)}" if mesh is not None else "")
                   + (f"; attention {saved.model.attention}, as model.attention="
                      f"{asked} needs the length split over mesh.sequence"
                      if asked and asked != saved.model.attention else "")
                   + "\n")
  if not stops:
    sys.stderr.write("no stop token (data.eos_id is unset and the tokenizer names no "
                     "end-of-text token): generating all --max_new_tokens; "
                     "--config.data.eos_id=ID stops at one.\n")
  context = saved.model.max_position_embeddings
  if len(ids) + max_new_tokens > context:
    sys.stderr.write(
        f"warning: {len(ids)} prompt tokens + up to {max_new_tokens} new ones run past "
        f"the model's context of {context} positions (model.max_position_embeddings); "
        "tokens beyond it are positions the model was not made for.\n")
  printer = _Printer(tokenizer, out, prompt, ids, stops)
  try:  # the printer keeps the new ids
    generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature,
             top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stops,
             on_token=printer)
  except CacheDoesNotFit as err:
    fits = err.positions - len(ids)
    raise sharding.ConfigError(
        "--max_new_tokens", str(err),
        f"pass --max_new_tokens={fits} or fewer." if fits > 0 else
        f"the {len(ids)}-token prompt alone does not fit; pass a shorter --prompt."
    ) from None
  printer.close()
  return printer.text()
