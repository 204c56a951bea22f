"""Ahead-of-time compile of a train or decode step for a TPU topology, without TPUs.

libtpu compiles for any named topology from a CPU host (DESIGN.md, "Kernels,
checked on all three backends"): `compile_step` builds the mesh on that topology's
devices, lowers the step with abstract, sharded inputs, runs the real TPU compiler
and reports, per device:

- memory: arguments (parameters, optimizer state, batch or KV cache), temporaries,
  outputs not aliased to donated inputs, generated code; their total against the
  chip's HBM (`sharding/chips.py`), and whether it fits;
- FLOPs per step counted in the compiled HLO (`aot/costs.py`: loop trip counts
  included, which XLA's cost analysis leaves out), next to the model's PaLM count
  (`model/flops.py`);
- collectives by kind with bytes and the mesh axes they run over;
- time: a roofline, max(compute, HBM, interconnect), from the compiled FLOPs, HBM
  bytes and collective bytes over the chip's rates, and the MFU it bounds; and the
  compiler's own estimate (`optimal_seconds`), which counts every loop body once.
  rung's Pallas attention kernels declare what they execute (`kernels/flash_tpu.py`:
  the visible tiles, computed whole, and the backward's recomputed scores), so the
  compiled count holds more attention FLOPs than the model's halved causal term; a
  kernel without a declared cost is counted at the model's attention FLOPs instead.

- time: the step-time estimate from the compiled schedule (`aot/schedule.py`:
  ops in their scheduled order, loop bodies times their trip counts, asynchronous
  collectives overlapping the ops between their start and done, collective times
  from ring algorithms on the slice's torus), the communication it leaves exposed
  per mesh axis, and the MFU it implies. `plan` ranks by it.

The roofline stays as a lower bound (it assumes perfect overlap and the whole ICI
bandwidth for every collective); it weighs every layer, unlike the compiler's
estimate of a scanned model.

Compiler flags are part of a plan: `compiler_flags` (libtpu / XLA options such as
MaxText's recipes set in LIBTPU_INIT_ARGS, see `parse_flags`) go to this compile
only, as compile options, and the report lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from aot import costs as costs_lib
from aot import schedule as schedule_lib
from infer import decode
from infer.kv_cache import cache_struct
from model import ModelConfig, flops as flops_lib
from sharding import ConfigError, MeshTooLarge
from sharding.chips import Chip, chip_for_topology, topology_name
from sharding.report import json_ready
from train.compression import Compression
from train.diloco import DiLoCo, Fragments, make_sync
from train.optimizer import make_optimizer, schedule
from train.state import abstract_params, abstract_state, model_spec, pipeline_from_config
from train.step import batch_sharding, make_inner_step, make_train_step
from train.validate import validate_config

WHAT = ("train", "decode")
_BATCH_FIELDS = ("inputs", "targets", "positions", "segment_ids")  # [batch, length]


@dataclasses.dataclass
class Report:
  """One compiled step. Bytes and FLOPs are per device and per step unless named
  `model_*` (whole step, all devices)."""
  topology: str
  chip: str
  what: str
  mesh: dict[str, int]
  devices: int
  memory: dict[str, float]   # params, optimizer, optimizer_host, diloco (replicas
  #                            and outer buffers), inputs, arguments, temporaries,
  #                            outputs, code, held (decode: the stacked layer
  #                            weights the serving model keeps beside the
  #                            per-step copies it reads), total, hbm (bytes
  #                            per device)
  fits: bool
  flops: float               # compiled, per device
  model_flops: float         # PaLM count for the whole step
  uncounted_kernels: int     # Pallas kernel calls whose FLOPs the HLO does not show
  hbm_bytes: float           # HBM traffic estimate per device
  collectives: list[dict[str, Any]]
  time: dict[str, float]     # seconds: compute, hbm, ici, dcn (between slices),
  #                            roofline, compiler, estimate (aot/schedule.py)
  compiler: dict[str, float]  # XLA's cost analysis as given: flops, bytes accessed,
  #                             optimal_seconds (each loop body counted once)
  mfu_bound: float
  compile_seconds: float
  error: str = ""            # the compiler's message when it refused the plan
  exposed_communication: dict[str, float] = dataclasses.field(default_factory=dict)
  #                            seconds per step a device waits for collectives,
  #                            by the mesh axes they span (aot/schedule.py)
  mfu_estimate: float = math.nan  # model FLOPs / (peak x time["estimate"])
  compiler_flags: dict[str, Any] = dataclasses.field(default_factory=dict)
  schedule: dict[str, Any] = dataclasses.field(default_factory=dict)
  #                            ops and communication seconds, collective counts
  received_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
  #                            bytes a device receives per step, by the mesh axes
  #                            the collectives span ("data", "data,fsdp", ...)
  unknown_trip_counts: int = 0  # loops counted once: their trip count was not
  #                            found in the HLO, so the times are too low
  slices: int = 1            # slices of `topology`, joined over DCN
  pipeline: dict[str, Any] = dataclasses.field(default_factory=dict)
  #                            pipelined training: stages, microbatches, repeats,
  #                            iterations (of the compiled loops), bubble (idle
  #                            fraction of their stage-time), bubble_formula
  diloco_syncs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  #                            DiLoCo (mesh.diloco > 1): per fragment, its
  #                            synchronisation program compiled (`_diloco_syncs`)
  to_fit: list[str] = dataclasses.field(default_factory=list)
  #                            config changes that hold less per device, for a
  #                            step that does not fit (`_to_fit`)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict; figures the compile could not give are None.
    `model_flops_per_device` sits beside `flops` (compiled, per device) so the two
    compare without dividing `model_flops` (whole step) by `devices`."""
    out = dataclasses.asdict(self)
    out["model_flops_per_device"] = self.model_flops / self.devices
    return json_ready(out)

  def table(self) -> str:
    return _table(self)

  def bound(self) -> str:
    """Which roofline term sets the step time: compute, hbm, ici or dcn."""
    return max(("compute", "hbm", "ici", "dcn"), key=lambda k: self.time.get(k, 0))


