"""Config fields a run does not read, given the rest of its config.

A field set on the command line that nothing reads under the rest of the config
(a DGC option under top-k compression, GaLore's rank under AdamW, a DiLoCo field
with one replica, a yarn parameter under default RoPE) changes nothing: an ablation
that sets it trains the baseline again. The launcher refuses such an override
before anything compiles (`unread_override`), as it refuses a launcher flag the
command does not read; `generate` also refuses what serving never reads
(`unread_by_serving`: the optimizer, the training length, remat, ...). Config
files may set such fields (a config's defaults cannot be told from choices);
only command-line overrides are checked.

Each rule below restates a condition in the code that reads the field (named in
its comment); `tests/test_unread.py` checks, for the optimizer, compression and
model rules, that changing the field under the rule's condition leaves the
update or the logits bit-identical and changes them where the field is read.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from sharding import AXES, ConfigError

_COMP = "optim.compression."
_ROPE = "model.rope_"


@dataclasses.dataclass(frozen=True)
class Rule:
  """`fields` are not read when `unread(config)`; `why` says what reads them and
  what this config has instead; `fix` is the flags that make them act (or a
  function of the config giving them)."""
  fields: tuple[str, ...]
  unread: Callable
  why: Callable[..., str]
  fix: str | Callable[..., str]


def _optimizers(*names: str) -> Callable:
  return lambda c: c.optim.name not in names


def _name_why(*names: str) -> Callable[..., str]:
  return lambda c: (f"only {' and '.join(names)} read it, and optim.name is "
                    f"{c.optim.name!r}")


def _method(c) -> str:
  return c.optim.compression.method


def _galore_fix(c) -> str:
  """optim.name=galore, with a rank that fits the model's matrices when
  optim.galore_rank does not (train.validate checks it)."""
  from train.validate import galore_rank_limit
  try:
    limit = galore_rank_limit(c)
  except ConfigError:  # optim.matrices names no matrix: validation says so
    limit = c.optim.galore_rank
  return "--config.optim.name=galore" + (
      f" --config.optim.galore_rank={limit}" if c.optim.galore_rank > limit else "")


def _file_source_fix(c) -> str:
  """A source that reads records with a text field (`train.data.source_fix`)."""
  from train.data import source_fix  # train.data imports the data libraries
  return source_fix(c, "jsonl") + " (or parquet, hf_disk)"


def _path_source_fix(c) -> str:
  """The source that reads data.path, by its name (`sources.source_of_path`); a
  text field given too asks for records that name one."""
  import os

  from train.data import source_fix
  from train.sources import TEXT_FIELD_SOURCES, source_of_path
  source = source_of_path(os.path.expanduser(c.data.path)) if c.data.path else "jsonl"
  if c.data.text_field != "text" and source not in TEXT_FIELD_SOURCES:
    return _file_source_fix(c)
  return source_fix(c, source)


def _sources(c) -> list[str]:
  """The sources a run reads: data.mixture's, else data.source."""
  if c.data.mixture:
    return [entry.get("source") for entry in c.data.mixture.values()]
  return [c.data.source]


def _can_skip(c, source: str) -> bool:
  """Whether `source` under this config can meet a bad record."""
  import types

  from train.sources import can_skip
  return can_skip(types.SimpleNamespace(source=source, tokenizer=c.data.tokenizer))


def _token_source_fix(c) -> str:
  """A source of token ids (`train.data.source_fix`)."""
  if c.data.mixture:
    return "add a source='tokens' entry to data.mixture in the config file"
  from train.data import source_fix
  return source_fix(c, "tokens")


