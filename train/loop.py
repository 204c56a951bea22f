"""`train(config, workdir)`: the one training loop every experiment runs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import kernels
import sharding
from sharding.report import count
from model import ModelConfig, flops as flops_lib
from train import run_config
from train.checkpoint import (Checkpointer, CheckpointError, checkpoint_dir, prepare_workdir,
                              load_init_params)
from train import diloco as diloco_lib
from train.compression import Compression, regroup, traffic, groups
from train import data_schedule
from train.stop_signal import StopOnSignal
from train.data import data_changes, make_data, record_tokens
from train.metrics import (DATA_FRACTION_PREFIX, MOE_KEYS, MetricsWriter, StepTimer,
                           peak_flops)
from train.optimizer import describe as describe_optimizer
from train.optimizer import (make_optimizer, rate_change_note, resume_note, schedule,
                             warmup_note)
from train.state import (abstract_state, init_state, model_spec, param_shardings,
                         pipeline_from_config, state_shardings)
from train.step import (batch_sharding, make_eval_step, make_inner_step,
                        make_train_step)
from train.tokenizer import tokenizer_file
from train.validate import context_note, validate_config


def _check_saved_model(workdir: str, config, spec, config_dict: dict,
                       num_devices: int) -> None:
  """A checkpoint of a model with other parameter shapes is a ConfigError before
  the data is read or tokenized (metadata only); its fix to resume with the
  saved model says what else that model needs on `num_devices` where this run's
  mesh refuses it. Whether checkpoints exist is process 0's answer
  (`process_0_says`): a slower process saw the directory this run's process 0
  had just made and opened a checkpoint manager the others never opened."""
  if not sharding.distributed.process_0_says(os.path.isdir(checkpoint_dir(workdir))):
    return
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  try:
    if (step := ckpt.latest_step()) is not None:
      ckpt.check_param_shapes(
          spec.abstract_params, step, config_dict,
          refusal=lambda saved: _refusal_with(config, saved, num_devices))
  finally:
    ckpt.close()


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(msg)


def _global_batch(local: dict[str, np.ndarray], data_sharding,
                  zigzag_shards: int = 1) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays. For attention=ring_zigzag every per-token
  array is permuted once here (never per layer), positions included. A mixture's
  per-row `source` index stays on the host (the step does not read it)."""
  local = {k: v for k, v in local.items() if k != "source"}
  if zigzag_shards > 1:
    local = {k: kernels.zigzag_permute(v, zigzag_shards, axis=1)
             for k, v in local.items()}
  return {k: jax.make_array_from_process_local_data(data_sharding, v)
          for k, v in local.items()}