@contextlib.contextmanager
def _quiet_libtpu():
  """Off a TPU VM, libtpu finds no accelerator type or workers in the VM's metadata
  and prints screens of warnings when it builds a topology. The topology it builds
  is the named one whatever these say (the same devices for v5p:2x2x2 and two
  v5e:4x4 slices with v5p-8 or v5litepod-4 set), so defaults silence it, for the
  call only: left set, TPU_WORKER_HOSTNAMES makes this process and its children
  look like a TPU pod to multi-host auto-detection."""
  import glob
  added = []
  if not any(glob.glob(p) for p in sharding.chips.TPU_DEVICE_FILES):
    for name, value in (("TPU_ACCELERATOR_TYPE", "v5p-8"),
                        ("TPU_WORKER_HOSTNAMES", "localhost")):
      if name not in os.environ:
        os.environ[name] = value
        added.append(name)
  try:
    yield
  finally:
    for name in added:
      os.environ.pop(name, None)


def topology_devices(topology: str, slices: int = 1) -> list[jax.Device]:
  """The devices of a named TPU topology (deviceless: compile-only); `slices` > 1:
  that many copies of the slice, joined over the data-center network (each device
  has a `slice_index`)."""
  chip = chip_for_topology(topology)
  topology = topology_name(topology)
  if slices < 1:
    raise ConfigError("--slices", f"is {slices}; a plan runs on at least 1 slice.",
                      "pass --slices=1 or more.")
  if slices > 1 and not chip.dcn_bandwidth:
    raise ConfigError(
        "--slices", f"rung has no data-center network figure for {chip.name} "
        "(sharding/chips.py cites one per chip), so it cannot price the traffic "
        "between slices.", "use --slices=1, or a v5e or v5p topology.")
  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError(
        "--topology", f"compiling for {topology} needs libtpu, the TPU compiler, "
        "which is not installed (no TPU is needed, only the library).",
        f'pip install "jax[tpu]=={jax.__version__}" (what rung\'s [tpu] extra '
        "installs: libtpu for this jax), from any directory.")
  from jax.experimental import topologies
  try:
    with _quiet_libtpu():
      kwargs = {"num_slices": slices} if slices > 1 else {}
      desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                          **kwargs)
      if devices_per_chip(list(desc.devices)) > 1:
        # v4 lists each TensorCore as a device; its runtime (and jax.make_mesh)
        # runs one device per chip, both cores together ("megacore").
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chip_config_name="megacore", **kwargs)
  except Exception as err:  # noqa: BLE001 -- libtpu's message names the problem
    why = str(err).strip().splitlines()[-1]
    if "lockfile" in why:  # another process started libtpu: not the topology
      raise ConfigError(
          "--topology", f"libtpu is held by another process on this host ({why})",
          "let that process end, or stop it: a compile, a notebook kernel or a "
          "script that imported jax with libtpu installed and without "
          "JAX_PLATFORMS=cpu holds libtpu until it exits (`fuser -v "
          "/tmp/libtpu_lockfile` names it); remove the file only if no process "
          "holds it.") from None
    name = topology.split(":", 1)[0]
    host = "2x2x1" if chip.wraparound == "cube" else "2x2"
    smallest = f"{name}:{host}"
    raise ConfigError("--topology", f"libtpu cannot build {topology!r}: {why}",
                      f"use a {name} slice of at least one host ({smallest}; "
                      "deviceless compiles take no smaller shape), e.g. "
                      f"--topology={smallest}." if topology != smallest else
                      "libtpu's reason above names what it refused; this is the "
                      f"smallest {name} slice a deviceless compile takes.") from None
  return list(desc.devices)