RULES: tuple[Rule, ...] = (
    # train/compression.py: nothing runs with method=none.
    Rule(tuple(_COMP + f for f in ("density", "warmup_steps", "sample_fraction",
                                   "error_feedback")),
         lambda c: _method(c) == "none",
         lambda c: "it configures gradient compression, and "
                   "optim.compression.method is 'none'",
         f"--config.{_COMP}method=topk (or dgc)"),
    # compression.replica_step: local clip and momentum only under dgc.
    Rule(tuple(_COMP + f for f in ("momentum_correction", "local_clip",
                                   "momentum_masking")),
         lambda c: _method(c) != "dgc",
         lambda c: f"it is a DGC option, and optim.compression.method is "
                   f"{_method(c)!r}",
         f"--config.{_COMP}method=dgc (with --config.optim.name=sgd)"),
    Rule((_COMP + "momentum_masking",),
         lambda c: _method(c) == "dgc" and not c.optim.compression.momentum_correction,
         lambda c: "it masks the per-replica momentum that momentum_correction keeps, "
                   "and momentum_correction is false",
         f"--config.{_COMP}momentum_correction=true"),
    Rule((_COMP + "local_clip",),
         lambda c: _method(c) == "dgc" and not c.optim.clip_norm,
         lambda c: "it clips each replica at optim.clip_norm / sqrt(replicas), and "
                   "optim.clip_norm is 0",
         "--config.optim.clip_norm=1.0"),
    # make_optimizer skips global clipping under DGC, which clips per replica
    # only with local_clip.
    Rule(("optim.clip_norm",),
         lambda c: _method(c) == "dgc" and not c.optim.compression.local_clip,
         lambda c: "DGC replaces global clipping with its per-replica clip, and "
                   "optim.compression.local_clip is false",
         f"--config.{_COMP}local_clip=true"),
    # train/optimizer.py: which update reads which field.
    Rule(("optim.momentum",), _optimizers("sgd", "muon", "normuon"),
         _name_why("sgd", "muon", "normuon"), "--config.optim.name=sgd (or muon)"),
    # ... and Nesterov's look-ahead is a multiple of the momentum (optax.trace,
    # scale_by_muon): with momentum 0 it adds nothing.
    Rule(("optim.nesterov",),
         lambda c: c.optim.name not in ("sgd", "muon") or c.optim.momentum == 0,
         lambda c: (_name_why("sgd", "muon")(c) if c.optim.name not in ("sgd", "muon")
                    else "it looks ahead along the momentum, and optim.momentum is 0"),
         lambda c: ("--config.optim.name=sgd (or muon)"
                    if c.optim.name not in ("sgd", "muon")
                    else "--config.optim.momentum=0.9")),
    Rule(("optim.ns_steps",), _optimizers("muon", "normuon"),
         _name_why("muon", "normuon"), "--config.optim.name=muon (or normuon)"),
    Rule(("optim.muon_rms",), _optimizers("muon"), _name_why("muon"),
         "--config.optim.name=muon"),
    Rule(("optim.normuon_b2",), _optimizers("normuon"), _name_why("normuon"),
         "--config.optim.name=normuon"),
    Rule(("optim.galore_rank", "optim.galore_update_proj_gap",
          "optim.galore_projector", "optim.galore_scale"),
         _optimizers("galore"), _name_why("galore"), _galore_fix),
    Rule(("optim.b1", "optim.b2", "optim.eps"), lambda c: c.optim.name == "sgd",
         lambda c: "AdamW's update reads it (alone, or beside muon, normuon and "
                   "galore for the other parameters), and optim.name is 'sgd'",
         "--config.optim.name=adamw"),
    Rule(("optim.matrices",), _optimizers("muon", "normuon", "galore"),
         _name_why("muon", "normuon", "galore"), "--config.optim.name=muon"),
    # train/diloco.py: DiLoCo runs only over more than one replica.
    Rule(("diloco.sync_every", "diloco.outer_lr", "diloco.outer_momentum",
          "diloco.nesterov", "diloco.fragments", "diloco.overlap_steps",
          "diloco.outer_dtype"),
         lambda c: c.mesh.diloco == 1,
         lambda c: "it configures DiLoCo, and mesh.diloco is 1 (one replica)",
         "--config.mesh.diloco=2 (or more)"),
    Rule(("diloco.alpha",), lambda c: c.mesh.diloco == 1 or not c.diloco.overlap_steps,
         lambda c: "it weighs the local fragment of an overlapped exchange, and "
                   + ("mesh.diloco is 1 (one replica)" if c.mesh.diloco == 1 else
                      "diloco.overlap_steps is 0 (blocking)"),
         lambda c: "--config.diloco.overlap_steps=1" + (
             " --config.diloco.sync_every=2" if c.diloco.sync_every < 2 else "") + (
             " --config.mesh.diloco=2" if c.mesh.diloco == 1 else "")),
    # train/diloco.py (outer_step): Nesterov's look-ahead is a multiple of the
    # outer momentum.
    Rule(("diloco.nesterov",),
         lambda c: c.mesh.diloco != 1 and not c.diloco.outer_momentum,
         lambda c: "it looks ahead along the outer momentum, and "
                   "diloco.outer_momentum is 0",
         "--config.diloco.outer_momentum=0.9"),
    # model/pipeline.py (Pipeline.active). (repeats > 1 without the circular
    # schedule is refused by validation, whose fix is repeats=1.)
    Rule(("pipeline.schedule", "pipeline.repeats"),
         lambda c: c.mesh.stage == 1 and c.pipeline.microbatches == 1,
         lambda c: "it configures the pipeline, and mesh.stage and "
                   "pipeline.microbatches are 1",
         "--config.pipeline.microbatches=2 (which must divide each data-parallel "
         "replica's batch), or --config.mesh.stage=2"),
    # model/decoder.py (forward_and_loss): under 1F1B each microbatch's loss runs
    # inside the pipeline loop; only evaluation chunks the LM head then.
    Rule(("model.loss_chunks",),
         lambda c: c.pipeline.schedule == "1f1b" and not c.train.eval_every
         and (c.mesh.stage != 1 or c.pipeline.microbatches > 1),
         lambda c: "the 1F1B schedule computes each microbatch's loss inside the "
                   "pipeline (its microbatches are the chunks), and train.eval_every "
                   "is 0 (evaluation would chunk the LM head)",
         "--config.pipeline.schedule=gpipe, or --config.train.eval_every=100"),
    # model/moe.py: a dense model has no router.
    Rule(tuple(f"model.moe.{f}" for f in (
        "top_k", "every_k_layers", "capacity_factor", "shared_expert",
        "aux_loss_weight", "z_loss_weight", "dispatch", "renormalize")),
         lambda c: not c.model.moe.num_experts,
         lambda c: "it configures mixture-of-experts layers, and "
                   "model.moe.num_experts is 0 (dense)",
         "--config.model.moe.num_experts=8 (or another count)"),
    Rule(("model.moe.capacity_factor",),
         lambda c: c.model.moe.dispatch == "dropless",
         lambda c: "it sizes capacity dispatch, and model.moe.dispatch is 'dropless'",
         "--config.model.moe.dispatch=capacity"),
    # kernels.attention: the reference (XLA) attention has no tiles.
    Rule(("model.attention_block_q", "model.attention_block_kv"),
         lambda c: c.model.attention == "reference",
         lambda c: "model.attention is 'reference', which has no tiles",
         "--config.model.attention=flash"),
    # model/rotary.py (inv_frequencies, Rotary.scale) and train/hf.py (_rope_params).
    Rule((_ROPE + "factor",), lambda c: c.model.rope_type == "default",
         lambda c: "default RoPE has no scaling factor", "--config.model.rope_type=llama3 "
         "(or linear, yarn)"),
    Rule((_ROPE + "low_freq_factor", _ROPE + "high_freq_factor"),
         lambda c: c.model.rope_type != "llama3",
         lambda c: f"only rope_type=llama3 reads it, and model.rope_type is "
                   f"{c.model.rope_type!r}", "--config.model.rope_type=llama3"),
    Rule((_ROPE + "original_max_positions",),
         lambda c: c.model.rope_type not in ("llama3", "yarn"),
         lambda c: f"only rope_type=llama3 and yarn read it, and model.rope_type is "
                   f"{c.model.rope_type!r}", "--config.model.rope_type=llama3 (or yarn)"),
    Rule((_ROPE + "beta_fast", _ROPE + "beta_slow", _ROPE + "attention_factor"),
         lambda c: c.model.rope_type != "yarn",
         lambda c: f"only rope_type=yarn reads it, and model.rope_type is "
                   f"{c.model.rope_type!r}", "--config.model.rope_type=yarn"),
    # train/data.py (load): a mixture replaces the single source; synthetic reads
    # no files.
    Rule(("data.source", "data.path"), lambda c: bool(c.data.mixture),
         lambda c: f"data.mixture ({', '.join(sorted(c.data.mixture))}) replaces the "
                   "single source",
         "set data.mixture.<name>.source and .path in the config file instead"),
    Rule(("data.path", "data.text_field"),
         lambda c: not c.data.mixture and c.data.source == "synthetic",
         lambda c: "data.source is 'synthetic', which reads no files",
         _path_source_fix),
    # train/sources.py: text files are read whole, arrayrecord records are the
    # text, .bin files hold ids; only jsonl, parquet and hf_disk name a field.
    Rule(("data.text_field",),
         lambda c: not c.data.mixture and c.data.source in ("text", "arrayrecord",
                                                            "tokens"),
         lambda c: f"only jsonl, parquet and hf_disk records name a text field, and "
                   f"data.source is {c.data.source!r}",
         _file_source_fix),
    # train/sources.py (can_skip): text files and text records are documents
    # whole; only records with a text field and token-id records can be bad.
    Rule(("data.skip_bad_records",),
         lambda c: not any(_can_skip(c, s) for s in _sources(c)),
         lambda c: "only jsonl, parquet and hf_disk records and token-id records "
                   "(data.tokenizer=none) can be bad, and "
                   + ("no source of data.mixture has such records" if c.data.mixture
                      else f"data.source is {c.data.source!r}"),
         lambda c: ("add a jsonl, parquet or hf_disk entry to data.mixture in the "
                    "config file" if c.data.mixture else _file_source_fix(c))),
    # train/data.py (corpus) and train/tokenizer.py (TokenIds): only .bin files
    # and token-id records are ids of data.token_dtype.
    Rule(("data.token_dtype",),
         lambda c: c.data.tokenizer != "none" and "tokens" not in _sources(c),
         lambda c: "only source=tokens (.bin files) and data.tokenizer=none "
                   "(token-id records) read it, and "
                   + ("no source of data.mixture is 'tokens'" if c.data.mixture else
                      f"data.source is {c.data.source!r}")
                   + f" with data.tokenizer {c.data.tokenizer or 'byte'!r}",
         _token_source_fix),
    # train/loop.py: evaluation runs only every train.eval_every steps.
    Rule(("train.eval_steps",), lambda c: not c.train.eval_every,
         lambda c: "it sets how many batches each evaluation averages, and "
                   "train.eval_every is 0 (no evaluation)",
         "--config.train.eval_every=100"),
    # train/checkpoint.py: BestN ranks checkpoints by the eval loss saved with
    # them; without evaluation none has one (Orbax then only spares the first
    # keep_best checkpoints until there are more, as if keep were larger).
    Rule(("checkpoint.keep_best",), lambda c: not c.train.eval_every,
         lambda c: "it keeps the checkpoints of lowest eval loss, and "
                   "train.eval_every is 0 (no evaluation, so none has one)",
         "--config.train.eval_every=100"),
)