def _with_source_ids(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A mixture's eval batch with `source_ids` [rows, length]: each row's `source`
  on every token, for the per-source sums of the eval step."""
  if "source" not in batch:
    return batch
  ids = np.broadcast_to(batch["source"][:, None], batch["targets"].shape)
  return {**batch, "source_ids": np.ascontiguousarray(ids, np.int32)}


def train(config, workdir: str, *, devices: list[jax.Device] | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
  """Trains `config` in `workdir`; returns the logged metric rows.

  `devices` restricts the run to a subset (tests use it to compare 1 device with 8).
  SIGTERM / SIGINT save the step reached and stop; one that comes during setup
  stops the run before its first step.

  Raises `sharding.ConfigError` for a config that cannot run, before compiling
  (`sharding.MeshTooLarge` for a mesh past the devices); `train.CheckpointError`
  for a checkpoint that exists but cannot be read, or cannot be written;
  `train.Diverged` when the loss or the state stops being finite (the state
  reached is not saved, so every kept checkpoint is finite).
  """
  stop = StopOnSignal()  # from the start: a signal during setup is not lost
  try:
    # closes what setup opened also when it fails (a refused restore left Orbax's
    # threads and event loop behind)
    with contextlib.ExitStack() as opened:
      return _train(config, workdir, stop, devices, progress, opened)
  finally:
    stop.restore()


def _train(config, workdir: str, stop: StopOnSignal, devices, progress: bool,
           opened: contextlib.ExitStack) -> list[dict[str, Any]]:
  devices = list(jax.devices() if devices is None else devices)
  sizes = validate_config(config, len(devices))
  prepare_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.normalize_rules(config.mesh.rules)
  cfg = ModelConfig.from_config(config.model)
  spec = model_spec(cfg, rules, pipeline_from_config(config, sizes))
  t = config.train
  lr = schedule(config.optim, t.steps)
  _say(describe_optimizer(config.optim, t.steps, sizes["data"]))
  for note in (warmup_note(config.optim, t.steps), context_note(config)):
    if note:
      _say(note)
  tx = make_optimizer(config.optim, t.steps)
  comp = Compression.from_config(config.optim)
  dl = diloco_lib.DiLoCo.from_config(config, sizes["diloco"])
  if dl.enabled:
    _say(dl.describe())
    if dl.sync_every >= t.steps:
      _say(dl.late_sync_note(t.steps))
  if comp.enabled:
    _say(comp.describe(sizes["data"]))
  shardings = state_shardings(spec, tx, mesh, comp, dl)
  data_sharding = batch_sharding(mesh, rules, t.batch_size, config.data.seq_len)

  _say(sharding.describe(mesh))
  _say(sharding.sharding_table(spec.abstract_params, shardings.params))
  unsplit = sharding.unsplit_dims(spec.abstract_params, spec.logical, mesh, spec.rules)
  if unsplit:
    _say(f"not split as the rules ask, because the mesh does not divide them "
         f"(replicated instead; {count(len(unsplit), 'dimension')}): "
         + "; ".join(unsplit[:8]) + ("; ..." if len(unsplit) > 8 else ""))
  idle = sharding.idle_axes(sizes, rules)
  if idle:
    _say(f"note: mesh {', '.join(idle)} split{'s' if len(idle) == 1 else ''} no "
         "computation (no activation rule of mesh.rules names "
         f"{'it' if len(idle) == 1 else 'them'}: batch, length, act_*, experts, "
         "layers), so every device along it computes the same thing; map it in "
         "mesh.rules (e.g. batch) or set it to 1")
  if dl.enabled:
    _say(f"(DiLoCo: these are the outer parameters; the {dl.replicas} replicas' own "
         "parameters and inner optimizer states add mesh.diloco to each spec)")

  config_dict = json.loads(config.to_json())
  _check_saved_model(workdir, config, spec, config_dict, len(devices))
  try:
    data = make_data(config, data_sharding)
  except sharding.ConfigError as err:
    raise _vocabulary_of_a_saved_model(err, workdir, config) from None
  zigzag = (sharding.split_size(rules, "length", sizes)
            if kernels.uses_zigzag(cfg.attention) else 1)
  to_global = lambda b: _global_batch(b, data_sharding, zigzag)
  ckpt = opened.enter_context(Checkpointer(workdir, config.checkpoint))
  latest = ckpt.latest_step()
  landed = 0  # DiLoCo: a finished run's last step, where its exchanges all landed
  optimizer_changed = latest is not None and _optimizer_state_changes(
      ckpt, latest, config, len(devices))
  if latest is not None:
    def saved_layout(step):  # compression replicas and DiLoCo layout of `step`
      return (ckpt.compression_replicas(step) if comp.enabled else None,
              diloco_lib.with_layout(dl, ckpt.diloco_replicas(step),
                                     ckpt.diloco_buffers(step)))

    # A different model is a ConfigError here, before anything is read.
    state = ckpt.restore(lambda s: abstract_state(spec, tx, mesh, comp, *saved_layout(s)),
                         data.train, config=config_dict)
    restored = _same_step_on_every_process(int(state.step))
    saved_replicas, saved_dl = saved_layout(restored)
    if ckpt.unreadable:
      skipped = "; ".join(f"step {s}: {why}" for s, why in ckpt.unreadable)
      again = _saved_again([s for s, _ in ckpt.unreadable], config)
      moved = ckpt.set_aside_unreadable()
      _say(f"checkpoint.fallback: could not read {skipped}; restored step {restored} "
           f"instead, and set the unreadable step{'s' if len(moved) > 1 else ''} aside "
           f"as {', '.join(moved)} ({again})")
    if restored == 0:  # step 0 (import-hf's, or a fallback's): its parameters alone
      # (`restore`), and the optimizer, compression and DiLoCo states fresh
      state = init_state(spec, tx, mesh, t.seed, params=state.params, comp=comp, dl=dl)
      saved_replicas, saved_dl = None, dl
      _say(f"starting {config.optim.name} from the step-0 parameters of "
           f"{ckpt.directory}" + (f" ({optimizer_changed})" if optimizer_changed else ""))
    saved = ckpt.saved_config(restored) or {}
    if restored:
      note = _new_window_order_note(saved, config, restored)
      if note:
        _say(note)
    ended = (saved.get("train") or {}).get("steps")
    if dl.enabled and ended == int(state.step):
      landed = ended
    if int(state.step):
      _say(f"resuming from step {int(state.step)} of {ckpt.directory}")
      if int(state.step) >= t.steps:
        _say(f"nothing to train: the run is at step {int(state.step)}, and "
             f"train.steps is {t.steps}; pass --config.train.steps above "
             f"{int(state.step)} to train it further")
      for note in (resume_note(config.optim, t.steps, int(state.step)),
                   rate_change_note(saved.get("optim") or {}, ended, config.optim,
                                    t.steps, int(state.step))):
        if note:
          _say(note)
      changed = data_changes(workdir, data.tokens, data.identities)
      if changed:
        _say(changed)
    if diloco_lib.layout(saved_dl) != diloco_lib.layout(dl):
      state = _regroup_diloco(state, dl, shardings)
      _say(diloco_lib.describe_regroup(saved_dl, dl))
    if saved_replicas and saved_replicas != mesh.shape["data"]:
      state = state.replace(compression=jax.device_put(
          regroup(jax.device_get(state.compression), mesh.shape["data"]),
          shardings.compression))
      _say(f"compression state of {saved_replicas} replicas regrouped onto "
           f"{mesh.shape['data']}: each starts from the sum over the old replicas "
           "/ the new count, so the total residual (gradient not yet sent) is kept")
    _report_trajectory_changes(saved, int(state.step), config_dict)
  elif config.checkpoint.init_from:
    params = load_init_params(config.checkpoint.init_from,
                              abstract_state(spec, tx, mesh).params,
                              config.checkpoint)
    state = init_state(spec, tx, mesh, t.seed, params=params, comp=comp, dl=dl)
    _say(f"initialised parameters from {config.checkpoint.init_from}")
  else:
    state = init_state(spec, tx, mesh, t.seed, comp=comp, dl=dl)
  # The data continues where the run's schedule left it, under a changed batch
  # size or mixture weights too.
  recorded, streams = data_schedule.read_schedule(workdir)
  segments = data_schedule.continue_schedule(recorded, int(state.step), t.batch_size,
                                             data.proportions())
  streams = data_schedule.continue_streams(streams if int(state.step) else {},
                                           [m.name for m in data.mixture])
  data.schedule.reschedule(segments, streams)
  if len(segments) > 1 and segments[-1].start_step == int(state.step):
    _say(_data_change_note(data, segments))
  # Written once the checkpoint is known to fit, so a refused resume leaves the
  # run's config.json (what `generate` and `export-hf` build the model from) alone.
  if jax.process_index() == 0:
    run_config.write(workdir, config_dict)
    run_config.keep_tokenizer(workdir, config.data.tokenizer)
    record_tokens(workdir, data.tokens, data.identities)
    data_schedule.write_schedule(workdir, segments, streams)
  # One program per compression density, with the traffic it logs (host-side,
  # computed once): density -> (compiled step, metrics of what a replica sends).
  step_fns: dict[float | None, tuple[Any, dict]] = {}
  group_tree = groups(spec.abstract_params, spec.logical)

  timer = StepTimer()  # seconds per step, compiles and evaluations left out

  def wait_for_steps():
    jax.block_until_ready(state)

  def compiled_step(step: int, batch):
    density = comp.density_at(step) if comp.enabled else None
    if density not in step_fns:
      with timer.paused(wait_for_steps):
        start = time.perf_counter()
        fn = (make_inner_step(spec, tx, lr, t, shardings, data_sharding)
              if dl.enabled else
              make_train_step(spec, tx, lr, t, shardings, data_sharding, comp=comp,
                              density=density))
        with jax.set_mesh(mesh):
          compiled = fn.lower(state, batch).compile()
        sent = ({k: v for k, v in traffic(spec.abstract_params, group_tree,
                                          density).items() if k != "dense_bytes"}
                if comp.enabled else {})
        step_fns[density] = compiled, sent
        at = f" (compression density {density:g})" if comp.enabled else ""
        _say(f"compiled the train step{at} in {time.perf_counter() - start:.1f}s")
    return step_fns[density]
  eval_fn = make_eval_step(spec, param_shardings(spec, mesh), data_sharding,
                           len(data.mixture))
  # DiLoCo: one program per (sync | merge, fragment), compiled on first use.
  frags = diloco_lib.Fragments.of(spec.abstract_params, spec.logical, dl.fragments)
  sync_fns: dict[tuple[str, int], Any] = {}
  outer_metrics: dict[str, jax.Array] = {}  # the latest sync's, until logged

  def synchronise(state, done: int):
    """Runs DiLoCo's events after inner step `done`; returns the state."""
    for kind, p in dl.events(done, t.steps, landed):
      if (kind, p) not in sync_fns:
        with timer.paused(lambda: jax.block_until_ready(state)):
          start = time.perf_counter()
          fn = diloco_lib.make_sync(dl, frags, spec.abstract_params, p, kind,
                                    shardings)
          with jax.set_mesh(mesh):
            sync_fns[kind, p] = fn.lower(state).compile()
          _say(f"compiled the DiLoCo {kind} of fragment {p} in "
               f"{time.perf_counter() - start:.1f}s")
      with jax.set_mesh(mesh):
        state, metrics = sync_fns[kind, p](state)
      if metrics:
        outer_metrics[diloco_lib.metric_name(dl, p)] = metrics["outer_grad_norm"]
    return state

  tokens_per_step = t.batch_size * config.data.seq_len
  step_flops = flops_lib.flops_per_token(cfg, config.data.seq_len) * tokens_per_step
  peak, peak_source = peak_flops(config.log)
  _say(f"model: {_architecture(spec, mesh, rules, t.batch_size, config.data.seq_len)}; "
       f"{flops_lib.matmul_params(cfg) / 1e6:.2f}M matmul params"
       f"{' (active per token)' if cfg.moe.num_experts else ''}, "
       f"{step_flops / 1e9:.1f} GFLOP per step; MFU peak {peak / 1e12:.3f} "
       f"TFLOP/s ({peak_source})")

  start = int(state.step)
  if not config.checkpoint.every_steps:
    _say("checkpoint.every_steps=0: this run saves no checkpoint (only SIGTERM or "
         "SIGINT does), so generate, export-hf and a resume " + (
             f"will read step {start}, where it started" if start else
             "will have nothing to read"))
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0,
                         tensorboard=config.log.tensorboard, start=start)
  if writer.dropped:
    _say(f"metrics.jsonl: dropped {count(writer.dropped, 'row')} that an interrupted "
         f"attempt logged past step {start}, where this run continues")
  history: list[dict[str, Any]] = []
  bar = tqdm(total=t.steps, initial=start, disable=not progress or
             jax.process_index() != 0, dynamic_ncols=True, desc="train")

  saved = {"step": start}

  def logged(done: int) -> bool:  # a metrics row (its loss and gradient norm read)
    return done % config.log.every_steps == 0 or done == t.steps

  def save(done: int, metrics: dict, eval_loss=None, force=False):
    if int(state.step) != saved["step"]:
      if not logged(done):  # a save between logged rows: read its metrics
        metrics = sharding.to_host(metrics)
        _stop_if_diverged(done, metrics, saved["step"], config, dl)
      with jax.set_mesh(mesh):
        finite = _all_finite(state)
      if not sharding.to_host(finite):  # e.g. DiLoCo's outer step overflowed
        _stop_if_diverged(done, metrics, saved["step"], config, dl,
                          state_finite=False)
      ckpt.save(state, data.train, config_dict, eval_loss=eval_loss, force=force)
      saved["step"] = int(state.step)

  def evaluate(step: int) -> dict[str, Any]:
    with jax.set_mesh(mesh):  # dispatch every batch, then one host sync
      sums = [eval_fn(state.params, to_global(_with_source_ids(b)))
              for b in data.eval_batches(t.eval_steps)]
    # [2, sources]: NLL and token sums per mixture source (one column without)
    nll, tokens = np.asarray(jax.device_get(sums), np.float64).reshape(
        len(sums), 2, -1).sum(0)
    if not tokens.sum():  # validate_config and make_data refuse such configs
      raise RuntimeError("evaluation found no held-out tokens; refusing to log an "
                         "eval_loss of 0/0.")
    row = {"step": step, "eval_loss": float(nll.sum() / tokens.sum())}
    for source, n, k in zip(data.mixture, nll, tokens):
      if k:  # a source whose held-out windows the evaluated batches reached
        row[f"eval_loss/{source.name}"] = float(n / k)
    writer.write(row)
    history.append(row)
    per_source = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in row.items()
                           if k.startswith("eval_loss/"))
    _say(f"step {step}: eval_loss {row['eval_loss']:.4f}"
         + (f" ({per_source})" if per_source else ""))
    return row

  try:
    if not stop.reached(start) and start == 0 and t.eval_every:
      evaluate(0)  # the untrained baseline (about ln(vocab) nats/token)
    if stop.requested:  # during setup or the baseline evaluation
      _say(f"{stop.requested} before the first step: nothing new to save; exiting")
      return history
    stop.stepping = True
    timer.restart()
    for step in range(start, t.steps):
      batch = to_global(next(data.train))
      compiled, sent = compiled_step(step, batch)
      with jax.set_mesh(mesh):
        state, metrics = compiled(state, batch)
      timer.step()
      done = step + 1
      if dl.enabled:
        state = synchronise(state, done)
      if logged(done):
        metrics = sharding.to_host(metrics)  # waits for the window's steps
        elapsed = timer.per_step()
        flops_per_sec = step_flops / elapsed
        # DiLoCo's metrics are per replica: their mean.
        row = {"step": done, "loss": float(np.mean(metrics["loss"])),
               "grad_norm": float(np.mean(metrics["grad_norm"])),
               "learning_rate": float(metrics["learning_rate"]),
               "step_time_s": elapsed,
               "tokens_per_sec": tokens_per_step / elapsed,
               "tflops_per_device": flops_per_sec / len(devices) / 1e12,
               "mfu": flops_per_sec / peak if math.isfinite(peak) else float("nan")}
        row.update({k: float(np.mean(v)) for k, v in metrics.items()
                    if k in MOE_KEYS})
        if "exchanged_grad_norm" in metrics:  # compression (train.step)
          row["exchanged_grad_norm"] = float(metrics["exchanged_grad_norm"])
        row.update(sent)  # compression: per replica, what it sent, and the ratio
        # DiLoCo: each fragment's outer-gradient norm, from its syncs since the last row
        row.update({k: float(v) for k, v in sharding.to_host(dict(outer_metrics)).items()})
        outer_metrics.clear()
        # One global batch per step: the windows seen so far, by mixture source.
        row.update({DATA_FRACTION_PREFIX + name: share for name, share in
                    data.source_fractions(data.schedule.first_window(done)).items()})
        writer.write(row)
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}",
                        tok_s=f"{row['tokens_per_sec']:.0f}")
        _stop_if_diverged(done, metrics, saved["step"], config, dl)
        timer.restart()
      bar.update(1)
      eval_loss = None
      if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
        with timer.paused(wait_for_steps):
          eval_loss = evaluate(done)["eval_loss"]
      if _saves(done, config):
        save(done, metrics, eval_loss)
      if stop.reached(done):
        save(done, metrics, force=True)
        ckpt.wait()
        _say(f"{stop.requested}: saved step {done}; exiting")
        break
  finally:
    bar.close()
    writer.close()
    ckpt.wait()  # `opened` closes it
  return history