def devices_per_chip(devices: list[jax.Device]) -> int:
  """Devices per chip: 2 where a topology lists each TensorCore as a device (v4's
  default; `topology_devices` asks for one per chip), else 1."""
  chips = {(getattr(d, "slice_index", 0), *getattr(d, "coords", (d.id,)))
           for d in devices}
  return max(1, len(devices) // len(chips))


# MaxText's flags for its published v5e / v5p training configs (LIBTPU_INIT_ARGS
# in MaxText/configs/v5e/16b.sh etc.; benchmarks/xla_flags_library.py names them
# CF_FOR_ALL_GATHER and DATA_PARALLEL_OVERLAP): continuation fusion of all-gathers
# with compute, and data-parallel all-reduce pipelining.
FLAG_PRESETS = {"maxtext": (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true "
    "--xla_tpu_data_parallel_opt_different_sized_ops=true "
    "--xla_tpu_enable_async_collective_fusion=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true "
    "--xla_enable_async_all_gather=true")}


def parse_flags(flags: str | dict | None) -> dict[str, Any]:
  """'--xla_a=true --xla_b=3' (LIBTPU_INIT_ARGS style, or a FLAG_PRESETS name
  among them) -> {'xla_a': True, 'xla_b': 3}; a dict passes through."""
  if not flags:
    return {}
  if isinstance(flags, dict):
    return dict(flags)
  out: dict[str, Any] = {}
  for word in flags.replace(",", " ").split():
    if word in FLAG_PRESETS:
      out.update(parse_flags(FLAG_PRESETS[word]))
      continue
    name, eq, value = word.lstrip("-").partition("=")
    if not eq:
      raise ConfigError("--libtpu_flags", f"{word!r} is neither NAME=VALUE nor one "
                        f"of the presets {sorted(FLAG_PRESETS)}.",
                        "write e.g. --libtpu_flags='--xla_enable_async_all_gather"
                        "=true' or --libtpu_flags=maxtext.")
    low = value.lower()
    out[name] = (low == "true" if low in ("true", "false")
                 else int(value) if re.fullmatch(r"-?\d+", value) else value)
  return out


def compile_step(config, topology: str, what: str = "train",
                 dump_hlo: str | None = None,
                 devices: list[jax.Device] | None = None,
                 compiler_flags: str | dict | None = None,
                 slices: int = 1) -> Report:
  """Compiles `config`'s train step (or decode step) for `topology` and reports
  what it needs and does. Raises ConfigError for a plan that cannot run.

  `what="decode"`: one KV-cache decode step (a token per sequence) for
  `train.batch_size` sequences and a cache of `data.seq_len` positions.
  `devices`: the topology's, when the caller already has them.
  `compiler_flags`: libtpu / XLA options for this compile (`parse_flags`).
  `slices`: copies of the slice joined over DCN; the outer mesh axes span them
  (`sharding.mesh.slice_split`).
  """
  if what not in WHAT:
    raise ConfigError.choice("--what", what, WHAT, flag="--what")
  devices = devices or topology_devices(topology, slices)
  topology = topology_name(topology)
  chip = chip_for_topology(topology).per_device(devices_per_chip(devices))
  try:
    sizes = validate_config(config, len(devices))
  except MeshTooLarge as err:  # the mesh's hint knows hosts, not topologies
    raise err.elsewhere(f"or compile for a larger --topology than {topology}"
                        ) from None
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.normalize_rules(config.mesh.rules)
  cfg = ModelConfig.from_config(config.model)
  spec = model_spec(cfg, rules, pipeline_from_config(config, sizes))
  batch, length = config.train.batch_size, config.data.seq_len
  if what == "train":
    step, args = _train_step(config, spec, mesh, rules)
    tokens, per_param = batch * length, 6
    model_flops = flops_lib.flops_per_token(cfg, length) * tokens
  else:
    step, args = decode_program(cfg, spec, mesh, rules, batch, length)
    tokens, per_param = batch, 2
    model_flops = flops_lib.decode_flops_per_token(cfg, length) * tokens
  attention_flops = model_flops - per_param * flops_lib.matmul_params(cfg) * tokens
  options = parse_flags(compiler_flags)

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step.lower(*args)
  error = ""
  try:
    compiled = compile_deviceless(lowered, options)
  except Exception as err:  # noqa: BLE001 -- XLA reports an oversized plan so
    if "No such compile option" in str(err) or "compile option" in str(err):
      raise ConfigError("--libtpu_flags", str(err).strip().splitlines()[0],
                        "check the flag's name against libtpu's (MaxText's "
                        "benchmarks/xla_flags_library.py lists common ones).") from None
    if "Failed to parse" in str(err):  # a known flag given a value it does not take
      raise ConfigError("--libtpu_flags", str(err).strip().splitlines()[0],
                        "give the flag one of the values the message lists.") from None
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    compiled, error = None, str(err).strip()
  seconds = time.perf_counter() - start
  stem = f"{what}_{topology.replace(':', '_')}"
  if dump_hlo:
    _dump(dump_hlo, stem, lowered, compiled)

  memory = _memory(args, what, compiled, chip, error)
  text = compiled.as_text() if compiled is not None else ""  # printed once, read thrice
  costs = (costs_lib.analyze(text, sharding.AXES, [sizes[a] for a in sharding.AXES])
           if compiled is not None else None)
  report = _report(topology, chip, what, sizes, len(devices), memory, costs,
                   model_flops, attention_flops, compiled, seconds, error)
  report.compiler_flags = options
  report.slices = len({getattr(d, "slice_index", 0) for d in devices})
  if not report.fits:
    report.to_fit = _to_fit(config, sizes, what)
  if compiled is not None and what == "train" and spec.pipeline.active:
    report.pipeline = _pipeline(spec.pipeline, text, sizes)
  if compiled is not None:
    _add_estimate(report, text, chip, list(mesh.devices.flat),
                  [sizes[a] for a in sharding.AXES],
                  attention_flops / len(devices) if costs.uncounted_kernels else 0.0)
  if compiled is not None and what == "train" and args[0].diloco is not None:
    report.diloco_syncs = _diloco_syncs(config, spec, mesh, args[0], chip, options,
                                        report.slices, dump_hlo and (dump_hlo, stem))
  return report


def _to_fit(config, sizes: dict[str, int], what: str) -> list[str]:
  """Config flags that hold less per device than `config` does, none of them
  already set: full remat and more accumulation micro-batches (the fewest the
  batch splits into, `sharding.validate.more_micro_batches`) for a train step;
  for a decode step, the largest batch whose cache holds at most half the rows
  per device (a batch the mesh does not split is replicated, so half the
  sequences can hold more)."""
  if what != "train":
    smaller = _half_the_rows(config, sizes)
    return [f"--config.train.batch_size={smaller}"] if smaller else []
  fixes = []
  if config.model.remat != "full":
    fixes.append("--config.model.remat=full")
  more = sharding.validate.more_micro_batches(config, sizes)
  if more is not None:
    fixes.append(f"--config.train.grad_accum_steps={more}")
  return fixes


def _half_the_rows(config, sizes: dict[str, int]) -> int | None:
  """The largest batch below `config`'s whose decode cache holds at most half
  its rows on each device of mesh `sizes` (the batch is split over the leading
  `batch` axes that divide it, `sharding.logical_to_spec`), or None when each
  device holds one row."""
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  rules = sharding.normalize_rules(config.mesh.rules)

  def rows(batch: int) -> int:  # rows of the cache one device holds
    spec = sharding.logical_to_spec(("batch",), rules, mesh, (batch,))
    return batch // (sharding.axis_size(mesh, spec[0]) if len(spec) else 1)

  held = rows(config.train.batch_size)
  return next((b for b in range(config.train.batch_size - 1, 0, -1)
               if rows(b) <= held // 2), None)


def _diloco_syncs(config, spec, mesh, state, chip: Chip, options: dict,
                  slices: int, dump: tuple[str, str] | None = None
                  ) -> list[dict[str, Any]]:
  """Each fragment's DiLoCo synchronisation (`train.diloco.make_sync`, the
  program the loop runs every `diloco.sync_every` inner steps per fragment),
  compiled on `mesh` with the inner step's state: per fragment, `seconds` (its
  schedule estimate), `exposed_communication` (seconds by mesh axes),
  `received_bytes` (per device, by mesh axes), `temporaries`, `total` (bytes per
  device: arguments + temporaries + unaliased outputs + code), `fits`,
  `compile_seconds`. `dump`: (directory, stem) writes each program as
  `<stem>_sync_fragment<p>.*` (`_dump`)."""
  dl = DiLoCo.from_config(config, mesh.shape["diloco"])
  frags = Fragments.of(spec.abstract_params, spec.logical, dl.fragments)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  shape = [mesh.shape[a] for a in sharding.AXES]
  out = []
  for p in range(dl.fragments):
    sync = make_sync(dl, frags, spec.abstract_params, p, "sync", shardings)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      lowered = sync.lower(state)
    compiled = compile_deviceless(lowered, options)
    seconds = time.perf_counter() - start
    if dump:
      _dump(dump[0], f"{dump[1]}_sync_fragment{p}", lowered, compiled)
    text = compiled.as_text()
    received = _received_by_axes(costs_lib.analyze(text, sharding.AXES, shape))
    est = _schedule_estimate(text, chip, list(mesh.devices.flat), shape, slices, 0.0)
    if est.collectives.get("dcn_bytes", 0):  # send / recv between slices
      axes, dcn = _dcn_received(est, chip, shape, slices)
      received["+".join(axes) + " (DCN)"] = dcn
    stats = compiled.memory_analysis()
    total = sum(_compiled_memory(stats).values())
    out.append(dict(fragment=p, sync_every=dl.sync_every, seconds=est.seconds,
                    exposed_communication=est.exposed, received_bytes=received,
                    temporaries=float(stats.temp_size_in_bytes), total=total,
                    fits=total <= chip.hbm_bytes, compile_seconds=seconds))
  return out


def _pipeline(pipe, text: str, sizes: dict[str, int]) -> dict[str, Any]:
  """The pipeline's bubble read from the compiled loops, next to its formula."""
  loops = costs_lib.pipeline_loops(text, sharding.AXES,
                                   [sizes[a] for a in sharding.AXES],
                                   pipe.repeats * pipe.microbatches)
  return dict(schedule=pipe.schedule, stages=pipe.stages,
              microbatches=pipe.microbatches, repeats=pipe.repeats,
              iterations=loops.trips if loops else [],
              bubble=loops.bubble if loops else math.nan,
              bubble_formula=pipe.bubble)


def compile_deviceless(lowered, options: dict | None = None):
  """`lowered.compile(options)` writing nothing to JAX's persistent compilation
  cache. An executable compiled for a topology without devices is written there
  ($JAX_COMPILATION_CACHE_DIR) but cannot be read back ("PjRtCompiler must be
  constructed with a Client"), so every later compile of the same program warned
  and compiled again, and the cache filled with entries no run can use. The
  write is skipped by an infinite minimum compile time; turning the cache off
  instead would keep it off for the rest of the process when this is the first
  compile (JAX decides whether a process uses the cache once)."""
  name = "jax_persistent_cache_min_compile_time_secs"
  minimum = getattr(jax.config, name)
  jax.config.update(name, math.inf)
  try:
    return lowered.compile(options) if options else lowered.compile()
  finally:
    jax.config.update(name, minimum)


def _add_estimate(report: Report, text: str, chip: Chip, devices, mesh_shape,
                  kernel_flops: float) -> None:
  """The schedule estimate into `report` (`aot/schedule.py`); `kernel_flops`:
  the per-device FLOPs of Pallas kernels without a cost estimate, spread over
  their calls."""
  est = _schedule_estimate(text, chip, devices, mesh_shape, report.slices, kernel_flops)
  report.time["estimate"] = est.seconds
  report.exposed_communication = est.exposed
  report.mfu_estimate = (report.model_flops / report.devices
                         / (chip.peak_flops * est.seconds)) if est.seconds else 0.0
  report.schedule = {"ops": est.ops, "communication": est.communication,
                     "hbm": est.hbm, "collectives": est.collectives,
                     "matmul_efficiency": chip.matmul_efficiency}
  dcn = est.collectives.get("dcn_bytes", 0)
  if dcn:  # send / recv between slices: not in the HLO's collectives (aot/hlo.py)
    axes, received = _dcn_received(est, chip, mesh_shape, report.slices)
    report.collectives.append(dict(
        kind="send/recv (DCN)", axes=axes, group_size=report.slices,
        count=est.collectives.get("dcn_transfers", 0), bytes=float(dcn),
        received_bytes=received))
    report.received_bytes["+".join(axes) + " (DCN)"] = received
    t = report.time
    t["dcn"] = est.dcn_seconds
    t["roofline"] = max(t["compute"], t["hbm"], t["ici"], t["dcn"])
    report.mfu_bound = report.model_flops / report.devices / (
        chip.peak_flops * t["roofline"])


def _schedule_estimate(text: str, chip: Chip, devices, mesh_shape, slices: int,
                       kernel_flops: float) -> schedule_lib.Estimate:
  """`aot/schedule.py`'s estimate of one compiled program on the devices' torus,
  the mesh axes that span slices priced over DCN."""
  calls = schedule_lib.kernel_calls(text) if kernel_flops else 0
  torus = schedule_lib.Torus.from_devices(devices, chip)
  split = sharding.mesh.slice_split(dict(zip(sharding.AXES, mesh_shape)), slices)
  return schedule_lib.estimate(text, chip, torus, sharding.AXES, mesh_shape,
                               kernel_flops / calls if calls else 0.0,
                               "+".join(a for a in sharding.AXES if split[a] > 1)
                               + " (DCN)")


def _received_by_axes(costs) -> dict[str, float]:
  """Bytes a device receives per step, by the mesh axes its collectives span
  ("data", "data+fsdp", ...: the keys of `exposed_communication`)."""
  received: dict[str, float] = {}
  for c in costs.collectives:
    key = "+".join(c.axes) or "?"
    received[key] = received.get(key, 0.0) + c.received_bytes
  return received


def _dcn_received(est: schedule_lib.Estimate, chip: Chip, mesh_shape, slices: int
                  ) -> tuple[list[str], float]:
  """(the mesh axes that span slices, bytes a device receives over DCN) of a
  program whose estimate priced send / receive pairs between slices."""
  split = sharding.mesh.slice_split(dict(zip(sharding.AXES, mesh_shape)), slices)
  return ([a for a in sharding.AXES if split[a] > 1],
          est.dcn_seconds * chip.dcn_bandwidth)


def state_bytes(config, devices: list[jax.Device]) -> float:
  """Bytes per device of the train state and batch under `config.mesh`, from the
  shardings alone (no compile): a floor under what the train step needs."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.normalize_rules(config.mesh.rules)
  spec = model_spec(ModelConfig.from_config(config.model), rules)
  _, state, batch = _train_args(config, spec, mesh, rules)
  return _device_bytes(state) + _device_bytes(batch)


# --- the two steps -------------------------------------------------------------

def _train_args(config, spec, mesh, rules):
  """(optimizer, abstract train state, abstract batch), sharded on `mesh`."""
  t = config.train
  tx = make_optimizer(config.optim, t.steps)
  data = batch_sharding(mesh, rules, t.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, config.data.seq_len), jnp.int32,
                                   sharding=data) for k in _BATCH_FIELDS}
  comp = Compression.from_config(config.optim)
  dl = DiLoCo.from_config(config, mesh.shape["diloco"])
  return tx, abstract_state(spec, tx, mesh, comp, dl=dl), batch


def _train_step(config, spec, mesh, rules):
  """The train step (DiLoCo, mesh.diloco > 1: the inner step) and its abstract
  arguments."""
  tx, state, batch = _train_args(config, spec, mesh, rules)
  args = (spec, tx, schedule(config.optim, config.train.steps), config.train,
          jax.tree.map(lambda x: x.sharding, state), batch["inputs"].sharding)
  if state.diloco is not None:
    return make_inner_step(*args), (state, batch)
  return (make_train_step(*args, comp=Compression.from_config(config.optim)),
          (state, batch))


def decode_program(cfg: ModelConfig, spec, mesh, rules, batch: int,
                   max_length: int):
  """(infer.decode.decode_step, its abstract arguments): the program
  `infer.generate` runs for every new token (greedy, one stop id), for `batch`
  sequences and a cache of `max_length` positions, with the shardings generate
  gives its arguments (`infer.decode.abstract_inputs`)."""
  params = abstract_params(spec, mesh)
  cache = cache_struct(cfg, batch, max_length, rules, mesh)
  with jax.set_mesh(mesh):
    args = decode.abstract_inputs(spec.graphdef, params, cache, mesh, rules,
                                  cfg.vocab_size, unit=cfg.unit)
  return decode.decode_step, args


# --- figures ---------------------------------------------------------------------

def _device_bytes(tree, memory: str = "device") -> float:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs: in its own
  memory (`memory="device"`), or those placed in host memory for it (`"host"`:
  memory kind pinned_host or unpinned_host, e.g. `optim.offload=host`)."""
  def in_host(x):
    return (getattr(x.sharding, "memory_kind", None) or "").endswith("host")
  return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if in_host(x) == (memory == "host")))


def _memory(args, what: str, compiled, chip: Chip, error: str) -> dict[str, float]:
  if what == "train":
    state, batch = args
    parts = {"params": _device_bytes(state.params),
             # with gradient compression, its per-replica buffers too
             "optimizer": _device_bytes((state.opt_state, state.compression))
                          + _device_bytes(state.step),
             # DiLoCo: every replica's parameters, the outer momentum and
             # the outer gradients in flight
             "diloco": _device_bytes(state.diloco),
             "inputs": _device_bytes(batch)}
    host = {"optimizer_host": _device_bytes(state.opt_state, "host")}
    held = 0.0
  else:  # decode_step's (graphdef, params, layers, cache, logits, done, key, ...)
    _, params, layers, cache, *inputs = args
    # The program reads the per-step copies `layers`, not the stacked layer
    # weights, which jit drops from its arguments; the model serving it still
    # holds them (`held`), so they count towards what a device needs.
    parts = {"params": _device_bytes({k: v for k, v in params.items() if k != "layers"})
                       + _device_bytes(layers),
             "optimizer": 0.0,
             "inputs": _device_bytes(cache) + _device_bytes(  # not the PRNG key
                 [x for x in inputs if isinstance(x, jax.ShapeDtypeStruct)
                  and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)])}
    host = {"optimizer_host": 0.0}
    held = _device_bytes(params["layers"])
  m = {**parts, **host, "held": held, "hbm": float(chip.hbm_bytes)}
  if compiled is None:  # refused: the state, and the temporaries XLA asked for
    m.update(arguments=sum(parts.values()), temporaries=_refused_temporaries(error),
             outputs=math.nan, code=math.nan)
    m["total"] = m["arguments"] + m["temporaries"] + held
    return m
  m.update(_compiled_memory(compiled.memory_analysis()))
  m["total"] = m["arguments"] + m["temporaries"] + m["outputs"] + m["code"] + held
  return m


