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
                output: str | None = None, **kwargs) -> flags.FlagHolder:
  """`flags.DEFINE_string` for a path: the value has `~` expanded.

  output: 'file' or 'directory' for a path the program writes: a value that
  cannot be written as one (`train.output_path.problem`) fails flag parsing,
  before any work. kwargs go to `flags.DEFINE` (e.g. `required=True`)."""
  holder = flags.DEFINE(_PathParser(), name, default, help_text,
                        serializer=flags.ArgumentSerializer(), **kwargs)
  if output is not None:
    def writable(value):
      from train.output_path import problem
      why = value and problem(value, output)
      if why:
        raise flags.ValidationError(f"{why}; pass a {output} path where you can write")
      return True
    flags.register_validator(name, writable)
  return holder
