"""Writing a directory's new files so that an interrupted command leaves none.

`import-hf` and `export-hf` write a whole set of files (config.json, weights,
tokenizer). Written in place, a kill part-way left a directory that looked
finished to the next command (a run whose config.json had no checkpoint, an HF
directory with weights but no config) and was refused as occupied by a rerun.
Here they are written into `<target>/.<command>.partial/` and moved into
`target` once all are written, config.json last, each move an atomic rename on
the same file system. A leftover of a killed command is removed by the next one;
a command that fails or is interrupted removes its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator, Sequence


def partial_name(command: str) -> str:
  """The staging directory's name inside the target: `.import-hf.partial`."""
  return f".{command}.partial"


def publish(staging: str, target: str, last: Sequence[str] = ("config.json",)) -> None:
  """Moves each entry of `staging` into `target` (os.replace), the names in `last`
  after every other, then removes `staging`."""
  names = sorted(os.listdir(staging),
                 key=lambda n: (last.index(n) + 1 if n in last else 0, n))
  for name in names:
    os.replace(os.path.join(staging, name), os.path.join(target, name))
  os.rmdir(staging)


@contextlib.contextmanager
def staged(target: str, command: str, last: Sequence[str] = ("config.json",),
           writer: bool = True, barrier=None) -> Iterator[str]:
  """Yields a staging directory to write `target`'s new files into; published
  into `target` when the block ends, removed when it raises (also on Ctrl-C).

  `writer`: whether this process makes the directory (after removing one a
  killed run of the command left; `target` is made if needed), publishes and
  removes it (process 0 of several; the others write into it too, e.g. Orbax's
  shards).
  `barrier`: called after the directory is made and before it is published, so
  every process writes into a fresh directory and has finished before the move.
  """
  path = os.path.join(target, partial_name(command))
  if writer:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
  if barrier:
    barrier("staging directory made")
  try:
    yield path
    if barrier:
      barrier("staged files written")
  except BaseException:
    if writer:
      shutil.rmtree(path, ignore_errors=True)
    raise
  if writer:
    publish(path, target, last)
  if barrier:
    barrier("staged files published")
