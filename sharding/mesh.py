"""The device mesh: axis names, sizes from config (one may be -1), device order."""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from sharding.errors import ConfigError, MeshTooLarge, closest
from sharding.report import count

# Outer to inner. `tensor` is innermost: it communicates most, so it gets the
# fastest links in the topology-aware device order; `diloco` (DiLoCo replicas,
# which synchronise every H steps) is outermost, on the slowest links; `stage`
# (pipeline stages, which pass one activation per microbatch) sits between the
# replicas and the axes that split a stage's work.
AXES = ("diloco", "data", "stage", "fsdp", "expert", "sequence", "tensor")
# Axes a batch is split over (the data-parallel size is their product).
BATCH_AXES = ("diloco", "data", "fsdp", "expert")


def resolve_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Returns {axis: size} with a -1 filled in; raises ConfigError if it cannot fit
  or names a key that is not a mesh axis (a misspelt axis was left at 1). An axis
  absent from `mesh_cfg` has size 1; `rules` (a config's mesh group) is not a size."""
  unknown = [k for k in mesh_cfg if k not in AXES and k != "rules"]
  if unknown:
    near = closest(unknown[0], AXES)
    raise ConfigError(
        f"mesh.{unknown[0]}", f"{unknown[0]!r} is not a mesh axis; the mesh axes are "
        f"{', '.join(AXES)}.",
        f"name axes of the mesh{f', e.g. {near} for {unknown[0]!r}' if near else ''}.")
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(
        f"mesh.{bad[0]}", f"mesh axis size {sizes[bad[0]]} is not allowed.",
        "use a positive size, or -1 on one axis to take the remaining devices.")
  if len(fill) > 1:
    raise ConfigError(
        f"mesh.{fill[1]}", f"only one mesh axis may be -1, got {fill}.",
        f"give explicit sizes to all but one of {fill}.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill and num_devices % known == 0:
    sizes[fill[0]] = num_devices // known
  product = math.prod(sizes.values())
  if product != num_devices:
    fix = mesh_fix(sizes, num_devices)
    named = next((a for a in fix if sizes[a] > 1), next(iter(fix)))
    if fill:
      what = (f"the axes other than mesh.{fill[0]}=-1 multiply to {known}, which "
              f"does not divide {devices_phrase(num_devices)}, so mesh.{fill[0]} cannot "
              "take the rest.")
    else:
      shape = ",".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all 1"
      what = (f"the mesh ({shape}) has {devices_phrase(product)} but {num_devices} "
              f"{'is' if num_devices == 1 else 'are'} available.")
    fix = resize_fix(fix, num_devices)
    if product > num_devices and not fill:
      raise MeshTooLarge(f"mesh.{named}", what, fix, wanted=product)
    raise ConfigError(f"mesh.{named}", what, fix + ".")
  return sizes


def resize_fix(changes: Mapping[str, int], num_devices: int, also: str = "",
               because: str = "") -> str:
  """The fix text of a mesh resized to `num_devices` by `changes` (`mesh_fix`),
  with flags `also` and a reason `because` added (e.g. a batch size that splits)."""
  return ("pass " + mesh_flags(changes) + (f" {also}" if also else "")
          + f" (the mesh axes must multiply to {num_devices}; -1 on one axis takes "
          "the devices the others leave" + (f"; {because}" if because else "") + ")")


def mesh_flags(changes: Mapping[str, int]) -> str:
  """The flags that make `changes` to a mesh, as fixes give them:
  `--config.mesh.fsdp=2 --config.mesh.data=-1`. `respell_mesh_flags` reads them
  back."""
  return " ".join(f"--config.mesh.{a}={v}" for a, v in changes.items())


# A run of `mesh_flags` in a message.
_MESH_FLAGS = re.compile(r"--config\.mesh\.\w+=-?\d+(?:\s+--config\.mesh\.\w+=-?\d+)*")


def respell_mesh_flags(text: str, spell: Callable[[dict[str, int]], str]) -> str | None:
  """`text` with its first run of `mesh_flags` replaced by `spell(changes)` (a
  Python caller's argument in place of the command line's flags); None when it
  holds none."""
  found = _MESH_FLAGS.search(text)
  if not found:
    return None
  changes = {a: int(v) for a, v in re.findall(r"--config\.mesh\.(\w+)=(-?\d+)",
                                              found.group(0))}
  return text[:found.start()] + spell(changes) + text[found.end():]


def largest_divisor(n: int, at_most: int) -> int:
  """The largest d <= at_most that divides n (1 at least)."""
  return max(d for d in range(1, max(at_most, 1) + 1) if n % d == 0)


def devices_phrase(n: int) -> str:
  """"1 device", "8 devices"."""
  return count(n, "device")


def mesh_fix(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """{axis: size} changes that make the mesh fit `num_devices`: explicitly sized
  axes cut to the largest sizes whose product divides the devices (one axis if one
  suffices, the largest such), then -1 on `data` unless an axis already is."""
  explicit = {a: s for a, s in sizes.items() if s > 1}
  fix: dict[str, int] = {}
  if num_devices % math.prod(explicit.values()):
    for axis in sorted(explicit, key=lambda a: -explicit[a]):
      others = math.prod(s for a, s in explicit.items() if a != axis)
      if num_devices % others == 0:
        fix[axis] = largest_divisor(num_devices // others, explicit[axis])
        break
    else:
      room = num_devices
      for axis in sorted(explicit, key=lambda a: explicit[a]):
        fix[axis] = largest_divisor(room, explicit[axis])
        room //= fix[axis]
      fix = {a: v for a, v in fix.items() if v != explicit[a]}
  if -1 not in sizes.values():
    fix["data"] = -1
  return fix


def make_mesh(mesh_cfg: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the 7-axis mesh with Auto axis types and topology-aware device order.
  Devices of several TPU slices (`slice_index`) get a hybrid mesh whose outer
  axes span the slices (`slice_split`)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  types = (AxisType.Auto,) * len(AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
  from jax.experimental import mesh_utils
  dcn = slice_split(sizes, slices)
  ici = tuple(s // dcn[a] for a, s in zip(AXES, shape))
  grid = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in AXES),
                                              devices)
  return Mesh(grid, AXES, axis_types=types)


def slice_split(sizes: Mapping[str, int], slices: int) -> dict[str, int]:
  """How many slices each axis spans: the outermost axes take them (DiLoCo
  replicas, then data parallelism, ...), as far as their sizes divide the count.
  Raises ConfigError when the axes cannot hold `slices`."""
  out, left = {}, slices
  for a in AXES:
    out[a] = math.gcd(left, sizes[a])
    left //= out[a]
  if left != 1:
    raise ConfigError(
        "mesh", f"the {slices} slices must split the mesh axes (outermost "
        f"first), but the axis sizes leave a factor of {left} over.",
        f"make mesh.data (or mesh.diloco) a multiple of {slices}, e.g. "
        f"--config.mesh.data={slices}.")
  return out


def axis_size(mesh: Mesh, axes: str | Sequence[str]) -> int:
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def describe(mesh: Mesh) -> str:
  """One line, e.g. 'mesh diloco=1 data=2 stage=1 fsdp=1 expert=1 sequence=1
  tensor=4 over 8 cpu devices'."""
  sizes = " ".join(f"{a}={mesh.shape[a]}" for a in AXES)
  platform = mesh.devices.flat[0].platform
  n = mesh.devices.size
  return f"mesh {sizes} over {count(n, f'{platform} device')}"