def _compiled_memory(stats) -> dict[str, float]:
  """A compiled program's bytes per device: arguments, temporaries, outputs not
  aliased to arguments, and code (their sum: what it needs to run)."""
  return dict(arguments=float(stats.argument_size_in_bytes),
              temporaries=float(stats.temp_size_in_bytes),
              outputs=float(stats.output_size_in_bytes - stats.alias_size_in_bytes),
              code=float(stats.generated_code_size_in_bytes))


def _refused_temporaries(error: str) -> float:
  """'... required for HLO temporaries (86.47G) exceeds ...' -> bytes (NaN if absent)."""
  m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", error)
  if not m:
    return math.nan
  return float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def _report(topology, chip: Chip, what, sizes, n, memory, costs, model_flops,
            attention_flops, compiled, seconds, error) -> Report:
  fits = not error and memory["total"] <= chip.hbm_bytes
  if costs is None:
    return Report(topology, chip.name, what, sizes, n, memory, False, math.nan,
                  model_flops, 0, math.nan, [], {}, {}, math.nan, seconds, error)
  per_device_model = model_flops / n
  # Pallas kernels without a declared cost are missing from the compiled count; the
  # compute term takes them at the model's attention FLOPs.
  kernels = attention_flops / n if costs.uncounted_kernels else 0.0
  t = {"compute": (costs.flops + kernels) / chip.peak_flops,
       "hbm": costs.hbm_bytes / chip.hbm_bandwidth,
       # Received bytes over the receive half of the chip's bidirectional ICI.
       "ici": sum(c.received_bytes for c in costs.collectives)
       / (chip.ici_bandwidth / 2)}
  t["roofline"] = max(t.values())
  analysis = compiled.cost_analysis()
  analysis = (analysis[0] if isinstance(analysis, list) else analysis) or {}
  xla = {k: float(analysis.get(k, math.nan))
         for k in ("flops", "bytes accessed", "optimal_seconds")}
  # XLA gives 0 or a negative number where it has no estimate: none, not a time
  t["compiler"] = xla["optimal_seconds"] if xla["optimal_seconds"] > 0 else math.nan
  collectives = [dict(kind=c.kind, axes=list(c.axes), group_size=c.group_size,
                      count=c.count, bytes=c.bytes, received_bytes=c.received_bytes)
                 for c in costs.by_kind()]
  mfu = per_device_model / (chip.peak_flops * t["roofline"]) if t["roofline"] else 0
  received = _received_by_axes(costs)
  return Report(topology, chip.name, what, sizes, n, memory, fits, costs.flops,
                model_flops, costs.uncounted_kernels, costs.hbm_bytes, collectives,
                t, xla, mfu, seconds, error, received_bytes=received,
                unknown_trip_counts=costs.unknown_trip_counts)


