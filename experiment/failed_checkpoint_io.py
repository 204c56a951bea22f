"""Quiets what a failed Orbax checkpoint read or write leaves behind, once the
failure itself has been reported (`train.checkpoint.CheckpointError`, or the
fallback's note).

A read: TensorStore callbacks that fire after Orbax closed its event loop
("RuntimeError: Event loop is closed", through `sys.unraisablehook`), the read's
coroutines closed with their exception still set ("Exception ignored in:
<coroutine ...>"), and asyncio's "exception was never retrieved" for the gather
that held them. A trial counted 1,941 lines of these around one line of error.

A write (a full disk): Orbax's background save threads each log the failure with
its traceback at ERROR ("_SignalingThread.run() raised an exception", "... in
background save thread", "Save Finalize thread ... failed"), about 350 lines for
one failed save, before the next save or wait raises it, which
`Checkpointer` reports as a CheckpointError naming the step; and, depending on
timing, asyncio's "exception was never retrieved" for the write's coroutines.

Only reports of those kinds are dropped; every other one passes through."""

from __future__ import annotations

import logging
import os
import sys


def _in(package: str, filename: str) -> bool:
  return f"{os.sep}{package}{os.sep}" in filename


def _closed_loop(report) -> bool:
  """A RuntimeError raised inside asyncio because its loop had closed."""
  frames, tb = [], report.exc_traceback
  while tb is not None:
    frames.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return (report.exc_type is RuntimeError and str(report.exc_value) ==
          "Event loop is closed" and bool(frames) and all(_in("asyncio", f) for f in frames))


def _orbax_coroutine(report) -> bool:
  """An Orbax coroutine closed with its (already reported) exception set."""
  code = getattr(report.object, "cr_code", None)
  return code is not None and _in("orbax", code.co_filename)


class _UnretrievedCheckpointErrors(logging.Filter):
  """asyncio's report of a failed read's, or a failed write's, Orbax coroutine
  (a read's names the array index, or TensorStore's checkpoint database: a
  missing or damaged file)."""
  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and ("while reading array index" in message
                     or "in OCDBT database" in message
                     or "orbax" in message and "Error writing" in message))


# What Orbax's save threads log when the write they wait on failed.
_FAILED_SAVE_LOGS = ("_SignalingThread.run() raised an exception",
                     "in background save thread", "Save Finalize thread")


class _FailedSaveLogs(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and _in("orbax", record.pathname)
                and any(m in record.getMessage() for m in _FAILED_SAVE_LOGS))


def install() -> None:
  """Filters the reports above for the rest of the process (the launcher's)."""
  previous = sys.unraisablehook

  def hook(report):
    if not (_closed_loop(report) or _orbax_coroutine(report)):
      previous(report)
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_UnretrievedCheckpointErrors())
  logging.getLogger("absl").addFilter(_FailedSaveLogs())
