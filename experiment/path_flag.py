"""Path flags whose `~` is the home directory.

The shell expands a tilde only at a word's start, so `--workdir=~/runs` reaches
the program as it was typed; taken literally it would make a directory named `~`
in the current one. Every flag that names a file or directory, in the launcher
and in `benchmarks/`, is defined here so that none is missed.
"""

from __future__ import annotations

import os

from absl import flags


class _PathParser(flags.ArgumentParser):
  """A string flag with `~` expanded (os.path.expanduser)."""

  def parse(self, argument):
    return os.path.expanduser(argument) if isinstance(argument, str) else argument

  def flag_type(self):
    return "string"


def define_path(name: str, default: str | None, help_text: str,
                **kwargs) -> flags.FlagHolder:
  """`flags.DEFINE_string` for a path: the value has `~` expanded.

  kwargs go to `flags.DEFINE` (e.g. `required=True`)."""
  return flags.DEFINE(_PathParser(), name, default, help_text,
                      serializer=flags.ArgumentSerializer(), **kwargs)
