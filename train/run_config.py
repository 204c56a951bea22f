"""A run's own config, `<workdir>/config.json`: written by `train` and `import-hf`,
read back by `generate`, `export-hf`, `infer.load` and resumes; and which changes
of a resumed run's config change its training trajectory (`trajectory_changes`).

The file holds every field of the config the run was started with, as JSON. Read
back on its own it is a complete config; laid over the current defaults
(`experiments/saved.py` passes experiments/base.py) it also gets fields this
version added since, and placeholders keep their declared types for command-line
overrides.

A run stays usable when its directory is moved or copied: a tokenizer file inside
the run directory (what `import-hf` copies there) is written as a path relative
to it, and read back joined to wherever the run is now; any other relative
tokenizer path is written absolute. Training keeps a copy of a tokenizer from
outside the run as `<workdir>/tokenizer.json` (`keep_tokenizer`), which `read`
gives when the recorded file has since moved or been deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ml_collections import ConfigDict

from sharding import ConfigError, flag
from train.tokenizer import copy_extras, tokenizer_file

FILE = "config.json"


def path(workdir: str) -> str:
  return os.path.join(workdir, FILE)


def write(workdir: str, config: ConfigDict | dict, home: str | None = None) -> None:
  """Writes the config as `<workdir>/config.json` (atomically: a crash leaves the old
  file or the new one, never half of one), a tokenizer inside the run directory
  as a path relative to it. `home`: the run directory the file will be moved
  into, when `workdir` is a staging directory (`train.staged`)."""
  data = json.loads(config.to_json()) if isinstance(config, ConfigDict) else config
  os.makedirs(workdir, exist_ok=True)
  tokenizer = tokenizer_file((data.get("data") or {}).get("tokenizer"))
  if tokenizer:
    full = os.path.abspath(tokenizer)
    inside = os.path.relpath(full, os.path.abspath(home or workdir))
    data = {**data, "data": {**data["data"], "tokenizer": (
        full if inside.startswith(os.pardir) else inside)}}
  write_atomically(path(workdir), json.dumps(data, indent=2))


def saved_config_flag(workdir: str) -> str:
  """`--config=<path of experiments/saved.py>:<workdir>`, the flag that trains or
  serves a run with its own config, with the path as seen from the current
  directory (relative inside the repository, absolute outside it)."""
  import importlib.util
  spec = importlib.util.find_spec("experiments")  # located, not imported
  path = "experiments/saved.py"
  if spec is not None and spec.submodule_search_locations:
    full = os.path.join(list(spec.submodule_search_locations)[0], "saved.py")
    inside = os.path.relpath(full)
    path = full if inside.startswith(os.pardir) else inside
  return flag("config", f"{path}:{workdir}")


def keep_tokenizer(workdir: str, tokenizer: str | None) -> None:
  """Copies the tokenizer file a run trains with into the run as tokenizer.json
  (atomically) when it lies outside it, with the files transformers reads beside
  it (`TOKENIZER_EXTRAS`: special tokens, chat template), so generate and
  export-hf still find them after the original moves (`read`). No-op for byte
  and token-id runs."""
  given = tokenizer_file(tokenizer)
  if not given:
    return
  full = os.path.abspath(given)
  here = os.path.join(os.path.abspath(workdir), "tokenizer.json")
  if full != here and os.path.isfile(full):
    shutil.copyfile(full, here + ".tmp")
    os.replace(here + ".tmp", here)
    copy_extras(os.path.dirname(full), os.path.dirname(here))


def write_atomically(file: str, text: str) -> None:
  """Writes `text` to a temporary file moved over `file`, so a crash leaves the
  old file or the new one, never half of one. An OSError names `file`."""
  try:
    with open(file + ".tmp", "w") as f:
      f.write(text)
    os.replace(file + ".tmp", file)
  except OSError as err:  # a failed write() names no file
    raise OSError(err.errno, err.strerror, file) from None


def read(workdir: str) -> dict[str, Any]:
  """The saved config as plain JSON data, its tokenizer path absolute (a relative
  one joined to `workdir`; a missing absolute one replaced by the run directory's
  own tokenizer.json, for runs saved before paths were relative and then moved).
  Raises FileNotFoundError if the run has none, and ConfigError naming the
  file if it is not a JSON object (an edit by hand gone wrong)."""
  file = path(workdir)
  with open(file) as f:
    try:
      data = json.load(f)
      why = None if isinstance(data, dict) else f"it holds a JSON {type(data).__name__}"
    except ValueError as err:  # JSONDecodeError, bad UTF-8
      why = str(err)
  if why:
    from train.checkpoint import checkpoint_dir  # (it imports this module)
    copy = os.path.join(checkpoint_dir(workdir), "STEP", "config", "metadata")
    raise ConfigError(
        "--workdir", f"{file}, the config the run was started with, is not a JSON "
        f"object ({why}).",
        "restore it: each checkpoint keeps the config it was saved with, as JSON, "
        f"in {copy}; copy the latest step's over it (or start a new --workdir).")
  tokenizer = tokenizer_file((data.get("data") or {}).get("tokenizer"))
  if tokenizer:
    here = os.path.join(os.path.abspath(workdir), "tokenizer.json")
    if not os.path.isabs(tokenizer):
      tokenizer = os.path.join(os.path.abspath(workdir), tokenizer)
    elif not os.path.exists(tokenizer) and os.path.isfile(here):
      tokenizer = here
    data["data"]["tokenizer"] = tokenizer
  return data


def overlay(config: ConfigDict, saved: dict) -> ConfigDict:
  """Writes `saved` values into `config`; lists become tuples where `config` has
  tuples, and the tables `mesh.rules` and `data.mixture` are replaced whole. Raises
  KeyError for a saved field `config` does not have."""
  for key, value in saved.items():
    if key not in config:
      raise KeyError(f"saved config has field {key!r}, which this version of rung "
                     "does not know")
    current = config[key]
    if isinstance(current, ConfigDict) and isinstance(value, dict):
      if key == "rules":  # a table, replaced whole
        config[key] = ConfigDict({k: tuple(v) for k, v in value.items()})
      elif key == "mixture":  # named entries, replaced whole
        config[key] = ConfigDict(value)
      else:
        overlay(current, value)
    elif isinstance(current, tuple) and isinstance(value, list):
      config[key] = tuple(value)
    elif isinstance(current, float) and isinstance(value, int):
      config[key] = float(value)
    else:
      config[key] = value
  return config


def hf_model_in(workdir: str) -> str | None:
  """The architecture (or model_type) when `<workdir>/config.json` is a Hugging
  Face model's rather than a run's, else None."""
  try:
    with open(path(workdir)) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(data, dict) or "model" in data:
    return None
  names = data.get("architectures") or [data.get("model_type")]
  return str(names[0]) if names and names[0] else None


def hf_model_error(workdir: str, why: str, fix: str) -> ConfigError | None:
  """The ConfigError naming --workdir when it holds a Hugging Face model
  (`hf_model_in`): "<workdir> holds a Hugging Face model (<arch>), <why>"."""
  model = hf_model_in(workdir)
  return ConfigError("--workdir", f"{workdir} holds a Hugging Face model ({model}), "
                     f"{why}", fix) if model else None


def import_first(workdir: str) -> str:
  """The command that imports the HF model in `workdir` into a new run."""
  return f"python -m experiment import-hf {flag('hf_dir', workdir)} --workdir=runs/NAME"


def no_run(workdir: str, then: str = "--workdir=runs/NAME") -> ConfigError | None:
  """The ConfigError for a `workdir` without a run's config.json (or with a
  Hugging Face model's, whose fix imports it and passes `then`), else None."""
  hf_model = hf_model_error(workdir, "not a rung run.",
                            f"import it first: {import_first(workdir)}, then pass {then}.")
  if hf_model:
    return hf_model
  if os.path.isfile(path(workdir)):
    return None
  # a run's checkpoints directory, or one step of it: the run is above
  parent, name = os.path.split(os.path.abspath(workdir))
  run, step = ((parent, None) if name == "checkpoints" else
               (os.path.dirname(parent), name)
               if os.path.basename(parent) == "checkpoints" else (None, None))
  if run is None or not os.path.isfile(path(run)):
    return ConfigError("--workdir", f"{workdir} holds no run (it has no {FILE}).",
                       "pass the --workdir of a trained or imported run.")
  return ConfigError(
      "--workdir", f"{workdir} is " + (f"step {step} of the run in {run}" if step
                                        else f"the checkpoints of the run in {run}")
      + f", which holds its {FILE}.", f"pass {flag('workdir', run)}"
      + (f" (generate and export-hf read that step with --step={step})"
         if step and step.isdigit() else "") + ".")