# What `generate` reads of a config (infer/load.py, infer/text.py): the model, the
# mesh it serves on, how checkpoints are read, the tokenizer and the stop ids;
# of the model, not what only training reads (remat, the loss's chunks and
# auxiliary weights, the unrolled training forward, initialisation).
SERVING = ("model.", "mesh.", "data.tokenizer", "data.eos_id", "data.stop_ids",
           "data.eos_stops")
SERVING_UNREAD = ("model.remat", "model.loss_chunks", "model.scan_layers",
                  "model.init_std", "model.moe.aux_loss_weight",
                  "model.moe.z_loss_weight")


# What `plan` sets itself in every candidate (aot/plan.py: candidate_meshes,
# _override): every mesh axis's size but DiLoCo's (the config's replica count is
# kept: DiLoCo changes the training algorithm, which a plan does not choose) and
# the remat policy.
PLAN_CHOOSES = (*(f"mesh.{a}" for a in AXES if a != "diloco"), "model.remat")


def _mixture_text_field(config, field: str) -> Rule | None:
  """The rule for `data.mixture.<name>.text_field` (RULES name fixed fields):
  unread, as data.text_field, where that entry's source names no text field."""
  from train.sources import TEXT_FIELD_SOURCES
  parts = field.split(".")
  if len(parts) != 4 or parts[:2] != ["data", "mixture"] or parts[3] != "text_field":
    return None
  entry = (config.data.mixture or {}).get(parts[2]) or {}
  source = entry.get("source")
  if source is None or source in TEXT_FIELD_SOURCES:
    return None
  return Rule((field,), lambda c: True,
              lambda c: "only jsonl, parquet and hf_disk records name a text field, "
                        f"and data.mixture.{parts[2]}.source is {source!r}",
              f"set data.mixture.{parts[2]}.source to one of those in the config file")


