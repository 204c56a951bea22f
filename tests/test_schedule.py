"""`aot/schedule.py`: the step-time estimate from a compiled schedule, on small
hand-written scheduled HLO (no compile), and the ring formulas by hand."""

import math

import numpy as np
import pytest

from aot import schedule
from sharding.chips import CHIPS, Chip

PEAK, HBM, LINK = 2e12, 1e12, 1e9   # FLOP/s, bytes/s, bytes/s per link one way
CHIP = Chip("test", 2 ** 34, PEAK, HBM, 8 * LINK, "hand-made", ici_link_bandwidth=LINK,
            ici_hop_latency=0.0, wraparound="cube")
N = 1024
ARRAY = N * N * 2                    # bytes of a bf16[1024,1024]
DOT = 2 * N ** 3 / PEAK              # compute-bound: its 3 arrays take 6 us of HBM
ADD = 3 * ARRAY / HBM                # reads two arrays, writes one
GATHER = 7 / 8 * ARRAY / 2 / LINK    # all-gather on a bidirectional ring of 8


def ring8(link=LINK) -> schedule.Torus:
  """8 chips on one axis that wraps around (a ring)."""
  return schedule.Torus(tuple((i,) for i in range(8)), (8,), (True,), link, 0.0, HBM)


ASYNC = """HloModule m, is_scheduled=true

ENTRY %main (p0: bf16[128,1024], p1: bf16[1024,1024]) -> bf16[1024,1024] {
  %p0 = bf16[128,1024]{1,0} parameter(0)
  %p1 = bf16[1024,1024]{1,0} parameter(1)
  %ags = (bf16[128,1024]{1,0}, bf16[1024,1024]{1,0}) all-gather-start(%p0), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  %dot = bf16[1024,1024]{1,0} dot(%p1, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %agd = bf16[1024,1024]{1,0} all-gather-done(%ags)
  ROOT %out = bf16[1024,1024]{1,0} add(%agd, %dot)
}
"""

SYNC = """HloModule m, is_scheduled=true

ENTRY %main (p0: bf16[128,1024], p1: bf16[1024,1024]) -> bf16[1024,1024] {
  %p0 = bf16[128,1024]{1,0} parameter(0)
  %p1 = bf16[1024,1024]{1,0} parameter(1)
  %ag = bf16[1024,1024]{1,0} all-gather(%p0), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  %dot = bf16[1024,1024]{1,0} dot(%p1, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %out = bf16[1024,1024]{1,0} add(%ag, %dot)
}
"""

# The TPU form (`--xla_tpu_enable_async_collective_fusion`): fusions whose
# computations end in AsyncCollectiveStart / AsyncCollectiveDone around the same
# channel, and a compute fusion between them that carries that channel too.
FUSED = """HloModule m, is_scheduled=true

%start_comp (a0: bf16[128,1024]) -> (bf16[128,1024], bf16[1024,1024]) {
  %a0 = bf16[128,1024]{1,0} parameter(0)
  %g0 = bf16[1024,1024]{1,0} all-gather(%a0), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %cs = (bf16[128,1024]{1,0}, bf16[1024,1024]{1,0}) custom-call(%g0), custom_call_target="AsyncCollectiveStart"
}

%step_comp (b0: bf16[1024,1024], b1: bf16[128,1024]) -> (bf16[1024,1024], bf16[1024,1024]) {
  %b0 = bf16[1024,1024]{1,0} parameter(0)
  %b1 = bf16[128,1024]{1,0} parameter(1)
  %mm = bf16[1024,1024]{1,0} dot(%b0, %b0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g1 = bf16[1024,1024]{1,0} all-gather(%b1), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %tp = (bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}) tuple(%mm, %g1)
}

%done_comp (c0: bf16[128,1024]) -> bf16[1024,1024] {
  %c0 = bf16[128,1024]{1,0} parameter(0)
  %g2 = bf16[1024,1024]{1,0} all-gather(%c0), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %cd = bf16[1024,1024]{1,0} custom-call(%c0, %g2), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (p0: bf16[128,1024], p1: bf16[1024,1024]) -> bf16[1024,1024] {
  %p0 = bf16[128,1024]{1,0} parameter(0)
  %p1 = bf16[1024,1024]{1,0} parameter(1)
  %s = (bf16[128,1024]{1,0}, bf16[1024,1024]{1,0}) fusion(%p0), kind=kCustom, calls=%start_comp
  %gs = bf16[128,1024]{1,0} get-tuple-element(%s), index=0
  %f = (bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}) fusion(%p1, %gs), kind=kOutput, calls=%step_comp
  %fm = bf16[1024,1024]{1,0} get-tuple-element(%f), index=0
  %d = bf16[1024,1024]{1,0} fusion(%gs), kind=kCustom, calls=%done_comp
  ROOT %out = bf16[1024,1024]{1,0} add(%d, %fm)
}
"""