def _dump(directory: str, stem: str, lowered, compiled) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{stem}.lowered.mlir"), "w") as f:
    f.write(lowered.as_text())
  if compiled is not None:
    with open(os.path.join(directory, f"{stem}.compiled.hlo"), "w") as f:
      f.write(compiled.as_text())


# --- the readable table ----------------------------------------------------------

def _table(r: Report) -> str:
  size = sharding.format_bytes
  mesh = " ".join(f"{a}={s}" for a, s in r.mesh.items())
  m = r.memory
  where = f"{r.slices} x {r.topology} (over DCN)" if r.slices > 1 else r.topology
  what = (f"{r.what} step" if r.what != "train" or not r.mesh.get("diloco", 1) > 1
          else "train step (DiLoCo's inner step; its synchronisations at the end)")
  lines = [f"{what} on {where}: {r.devices} x TPU {r.chip} "
           f"({size(m['hbm'])} HBM each), mesh {mesh}; "
           f"{'refused after' if r.error else 'compiled in'} {r.compile_seconds:.1f} s",
           "", "memory per device"]
  rows = [("parameters", m["params"]), ("optimizer state", m["optimizer"]),
          *([("optimizer state (host)", m["optimizer_host"])]
            if m.get("optimizer_host") else []),
          *([("DiLoCo replicas, outer", m["diloco"])] if m.get("diloco") else []),
          ("batch" if r.what == "train" else "tokens + KV cache", m["inputs"]),
          ("arguments (compiled)", m["arguments"]), ("temporaries", m["temporaries"]),
          *([("stacked weights (held)", m["held"])] if m.get("held") else []),
          ("outputs not aliased", m["outputs"]), ("generated code", m["code"]),
          ("total", m["total"])]
  lines += [f"  {k:<24}{'-' if math.isnan(v) else size(v):>12}" for k, v in rows]
  verdict = "fits" if r.fits else "DOES NOT FIT"
  lines.append(f"  {verdict} in {size(m['hbm'])} of HBM"
               + (f" ({m['total'] / m['hbm']:.0%})" if math.isfinite(m["total"]) else ""))
  if not r.fits:
    tries = " or ".join(r.to_fit)
    lines.append(f"  to fit: `plan --topology={r.topology}` compiles every mesh and "
                 "remat policy and ranks those that fit"
                 + (f"; or try {tries}" if tries else "")
                 + "; or more devices (a larger --topology)" if r.what == "train" else
                 "  to fit: " + (f"{tries}, " if tries else "")
                 + "a shorter data.seq_len, or more devices (a larger --topology)")
  if r.error:
    lines += ["", "the compiler refused the plan:", "  " + r.error.splitlines()[0]]
    return "\n".join(lines)
  t = r.time
  bound = r.bound()
  lines += [
      "", "compute per step",
      f"  FLOPs per device (compiled)  {r.flops:.3e}"
      + (f"  (without {r.uncounted_kernels} Pallas kernel calls; the roofline "
         "takes them at the model's attention FLOPs)" if r.uncounted_kernels else ""),
      f"  model FLOPs per device       {r.model_flops / r.devices:.3e}  "
      f"(PaLM count, causal attention halved: "
      f"{'6N + attention' if r.what == 'train' else '2N + attention'})",
      f"  HBM bytes per device         {size(r.hbm_bytes)}",
      *([f"  WARNING: {r.unknown_trip_counts} loop(s) of unknown trip count "
         "counted once: the FLOPs and times below are too low"]
        if r.unknown_trip_counts else []),
      "", "time per step",
      f"  roofline                     {t['roofline'] * 1e3:.2f} ms ({bound}-bound: "
      f"compute {t['compute'] * 1e3:.2f}, HBM {t['hbm'] * 1e3:.2f}, "
      f"ICI {t['ici'] * 1e3:.2f}"
      + (f", DCN {t['dcn'] * 1e3:.2f}" if "dcn" in t else "") + " ms)",
      f"  MFU upper bound              {r.mfu_bound:.1%}",
      *_estimate_lines(r),
      "  compiler estimate            "
      + (f"{t['compiler'] * 1e3:.2f} ms (XLA's optimal_seconds; counts each loop body "
         "once)" if t["compiler"] > 0 else
         f"unavailable (XLA's optimal_seconds is {r.compiler['optimal_seconds']:.3g} s "
         "for this program, not a time)"),
      *_pipeline_lines(r),
      "", "collectives per step"]
  if not r.collectives:
    lines.append("  none")
  else:
    lines.append("  received per device          " + ", ".join(
        f"{size(b)} over {axes}" for axes, b in sorted(r.received_bytes.items())))
  for c in r.collectives:
    axes = "+".join(c["axes"]) or "?"
    lines.append(f"  {c['kind']:<20} x{c['count']:<7.0f} {size(c['bytes']):>11} "
                 f"result, {size(c['received_bytes']):>11} received over {axes} "
                 f"(groups of {c['group_size']})")
  return "\n".join(lines + _diloco_lines(r))