class Diverged(RuntimeError):
  """The training loss or gradient norm was not finite: the run stopped without
  saving that state, so every checkpoint it kept holds a finite one."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  """A scalar bool: every floating-point leaf of `tree` holds only finite values."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _stop_if_diverged(step: int, metrics: dict, last_saved: int, config,
                      dl: diloco_lib.DiLoCo, state_finite: bool = True) -> None:
  """Raises Diverged when step `step`'s loss or gradient norm (host `metrics`; the
  mean over DiLoCo replicas) is NaN or infinite, or (`state_finite=False`) when the
  state about to be saved holds a non-finite value although they were finite (an
  update or DiLoCo outer step that overflowed). Read at every logged row and before
  every save, so a non-finite state is never saved, and a diverged run cannot rotate
  its good checkpoints out under checkpoint.keep."""
  loss, grad_norm = (float(np.mean(metrics[k])) for k in ("loss", "grad_norm"))
  if math.isfinite(loss) and math.isfinite(grad_norm) and state_finite:
    return
  o = config.optim
  fixes = (f"a lower --config.optim.learning_rate (now {o.learning_rate:g}), a longer "
           f"--config.optim.warmup_steps (now {o.warmup_steps}) or gradient clipping "
           f"(--config.optim.clip_norm, now {o.clip_norm:g})")
  if dl.enabled:
    fixes += f"; with DiLoCo, a lower --config.diloco.outer_lr (now {dl.outer_lr:g})"
  where = (f"Its last checkpoint, step {last_saved}, is kept: resume from it (the same "
           f"--workdir) with {fixes}" if last_saved else
           f"It saved no checkpoint: start again with {fixes}")
  what = (f"the training loss is {loss:g} and the gradient norm {grad_norm:g}"
          if state_finite else
          f"the training loss ({loss:g}) and gradient norm ({grad_norm:g}) are finite "
          f"but the state to be saved holds non-finite values (an update, or DiLoCo's "
          f"outer step, overflowed)")
  raise Diverged(f"step {step}: {what}: training diverged, and stops here without "
                 f"saving this state. {where}.")