LOOP = """HloModule m, is_scheduled=true

%body (t: (s32[], bf16[1024,1024])) -> (s32[], bf16[1024,1024]) {
  %t = (s32[], bf16[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[1024,1024]{1,0} get-tuple-element(%t), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = bf16[1024,1024]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %r = (s32[], bf16[1024,1024]{1,0}) tuple(%next, %y)
}

%cond (u: (s32[], bf16[1024,1024])) -> pred[] {
  %u = (s32[], bf16[1024,1024]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%u), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (p0: bf16[1024,1024]) -> bf16[1024,1024] {
  %p0 = bf16[1024,1024]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[1024,1024]{1,0}) tuple(%zero, %p0)
  %w = (s32[], bf16[1024,1024]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %o = bf16[1024,1024]{1,0} get-tuple-element(%w), index=1
}
"""


def test_async_collective_fully_hidden():
  """The all-gather (0.92 ms) runs under the matmul (1.07 ms): nothing exposed."""
  est = schedule.estimate(ASYNC, CHIP, ring8())
  assert GATHER < DOT
  assert est.seconds == pytest.approx(DOT + ADD)
  assert est.exposed == {"devices": 0.0} or not any(est.exposed.values())
  assert est.communication == pytest.approx(GATHER)
  assert est.collectives == {"asynchronous": 1}


def test_matmuls_run_at_the_chip_matmul_efficiency():
  """A compute-bound matmul takes its FLOPs over peak x `matmul_efficiency`; a
  memory-bound op its bytes over HBM bandwidth, whatever the efficiency. The TPU
  rows carry the published v5e measurement (sharding/chips.py)."""
  import dataclasses
  half = dataclasses.replace(CHIP, matmul_efficiency=0.5)
  full = schedule.estimate(SYNC, CHIP, ring8())
  slow = schedule.estimate(SYNC, half, ring8())
  assert full.ops == pytest.approx(DOT + ADD)
  assert slow.ops == pytest.approx(2 * DOT + ADD)
  assert slow.seconds - full.seconds == pytest.approx(DOT)
  assert {CHIPS[n].matmul_efficiency for n in ("v4", "v5e", "v5p", "v6e")} == {0.923}


def test_async_collective_partly_exposed():
  """At half the link bandwidth the all-gather takes 1.84 ms: what sticks out
  past the 1.07 ms matmul is exposed, and the step waits for it."""
  est = schedule.estimate(ASYNC, CHIP, ring8(LINK / 2))
  assert est.exposed["devices"] == pytest.approx(2 * GATHER - DOT)
  assert est.seconds == pytest.approx(2 * GATHER + ADD)


def test_synchronous_collective_adds_its_whole_time():
  est = schedule.estimate(SYNC, CHIP, ring8())
  assert est.exposed["devices"] == pytest.approx(GATHER)
  assert est.seconds == pytest.approx(GATHER + DOT + ADD)
  assert est.collectives == {"synchronous": 1}


def test_tpu_collective_fusion_overlaps_its_steps():
  """The TPU's async collective fusion: start / done matched by channel; the
  fusion between them carrying the same channel is compute (its matmul)."""
  hidden = schedule.estimate(FUSED, CHIP, ring8())
  assert hidden.collectives == {"asynchronous": 1}
  assert hidden.communication == pytest.approx(GATHER)
  assert not any(hidden.exposed.values())
  # the step fusion's matmul, plus its HBM-bound tuple traffic is below the matmul
  assert hidden.seconds == pytest.approx(DOT + ADD)
  slow = schedule.estimate(FUSED, CHIP, ring8(LINK / 4))
  assert slow.exposed["devices"] == pytest.approx(4 * GATHER - DOT)