def _diloco_lines(r: Report) -> list[str]:
  if not r.diloco_syncs:
    return []
  size = sharding.format_bytes
  every = r.diloco_syncs[0]["sync_every"]
  lines = ["", f"DiLoCo synchronisations (one program per fragment, each every "
               f"{every} inner steps)"]
  for s in r.diloco_syncs:
    received = ", ".join(f"{size(b)} over {a}" for a, b in sorted(
        s["received_bytes"].items())) or "nothing"
    exposed = ", ".join(f"{a} {t * 1e3:.2f} ms" for a, t in sorted(
        s["exposed_communication"].items(), key=lambda x: -x[1])) or "none"
    lines.append(f"  fragment {s['fragment']:<20}{s['seconds'] * 1e3:.2f} ms estimate; "
                 f"receives {received}; exposed {exposed}; {size(s['total'])} in all, "
                 f"{'fits' if s['fits'] else 'DOES NOT FIT'}")
  per_step = sum(s["seconds"] for s in r.diloco_syncs) / every
  inner = r.time.get("estimate", math.nan)
  lines.append(f"  amortised                    {per_step * 1e3:.3f} ms per inner step"
               + (f" ({per_step / inner:.2%} of the inner step's estimate)"
                  if inner > 0 else ""))
  return lines


