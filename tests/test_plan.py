"""`plan`: enumerate, compile and rank parallelism plans for a TPU topology."""

import pytest

import sharding
from aot import plan
from experiments import llama_1b
from test_compile import needs_libtpu, small_1b
from train.validate import validate_config


def test_enumeration_is_bounded():
  """Factorisations of 8 devices: over (data, stage, fsdp, tensor) by default;
  sequence and expert join only when asked for or when the model has experts."""
  meshes = plan.candidate_meshes(8)
  # ordered 4-tuples with product 2^3: 3 factors of 2 among 4 axes, C(6, 3)
  assert len(meshes) == 20
  assert all(m["expert"] == m["sequence"] == m["diloco"] == 1 for m in meshes)
  assert meshes[0] == dict(diloco=1, data=1, stage=1, fsdp=8, expert=1, sequence=1,
                           tensor=1)
  assert sum(m["stage"] > 1 for m in meshes) == 10
  # a capped search (max_plans) compiles the ten plans without stages first
  assert all(m["stage"] == 1 for m in meshes[:10])
  assert len(plan.candidate_meshes(8, sequence=True)) == 35  # C(7, 4)
  # an MoE search reaches expert parallelism within its first plans: the state is
  # sharded over fsdp x expert, so expert=2..8 come right after fsdp=8
  moe = plan.candidate_meshes(8, experts=True)
  assert [(m["fsdp"], m["expert"]) for m in moe[:4]] == [(8, 1), (4, 2), (2, 4), (1, 8)]
  assert moe[:10] == sorted(moe[:10], key=lambda m: -m["fsdp"] * m["expert"])
  assert len(plan.candidate_meshes(8, experts=True, sequence=True)) == 56  # C(8, 5)
  # DiLoCo's replicas are the config's: the other axes factor the devices left
  two = plan.candidate_meshes(8, diloco=2)
  assert len(two) == 10 and all(m["diloco"] == 2 for m in two)  # C(5, 3)
  assert [{a: s for a, s in m.items() if a != "diloco"} for m in two] == [
      {a: s for a, s in m.items() if a != "diloco"} for m in plan.candidate_meshes(4)]


@needs_libtpu
def test_a_diloco_config_is_planned_with_its_replicas_and_syncs():
  """plan compiled a DiLoCo config (mesh.diloco=2) as plain data parallelism:
  every candidate had one replica and no synchronisation. Now the replicas stay
  and a plan's step time is its inner step plus each fragment's sync amortised
  over diloco.sync_every steps (the figures compile reports)."""
  from experiments import llama_tiny
  c = llama_tiny.get_config()
  c.mesh.diloco = 2
  c.diloco.update(sync_every=4, fragments=2)
  plans = plan.plan(c, "v5e:2x2", remats=("full",), meshes=[dict(fsdp=2)],
                    progress=False)
  (p,) = plans
  assert p.mesh["diloco"] == 2 and p.report.mesh["diloco"] == 2
  syncs = p.report.diloco_syncs
  assert len(syncs) == 2 and all(s["seconds"] > 0 for s in syncs)
  assert p.sync_time == pytest.approx(sum(s["seconds"] for s in syncs) / 4)
  assert p.step_time == pytest.approx(p.report.time["estimate"] + p.sync_time)
  assert p.mfu_estimate < p.report.mfu_estimate
  assert "incl. DiLoCo syncs" in plan.table(plans)
  assert "--config.mesh.diloco=2" in p.flags()
  c.mesh.diloco = 3
  with pytest.raises(sharding.ConfigError) as err:
    plan.plan(c, "v5e:2x2", progress=False)
  assert err.value.field == "mesh.diloco" and "must divide 4" in err.value.problem


@needs_libtpu
def test_plan_ranks_compiled_plans_and_the_winner_validates():
  c = small_1b()
  plans = plan.plan(c, "v5e:2x4", remats=("save_dots",), max_plans=2,
                    meshes=[dict(data=8), dict(fsdp=8), dict(fsdp=2, tensor=4)],
                    progress=False)
  compiled = [p for p in plans if p.report is not None]
  assert len(compiled) == 2 and all(p.fits for p in compiled)
  assert [p.step_time for p in compiled] == sorted(p.step_time for p in compiled)
  # ranked by the schedule estimate, which data=8 (gradient all-reduces) and
  # fsdp=8 (weight all-gathers) do not share
  assert all(p.step_time == p.report.time["estimate"] for p in compiled)
  assert compiled[0].step_time < compiled[1].step_time
  assert all(0 < p.mfu_estimate <= p.mfu_bound for p in compiled)
  assert plans[:2] == compiled  # fitting plans first, then the one not compiled
  assert plans[2].fits is None and "max_plans=2" in plans[2].note

  text = plan.table(plans)
  assert "step (estimate)" in text and "exposed comm (ms)" in text
  best = plans[0]
  assert f"best: {best.flags()}" in text
  for flag in best.flags().split():  # the printed overrides make a valid config
    field, value = flag.removeprefix("--config.").split("=")
    group, name = field.split(".")
    c[group][name] = type(c[group][name])(value)
  validate_config(c, 8)
  assert {a: c.mesh[a] for a in sharding.AXES} == best.mesh


