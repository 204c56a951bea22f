"""Whether a file or directory a command will write can be written, asked before
the work that produces it (a compile, a generation, a benchmark), so a path that
cannot take it fails in a second instead of after the work, with nothing lost.

The check writes and removes a probe where the output would go (a file, or a
directory where missing parents would be made): permission bits alone say little
to root or on a read-only file system.
"""

from __future__ import annotations

import os
import stat
import tempfile


def is_stream(path: str) -> bool:
  """Whether `path` names a device or a pipe rather than a file: /dev/null,
  /dev/stdout, a FIFO, a shell's `>(gzip > out.gz)` (/dev/fd/N). Such a path is
  written as it comes; it has no directory to put files beside it."""
  name = os.path.abspath(path)
  if name in ("/dev/stdout", "/dev/stderr") or name.startswith(("/dev/fd/",
                                                                 "/proc/self/fd/")):
    return True
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return False
  return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def problem(path: str, kind: str = "file") -> str | None:
  """Why `path` cannot be written as a `kind` ('file' or 'directory'; missing
  parents are made when it is written), or None when it can. Leaves nothing
  behind."""
  if kind not in ("file", "directory"):
    raise ValueError(f"kind must be 'file' or 'directory', got {kind!r}")
  path = os.path.abspath(path)
  try:
    if os.path.isdir(path):
      if kind == "file":
        return f"{path} is a directory, not a file"
      fd, probe = tempfile.mkstemp(dir=path)
      os.close(fd)
      os.remove(probe)
      return None
    if os.path.exists(path):
      if kind == "directory":
        return f"{path} is a file, not a directory"
      if is_stream(path):
        # not opened: closing a probe of a FIFO would end its reader's input
        return None if os.access(path, os.W_OK) else (
            f"{path} cannot be written: permission denied")
      open(path, "r+b").close()  # nothing truncated
      return None
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
      ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
      return f"{ancestor} is a file, so {path} cannot be made under it"
    if ancestor == os.path.dirname(path) and kind == "file":
      open(path, "xb").close()
      os.remove(path)
    else:
      os.rmdir(tempfile.mkdtemp(dir=ancestor))
  except OSError as err:
    return f"{path} cannot be written: {err.strerror or err}"
  return None
