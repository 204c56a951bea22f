"""Accelerator facts: one row per chip, the only place they are written.

`compile` and `plan` compare a compiled step against the TPU rows: per-device
memory against `hbm_bytes`, FLOPs against `peak_flops`, and the roofline step time
of `aot/compile.py` from FLOPs, HBM bytes and collective bytes over the three
rates. At run time the train loop's MFU and `benchmarks/gpu_check.py` divide by
`peak_flops` of the row matching the device's `device_kind` (TPU or GPU).

Sources (Google Cloud TPU documentation, read 2026-11-22; each page's "System
architecture" table):
- v4:  https://cloud.google.com/tpu/docs/v4 -- 275 TFLOP/s bf16, 32 GiB HBM2 at
       1200 GB/s. The page gives no per-chip ICI figure; 6 links (the 3D torus on
       the same page) x 400 Gb/s each way per link, as reported from the TPU v4 paper
       (ISCA 2023) at https://glennklockwood.com/garden/processors/TPUv4, is
       2 x 300 GB/s = 600 GB/s bidirectional.
- v5e: https://docs.cloud.google.com/tpu/docs/v5e -- 197 TFLOP/s bf16, 16 GB HBM2
       at 819 GB/s, bidirectional ICI 400 GB/s per chip (1600 Gb/s each way).
- v5p: https://docs.cloud.google.com/tpu/docs/v5p -- 459 TFLOP/s bf16, 95 GiB HBM
       at 2765 GB/s (2575 GiB/s), bidirectional ICI 1200 GB/s per chip (4800 Gb/s).
- v6e (Trillium): https://docs.cloud.google.com/tpu/docs/v6e -- 918 TFLOP/s bf16,
       32 GB HBM at 1600 GB/s, bidirectional ICI 800 GB/s per chip (3200 Gb/s).

NVIDIA data-center GPUs (NVIDIA's product pages and datasheets; the dense bf16
Tensor Core rate is half the "with sparsity" figure they print; `ici_bandwidth`
holds the GPU's total NVLink bandwidth, both directions). Not re-read from this
machine (no internet); the H200 figures agree with those quoted in the device
notes of the workplace this was built in, where a bf16 8192^3 matmul through
PyTorch measured 769-798 TFLOP/s on one H200 (about 80% of the dense peak):
- H100 SXM: https://www.nvidia.com/en-us/data-center/h100/ -- 1979 TFLOP/s bf16
       with sparsity (989.5 dense), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s.
- H200 SXM: https://www.nvidia.com/en-us/data-center/h200/ -- same Tensor Cores as
       H100 SXM (989.5 TFLOP/s dense bf16), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
- A100 SXM 80GB: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/
       a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf -- 312 TFLOP/s
       dense bf16, 80 GB HBM2e at 2039 GB/s, NVLink 600 GB/s.

Links, for the schedule estimate (`aot/schedule.py`): `ici_link_bandwidth` is the
bytes/s one ICI link carries in one direction, `ici_hop_latency` the seconds a
message spends per hop, `wraparound` which torus axes close into rings.
- Per-link bandwidth, one way: "How to Scale Your Model", part 2 ("How to think
  about TPUs"), https://jax-ml.github.io/scaling-book/tpus/ -- v4p 4.5e10,
  v5e 4.5e10, v5p 9e10, v6e 9e10 bytes/s (twice that bidirectional; quoted as
  W_ici = 9e10 bytes/s bidirectional for v5e at
  https://scaling-book-viz.aronteh.com/collectives). They agree within 10% with the
  per-chip figures above over the chip's ports: v5p 1200 GB/s / 6 links / 2
  directions = 100 GB/s; v5e 400 / 4 / 2 = 50 GB/s; v6e 800 / 4 / 2 = 100 GB/s
  (4 ICI ports per v5e and v6e chip: https://docs.cloud.google.com/tpu/docs/v6e).
- Per-hop latency: 1 us, the link latency the ASTRA-sim authors were given by the
  TPU team for TPU v3
  (https://astra-sim.github.io/astra-sim-docs/validation/hardware/tpu-validation.html);
  no later generation publishes one, so every row uses it.
- Wraparound (scaling book, same page): v4 and v5p slices close an axis into a ring
  when its length is a multiple of 4 (whole 4x4x4 cubes); v5e and v6e only on a
  full 16-chip axis of a 16x16 pod. A smaller axis is a line, which halves what a
  ring collective gets from its links.

Between slices (`--slices=N`: data-center network, DCN), `dcn_bandwidth` is the
bytes/s one chip sends to other slices, one way:
- v5e: https://docs.cloud.google.com/tpu/docs/v5e -- "Per-host NIC configuration
       2 x 100 Gbps NIC", 8 chips per host: 25 Gb/s = 3.125e9 bytes/s per chip
       (the page's 6.4 Tbps of DCN per 256-chip pod is the same figure).
- v5p: https://docs.cloud.google.com/tpu/docs/v5p-training -- "Data center network
       (DCN) bandwidth per chip (Gbps) 50": 6.25e9 bytes/s.
v4 and v6e: no per-chip or per-host DCN figure was found in their pages, so the
row has none and a multi-slice compile for them is refused. No DCN latency is
published; none is charged.

Matmul efficiency, for the schedule estimate: `matmul_efficiency` is the fraction
of `peak_flops` a large bf16 matmul reaches on the chip. The one published TPU
measurement found: JAX's Pallas TPU guide "Matrix Multiplication"
(https://docs.jax.dev/en/latest/pallas/tpu/matmul.html, section "Performance of
pipelined kernels"), on "TPU v5 lite" (v5e), times XLA's bf16 `jnp.matmul` of
two square matrices at 92.2960% of 197 TFLOP/s for 8192^3 and 84.3307% for
4096^3 (its times include the Python call, which weighs most at 1024^3: 9.1%).
Every TPU row uses the 8192^3 figure, 0.923: the matmuls that weigh in the
published runs `benchmarks/predict.py` checks against are larger than 8192^3 per
device (smaller ones reach less, as the 4096^3 figure shows, so estimates of small
models stay optimistic), and v4, v5p and v6e publish none (their MXUs are the same
systolic arrays, 128x128, 256x256 on v6e). GPU rows are not
compile targets and keep 1.

HBM capacities are taken as binary (the v5e and v6e pages write "16 GB" and
"32 GB"): the TPU compiler (libtpu 0.0.42.1, deviceless) refuses programs above
15.75 GiB on v5e, 31.25 GiB on v6e and 15.25 GiB per TensorCore on v4, the usable
part of 16, 32 and 2 x 16 GiB; on v5p it allows 95.74 GiB, a little above the
page's 95 GiB used here.

libtpu's default v4 topology lists each of a chip's two TensorCores as a device
(v5p's two act as one); rung's compiles ask for one device per chip, as v4 runs
(megacore: `aot.compile.topology_devices`), and `per_device` divides a chip's
figures among its devices wherever a topology still lists cores.
"""

