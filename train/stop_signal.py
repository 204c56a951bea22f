"""SIGTERM / SIGINT as a request to stop at a boundary every process agrees on.

A multi-process program stopped by one process alone leaves the others waiting
in their next collective, for good. Here a signal to any process stops every
process at the same boundary (a training step, a generation batch): SIGTERM is
left to JAX's preemption notifier, SIGINT is passed on to it as a SIGTERM, and
`reached(n)` asks the coordination service
(`multihost_utils.reached_preemption_sync_point`), which answers True on every
process at one boundary once any process was signalled.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax


class StopOnSignal:
  """Turns SIGTERM / SIGINT into a request to stop at the next `boundary` ("step":
  save it and stop; or before the first, during setup, once `stepping` is
  unset); in one process a second signal stops at once (KeyboardInterrupt), e.g.
  during a long first tokenization. In several processes, the agreed boundary
  above. Installs its handlers from the main thread only; `restore` puts the
  previous ones back."""

  def __init__(self, boundary: str = "step", saving: bool = True):
    self.boundary = boundary
    self.saving = " (saving it)" if saving else ""
    self.requested: str | None = None
    self.stepping = False  # set when the first step starts (setup is done)
    self._previous = {}
    self._multiprocess = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM,
                                                               signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._multiprocess:
      sys.stderr.write(f"\n{signal.Signals(signum).name}: every process stops at "
                       f"the next {self.boundary} boundary they reach together"
                       f"{self.saving}.\n")
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier
      return
    if self.requested:
      raise KeyboardInterrupt(f"a second {signal.Signals(signum).name}")
    self.requested = signal.Signals(signum).name
    when = (f"at the next {self.boundary} boundary{self.saving}" if self.stepping else
            f"before the first {self.boundary}, once setup (data, restore, compile) "
            "is done; nothing new to save")
    sys.stderr.write(f"\n{self.requested}: stopping {when}; send it again to stop "
                     "at once.\n")

  def reached(self, n: int) -> bool:
    """Whether to stop at boundary `n`: this process's signal, or in a
    multi-process run the boundary every process agreed on. Call it once per
    boundary on every process, with increasing `n` from the same start."""
    if self._multiprocess:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(n):
        self.requested = "a process's SIGTERM (preemption)"
    return self.requested is not None

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
