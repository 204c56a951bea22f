"""A data mixture whose weights change during a run, without re-reading or
skipping windows.

A mixture interleaves each source's shuffled, repeated windows in integer
proportions (`grain.MapDataset.mix`): global training window i comes from the
source, and from the position in that source's stream, that grain's arithmetic
gives i. A resume with other weights that built the mix again from window 0 would
read on from window i of a *different* interleaving: a source whose weight fell
would read again windows it had already given, and one whose weight rose would
skip windows it never gave. A schedule instead holds segments, each the
proportions from its first global window on; in a segment every source continues
from the position it reached in the segments before, so each source's stream is
read once, in order, whatever the weights did.

The schedule is kept in the run's workdir (`SCHEDULE_FILE`): the segments a run
drew from, up to where its latest start continued. A resume keeps the segments
that began before the step it continues from and adds one if the weights differ
(`continue_schedule`), so a resume from an earlier checkpoint forgets segments it
never reached. A run without the file (started before it existed, or copied
without it) is taken to have drawn from its current weights from window 0.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import sys
from typing import Sequence

import grain

from train import run_config

SCHEDULE_FILE = "data_mixture.json"


def mixture_counts(num_examples: int, proportions: Sequence[int]) -> list[int]:
  """How many of the first `num_examples` examples of `grain.MapDataset.mix(...,
  weights=proportions)` come from each source: the same arithmetic grain uses to
  place elements, summed in closed form (exact; O(sources)). Sums to
  num_examples."""
  remaining, current, counts = sum(proportions), int(num_examples), []
  for p in proportions:
    nxt = current * (remaining - p) // remaining
    counts.append(current - nxt)
    current, remaining = nxt, remaining - p
  return counts


@dataclasses.dataclass(frozen=True)
class Segment:
  """From global training window `start` on, the sources mix in `proportions`
  ({source name: grain's integer proportion}, `data.mixture_proportions`)."""
  start: int
  proportions: dict[str, int]

  def counts(self, windows: int) -> dict[str, int]:
    """{name: windows drawn from it} in this segment's first `windows`."""
    names = sorted(self.proportions)
    return dict(zip(names, mixture_counts(windows, [self.proportions[n]
                                                    for n in names])))


class ScheduledSelection(grain.transforms.DatasetSelectionMap):
  """Global training window -> (source index, window in that source's stream)
  under `segments` (`grain.MapDataset.select_from_datasets`). Sources are indexed
  by their position in `names` (the mixture's current sources, sorted). One
  segment from 0 selects exactly as `grain.MapDataset.mix` with its proportions.
  `reschedule` replaces the segments; call it before the first window is read."""

  def __init__(self, names: Sequence[str], segments: Sequence[Segment]):
    self.names = list(names)
    self.reschedule(segments)

  def reschedule(self, segments: Sequence[Segment]) -> None:
    self.segments = list(segments)
    self._starts = [s.start for s in self.segments]
    # Where each segment finds each source: what the segments before it drew.
    self._offsets, drawn = [], {}
    for seg, nxt in zip(self.segments, self._starts[1:] + [None]):
      self._offsets.append(dict(drawn))
      if nxt is not None:
        for name, k in seg.counts(nxt - seg.start).items():
          drawn[name] = drawn.get(name, 0) + k

  def __len__(self) -> int:
    return sys.maxsize  # every source repeats

  def __getitem__(self, index: int) -> tuple[int, int]:
    k = bisect.bisect_right(self._starts, index) - 1
    seg, j = self.segments[k], index - self.segments[k].start
    before, after = seg.counts(j), seg.counts(j + 1)
    name = next(n for n in after if after[n] != before[n])
    if name not in self.names:
      raise IndexError(f"window {index} was drawn from source {name!r}, which this "
                       "mixture no longer has")
    return self.names.index(name), self._offsets[k].get(name, 0) + before[name]

  def counts(self, windows: int) -> dict[str, int]:
    """{name: windows drawn from it} in the first `windows` global windows, for
    every source of every segment up to there."""
    total: dict[str, int] = {}
    for seg, nxt in zip(self.segments, self._starts[1:] + [None]):
      if seg.start >= windows:
        break
      end = windows if nxt is None else min(nxt, windows)
      for name, n in seg.counts(end - seg.start).items():
        total[name] = total.get(name, 0) + n
    return total


def read_schedule(workdir: str) -> list[Segment]:
  """The segments recorded in `workdir` ([] when none or unreadable)."""
  try:
    with open(os.path.join(workdir, SCHEDULE_FILE)) as f:
      return [Segment(int(s["start_window"]), {k: int(v) for k, v in
                                               s["proportions"].items()})
              for s in json.load(f)["segments"]]
  except (OSError, ValueError, KeyError, TypeError):
    return []


def continue_schedule(recorded: Sequence[Segment], start: int,
                      proportions: dict[str, int]) -> list[Segment]:
  """The schedule of a run that continues at global window `start` with
  `proportions`: the `recorded` segments that began before `start` (all of them
  from window 0 of the first, which a run without a record is taken to have
  drawn with `proportions`), then a segment from `start` if `proportions`
  differ from the last one's. Idempotent: applied to its own result with the
  same arguments it returns the same."""
  kept = [s for s in recorded if s.start < start]
  if not kept:
    return [Segment(0, dict(proportions))]
  if kept[-1].proportions != proportions:
    kept.append(Segment(start, dict(proportions)))
  return kept


def write_schedule(workdir: str, segments: Sequence[Segment]) -> None:
  """Records `segments` as the run's SCHEDULE_FILE (atomically)."""
  rows = [{"start_window": s.start, "proportions": s.proportions} for s in segments]
  run_config.write_atomically(os.path.join(workdir, SCHEDULE_FILE),
                              json.dumps({"segments": rows}, indent=1))