from __future__ import annotations

import dataclasses

from sharding.errors import ConfigError

GB, GiB = 10 ** 9, 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int           # HBM capacity per chip
  peak_flops: float        # dense bf16 FLOP/s per chip
  hbm_bandwidth: float     # bytes/s per chip
  ici_bandwidth: float     # bytes/s per chip, both directions of all links together
  source: str
  platform: str = "tpu"    # "tpu" rows can be compile targets; "gpu" rows cannot
  ici_link_bandwidth: float = 0.0  # bytes/s per ICI link, one direction
  ici_hop_latency: float = 0.0     # seconds per hop
  wraparound: str = ""     # "cube": axes of 4k chips are rings; "pod": axes of 16
  dcn_bandwidth: float = 0.0  # bytes/s per chip to other slices, one way (0: unknown)
  matmul_efficiency: float = 1.0  # fraction of peak_flops a large matmul reaches

  def wraps(self, axis_length: int) -> bool:
    """Whether a slice axis of `axis_length` chips closes into a ring."""
    if self.wraparound == "cube":
      return axis_length % 4 == 0
    return self.wraparound == "pod" and axis_length == 16

  def per_device(self, devices_per_chip: int) -> "Chip":
    """The share of one device when a chip shows up as several."""
    if devices_per_chip == 1:
      return self
    n = devices_per_chip
    return dataclasses.replace(
        self, name=f"{self.name} (1/{n} chip)", hbm_bytes=self.hbm_bytes // n,
        peak_flops=self.peak_flops / n, hbm_bandwidth=self.hbm_bandwidth / n,
        ici_bandwidth=self.ici_bandwidth / n,
        ici_link_bandwidth=self.ici_link_bandwidth / n,
        dcn_bandwidth=self.dcn_bandwidth / n)


# XLA's bf16 8192^3 matmul on v5e, 92.2960% of peak (module docstring)
TPU_MATMUL_EFFICIENCY = 0.923

CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 32 * GiB, 275e12, 1200 * GB, 600 * GB,
         "https://cloud.google.com/tpu/docs/v4",
         ici_link_bandwidth=4.5e10, ici_hop_latency=1e-6, wraparound="cube",
         matmul_efficiency=TPU_MATMUL_EFFICIENCY),
    Chip("v5e", 16 * GiB, 197e12, 819 * GB, 400 * GB,
         "https://docs.cloud.google.com/tpu/docs/v5e",
         ici_link_bandwidth=4.5e10, ici_hop_latency=1e-6, wraparound="pod",
         dcn_bandwidth=3.125e9, matmul_efficiency=TPU_MATMUL_EFFICIENCY),
    Chip("v5p", 95 * GiB, 459e12, 2765 * GB, 1200 * GB,
         "https://docs.cloud.google.com/tpu/docs/v5p",
         ici_link_bandwidth=9e10, ici_hop_latency=1e-6, wraparound="cube",
         dcn_bandwidth=6.25e9, matmul_efficiency=TPU_MATMUL_EFFICIENCY),
    Chip("v6e", 32 * GiB, 918e12, 1600 * GB, 800 * GB,
         "https://docs.cloud.google.com/tpu/docs/v6e",
         ici_link_bandwidth=9e10, ici_hop_latency=1e-6, wraparound="pod",
         matmul_efficiency=TPU_MATMUL_EFFICIENCY),
    Chip("a100", 80 * GB, 312e12, 2039 * GB, 600 * GB,
         "https://www.nvidia.com/en-us/data-center/a100/", platform="gpu"),
    Chip("h100", 80 * GB, 989.5e12, 3350 * GB, 900 * GB,
         "https://www.nvidia.com/en-us/data-center/h100/", platform="gpu"),
    Chip("h200", 141 * GB, 989.5e12, 4800 * GB, 900 * GB,
         "https://www.nvidia.com/en-us/data-center/h200/", platform="gpu"),
)}
TPUS = tuple(name for name, c in CHIPS.items() if c.platform == "tpu")


# Device files a TPU driver creates on a TPU VM (v4: /dev/accel*, v5e and later:
# /dev/vfio/N): their absence means no TPU on this host.
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def topology_name(topology: str) -> str:
  """The spelling libtpu reads: ' V5E:2X4 ' -> 'v5e:2x4'."""
  return "".join(topology.split()).lower()


def chip_for_topology(topology: str) -> Chip:
  """'v5p:2x2x2' -> the v5p row; ConfigError naming the known chips otherwise.
  Case and spaces do not matter (`topology_name`)."""
  name = topology_name(topology).split(":", 1)[0]
  if ":" not in topology or name not in TPUS:
    raise ConfigError(
        "--topology", f"{topology!r} is not a TPU topology rung knows.",
        f"write CHIP:SHAPE with CHIP one of {', '.join(TPUS)}, e.g. "
        "--topology=v5p:2x2x2 or --topology=v5e:2x4.")
  chip = CHIPS[name]
  # Slice shapes as the chips' pages list them: v4 and v5p slices are 3-D, each
  # side 1, 2 or a multiple of 4 (2x2x1 ... 4x4x4, 8x8x12, 16x16x24); v5e and v6e
  # slices are 2-D, sides powers of two up to a 16x16 pod, the longer at most twice
  # the shorter (1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16). libtpu itself builds
  # some other shapes (v5e:2x2x2; v5e:2x16 then fails inside its DMA routing),
  # which no slice has.
  dims = topology_name(topology).split(":", 1)[1].split("x")
  cube = chip.wraparound == "cube"
  example = "2x2x2" if cube else "2x4"
  ok = len(dims) == (3 if cube else 2) and all(d.isdigit() and int(d) > 0
                                               for d in dims)
  if ok:
    sides = [int(d) for d in dims]
    ok = all(d in (1, 2) or d % 4 == 0 for d in sides) if cube else all(
        d <= 16 and d & (d - 1) == 0 for d in sides) and max(sides) <= 2 * min(sides)
  if not ok:
    rule = ("3 sides, each 1, 2 or a multiple of 4" if cube else
            "2 sides, each a power of two up to 16, the longer at most twice the "
            "shorter (2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16)")
    raise ConfigError(
        "--topology", f"{topology!r} is not a {name} slice shape: {name} slices "
        f"have {rule}.", f"pass e.g. --topology={name}:{example}.")
  return chip


# jax's `device_kind` for each chip (v5e and v6e report "lite"; GPUs report the
# CUDA device name). PCIe and NVL GPU variants have lower clocks: not listed, so
# their MFU is NaN rather than divided by the SXM peak.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
                "TPU v5p": "v5p", "TPU v5": "v5p", "TPU v6 lite": "v6e",
                "TPU v6e": "v6e", "NVIDIA A100-SXM4-80GB": "a100",
                "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100 SXM5 80GB": "h100",
                "NVIDIA H200": "h200"}


def chip_for_device_kind(kind: str) -> Chip | None:
  """The row for a `jax.Device.device_kind`, or None for a kind not in the table."""
  name = DEVICE_KINDS.get(kind.strip())
  return CHIPS[name] if name else None