def load(workdir: str, defaults: ConfigDict | None = None) -> ConfigDict:
  """The run's config as a locked ConfigDict (a misspelt field set on it is an
  error): laid over `defaults` when given, else as saved (lists as tuples).
  Raises ConfigError when `workdir` holds no run."""
  if error := no_run(workdir):
    raise error
  saved = read(workdir)  # the tokenizer path resolved
  if defaults is not None:
    return overlay(defaults, saved).lock()
  return ConfigDict(_tuples(saved)).lock()


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
  """{'group.field': value} of a config dict (as config.json holds it)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, dict) and key != "rules":  # mesh.rules: one table
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


ABSENT = "(absent)"
# Fields that change how training is run or watched, not the numbers it computes:
# resuming with a different value continues the same trajectory.
_SAME_TRAJECTORY_GROUPS = ("mesh.", "log.", "checkpoint.")
_SAME_TRAJECTORY_FIELDS = ("model.attention", "model.attention_block_q",
                           "model.attention_block_kv", "model.remat", "model.scan_layers",
                           "model.loss_chunks", "model.embed_lookup",
                           "train.eval_every", "train.eval_steps", "optim.offload",
                           "pipeline.schedule", "pipeline.repeats",
                           "data.prefetch_batches", "data.cache_dir", "data.stop_ids",
                           "data.bos_id")
# Groups of fields that a run reads only when a switch turns them on:
# {group prefix: (the switch field, whether it is on)}. The switch itself is
# always read, also where it sits inside its group.
_ACTIVE_WHEN = {
    "diloco.": ("mesh.diloco", lambda c: (c.get("mesh.diloco") or 1) > 1),
    "optim.compression.": ("optim.compression.method",
                           lambda c: c.get("optim.compression.method", "none") != "none"),
    "optim.galore_": ("optim.name", lambda c: c.get("optim.name") == "galore"),
    "optim.normuon_": ("optim.name", lambda c: c.get("optim.name") == "normuon"),
    # train.matrices.OPTIMIZERS, spelled here to keep this module free of jax
    "optim.matrices": ("optim.name",
                       lambda c: c.get("optim.name") in ("muon", "normuon", "galore")),
    "optim.compression.momentum_correction": (
        "optim.compression.method", lambda c: c.get("optim.compression.method") == "dgc"),
}


def in_use(field: str, flat: dict) -> bool:
  """Whether the run whose flattened config is `flat` reads `field` (e.g.
  'optim.galore_rank' only under GaLore): every switch over it is on."""
  return all(on(flat) for group, (switch, on) in _ACTIVE_WHEN.items()
             if field.startswith(group) and field != switch)
# The same mean gradient in a dense model; per-micro-batch MoE losses otherwise.
_SPLITS_OF_THE_BATCH = {"train.grad_accum_steps": "micro-batch",
                        "pipeline.microbatches": "pipeline microbatch"}


def _proportions(flat: dict) -> dict[str, int] | None:
  """{source: grain's integer proportion} of a flattened config's mixture; None
  without one (or with weights validation would refuse)."""
  from train.data import mixture_proportions  # train.data imports this module
  weights = {f.split(".")[2]: v for f, v in flat.items()
             if f.startswith("data.mixture.") and f.endswith(".weight")}
  if not weights or not all(isinstance(w, (int, float)) and w > 0
                            for w in weights.values()):
    return None
  names = sorted(weights)
  return dict(zip(names, mixture_proportions([weights[n] for n in names])))


def trajectory_changes(saved: dict, config: dict) -> list[tuple[str, Any, Any, str]]:
  """(field, saved value, new value, note) for every config field whose change makes
  a run resumed with `config` continue differently from the run saved with `saved`:
  model, data, optimizer, batch size, seed and other train fields. Not reported:
  mesh sizes and rules, log.*, checkpoint.*, the attention implementation and its
  tile sizes, remat, scanned or unrolled layers, loss chunks, the embedding lookup,
  evaluation settings, the pipeline schedule, the loader's read-ahead, where the
  token cache lives, generation's stop ids and export's bos id, and fields of
  a feature the resumed run has switched off (diloco.* without mesh.diloco > 1,
  optim.compression.* while its method is none, GaLore's and NorMuon's own
  fields under another optimizer): the switch is reported where it is a field
  (optim.name, the compression method), and DiLoCo's layout change on its own
  line. `train.steps` and
  `optim.decay_steps` are reported only when the schedule's length (decay_steps,
  or train.steps when it is unset) changes; `train.grad_accum_steps` and
  `pipeline.microbatches` only for MoE models (their losses are per micro-batch);
  mixture weights only when the proportions they make change (0.3 / 0.7 and
  0.6 / 1.4 mix alike).
  """
  old, new = flatten(saved), flatten(config)
  schedule = {"train.steps", "optim.decay_steps"}
  mix = _proportions(old)
  same_mix = mix is not None and mix == _proportions(new)
  changes = []
  for field in list(old) + [f for f in new if f not in old]:
    a, b = old.get(field, ABSENT), new.get(field, ABSENT)
    if (a == b or field.startswith(_SAME_TRAJECTORY_GROUPS)
        or field in _SAME_TRAJECTORY_FIELDS or field in schedule
        or same_mix and field.startswith("data.mixture.") and field.endswith(".weight")):
      continue
    if not in_use(field, new):  # the resumed run does not read it (a switch that
      continue                  # turned its feature off is reported on its own)
    note = ""
    if field in _SPLITS_OF_THE_BATCH:
      if (not (old.get("model.moe.num_experts") or new.get("model.moe.num_experts"))
          or {a, b} == {ABSENT, 1}):  # saved before the field existed: 1
        continue
      note = ("MoE load-balancing and router losses are computed per "
              f"{_SPLITS_OF_THE_BATCH[field]}")
    changes.append((field, a, b, note))
  length = lambda c: c.get("optim.decay_steps") or c.get("train.steps")  # noqa: E731
  if length(old) != length(new):
    decay = old.get("optim.decay_steps"), new.get("optim.decay_steps")
    if decay[0] != decay[1]:
      unset = [f"{when} train.steps={c.get('train.steps')} while it is unset"
               for when, c, d in (("saved:", old, decay[0]), ("now:", new, decay[1]))
               if not d]
      changes.append(("optim.decay_steps", *decay, "the learning-rate schedule's "
                      "length" + (f"; {', '.join(unset)}" if unset else "")))
    else:  # unset on both sides: train.steps is the length
      changes.append(("train.steps", old.get("train.steps"), new.get("train.steps"),
                      "the learning-rate schedule's length while optim.decay_steps is "
                      "unset"))
  return changes


def describe_trajectory_changes(step: int, changes: list) -> str:
  """The message a resume prints for `trajectory_changes` (empty when none)."""
  if not changes:
    return ""
  lines = [f"the config changes the training trajectory from step {step} on (saved "
           "with the checkpoint -> now):"]
  for field, a, b, note in changes:
    lines.append(f"  {field}: {a!r} -> {b!r}" + (f"  ({note})" if note else ""))
  lines.append("The run will not match an uninterrupted run of either config." + (
      " To extend a run on the same learning-rate curve, set optim.decay_steps to "
      "the whole run's length from the start."
      if any(f in ("train.steps", "optim.decay_steps") for f, *_ in changes) else ""))
  return "\n".join(lines)


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value