def _rule_for(config, field: str) -> Rule | None:
  """The first rule under which `config` does not read `field`, else None."""
  if rule := _mixture_text_field(config, field):
    return rule
  for rule in RULES:
    if field not in rule.fields:
      continue
    try:
      if rule.unread(config):
        return rule
    except (AttributeError, KeyError):  # a config without the group
      continue
  return None


def read(config, field: str) -> bool:
  """Whether a run of `config` reads `field` (validation checks only such fields,
  so a fix never asks for a value the run would not read)."""
  return _rule_for(config, field) is None


def _value(config, field: str):
  node = config
  try:
    for name in field.split("."):
      node = node[name]
  except (KeyError, AttributeError):
    return None
  return node


def unread_override(config, fields: Sequence[str]) -> ConfigError | None:
  """The error for the first of `fields` (dotted config paths set on the command
  line, e.g. "optim.compression.local_clip") that `config` does not read, else
  None. A field a rule names that this config does not have is skipped. A switch
  turned off (set to False) where nothing reads it asks for what the run does
  anyway, and is accepted: an ablation script may set every switch explicitly."""
  for field in fields:
    rule = _rule_for(config, field)
    if rule is not None and _value(config, field) is not False:
      fix = rule.fix(config) if callable(rule.fix) else rule.fix
      fix = f"pass {fix} for it to act" if fix.startswith("--") else fix
      return ConfigError(
          field, f"--config.{field} is set but this run never reads it: "
          f"{rule.why(config)}.", f"drop --config.{field}, or {fix}.")
  return None


