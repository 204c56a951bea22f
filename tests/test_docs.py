"""The configuration reference documents every field of experiments/base.py."""

import os
import re

from conftest import REPO
from experiments import base


def _fields(config, prefix=""):
  for key, value in config.items():
    if key == "rules":
      yield prefix + "rules.<name>"
    elif key == "mixture":  # data.mixture: name -> entry, empty by default
      yield prefix + "mixture.<name>"
    elif hasattr(value, "items"):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_every_field_is_documented():
  with open(os.path.join(REPO, "docs", "configuration.md")) as f:
    documented = set(re.findall(r"^\| `([\w.<>]+)` \|", f.read(), re.M))
  missing = sorted(set(_fields(base.get_config())) - documented)
  assert not missing, f"fields missing from docs/configuration.md: {missing}"


def test_readme_links_the_reference_and_benchmarks():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert "docs/configuration.md" in readme
  assert "benchmarks/README.md" in readme