def test_while_loop_counts_its_trips():
  est = schedule.estimate(LOOP, CHIP, ring8())
  # 5 matmuls; the counter adds and the 6 compares move a few bytes each
  assert est.seconds == pytest.approx(5 * DOT, rel=1e-4)
  assert est.seconds > 5 * DOT


def test_ring_formulas_by_hand():
  V, B, lat = 8e6, 1e9, 1e-6
  # all-gather on a ring of 8 (both directions): (k-1)/k V / 2 per link direction
  assert schedule.ring_time("all-gather", V, [8], [True], B, lat) == pytest.approx(
      7 / 8 * V / 2 / B + 4 * lat)
  # on a line of 4 (no wraparound) only one direction helps: (k-1)/k V
  assert schedule.ring_time("reduce-scatter", V, [4], [False], B, lat) == \
      pytest.approx(3 / 4 * V / B + 3 * lat)
  # all-reduce: reduce-scatter then all-gather
  assert schedule.ring_time("all-reduce", V, [8], [True], B, 0) == pytest.approx(
      2 * 7 / 8 * V / 2 / B)
  # 2 x 2 lines: two axis orders each carry V/2; each axis sees V/8 then V/4
  assert schedule.ring_time("all-gather", V, [2, 2], [False, False], B, 0) == \
      pytest.approx(3 * V / 8 / B)
  assert schedule.ring_time("all-to-all", V, [8], [True], B, 0) == pytest.approx(
      7 / 8 * V / 8 / B)


def test_ring_all_gather_matches_a_step_by_step_simulation():
  """A bidirectional ring all-gather simulated chunk by chunk with NumPy: each
  shard is halved, one half travels clockwise and one counter-clockwise, one hop
  per step; the busiest link direction's bytes over its bandwidth is the time."""
  k, shard, B = 8, 1000.0, 1e9
  load = np.zeros((k, 2))           # bytes per (link i -> i+1, direction)
  for src in range(k):
    for direction, sign in ((0, 1), (1, -1)):
      pos = src
      for _ in range(k - 1):        # a half reaches all k-1 others, hop by hop
        link = pos if sign == 1 else (pos - 1) % k
        load[link, direction] += shard / 2
        pos = (pos + sign) % k
  assert schedule.ring_time("all-gather", k * shard, [k], [True], B, 0) == \
      pytest.approx(load.max() / B)


