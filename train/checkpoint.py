"""Checkpoints: Orbax CheckpointManager with async saves, restore onto any mesh.

A step directory holds three items:
  state   params, optimizer state and step (Orbax PyTree, tensorstore arrays),
  data    the grain iterator position of every process,
  config  the experiment config as JSON.
No pickle is written or read. Saves are asynchronous: `save` returns once arrays are
copied off the devices and the write finishes in the background. A step becomes
visible to `latest_step` only after Orbax commits it, so a crash mid-save leaves the
previous step as the latest.

Restores check the saved parameter shapes (checkpoint metadata, no array read)
against the target first: a different model is a ConfigError naming the parameter,
both shapes and the model fields that differ from the config saved with the step,
and nothing is half-loaded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging as std_logging
import os
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from model import ModelConfig
from sharding import ConfigError, flag, normalize_rules, path_name
from train import run_config
from train.state import TrainState, model_spec


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be read, or one that could not be
  written."""


def _as_dict(state: TrainState) -> dict[str, Any]:
  out = {"step": state.step, "params": state.params}
  if state.opt_state is not None:  # absent from import-hf's step 0
    out["opt_state"] = state.opt_state
  if state.compression is not None:  # absent without compression: same layout
    out["compression"] = state.compression
  if state.diloco is not None:
    out["diloco"] = state.diloco
  return out