@needs_libtpu
def test_plan_marks_a_plan_that_cannot_fit():
  """A 7B-class model replicated on v5e's 16 GiB chips: float32 parameters and two
  Adam moments are 12 bytes per parameter on every device, before any compile."""
  c = llama_1b.get_config()
  c.model.update(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128, d_ff=11008, tie_embeddings=False)
  plans = plan.plan(c, "v5e:2x4", remats=("none",), meshes=[dict(data=8)],
                    progress=False)
  assert len(plans) == 1 and plans[0].fits is False and plans[0].report is None
  params = 2 * 32000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096
  assert params == pytest.approx(6.74e9, rel=1e-3)
  batch = 4 * 4 * c.train.batch_size * c.data.seq_len / 8
  assert 12 * params + batch <= plans[0].memory <= 12 * params + batch + 16
  assert "state and batch alone need" in plans[0].note
  assert plan.table(plans).endswith("no plan fits in HBM.")


@needs_libtpu
def test_a_plan_that_cannot_start_names_why():
  """--max_plans of 0 compiled nothing and then said that nothing fit (exit 3);
  a config no mesh passes said only that, where each mesh's own error names the
  fix (here: a global batch of 16 over 12 devices of three slices)."""
  from experiments import llama_tiny
  with pytest.raises(sharding.ConfigError) as err:
    plan.plan(llama_tiny.get_config(), "v5e:2x2", max_plans=0, progress=False)
  assert err.value.field == "--max_plans"
  with pytest.raises(sharding.ConfigError) as err:
    plan.plan(llama_tiny.get_config(), "v5e:2x2", slices=3, progress=False)
  assert "no mesh of 12 devices passes validation for this config. Of the " in str(
      err.value)
  assert "say: `train.batch_size`: global batch_size=16 does not split" in str(err.value)


@needs_libtpu
def test_plan_over_slices_compiles_data_over_dcn_first():
  """With --slices, plans whose data axis spans the slices come first (they came
  last: `--max_plans` compiled FSDP across DCN and recommended it)."""
  from experiments import llama_tiny
  plans = plan.plan(llama_tiny.get_config(), "v5e:2x2", slices=2, max_plans=1,
                    remats=("full",), progress=False)
  compiled = [p for p in plans if p.report is not None]
  assert len(compiled) == 1 and compiled[0].mesh["data"] % 2 == 0, compiled[0].mesh
  assert any(p.mesh["data"] == 1 for p in plans)  # the others are still listed


def test_a_problem_without_its_full_stop_gets_one():
  """A problem quoted from a library ('No such compile option: x') ran into
  'Fix:'."""
  err = sharding.ConfigError("--libtpu_flags", "No such compile option: 'x'", "check it.")
  assert str(err) == ("Config error in `--libtpu_flags`: No such compile option: 'x'. "
                      "Fix: check it.")


@needs_libtpu
def test_a_capped_search_says_what_it_left_and_a_log_gets_no_line_per_plan(
    monkeypatch, capsys):
  """From a fresh-user trial of plan: with `--max_plans` leaving most candidates
  uncompiled and none of the compiled fitting, the table closed "no plan fits in
  HBM." (12 of 15 never compiled); the progress bar redrew for every candidate
  into a log (`set_postfix_str` refreshes); and the JSON gave a pipeline schedule
  to plans without stages. The compiler is stubbed: each compile 'fails'."""
  from experiments import llama_tiny

  def refused(*args, **kwargs):
    raise RuntimeError("stub: RESOURCE_EXHAUSTED")
  monkeypatch.setattr(plan, "compile_step", refused)
  plans = plan.plan(llama_tiny.get_config(), "v5e:2x2", max_plans=2, progress=True)
  err = capsys.readouterr().err
  left = sum(p.fits is None for p in plans)
  assert left == len(plans) - 2 > 2 and not any(p.fits for p in plans)
  assert plan.table(plans).endswith(
      f"no plan of the 2 tried fits in HBM, and {left} plans were not compiled "
      "(max_plans): raise --max_plans to try them.")
  assert err.count("\r") <= 3, err  # stderr is no terminal here: opening and closing
  unstaged = [p.to_dict() for p in plans if p.mesh["stage"] == 1]
  staged = [p.to_dict() for p in plans if p.mesh["stage"] > 1]
  assert unstaged and all(d["schedule"] is None for d in unstaged)
  assert staged and all(d["schedule"] in ("gpipe", "1f1b", "circular") for d in staged)
  fitting = [plan.Plan(dict(data=4), "none", False, 1.0, 1.0, 0.5)]
  assert plan.table(fitting).endswith("no plan fits in HBM.")