def unread_by_planning(config, fields: Sequence[str]) -> ConfigError | None:
  """`unread_override` for `plan`, which chooses `PLAN_CHOOSES` itself: an
  override of a mesh size or of model.remat there changes nothing it compiles."""
  for field in fields:
    if field in PLAN_CHOOSES:
      return ConfigError(
          field, f"--config.{field} is set but plan never reads it: plan compiles "
          "every mesh (keeping the config's mesh.diloco replicas) under every "
          "remat policy itself.",
          f"drop --config.{field}; --plan_remats limits the remat policies, and "
          f"`compile --config.{field}=...` compiles that one plan.")
  return unread_override(config, fields)


def unread_by_serving(config, fields: Sequence[str]) -> ConfigError | None:
  """`unread_override` for `generate`, which reads only `SERVING` (less
  `SERVING_UNREAD`): an override of anything else (the optimizer, the training
  length, remat) changes nothing it computes."""
  for field in fields:
    served = any(field == s or s.endswith(".") and field.startswith(s)
                 for s in SERVING)
    if not served or field in SERVING_UNREAD:
      return ConfigError(
          field, f"--config.{field} is set but generate never reads it: it reads "
          "the model's architecture, the mesh, data.tokenizer and the stop ids "
          "(data.eos_id, data.stop_ids, data.eos_stops), not what only training reads.",
          f"drop --config.{field} (`train` reads it)" + (
              "; generate reads one saved step: the latest, or --step=N"
              if field.startswith("checkpoint.") else "") + ".")
  err = unread_override(config, fields)
  if err is not None and "model.moe.num_experts" in err.fix:
    # a served checkpoint keeps its experts: that fix could not load it
    return ConfigError(err.field, err.problem,
                       f"drop --config.{err.field} (the run's model has no experts).")
  return err