def _vocabulary_of_a_saved_model(err, workdir: str, config):
  """`err`, or for data whose ids need a larger model.vocab_size in a run that
  already holds checkpoints (an import, a resume), an error whose fix does not
  lead to the shape error of a resumed model of another size."""
  if err.field != "model.vocab_size" or not os.path.isdir(checkpoint_dir(workdir)):
    return err
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  try:
    steps = ckpt.all_steps()
  finally:
    ckpt.close()
  if not steps:
    return err
  return sharding.ConfigError(
      "data.tokenizer" if tokenizer_file(config.data.tokenizer) else "data.path",
      err.problem, f"the checkpoints in {checkpoint_dir(workdir)} "
      f"hold a model of {config.model.vocab_size} token rows, which a resume keeps: "
      "pass the tokenizer (or data) of that vocabulary, or train a model of the "
      "larger vocabulary in a new --workdir.")


def _new_window_order_note(saved: dict, config, step: int) -> str | None:
  """What a resume with another train.seed or data.seq_len does to the data
  (the windows are shuffled, or cut, anew: the data schedule cannot continue
  them), or None."""
  changed = [f"{group}.{name} {was} -> {now}" for group, name, now in (
      ("train", "seed", config.train.seed), ("data", "seq_len", config.data.seq_len))
      if (was := (saved.get(group) or {}).get(name)) is not None and was != now]
  if not changed:
    return None
  return (f"data: {' and '.join(changed)}: the windows are cut and shuffled anew, and "
          f"step {step + 1} reads on from the same window number of the new order, so "
          "windows read before may come again and others not at all")