def test_group_axes_come_from_device_coordinates():
  """On a 2x2x2 v5p slice (no wraparound below 4 chips), a group of the four
  chips with z = 0 spans two lines of 2; all eight span three; a permute between
  opposite corners crosses three hops."""
  coords = [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
  torus = schedule.Torus.from_coords(coords, CHIPS["v5p"])
  assert torus.shape == (2, 2, 2) and torus.wraps == (False, False, False)
  v5p = CHIPS["v5p"]
  V = 4e6
  four = schedule.collective_seconds("all-reduce", V, [[0, 1, 2, 3], [4, 5, 6, 7]],
                                     torus)
  assert four == pytest.approx(schedule.ring_time(
      "all-reduce", V, [2, 2, 1], [False] * 3, v5p.ici_link_bandwidth,
      v5p.ici_hop_latency))
  eight = schedule.collective_seconds("all-reduce", V, [], torus)
  assert eight == pytest.approx(schedule.ring_time(
      "all-reduce", V, [2, 2, 2], [False] * 3, v5p.ici_link_bandwidth,
      v5p.ici_hop_latency))
  assert eight < four  # three axes' links instead of two
  permute = schedule.collective_seconds("collective-permute", V, [[0, 7]], torus)
  assert permute == pytest.approx(V / v5p.ici_link_bandwidth + 3 * 1e-6)
  # groups of one device each (shard_map's cotangent all-reduce over size-1
  # axes) move nothing; it was priced as an HBM copy of the whole operand
  assert schedule.collective_seconds("all-reduce", V, [[i] for i in range(8)],
                                     torus) == 0
  # a 4x4x4 cube wraps around: a ring of 4 beats a line of 4 by 2x in bandwidth
  assert CHIPS["v5p"].wraps(4) and not CHIPS["v5e"].wraps(8) and CHIPS["v5e"].wraps(16)
  ring = schedule.ring_time("all-gather", V, [4], [True], 1e9, 0)
  line = schedule.ring_time("all-gather", V, [4], [False], 1e9, 0)
  assert line == pytest.approx(2 * ring) and math.isfinite(ring)


def test_groups_across_slices_add_a_dcn_phase():
  """Two v5e 2x2 slices: an all-reduce over the 2 chips with the same place in
  each slice runs over DCN alone, 2 x (1/2) V at the chip's DCN share one way;
  over all 8, the ICI phases run over one slice's 2x2 and the DCN phase carries
  what is left, by the same rotation rule as the ICI axes (written out here)."""
  v5e = CHIPS["v5e"]
  coords = [(x, y, 0) for y in range(2) for x in range(2)] * 2
  torus = schedule.Torus.from_coords(coords, v5e, slices=[0] * 4 + [1] * 4)
  V = 8e6
  across = schedule.collective_seconds("all-reduce", V, [[0, 4], [1, 5], [2, 6],
                                                         [3, 7]], torus)
  assert across == pytest.approx(2 * (1 / 2) * V / v5e.dcn_bandwidth)
  everything = schedule.collective_seconds("all-gather", V, [], torus)
  # 3 phases (x, y, DCN), each of length 2, one way; rotation r starts at axis r
  # with V/3/8 held; an axis seen j-th carries (V/3/8) * 2^j.
  ici = sum(V / 3 / 8 * 2 ** j for j in (0, 2, 1)) / v5e.ici_link_bandwidth
  dcn = sum(V / 3 / 8 * 2 ** j for j in (2, 1, 0)) / v5e.dcn_bandwidth
  assert everything == pytest.approx(max(ici, dcn) + 2 * v5e.ici_hop_latency)
  # a permute between slices goes over DCN
  assert schedule.collective_seconds("collective-permute", V, [[0, 4]], torus) == \
      pytest.approx(V / v5e.dcn_bandwidth)
  # one slice only: no DCN phase, the figures of before
  one = schedule.Torus.from_coords(coords[:4], v5e, slices=[0] * 4)
  assert one.slices == () and schedule.collective_seconds(
      "all-gather", V, [], one) == pytest.approx(schedule.ring_time(
          "all-gather", V, [2, 2, 1], [False] * 3, v5e.ici_link_bandwidth,
          v5e.ici_hop_latency))


def test_collective_inside_a_compute_fusion_runs_alongside_it():
  """A fusion carrying a collective that no start / done brackets (a collective
  matmul step): the collective runs alongside the fusion's matmul; only what
  exceeds the matmul is exposed."""
  text = FUSED.split("ENTRY")[0] + """ENTRY %main (p0: bf16[128,1024], p1: bf16[1024,1024]) -> bf16[1024,1024] {
  %p0 = bf16[128,1024]{1,0} parameter(0)
  %p1 = bf16[1024,1024]{1,0} parameter(1)
  %f = (bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}) fusion(%p1, %p0), kind=kOutput, calls=%step_comp
  ROOT %fm = bf16[1024,1024]{1,0} get-tuple-element(%f), index=0
}
"""
  hidden = schedule.estimate(text, CHIP, ring8())
  assert hidden.seconds == pytest.approx(DOT) and hidden.ops == pytest.approx(DOT)
  assert hidden.collectives == {"synchronous": 1} and not any(hidden.exposed.values())
  slow = schedule.estimate(text, CHIP, ring8(LINK / 4))
  assert slow.seconds == pytest.approx(4 * GATHER)
  assert slow.exposed["devices"] == pytest.approx(4 * GATHER - DOT)


# Remat residuals offloaded to host memory (S(5)): one [1024,1024] slice of a
# [64,1024,1024] host buffer written and one read, each around a matmul; and a
# quarter of p0 prefetched into VMEM (S(1)).
HOST_OFFLOAD = """HloModule m, is_scheduled=true

ENTRY %main (p0: bf16[1024,1024], p1: bf16[64,1024,1024], i: s32[]) -> (bf16[1024,1024], bf16[256,1024]) {
  %p0 = bf16[1024,1024]{1,0} parameter(0)
  %p1 = bf16[64,1024,1024]{2,1,0:S(5)} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  %up = bf16[1,1024,1024]{2,1,0} bitcast(%p0)
  %dus = ((bf16[64,1024,1024]{2,1,0:S(5)}, bf16[1,1024,1024]{2,1,0}, s32[], s32[], s32[]), bf16[64,1024,1024]{2,1,0:S(5)}, u32[]) dynamic-update-slice-start(%p1, %up, %i, %z, %z)
  %dot = bf16[1024,1024]{1,0} dot(%p0, %p0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %buf = bf16[64,1024,1024]{2,1,0:S(5)} dynamic-update-slice-done(%dus)
  %ds = ((bf16[64,1024,1024]{2,1,0:S(5)}, s32[], s32[], s32[]), bf16[1,1024,1024]{2,1,0}, u32[]) dynamic-slice-start(%buf, %i, %z, %z), dynamic_slice_sizes={1,1024,1024}
  %dot2 = bf16[1024,1024]{1,0} dot(%dot, %dot), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %back = bf16[1,1024,1024]{2,1,0} dynamic-slice-done(%ds)
  %b2 = bf16[1024,1024]{1,0} bitcast(%back)
  %ss = ((bf16[1024,1024]{1,0}), bf16[256,1024]{1,0:S(1)}, s32[]) slice-start(%p0), slice={[0:256], [0:1024]}
  %q = bf16[256,1024]{1,0:S(1)} slice-done(%ss)
  %out = bf16[1024,1024]{1,0} add(%b2, %dot2)
  ROOT %t = (bf16[1024,1024]{1,0}, bf16[256,1024]{1,0:S(1)}) tuple(%out, %q)
}
"""


def test_host_offload_moves_slices_beside_the_core():
  """The DMAs to and from a host buffer, and the prefetch into VMEM, cost the
  core nothing and move their slice (not the 128 MiB buffer): in the estimate,
  its host byte count and the roofline's HBM traffic."""
  from aot import costs
  est = schedule.estimate(HOST_OFFLOAD, CHIP, ring8())
  assert est.seconds == pytest.approx(2 * DOT + ADD)
  assert est.collectives["host_bytes"] == 2 * ARRAY
  dots = 2 * 3 * ARRAY  # the two matmuls read two arrays and write one each
  assert costs.analyze(HOST_OFFLOAD).hbm_bytes == pytest.approx(
      dots + 3 * ARRAY + 2 * 2 * ARRAY + 2 * ARRAY / 4)


# A collective matmul's window: the TPU compiler pads an activation with -inf
# (bitcast to a new leading dim of 1, padded to 2) and slices one 256-column window
# of the padded array per loop step; `tail` is what else the fusion does with it.
WINDOW = """HloModule m, is_scheduled=true

%window (a: bf16[1024,1024], i: s32[]) -> {out} {{
  %a = bf16[1024,1024]{{1,0}} parameter(0)
  %i = s32[] parameter(1)
  %b = bf16[1,1024,1024]{{2,1,0}} bitcast(%a)
  %ninf = bf16[] constant(-inf)
  %p = bf16[2,1024,1024]{{2,1,0}} pad(%b, %ninf), padding=0_1x0_0x0_0
  %z = s32[] constant(0)
  %c = f32[2,1024,1024]{{2,1,0}} convert(%p)
  %s = f32[2,1024,256]{{2,1,0}} dynamic-slice(%c, %z, %z, %i), dynamic_slice_sizes={{2,1024,256}}
  %w = bf16[2,1024,256]{{2,1,0}} convert(%s)
  {tail}
}}

ENTRY %main (p0: bf16[1024,1024], i: s32[]) -> {out} {{
  %p0 = bf16[1024,1024]{{1,0}} parameter(0)
  %i = s32[] parameter(1)
  ROOT %f = {out} fusion(%p0, %i), kind=kLoop, calls=%window
}}
"""


@pytest.mark.parametrize("whole", [False, True])
def test_a_window_of_a_padded_parameter_reads_the_window(whole):
  """HBM traffic of a fusion that slices a padded view of its parameter: the
  window's share of the array (a quarter: 256 of 1024 columns, half of each
  window padding) and the window written, not the whole array; when the padded
  array is also used whole (`whole`), the whole array."""
  from aot import costs
  window = 2 * 1024 * 256 * 2  # bytes of the bf16 window written
  if whole:
    out = "(bf16[2,1024,256]{2,1,0}, bf16[2,1024,1024]{2,1,0})"
    tail = f"ROOT %t = {out} tuple(%w, %p)"
    expected = ARRAY + window + 2 * ARRAY
  else:
    out = "bf16[2,1024,256]{2,1,0}"
    tail = "ROOT %r = bf16[2,1024,256]{2,1,0} copy(%w)"
    expected = ARRAY / 4 + window
  text = WINDOW.format(out=out, tail=tail)
  assert costs.analyze(text).hbm_bytes == pytest.approx(expected + 4)  # + index


CARRIED = """HloModule m, is_scheduled=true

%step_comp (b0: bf16[1024,1024], b1: bf16[128,1024], b2: bf16[1024,1024]) -> (bf16[1024,1024], bf16[1024,1024], bf16[1024,1024], bf16[128,1024]) {
  %b0 = bf16[1024,1024]{1,0} parameter(0)
  %b1 = bf16[128,1024]{1,0} parameter(1)
  %b2 = bf16[1024,1024]{1,0} parameter(2)
  %mm = bf16[1024,1024]{1,0} dot(%b0, %b0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g1 = bf16[1024,1024]{1,0} all-gather(%b1), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %tp = (bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, bf16[128,1024]{1,0}) tuple(%mm, %g1, %b2, %b1)
}

ENTRY %main (p0: bf16[1024,1024], p1: bf16[128,1024], p2: bf16[1024,1024]) -> (bf16[1024,1024], bf16[1024,1024], bf16[1024,1024], bf16[128,1024]) {
  %p0 = bf16[1024,1024]{1,0} parameter(0)
  %p1 = bf16[128,1024]{1,0} parameter(1)
  %p2 = bf16[1024,1024]{1,0} parameter(2)
  ROOT %f = (bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, bf16[128,1024]{1,0}) fusion(%p0, %p1, %p2), kind=kOutput, calls=%step_comp
}
"""


def test_a_fusion_carrying_an_async_collective_moves_only_its_own_work():
  """From llama_1b's decode step on v5e (80.5 GiB of HBM traffic counted for 1.2
  GiB of parameters and a 4 GiB cache): a TPU fusion between an asynchronous
  collective's start and done carries the collective's buffers, as parameters it
  returns unchanged and as the collective inside it. Its traffic is its matmul's
  operand read and result written: the passed-through buffers (b1, b2) and the
  carried all-gather's operand and result (moved by the collective's own DMAs,
  counted at its start and done fusions) are not read or written by it."""
  from aot import costs
  assert costs.analyze(CARRIED).hbm_bytes == pytest.approx(2 * ARRAY)
  # the same fusion as an AsyncCollectiveStart: the collective is its work
  start = CARRIED.replace(
      "ROOT %tp = (bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, "
      "bf16[128,1024]{1,0}) tuple(%mm, %g1, %b2, %b1)",
      "%tp = (bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, "
      "bf16[128,1024]{1,0}) tuple(%mm, %g1, %b2, %b1)\n  ROOT %cs = (bf16[1024,1024]{1,0}, "
      "bf16[1024,1024]{1,0}, bf16[1024,1024]{1,0}, bf16[128,1024]{1,0}) custom-call(%tp), "
      'custom_call_target="AsyncCollectiveStart"')
  assert start != CARRIED
  assert costs.analyze(start).hbm_bytes > 2 * ARRAY + ARRAY
