"""What the host offers, for the entry points (the launcher and benchmarks/): the
only place outside `experiment/__main__.py` that reads the environment."""

from __future__ import annotations

import glob
import os
import platform

from sharding.chips import TPU_DEVICE_FILES

# Device files an accelerator's driver creates on Linux: TPU, NVIDIA and AMD GPUs.
ACCELERATOR_FILES = TPU_DEVICE_FILES + ("/dev/nvidia[0-9]*", "/dev/kfd")


def cpu_only_host() -> bool:
  """A Linux host without accelerator device files, JAX_PLATFORMS unset: jax then
  should run on the CPU without first starting libtpu (installed by the test
  extra), which fails there with screens of warnings that look like a crash."""
  return ("JAX_PLATFORMS" not in os.environ and platform.system() == "Linux"
          and not any(glob.glob(p) for p in ACCELERATOR_FILES))


def one_blas_thread_per_cpu_device() -> None:
  """Where XLA splits the CPU into several devices
  (XLA_FLAGS=--xla_force_host_platform_device_count=N), each device runs its own
  LAPACK calls (jax's QR and SVD: GaLore's projector refresh), and OpenBLAS's
  own threads per call then oversubscribe the cores: llama_tiny with GaLore
  refreshing every step took 52.9 s for 4 steps on 8 devices of a 2-core VM,
  25.1 s with one OpenBLAS thread, 18.9 s on one device (benchmarks/README.md).
  Sets OPENBLAS_NUM_THREADS=1 unless it is set; call before the first LAPACK
  call (jax loads scipy's OpenBLAS then, not at import)."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
