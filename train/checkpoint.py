"""Checkpoints: Orbax CheckpointManager with async saves, restore onto any mesh.

A step directory holds three items:
  state   params, optimizer state and step (Orbax PyTree, tensorstore arrays),
  data    the grain iterator position of every process,
  config  the experiment config as JSON.
No pickle is written or read. Saves are asynchronous: `save` returns once arrays are
copied off the devices and the write finishes in the background. A step becomes
visible to `latest_step` only after Orbax commits it, so a crash mid-save leaves the
previous step as the latest.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from sharding import ConfigError
from train.state import TrainState


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be read."""


def _as_dict(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _restore_args(target: Any) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """The checkpoints of one run directory."""

  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False):
    policies: list[pp.PreservationPolicy] = [pp.LatestN(max(ckpt_cfg.keep, 1))]
    if ckpt_cfg.keep_best:
      policies.append(pp.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True,
                               n=ckpt_cfg.keep_best,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=ckpt_cfg.async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        read_only=read_only, create=not read_only)
    self.directory = checkpoint_dir(workdir)
    self.cfg = ckpt_cfg
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState, data_iter: Any, config_dict: dict, *,
           eval_loss: float | None = None, force: bool = False) -> bool:
    step = int(state.step)
    items = {"state": ocp.args.PyTreeSave(_as_dict(state)),
             "config": ocp.args.JsonSave(config_dict)}
    if data_iter is not None:  # e.g. a step-0 import has no data position yet
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    args = ocp.args.Composite(**items)
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    return self._manager.save(step, args=args, metrics=metrics, force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def restore(self, target: TrainState, data_iter: Any | None = None,
              step: int | None = None) -> TrainState:
    """Restores `step` (default: latest) into `target`'s shapes and shardings.

    `target` holds ShapeDtypeStructs with concrete NamedShardings of the current
    mesh, so a checkpoint written on any mesh lands on this one. With
    `checkpoint.fallback`, an unreadable step falls back to the previous one.
    """
    steps = self.all_steps() if step is None else [step]
    if not steps:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    candidates = steps[::-1] if self.cfg.fallback and step is None else steps[-1:]
    errors = []
    for s in candidates:
      try:
        items = {"state": _restore_args(_as_dict(target))}
        data_dir = os.path.join(self.directory, str(s), "data")
        own = os.path.join(data_dir, f"process_{jax.process_index()}-of-"
                           f"{jax.process_count()}.json")
        if data_iter is not None and os.path.exists(own):
          items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        elif data_iter is not None and os.path.isdir(data_dir):
          _restore_iterator_from_other_process_count(data_iter, data_dir)
        restored = self._manager.restore(s, args=ocp.args.Composite(**items))
        if errors:
          logging.warning("restored step %d after failing on: %s", s, errors)
        return TrainState(**restored.state)
      except Exception as err:  # any read failure: report or fall back
        errors.append(f"step {s}: {type(err).__name__}: {str(err)[:300]}")
    hint = ("" if self.cfg.fallback else
            " Pass --config.checkpoint.fallback=true to resume from the step before.")
    raise CheckpointError(f"cannot read checkpoint in {self.directory}: "
                          f"{'; '.join(errors)}.{hint}")

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def param_shapes(self, step: int) -> dict:
    """{path: shape} of the saved parameters, from metadata (no array reads)."""
    meta = self._manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)["params"]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(m.shape)
            for path, m in jax.tree_util.tree_leaves_with_path(tree)}

  def restore_params(self, abstract_params: Any, step: int) -> Any:
    """Only the parameters (optimizer state is not read)."""
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    return self._manager.restore(step, args=ocp.args.Composite(state=args)
                                 ).state["params"]


def _restore_iterator_from_other_process_count(data_iter, data_dir: str) -> None:
  """Resuming on a different number of processes: every process's iterator has
  consumed the same number of global batches (train/data.py), so any saved
  position is everyone's position."""
  saved = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
  with open(os.path.join(data_dir, saved[0])) as f:
    data_iter.set_state(json.loads(f.read()))
  logging.info("data position from %s (saved by %d processes)", saved[0], len(saved))


def parse_init_from(spec: str) -> tuple[str, int | None]:
  """'DIR' or 'DIR:STEP' -> (DIR, STEP or None for the latest)."""
  path, sep, step = spec.rpartition(":")
  if sep and step.isdigit():
    return path, int(step)
  return spec, None


def load_init_params(spec: str, abstract_params: Any, ckpt_cfg) -> Any:
  """Parameters from another run for fine-tuning, checked shape by shape."""
  path, step = parse_init_from(spec)
  source = Checkpointer(path, ckpt_cfg, read_only=True)
  step = source.latest_step() if step is None else step
  if step is None or step not in source.all_steps():
    raise ConfigError("checkpoint.init_from",
                      f"{source.directory} has no step {step} "
                      f"(steps: {source.all_steps()}).",
                      "give DIR of a run with checkpoints, or DIR:STEP of one of them.")
  saved = source.param_shapes(step)
  ours = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  for name in sorted(set(saved) | set(ours)):
    if saved.get(name) != ours.get(name):
      raise ConfigError(
          "checkpoint.init_from",
          f"parameter `{name}` has shape {saved.get(name, 'missing')} in "
          f"{path} step {step} but {ours.get(name, 'missing')} in this model.",
          "make the model config match the source run, or start from scratch.")
  params = source.restore_params(abstract_params, step)
  source.close()
  return params