def _restore_args(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=partial)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def prepare_workdir(workdir: str, make: bool = True) -> None:
  """Checks that `workdir` and its checkpoint directory are directories (or can
  be made) and that `workdir` holds no Hugging Face model; with `make`, makes
  `workdir` on process 0. Else a ConfigError naming --workdir. The loop and
  import-hf call it before reading any data (a file in either place failed only
  after tokenization, with a traceback); a writable
  `Checkpointer` checks too, since Orbax's asynchronous save into such a place
  hangs (its failing thread never signals the threads that wait for it; SIGTERM
  could not end it)."""
  for path in (workdir, checkpoint_dir(workdir)):
    if os.path.exists(path) and not os.path.isdir(path):
      raise ConfigError("--workdir", f"{path} is a file, not a directory.",
                        "pass another --workdir, or move the file out of the way.")
  hf_model = run_config.hf_model_error(  # a run's config.json would replace its
      workdir, "whose config.json a run there would overwrite.",
      "pass another --workdir; to train this model, import it first: "
      f"{run_config.import_first(workdir)}.")
  if hf_model:
    raise hf_model
  if make and jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as err:
      raise ConfigError("--workdir", f"cannot make {workdir}: {err.strerror}.",
                        "pass a directory this process can write to.") from None


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} of a tree of arrays, ShapeDtypeStructs or metadata."""
  return {path_name(path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


class _WithoutReadOnlyNotice(std_logging.Filter):
  """Orbax warns twice on every read-only manager it opens ("read_only=True,
  setting save_interval_steps=0", "Given directory is read only"), which is how
  loading for inference opens one: not news to the reader."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    return "read_only=True" not in message and "is read only=" not in message


class Checkpointer:
  """The checkpoints of one run directory."""

  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False):
    policies: list[pp.PreservationPolicy] = [pp.LatestN(max(ckpt_cfg.keep, 1))]
    if ckpt_cfg.keep_best:
      policies.append(pp.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True,
                               n=ckpt_cfg.keep_best,
                               keep_checkpoints_without_metrics=False))
    if not read_only:
      prepare_workdir(workdir, make=False)
    self.directory = checkpoint_dir(workdir)
    self.cfg = ckpt_cfg
    self.unreadable: list[tuple[int, str]] = []  # (step, why): `restore`'s fallback
    self._writing: int | None = None  # the step of a save not yet known finished
    quiet, absl_logger = _WithoutReadOnlyNotice(), std_logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
      options = ocp.CheckpointManagerOptions(
          enable_async_checkpointing=ckpt_cfg.async_save,
          preservation_policy=pp.AnyPreservationPolicy(policies),
          read_only=read_only, create=not read_only)
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=("state", "data", "config"),
          # Compression (zstd) halves save and restore speed here for ~8% less disk
          # on float weights (benchmarks/README.md, "Checkpoints"); off by default.
          item_handlers={"state": ocp.PyTreeCheckpointHandler(
                             use_compression=bool(ckpt_cfg.get("compress", False))),
                         "data": grain.checkpoint.CheckpointHandler(),
                         "config": ocp.JsonCheckpointHandler()})
    finally:
      absl_logger.removeFilter(quiet)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_to_read(self, step: int | None = None) -> int:
    """`step`, or the latest saved one when None, for reading parameters
    (generate, export-hf, inspect-style tools). ConfigError when there is no such
    step (a run stopped before its first save has a config.json and no step)."""
    steps = self.all_steps()
    if not steps:
      workdir = os.path.dirname(self.directory)
      why = "a run stopped before its first save"
      try:
        if run_config.read(workdir)["checkpoint"]["every_steps"] == 0:
          why = "it was trained with checkpoint.every_steps=0, which saves nothing"
      except (OSError, ValueError, KeyError, TypeError):
        pass
      raise ConfigError(
          "--workdir", f"{workdir} holds a run config but no saved checkpoint "
          f"({why}).",
          "train it with --config.checkpoint.every_steps above 0 (the end of the "
          "run then saves too), or pass the --workdir of a run with a checkpoint.")
    if step is None:
      return steps[-1]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      # "4" and True were "not a saved step (saved: 4, ...)"; 4.0 passed the
      # membership test and failed as an unreadable step
      raise ConfigError("--step", f"{step!r} is a {type(step).__name__}; a step is an "
                        f"integer (saved: {', '.join(map(str, steps))}).",
                        f"pass --step={steps[-1]} (the latest), or leave --step out.")
    if step not in steps:
      raise ConfigError("--step", f"{step} is not a saved step of this run "
                        f"(saved: {', '.join(map(str, steps))}).",
                        f"pass --step={steps[-1]} (the latest), or leave --step out.")
    return int(step)

  def save(self, state: TrainState, data_iter: Any, config_dict: dict, *,
           eval_loss: float | None = None, force: bool = False) -> bool:
    step = int(state.step)
    items = {"state": ocp.args.PyTreeSave(_as_dict(state)),
             "config": ocp.args.JsonSave(config_dict)}
    if data_iter is not None:  # e.g. a step-0 import has no data position yet
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    args = ocp.args.Composite(**items)
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    with self._reporting_failed_writes(step):
      saved = self._manager.save(step, args=args, metrics=metrics, force=force)
    self._writing = step
    return saved

  def wait(self) -> None:
    """Blocks until the asynchronous save in flight is committed. Raises
    CheckpointError when it failed (a full disk, a lost mount)."""
    with self._reporting_failed_writes(None):
      self._manager.wait_until_finished()
    self._writing = None

  @contextlib.contextmanager
  def _reporting_failed_writes(self, step: int | None):
    """Orbax's error for a save that failed (the asynchronous one in flight, which
    surfaces at the next save or wait, else `step`'s) -> CheckpointError naming the
    step, the directory, the last complete step and what to do. The failed step
    stays invisible: a step is listed only once Orbax commits it."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as err:  # noqa: BLE001 -- any failed write, reported whole
      try:
        steps = self.all_steps()
      except Exception:  # noqa: BLE001 -- the listing may fail for the same reason
        steps = []
      # the save in flight, unless Orbax committed it (then this call's own failed)
      failed = (self._writing if self._writing is not None and self._writing
                not in steps else step)
      self._writing = None
      steps = [s for s in steps if s != failed]
      intact = (f"step {steps[-1]}, the latest complete checkpoint, is intact and a "
                "resume reads it" if steps else "no complete checkpoint was saved")
      raise CheckpointError(
          f"saving step {failed} into {self.directory} failed: "
          f"{type(err).__name__}: {err}\n{intact}. Free space there (or fix the file "
          "system) and run again with the same --workdir (training resumes from "
          "that step).") from err

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def restore(self, target: TrainState | Callable[[int], TrainState],
              data_iter: Any | None = None, step: int | None = None, *,
              config: dict | None = None) -> TrainState:
    """Restores `step` (default: latest) into `target`'s shapes and shardings.

    `target` holds ShapeDtypeStructs with concrete NamedShardings of the current
    mesh, so a checkpoint written on any mesh lands on this one; it may be a
    function of the step (a step's saved layout, such as DiLoCo's replicas, can
    differ from another's). With `checkpoint.fallback`, an unreadable step falls
    back to the previous one, and `unreadable` lists what was skipped and why
    (`set_aside_unreadable` moves them out of the way). Step 0 is restored as
    its step and parameters alone (opt_state None): import-hf saves no more, and
    any other step 0's optimizer state is a fresh one. Parameters saved with
    other shapes are a ConfigError (`check_param_shapes`, naming the model fields
    in which `config` differs), raised before any read.
    """
    steps = self.all_steps() if step is None else [step]
    if not steps:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    candidates = steps[::-1] if self.cfg.fallback and step is None else steps[-1:]
    errors: list[tuple[int, str]] = []
    # A failed read may have set the data position before the arrays failed: each
    # try starts from the iterator as given (step 0 keeps it: it has none).
    start = data_iter.get_state() if data_iter is not None else None
    for s in candidates:
      if data_iter is not None:
        data_iter.set_state(start)
      t = target(s) if callable(target) else target
      self.check_param_shapes(t.params, s, config)  # a wrong model: no fallback
      if s == 0:  # its optimizer state (none, from import-hf) is a fresh one
        t = TrainState(step=t.step, params=t.params, opt_state=None)
      try:
        items = {"state": _restore_args(_as_dict(t), partial=s == 0)}
        data_dir = os.path.join(self.directory, str(s), "data")
        own = os.path.join(data_dir, f"process_{jax.process_index()}-of-"
                           f"{jax.process_count()}.json")
        if data_iter is not None and os.path.exists(own):
          items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        elif data_iter is not None and s:  # step 0 (an import) has no position
          _restore_iterator_from_other_process_count(data_iter, data_dir)
        restored = self._manager.restore(s, args=ocp.args.Composite(**items))
        self.unreadable = errors
        return TrainState(**{"opt_state": None, **restored.state})
      except Exception as err:  # any read failure: report or fall back
        errors.append((s, _reason(err)))
    hint = ("" if self.cfg.fallback else
            " Pass --config.checkpoint.fallback=true to resume from the step before.")
    raise CheckpointError(f"cannot read checkpoint in {self.directory}: "
                          + "; ".join(f"step {s}: {why}" for s, why in errors)
                          + f".{hint}")

  def set_aside_unreadable(self) -> list[str]:
    """Renames the steps a fallback restore could not read (`unreadable`) to
    `<step>.unreadable` (kept for inspection; Orbax ignores them), so the run
    saves those steps again when it reaches them (Orbax skips a step that
    exists) and they stop counting against `checkpoint.keep`. Process 0 renames;
    every process then reloads its step list. Returns the new paths."""
    moved = []
    for s, _ in self.unreadable:
      src = os.path.join(self.directory, str(s))
      dst, n = src + ".unreadable", 1
      while os.path.exists(dst):
        dst, n = f"{src}.unreadable{n}", n + 1
      moved.append(dst)
      if jax.process_index() == 0 and os.path.isdir(src):
        os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("rung: unreadable steps set aside")
    self._manager.reload()
    self.unreadable = []
    return moved

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def _step_config(self, step: int) -> dict | None:
    try:
      return dict(self.restore_config(step))
    except Exception:  # noqa: BLE001 -- an older or damaged step
      return None

  def saved_config(self, step: int) -> dict | None:
    """The config saved with `step`; if unreadable, the run's config.json (call it
    before a new run overwrites that); None when neither can be read."""
    stored = self._step_config(step)
    if stored is not None:
      return stored
    try:
      return run_config.read(os.path.dirname(self.directory))
    except (OSError, ValueError):
      return None

  def check_param_shapes(self, abstract_params: Any, step: int,
                         config: dict | None = None, *, serving: bool = False,
                         refusal: Callable[[dict[str, Any]], ConfigError | None]
                         | None = None) -> None:
    """Raises ConfigError if the parameters saved at `step` (read from metadata,
    no arrays) differ in shape or presence from `abstract_params`: the error names
    the first differing parameter, both shapes, and the model fields in which
    `config` (default: the run's config.json, which `infer.load` and `export_hf`
    build their model from) differs from the config saved with `step`; its fix
    is to resume with the saved model, or (`serving`: generate loads the step) to
    load it with the run's saved config. `refusal({field: saved value})`: the
    ConfigError the run would meet resuming with the saved model's fields (None
    where it would not); the fix then adds what that refusal asks. Metadata that
    cannot be read is left to the restore to report."""
    try:
      saved = self.param_shapes(step)
    except Exception:  # noqa: BLE001 -- unreadable: the restore reports (or falls back)
      return
    ours = leaf_shapes(abstract_params)
    bad = [n for n in sorted(set(saved) | set(ours)) if saved.get(n) != ours.get(n)]
    if not bad:
      return
    workdir = os.path.dirname(self.directory)
    if config is None:
      requested, desc = None, f"the run's {run_config.path(workdir)}"
      try:
        requested = run_config.read(workdir)
      except (OSError, ValueError):
        pass
    else:
      requested, desc = config, "this config"
    # Without `config`, config.json is the requested side: compare with the step's.
    stored = self.saved_config(step) if config is not None else self._step_config(step)
    name = bad[0]
    problem = (f"step {step} in {self.directory} cannot be restored: parameter "
               f"`{name}` has shape {saved.get(name, 'missing')} there but "
               f"{ours.get(name, 'missing')} in the model {desc} builds")
    more = len(bad) - 1
    problem += (f" ({more} more parameter{'s differ' if more > 1 else ' differs'})."
                if more else ".")
    diffs = []
    if stored is not None and requested is not None:
      a = run_config.flatten(stored.get("model", {}), "model.")
      b = run_config.flatten(requested.get("model", {}), "model.")
      diffs = [(f, a.get(f, run_config.ABSENT), b.get(f, run_config.ABSENT))
               for f in list(a) + [f for f in b if f not in a]
               if a.get(f, run_config.ABSENT) != b.get(f, run_config.ABSENT)]
    if diffs:
      shaping = [d for d in diffs if _changes_shapes(stored["model"], d, saved)]
      others = [d for d in diffs if d not in shaping]
      shaping = shaping or diffs  # only together do they change the shapes
      listed = lambda ds: ", ".join(f"{f} {x} -> {y}" for f, x, y in ds)  # noqa: E731
      problem += (" The model differs from the one saved with that step in "
                  f"{listed(shaping)}.")
      if others:
        problem += f" Also different (no shape change): {listed(others)}."
      saved_flags = " ".join(flag(f"config.{f}", x) for f, x, _ in shaping)
      if config is None:
        fix = (f"make {run_config.path(workdir)} say what step {step} was saved with "
               f"({saved_flags.replace('--config.', '')}), or load a step saved with "
               "this model.")
      elif serving:
        fix = (f"load it with the model it was saved with: drop --config (the run's "
               f"saved config is the default), or pass {saved_flags}.")
      else:
        refused = refusal({f: x for f, x, _ in shaping}) if refusal else None
        whole = run_config.saved_config_flag(workdir)
        fix = (f"resume with the saved model ({saved_flags}, or {whole}), or train "
               "this model in a new --workdir." if refused is None else
               f"resume with the saved model: {whole} (the run's saved config), or "
               f"{saved_flags} with what that model needs on this run's mesh "
               f"(`{refused.field}`: {refused.problem.rstrip('.')}. Fix: "
               f"{refused.fix.rstrip('.')}); or train this model in a new --workdir.")
      raise ConfigError(shaping[0][0], problem, fix)
    problem += (" The config saved with that step cannot be read to name the field."
                if stored is None or requested is None else
                " The saved config names no model field that differs.")
    raise ConfigError("model", problem, "use the model config the checkpoint was "
                      "saved with, or train this model in a new --workdir.")

  def param_shapes(self, step: int) -> dict:
    """{path: shape} of the saved parameters, from metadata (no array reads)."""
    meta = self._manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)["params"]
    return {path_name(path): tuple(m.shape)
            for path, m in jax.tree_util.tree_leaves_with_path(tree)}

  def compression_replicas(self, step: int) -> int | None:
    """The replica count of the compression buffers saved at `step` (from
    metadata), or None when it holds none."""
    return self._replicas(step, "compression")

  def diloco_replicas(self, step: int) -> int | None:
    """The DiLoCo replica count saved at `step` (from metadata), or None when
    it was saved without DiLoCo."""
    return self._replicas(step, "diloco", "replicas")

  def diloco_buffers(self, step: int) -> tuple[str, ...]:
    """The DiLoCo buffers saved at `step` (`diloco.state_names`), from metadata."""
    return tuple(self.state_metadata(step).get("diloco") or ())

  def state_metadata(self, step: int) -> dict:
    """The saved state's tree of metadata; {} when unreadable (`restore` then
    reports the damage, or falls back)."""
    try:
      meta = self._manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 -- any read failure: restore reports it
      return {}
    return getattr(meta, "tree", meta) or {}  # None: its metadata file is gone

  def _replicas(self, step: int, field: str, buffer: str | None = None
                ) -> int | None:
    tree = self.state_metadata(step).get(field)
    tree = tree[buffer] if tree and buffer else tree
    leaves = jax.tree.leaves(tree) if tree else []
    return int(leaves[0].shape[0]) if leaves else None

  def restore_params(self, abstract_params: Any, step: int, *,
                     config: dict | None = None, serving: bool = False,
                     other_step: Callable[[int], str] = "--step={}".format) -> Any:
    """Only the parameters (optimizer state is not read), after
    `check_param_shapes` (`config` defaults to the run's config.json). A step that
    cannot be read (missing or damaged files) is a CheckpointError naming it, the
    reason and, where one is saved, the step before it, as `other_step(step)`
    spells the way to read it (a flag)."""
    self.check_param_shapes(abstract_params, step, config, serving=serving)
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(state=args)
                                   ).state["params"]
    except Exception as err:  # noqa: BLE001 -- any read failure is reported alike
      raise self.unreadable_step(step, err, other_step) from None

  def unreadable_step(self, step: int, err: Exception,
                      other_step: Callable[[int], str]) -> CheckpointError:
    """The error for `step`'s failed read `err`: the step, the reason, and the
    step saved before it as `other_step` spells the way to read it."""
    before = [s for s in self.all_steps() if s < step]
    return CheckpointError(
        f"cannot read step {step} in {self.directory}: {_reason(err)}. "
        + (f"Read the step saved before it with {other_step(before[-1])}."
           if before else "No earlier step is saved."))


def _reason(err: Exception) -> str:
  """A failed read's reason on one line, without the TensorStore spec dump that
  follows it, at most about 300 characters."""
  why = " ".join(str(err).split(" See full TensorStore details")[0].split())
  why = why[:300] + " ..." if len(why) > 300 else why.rstrip(".")
  return f"{type(err).__name__}: {why}"


def _changes_shapes(stored_model: dict, diff: tuple[str, Any, Any],
                    saved_shapes: dict) -> bool:
  """Whether the model saved as `stored_model`, with only `diff`'s field set to its
  new value, has parameter shapes other than `saved_shapes` (abstractly built; a
  model that cannot be built counts as changed)."""
  field, _, value = diff
  model = copy.deepcopy(stored_model)
  *groups, name = field.split(".")[1:]
  node = model
  for g in groups:
    node = node.setdefault(g, {})
  node[name] = value
  try:
    spec = model_spec(ModelConfig.from_config(model), normalize_rules(None))
    return leaf_shapes(spec.abstract_params) != saved_shapes
  except Exception:  # noqa: BLE001 -- e.g. num_heads alone no longer divides
    return True


def _restore_iterator_from_other_process_count(data_iter, data_dir: str) -> None:
  """Resuming on a different number of processes: every process's iterator has
  consumed the same number of global batches (train/data.py), so any saved
  position is everyone's position. A step without one is an error (restoring
  the rest would read the data again from its first window)."""
  saved = sorted(f for f in os.listdir(data_dir)
                 if f.startswith("process_")) if os.path.isdir(data_dir) else []
  if not saved:
    raise FileNotFoundError(f"the step holds no data position ({data_dir} has no "
                            "process_*.json)")
  with open(os.path.join(data_dir, saved[0])) as f:
    data_iter.set_state(json.loads(f.read()))
  logging.info("data position from %s (saved by %d processes)", saved[0], len(saved))


def parse_init_from(spec: str) -> tuple[str, int | None]:
  """'DIR' or 'DIR:STEP' -> (DIR with `~` expanded, STEP or None for the
  latest)."""
  path, sep, step = spec.rpartition(":")
  if sep and step.isdigit():
    return os.path.expanduser(path), int(step)
  return os.path.expanduser(spec), None


def load_init_params(spec: str, abstract_params: Any, ckpt_cfg) -> Any:
  """Parameters from another run for fine-tuning, checked shape by shape."""
  path, step = parse_init_from(spec)
  source = Checkpointer(path, ckpt_cfg, read_only=True)
  steps = source.all_steps()
  if not steps:
    unset = spec.strip().lower() in ("none", "null")
    raise ConfigError(
        "checkpoint.init_from", f"{spec!r} is read as a run directory, and "
        f"{source.directory} holds no checkpoints"
        + (" (a value of None on the command line is the word, not unset)."
           if unset else "."),
        "pass an empty value, --config.checkpoint.init_from=, to start from "
        "scratch" if unset else "give DIR of a run with checkpoints, or DIR:STEP.")
  step = source.latest_step() if step is None else step
  if step not in steps:
    raise ConfigError("checkpoint.init_from",
                      f"{source.directory} has no step {step} (steps: {steps}).",
                      f"give DIR:STEP with a saved step, e.g. {path}:{steps[-1]}, "
                      f"or DIR for the latest.")
  other_step = f"--config.checkpoint.init_from={path}:{{}}".format
  try:
    saved = source.param_shapes(step)
  except Exception as err:  # noqa: BLE001 -- a damaged step's metadata
    raise source.unreadable_step(step, err, other_step) from None
  ours = {path_name(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  for name in sorted(set(saved) | set(ours)):
    if saved.get(name) != ours.get(name):
      raise ConfigError(
          "checkpoint.init_from",
          f"parameter `{name}` has shape {saved.get(name, 'missing')} in "
          f"{path} step {step} but {ours.get(name, 'missing')} in this model.",
          "make the model config match the source run, or start from scratch.")
  params = source.restore_params(abstract_params, step, other_step=other_step)
  source.close()
  return params
