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