def _pipeline_lines(r: Report) -> list[str]:
  if not r.pipeline:
    return []
  p = r.pipeline
  formula = ("2(S-1)/(M+2(S-1))" if p.get("schedule") == "1f1b"
             else "(S-1)/(R*M+S-1)")
  loops = ("/".join(map(str, p["iterations"])) + " iterations" if p["iterations"]
           else "none found")
  return [f"  pipeline bubble              {p['bubble']:.1%} of stage-time idle in "
          f"the compiled loops ({loops}); {p.get('schedule', 'gpipe')} formula {formula} = "
          f"{p['bubble_formula']:.1%} (S={p['stages']}, M={p['microbatches']}, "
          f"R={p['repeats']})"]


def _estimate_lines(r: Report) -> list[str]:
  if "estimate" not in r.time:
    return []
  s = r.schedule
  exposed = ", ".join(f"{a} {t * 1e3:.2f} ms" for a, t in sorted(
      r.exposed_communication.items(), key=lambda x: -x[1])) or "none"
  flags = " ".join(f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
                   for k, v in r.compiler_flags.items()) or "none (libtpu defaults)"
  hbm = s.get("hbm", 0.0)
  floor = ", the floor" if hbm >= r.time["estimate"] > s["ops"] else ""
  return [f"  schedule estimate            {r.time['estimate'] * 1e3:.2f} ms "
          f"(ops {s['ops'] * 1e3:.2f} ms, all HBM traffic with asynchronous copies "
          f"{hbm * 1e3:.2f} ms{floor}; matmuls at "
          f"{s.get('matmul_efficiency', 1):.1%} of peak; collectives "
          f"{s['communication'] * 1e3:.2f}"
          f" ms, {s['collectives'].get('asynchronous', 0)} async / "
          f"{s['collectives'].get('synchronous', 0)} sync per step)",
          f"  exposed communication        {exposed} (by mesh axes)",
          f"  MFU estimate                 {r.mfu_estimate:.1%}",
          f"  compiler flags               {flags}"]
