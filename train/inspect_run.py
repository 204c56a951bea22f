"""`inspect`: what a run directory holds — steps, sizes, metrics, parameters."""

from __future__ import annotations

import os

import jax
import numpy as np
from ml_collections import ConfigDict

import sharding
from sharding.report import count
from train import data_schedule, run_config
from train.checkpoint import Checkpointer, checkpoint_dir
from train.metrics import read_metrics


def _dir_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def _number(value: float | None, spec: str) -> str:
  """`value` formatted, or "not finite" for metrics.jsonl's null (a NaN or infinite
  value: MetricsWriter)."""
  return "not finite" if value is None else format(value, spec)


def _describe_model(saved: dict) -> list[str]:
  """Family, shape, attention window, experts, rotary variant and stop tokens of a
  run's saved config."""
  from model import ModelConfig
  from model.config import parse_ladder_layers
  from train import hf
  cfg = ModelConfig.from_config(saved.get("model", {}))
  try:
    family = f"{hf.family_of(cfg)} layout"
  except sharding.ConfigError:
    family = "no transformers family"
  block = f"{cfg.block} block"
  if cfg.block == "ladder":
    ladder = sorted(parse_ladder_layers(cfg.ladder_layers, cfg.num_layers))
    if len(ladder) < cfg.num_layers:
      block = (f"ladder block in layers {','.join(map(str, ladder))} (standard "
               "elsewhere)" if ladder else "standard block (ladder_layers=none)")
  if not cfg.standard_wiring():  # export refuses these (HF has no such block)
    family = "no transformers family"
  data = saved.get("data", {})
  try:
    stops = hf.stop_tokens(data)
  except (OSError, ValueError) as err:  # the run's tokenizer.json is gone
    stops = f"unknown ({err})"
  return [
      f"model: {block}, {family}, {count(cfg.num_layers, 'layer')}, d_model {cfg.d_model}, "
      f"{count(cfg.num_heads, 'head')} ({cfg.num_kv_heads} kv) of {cfg.head_dim}, d_ff "
      f"{cfg.d_ff}, qkv_bias {cfg.qkv_bias}, qk_norm {cfg.qk_norm}, tied head "
      f"{cfg.tie_embeddings}",
      "attention: " + (f"sliding window of {cfg.sliding_window} keys"
                       if cfg.sliding_window else "full causal") +
      (f"; experts: top-{cfg.moe.top_k} of {cfg.moe.num_experts}"
       f"{' (renormalised gates)' if cfg.moe.renormalize else ''}, "
       f"dispatch {cfg.moe.dispatch}"
       + (f", every {cfg.moe.every_k_layers} layers" if cfg.moe.every_k_layers > 1
          else "") + (", shared expert" if cfg.moe.shared_expert else "")
       if cfg.moe.num_experts else ""),
      f"rope: {hf.rope_description(cfg)}",
      f"stop tokens: {stops}"]


def _saved_mesh(tree) -> dict[str, int]:
  """{axis: size} of the mesh a step's parameters were saved on, read from their
  sharding metadata; {} where it does not say."""
  for m in jax.tree_util.tree_leaves(tree):
    names = getattr(m.sharding, "axis_names", None)
    shape = getattr(m.sharding, "shape", None)
    if names is not None and shape is not None:
      return dict(zip(names, map(int, shape)))
  return {}


