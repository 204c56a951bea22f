"""Where a run's training data stands across resumes that change the global batch
size or a mixture's weights: no window is read twice or skipped.

Training reads global windows in order, `train.batch_size` per step; a mixture
interleaves its sources' shuffled, repeated windows in integer proportions
(`grain.MapDataset.mix`'s arithmetic: global window i comes from one source, at
one position of its stream). Rebuilt from step 0 with a new configuration, a
resume would read on from the wrong place: with a larger batch, from window
step x new batch, skipping the windows between; with other weights, from another
interleaving, so a source whose weight fell would give again windows it had
given, and one whose weight rose would skip some.

A `Schedule` instead holds segments, each the batch size and proportions from
its first step (and first global window) on: batches follow one another without
a gap, and in each mixture segment every source continues after the windows it
gave in the segments before. Each source's own order (its windows shuffled,
then repeated) is seeded by its stream number, fixed when the source first
joined the run (`streams`), so sources joining or leaving leave the others' order
alone (seeding by position among the sorted names re-shuffled them).

The schedule is kept in the run's workdir (`SCHEDULE_FILE`); a resume keeps
the segments that began before the step it continues from and adds one when the
batch size or proportions differ (`continue_schedule`), so a resume from an
earlier checkpoint forgets segments it never reached; stream numbers are kept
for good (`continue_streams`). A run without the file (started before it
existed, or copied without it) is taken to have read with its current settings
from step 0. A new `train.seed` or `data.seq_len` shuffles or cuts the windows
anew, which no schedule continues (the resume says so).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import sys
from typing import Sequence

import grain

from sharding.report import count
from train import run_config

SCHEDULE_FILE = "data_schedule.json"


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
  """From step `start_step` (global window `start_window`) on, each step reads
  `batch_size` windows, a mixture's sources mixed in `proportions` ({source name:
  grain's integer proportion}, `data.mixture_proportions`; {} without one)."""
  start_step: int
  start_window: int
  batch_size: int
  proportions: dict[str, int] = dataclasses.field(default_factory=dict)

  def counts(self, windows: int) -> dict[str, int]:
    """{name: windows drawn from it} in this segment's first `windows`."""
    names = sorted(self.proportions)
    return dict(zip(names, mixture_counts(windows, [self.proportions[n]
                                                    for n in names])))


class Schedule:
  """The segments a run reads by, and each mixture source's stream number
  (`reschedule` replaces them; call it before the first window is read). One
  segment from step 0 reads as a run that never changed: global batch b is
  windows [b x batch_size, (b + 1) x batch_size)."""

  def __init__(self, segments: Sequence[Segment], streams: dict[str, int] | None = None):
    self.streams: dict[str, int] = {}
    self.reschedule(segments, streams)

  def reschedule(self, segments: Sequence[Segment],
                 streams: dict[str, int] | None = None) -> None:
    if streams is not None:
      self.streams = dict(streams)
    self.segments = list(segments)
    self._steps = [s.start_step for s in self.segments]
    # A mixture changes interleaving only where its proportions change.
    self.mixes = [s for k, s in enumerate(self.segments)
                  if not k or s.proportions != self.segments[k - 1].proportions]
    self._mix_starts = [s.start_window for s in self.mixes]
    # Where each mix finds each source: what the mixes before it drew.
    self._offsets, drawn = [], {}
    for seg, nxt in zip(self.mixes, self._mix_starts[1:] + [None]):
      self._offsets.append(dict(drawn))
      if nxt is not None:
        for name, k in seg.counts(nxt - seg.start_window).items():
          drawn[name] = drawn.get(name, 0) + k

  def first_window(self, batch: int) -> int:
    """The first global window of global batch (step) `batch`."""
    seg = self.segments[max(0, bisect.bisect_right(self._steps, batch) - 1)]
    return seg.start_window + (batch - seg.start_step) * seg.batch_size

  def source_of(self, window: int) -> tuple[str, int]:
    """(source name, position in its stream) of global training window `window`."""
    k = bisect.bisect_right(self._mix_starts, window) - 1
    seg, j = self.mixes[k], window - self.mixes[k].start_window
    before, after = seg.counts(j), seg.counts(j + 1)
    name = next(n for n in after if after[n] != before[n])
    return name, self._offsets[k].get(name, 0) + before[name]

  def counts(self, windows: int) -> dict[str, int]:
    """{name: windows drawn from it} in the first `windows` global windows, for
    every source of every mixture segment up to there."""
    if windows <= 0:
      return {}
    k = bisect.bisect_right(self._mix_starts, windows - 1) - 1  # the last one's mix
    total = dict(self._offsets[k])
    for name, n in self.mixes[k].counts(windows - self.mixes[k].start_window).items():
      total[name] = total.get(name, 0) + n
    return total