def _saves(step: int, config) -> bool:
  """Whether the loop saves `step` (besides a signal's save): a multiple of
  checkpoint.every_steps, or the run's last step (none with every_steps=0)."""
  every, last = config.checkpoint.every_steps, config.train.steps
  return bool(every) and step <= last and (step % every == 0 or step == last)


def _saved_again(steps: list[int], config) -> str:
  """Whether this run saves `steps` (set aside as unreadable) when it gets there
  (`_saves`), said for the fallback's note."""
  every, last = config.checkpoint.every_steps, config.train.steps
  again = [s for s in steps if _saves(s, config)]
  if again == steps:
    return f"the run saves {'them' if len(steps) > 1 else 'it'} again when it gets there"
  others = [s for s in steps if s not in again]
  why = (f"this run saves steps that are multiples of checkpoint.every_steps={every} "
         f"and its last, {last}" if every else "checkpoint.every_steps=0 saves none")
  return ((f"the run saves step {', '.join(map(str, again))} again when it gets "
           "there; " if again else "") +
          f"not step {', '.join(map(str, others))}: {why}")


def _same_step_on_every_process(step: int) -> int:
  """`step`, once every process has restored the same one (a process that fell
  back from a step the others read would train a different state: an error)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    steps = np.asarray(multihost_utils.process_allgather(np.int64(step))).ravel()
    if len(set(steps.tolist())) > 1:
      raise CheckpointError(
          "the processes restored different steps (" + ", ".join(
              f"process {i}: {s}" for i, s in enumerate(steps.tolist()))
          + "): a step that some processes cannot read; remove it from "
          "checkpoints/ (or repair the file system) and resume.")
  return step


def _data_change_note(data, segments) -> str:
  """What a resume onto another batch size or other mixture weights does with the
  data: where it continues, and the new shares."""
  new, old = segments[-1], segments[-2]
  first = new.start_step + 1  # the schedule counts batches from 0, metrics steps from 1
  parts = []
  if new.batch_size != old.batch_size:
    parts.append(f"train.batch_size {old.batch_size} -> {new.batch_size}: step "
                 f"{first} reads on from training window {new.start_window:,}, "
                 "the first one not yet read")
  if new.proportions != old.proportions:
    total = sum(new.proportions.values())
    drawn = data.schedule.counts(new.start_window)
    parts.append(
        "the mixture's weights changed; from step "
        f"{first} (training window {new.start_window:,}) the sources mix as "
        + ", ".join(f"{name} {p / total:.1%}" for name, p in new.proportions.items())
        + "; each continues after the windows it gave before (" + ", ".join(
            f"{name} {drawn.get(name, 0):,}" for name in new.proportions) + ")")
  return "data: " + "; ".join(parts) + ", so no window is read twice or skipped"


def _architecture(spec, mesh, rules, batch: int, seq_len: int) -> str:
  """The block, the attention impl (what `auto` chooses on this mesh, and why,
  and what it leaves unused), MoE and pipeline settings, for the run's first
  lines."""
  cfg = spec.cfg
  attention = impl = cfg.attention
  axes = kernels.partition.Axes.from_rules(rules)
  with jax.set_mesh(mesh):
    if impl == "auto":
      impl, _, reason = kernels.choose((batch, seq_len, cfg.num_heads, cfg.head_dim),
                                       cfg.num_kv_heads, axes)
      attention = f"auto -> {impl} ({reason})"
    length_split = kernels.partition.sequence_size(mesh, axes)
  if impl not in kernels.SEQUENCE_PARALLEL and length_split > 1:
    attention += (f" (it gathers the length the mesh splits {length_split} ways: "
                  "each of those devices computes the whole sequence's attention; "
                  "ring or ulysses split it)")
  if impl == "reference" and (cfg.attention_block_q or cfg.attention_block_kv):
    attention += " (model.attention_block_q/kv unused: reference has no tiles)"
  parts = [f"{cfg.describe_blocks()}, attention {attention}"]
  moe, pipe = cfg.moe, spec.pipeline
  if moe.num_experts:
    parts.append(f"MoE: {moe.num_experts} experts, top-{moe.top_k}, "
                 f"{moe.dispatch} dispatch")
  if not pipe.active and (pipe.schedule != "gpipe" or pipe.repeats > 1):
    parts.append(f"no pipeline (pipeline.schedule={pipe.schedule!r}"
                 + (f", repeats={pipe.repeats}" if pipe.repeats > 1 else "")
                 + " unused: mesh.stage=1 and pipeline.microbatches=1)")
  if pipe.active:
    parts.append(pipe.describe())
  return "; ".join(parts)


def _regroup_diloco(state, dl, shardings):
  """A state restored in another DiLoCo layout -> `dl`'s (`diloco.regroup`, on
  the host)."""
  host = jax.device_get(state)
  opt_state, extra = diloco_lib.regroup(host.params, host.opt_state, host.diloco, dl)
  return jax.device_put(state.replace(opt_state=opt_state, diloco=extra), shardings)


# Fields that decide the optimizer state's structure (which buffers, what shapes);
# one that neither side uses (`run_config.in_use`) changes nothing saved.
_OPTIMIZER_STATE_FIELDS = ("optim.name", "optim.matrices", "optim.galore_rank",
                           "optim.compression.method",
                           "optim.compression.momentum_correction")


def _optimizer_state_changes(ckpt: Checkpointer, step: int, config,
                             num_devices: int) -> str:
  """'' when the checkpoint at `step` holds the state of the optimizer `config`
  asks for; else a description of the change. Past step 0 a change is a
  ConfigError naming the field: that state cannot be resumed. Its fix offers
  resuming with the saved value only where `config` with it validates on
  `num_devices` (a resume onto stages cannot take compression back, whose own
  refusal offered dropping it)."""
  saved = run_config.flatten({"optim": (ckpt.saved_config(step) or {}).get("optim", {})})
  new = run_config.flatten({"optim": json.loads(config.to_json()).get("optim", {})})
  for field in _OPTIMIZER_STATE_FIELDS:
    if (field in saved and saved[field] != new.get(field)
        and (run_config.in_use(field, saved) or run_config.in_use(field, new))):
      if step:
        new_run = ("start a new run from its parameters in another directory: "
                   "--workdir=NEW_RUN " + sharding.flag(
                       "config.checkpoint.init_from",
                       f"{os.path.dirname(ckpt.directory)}:{step}"))
        resume = sharding.flag(f"config.{field}", saved[field])
        refused = _refusal_with(config, {field: saved[field]}, num_devices)
        raise sharding.ConfigError(
            field, f"the checkpoint at step {step} holds the state of "
            f"{field}={saved[field]!r}, not {new.get(field)!r}.",
            f"resume with {resume}, or {new_run}." if refused is None else
            f"{new_run} (resuming needs {resume}, which this run refuses: "
            f"{refused.field} {refused.problem.rstrip('.')}).")
      return f"{field} {saved[field]!r} -> {new.get(field)!r}"
  return ""


def _refusal_with(config, changes: dict[str, Any], num_devices: int):
  """The ConfigError `validate_config` raises for `config` with `changes`
  ({dotted field: value}) on `num_devices`, or None when it validates."""
  import copy
  changed = copy.deepcopy(config)
  changed.update_from_flattened_dict(changes)
  try:
    validate_config(changed, num_devices)
  except sharding.ConfigError as err:
    return err
  return None


def _report_trajectory_changes(saved: dict, step: int, config_dict: dict):
  """On resume: prints (process 0, stderr) every changed config field that makes
  the run continue differently from the run that saved `step` with the config
  `saved` (read by every process alike). Step 0 (an import) has no trajectory
  yet."""
  if not step:
    return
  message = run_config.describe_trajectory_changes(
      step, run_config.trajectory_changes(saved, config_dict) if saved else [])
  if message and jax.process_index() == 0:
    tqdm.write(message, file=sys.stderr)