def _describe_training(config, saved_mesh: dict[str, int]) -> list[str]:
  """The lines a run printed at its start about how it trains: optimizer,
  DiLoCo, gradient compression and pipeline, from its saved config. An auto
  (-1) mesh size takes the size its latest checkpoint was saved with
  (`saved_mesh`); with no checkpoint it reads "auto" and counts as 1 below."""
  from train import diloco, optimizer
  from train.compression import Compression
  from train.state import pipeline_from_config
  configured = {a: int(config.mesh.get(a, 1)) for a in sharding.AXES}
  resolved = {a: saved_mesh.get(a, n) if n == -1 else n for a, n in configured.items()}
  mesh = {a: max(n, 1) for a, n in resolved.items()}
  t, seq_len = config.train, config.data.seq_len
  accum = t.get("grad_accum_steps", 1)
  sizes = [f"{a}={'auto' if n == -1 else n}" for a, n in resolved.items() if n != 1]
  lines = [f"training: {count(t.steps, 'step')} of batch_size {t.batch_size} x "
           f"seq_len {seq_len} ({t.batch_size * seq_len:,} tokens a step)"
           + (f" in {accum} gradient-accumulation micro-batches" if accum > 1 else "")
           + "; mesh " + (" ".join(sizes) or "of one device"),
           optimizer.describe(config.optim, config.train.steps, resolved["data"])]
  dl = diloco.DiLoCo.from_config(config, mesh["diloco"])
  if dl.enabled:
    lines.append(dl.describe())
  comp = Compression.from_config(config.optim)
  if comp.enabled:
    lines.append(comp.describe(mesh["data"]))
  pipeline = pipeline_from_config(config, mesh)
  if pipeline.active:
    lines.append(pipeline.describe())
  return lines


# What reading a run's checkpoints needs of a checkpoint config (which steps are
# kept is the writer's business).
_READING = ConfigDict(dict(keep=1, keep_best=0, async_save=False))


def describe_run(workdir: str) -> str:
  """A report of a run's checkpoints (read from metadata only) and metrics."""
  lines = [f"run {os.path.abspath(workdir)}"]
  # The run's own checkpoint reader: it knows every item a step holds (a manager
  # that knows only the state warns about the others on each metadata read).
  ckpt = (Checkpointer(workdir, _READING, read_only=True)
          if os.path.isdir(checkpoint_dir(workdir)) else None)
  steps = ckpt.all_steps() if ckpt else []
  tree = ckpt.state_metadata(steps[-1]).get("params") if steps else None
  if os.path.exists(run_config.path(workdir)):
    lines += _describe_model(run_config.read(workdir))
    lines += _describe_training(run_config.load(workdir),
                                _saved_mesh(tree) if tree is not None else {})
  schedule = data_schedule.describe(data_schedule.read_schedule(workdir)[0])
  if schedule:
    lines.append(schedule)
  if not steps:
    lines.append("checkpoints: none")
  else:
    lines.append("checkpoints:")
    for s in steps:
      size = _dir_size(os.path.join(ckpt.directory, str(s)))
      lines.append(f"  step {s:>8}  {sharding.format_bytes(size)}")
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if train_rows:
      r = train_rows[-1]
      lines.append(f"last logged step {r['step']}: loss {_number(r['loss'], '.4f')}, "
                   f"{_number(r['tokens_per_sec'], '.0f')} tokens/s, "
                   f"MFU {_number(r['mfu'], '.1%')}")
    finite = [r for r in evals if r["eval_loss"] is not None]
    if evals:
      best = (f", best {_number(b['eval_loss'], '.4f')} at step {b['step']}" if
              (b := min(finite, key=lambda r: r["eval_loss"], default=None)) else "")
      lines.append(f"eval loss: last {_number(evals[-1]['eval_loss'], '.4f')} at step "
                   f"{evals[-1]['step']}{best}")
  if steps and tree is None:
    lines.append(f"parameters at step {steps[-1]}: its metadata cannot be read")
  if tree is not None:
    rows = [("parameter", "shape", "dtype", "saved sharding")]
    total = 0
    for path, m in jax.tree_util.tree_leaves_with_path(tree):
      name = sharding.path_name(path)
      spec = getattr(m.sharding, "partition_spec", None)
      axes = dict(zip(getattr(m.sharding, "axis_names", []),
                      getattr(m.sharding, "shape", [])))
      mesh = ",".join(f"{a}={n}" for a, n in axes.items() if n > 1) or "1 device"
      rows.append((name, "x".join(map(str, m.shape)), str(np.dtype(m.dtype)),
                   f"{tuple(spec) if spec is not None else '?'} on {mesh}"))
      total += int(np.prod(m.shape))
    lines.append(f"parameters at step {steps[-1]} ({total / 1e6:.2f}M):")
    lines.append(sharding.format_rows(rows, indent="  "))
  if ckpt:
    ckpt.close()
  return "\n".join(lines)