class ScheduledSelection(grain.transforms.DatasetSelectionMap):
  """A mixture's global training window -> (source index, window in that
  source's stream) under `schedule` (`grain.MapDataset.select_from_datasets`).
  Sources are indexed by their position in `names` (the mixture's current
  sources, sorted). Under one segment it selects exactly as `grain.MapDataset.mix`
  with its proportions."""

  def __init__(self, names: Sequence[str], schedule: Schedule):
    self.names, self.schedule = list(names), schedule

  def __len__(self) -> int:
    return sys.maxsize  # every source repeats

  def __getitem__(self, index: int) -> tuple[int, int]:
    name, position = self.schedule.source_of(index)
    if name not in self.names:
      raise IndexError(f"window {index} was drawn from source {name!r}, which this "
                       "mixture no longer has")
    return self.names.index(name), position


def read_schedule(workdir: str) -> tuple[list[Segment], dict[str, int]]:
  """(segments, streams) recorded in `workdir` (empty when none or unreadable)."""
  try:
    with open(os.path.join(workdir, SCHEDULE_FILE)) as f:
      data = json.load(f)
    return ([Segment(int(s["start_step"]), int(s["start_window"]),
                     int(s["batch_size"]),
                     {k: int(v) for k, v in s["proportions"].items()})
             for s in data["segments"]],
            {k: int(v) for k, v in data.get("streams", {}).items()})
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return [], {}


def continue_streams(recorded: dict[str, int], names: Sequence[str]) -> dict[str, int]:
  """Every source's stream number: the recorded one, and for a source new to
  the run the next unused number (in name order). Without a record, a source's
  position among the sorted `names` (what a run started with). Sources no
  longer mixed keep theirs, so a number is never given twice."""
  if not recorded:
    return {name: i for i, name in enumerate(sorted(names))}
  streams = dict(recorded)
  for name in sorted(names):
    if name not in streams:
      streams[name] = max(streams.values()) + 1
  return streams


def continue_schedule(recorded: Sequence[Segment], step: int, batch_size: int,
                      proportions: dict[str, int]) -> list[Segment]:
  """The schedule of a run that continues at `step` with `batch_size` and
  `proportions`: the `recorded` segments that began before `step` (all of them
  from step 0 of the first, which a run without a record is taken to have read
  with these settings), then a segment from `step` if the settings differ from
  the last one's. Idempotent: applied to its own result with the same arguments
  it returns the same."""
  kept = [s for s in recorded if s.start_step < step]
  if not kept:
    return [Segment(0, 0, batch_size, dict(proportions))]
  last = kept[-1]
  if (last.batch_size, last.proportions) != (batch_size, proportions):
    window = last.start_window + (step - last.start_step) * last.batch_size
    kept.append(Segment(step, window, batch_size, dict(proportions)))
  return kept


def describe(segments: Sequence[Segment]) -> str | None:
  """One line of how a run read its data when its batch size or mixture weights
  changed at a resume; None when they never did."""
  if len(segments) < 2:
    return None

  def shares(seg):
    total = sum(seg.proportions.values())
    return ", ".join(f"{n} {p / total:.1%}" for n, p in seg.proportions.items())
  return "data schedule: " + "; ".join(
      f"from step {s.start_step} (window {s.start_window:,}) {count(s.batch_size, 'window')} "
      f"per step" + (f", {shares(s)}" if s.proportions else "") for s in segments)


def write_schedule(workdir: str, segments: Sequence[Segment],
                   streams: dict[str, int]) -> None:
  """Records `segments` and `streams` as the run's SCHEDULE_FILE (atomically)."""
  run_config.write_atomically(os.path.join(workdir, SCHEDULE_FILE), json.dumps(
      {"segments": [dataclasses.asdict(s) for s in segments], "streams": streams},
      indent=1))
