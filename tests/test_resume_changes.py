"""Resuming with a changed config: trajectory changes are reported; a different
model shape is a ConfigError naming parameter, shapes and field (issue #14, 9-10)."""

import json
import shutil

import pytest

import sharding
import train
from conftest import make_tiny_config, run_cli


def _as_dict(config):
  return json.loads(config.to_json())


def test_trajectory_changes_lists_exactly_the_fields_that_change_the_run():
  from train.run_config import trajectory_changes
  old = make_tiny_config()
  new = make_tiny_config()
  new.train.steps = 6                      # drives the schedule: decay_steps unset
  new.optim.learning_rate = 1e-3
  new.train.batch_size = 16
  new.data.seq_len = 32
  new.model.rope_theta = 500000.0
  new.train.seed = 1
  # None of these changes what the run computes:
  new.log.every_steps = 5
  new.checkpoint.every_steps = 2
  new.mesh.update(data=2, tensor=4)
  new.train.eval_every = 2
  new.model.remat = "full"
  new.model.update(scan_layers=False, loss_chunks=2, embed_lookup="one_hot",
                   attention_block_q=128, attention_block_kv=256)
  new.data.prefetch_batches = 0
  # where tokens are cached (the CLI fills it from $XDG_CACHE_HOME, the Python API
  # leaves it None: a resume across the two reported it), generation and export ids
  new.data.update(cache_dir="/elsewhere", stop_ids=(7,), bos_id=1)
  new.train.grad_accum_steps = 2           # a dense model: the same mean gradient
  new.pipeline.update(microbatches=2, schedule="circular", repeats=2)
  # Fields of features this run has switched off (no diloco replicas, no
  # compression, neither GaLore nor NorMuon):
  new.diloco.update(sync_every=5, outer_lr=0.5)
  new.optim.compression.density = 0.01
  new.optim.update(galore_rank=8, normuon_b2=0.5)
  changes = trajectory_changes(_as_dict(old), _as_dict(new))
  assert sorted((f, a, b) for f, a, b, _ in changes) == [
      ("data.seq_len", 16, 32),
      ("model.rope_theta", 10000.0, 500000.0),
      ("optim.learning_rate", 3e-3, 1e-3),
      ("train.batch_size", 8, 16),
      ("train.seed", 0, 1),
      ("train.steps", 3, 6),
  ]
  assert trajectory_changes(_as_dict(old), _as_dict(make_tiny_config())) == []
  # ... which count once the resumed run has the feature on. Switched off there,
  # they do not (a trial's resume from diloco=2 onto stages listed
  # diloco.sync_every 2 -> 100): the switch is reported where it is a field
  # (DiLoCo's layout change has its own line).
  for switch, field, reported in [
      (dict(mesh=dict(diloco=2)), "diloco.sync_every", None),
      (dict(optim=dict(compression=dict(method="dgc"))), "optim.compression.density",
       "optim.compression.method"),
      (dict(optim=dict(name="galore")), "optim.galore_rank", "optim.name"),
      (dict(optim=dict(name="normuon")), "optim.normuon_b2", "optim.name")]:
    on = make_tiny_config()
    on.update(switch)
    assert field in [f for f, *_ in trajectory_changes(_as_dict(new), _as_dict(on))]
    off = [f for f, *_ in trajectory_changes(_as_dict(on), _as_dict(new))]
    assert field not in off and (reported is None or reported in off), off
  before_prefetch = _as_dict(old)  # saved before these fields existed
  del before_prefetch["data"]["prefetch_batches"]
  del before_prefetch["model"]["attention_block_q"], before_prefetch["model"]["attention_block_kv"]
  assert trajectory_changes(before_prefetch, _as_dict(make_tiny_config())) == []
  # An MoE model's losses are per microbatch; a run saved before the pipeline
  # group existed had one.
  old.model.moe.num_experts = new.model.moe.num_experts = 4
  new = _as_dict(new)
  fields = [f for f, *_ in trajectory_changes(_as_dict(old), new)]
  assert "pipeline.microbatches" in fields and "train.grad_accum_steps" in fields
  saved = _as_dict(old)
  del saved["pipeline"]
  new["pipeline"]["microbatches"] = 1
  assert "pipeline.microbatches" not in [
      f for f, *_ in trajectory_changes(saved, new)]


def test_steps_are_a_change_only_while_they_set_the_schedule_length():
  from train.run_config import trajectory_changes
  old, new = make_tiny_config(), make_tiny_config()
  old.optim.decay_steps = new.optim.decay_steps = 6
  new.train.steps = 6
  assert trajectory_changes(_as_dict(old), _as_dict(new)) == []
  # decay_steps set to what train.steps was: the same curve, nothing to report.
  new.optim.decay_steps, old.optim.decay_steps = 3, None
  assert trajectory_changes(_as_dict(old), _as_dict(new)) == []
  new.optim.decay_steps = 12
  assert trajectory_changes(_as_dict(old), _as_dict(new)) == [
      ("optim.decay_steps", None, 12, "the learning-rate schedule's length; saved: "
       "train.steps=3 while it is unset")]
  old.optim.decay_steps, new.optim.decay_steps = 12, None
  assert trajectory_changes(_as_dict(old), _as_dict(new)) == [
      ("optim.decay_steps", 12, None, "the learning-rate schedule's length; now: "
       "train.steps=6 while it is unset")]


def test_the_schedule_hint_comes_only_with_a_schedule_change():
  from train.run_config import describe_trajectory_changes
  hint = "To extend a run on the same learning-rate curve"
  assert hint in describe_trajectory_changes(3, [("train.steps", 3, 6, "")])
  assert hint in describe_trajectory_changes(3, [("optim.decay_steps", None, 9, "")])
  message = describe_trajectory_changes(3, [("train.seed", 0, 1, "")])
  assert message.endswith("will not match an uninterrupted run of either config.")


def test_resume_with_more_steps_says_the_schedule_changed(tmp_path, capsys):
  c = make_tiny_config()  # optim.decay_steps unset: train.steps sets the cosine
  c.checkpoint.every_steps = 3
  train.train(c, str(tmp_path), progress=False)
  capsys.readouterr()
  c.train.steps = 6
  rows = train.train(c, str(tmp_path), progress=False)
  assert [r["step"] for r in rows] == [4, 5, 6]
  out, err = capsys.readouterr()
  assert "resuming from step 3 of" in out and "resuming" not in err  # said once
  assert ("the config changes the training trajectory from step 3 on (saved with "
          "the checkpoint -> now):") in err
  lines = err.splitlines()
  first = next(i for i, line in enumerate(lines) if "changes the training" in line)
  last = next(i for i, line in enumerate(lines) if line.startswith("The run will"))
  assert [line.strip() for line in lines[first + 1:last]] == [
      "train.steps: 3 -> 6  (the learning-rate schedule's length while "
      "optim.decay_steps is unset)"]
  assert err.count("changes the training trajectory") == 1  # said once
  # and the rate step 4 now takes, beside the one the saved schedule gave it
  from train.optimizer import schedule
  now, was = float(schedule(c.optim, 6)(3)), float(schedule(c.optim, 3)(3))
  assert now != was
  assert (f"step 4 takes learning rate {now:g}, where the saved run's schedule "
          f"gave it {was:g}") in out
  # Resuming again unchanged, then with only non-trajectory fields changed: silent.
  for change in ({}, dict(log=dict(every_steps=2), checkpoint=dict(every_steps=1),
                          mesh=dict(data=2, fsdp=4))):
    c.update(change)
    train.train(c, str(tmp_path), progress=False)
    out = capsys.readouterr()
    assert "trajectory" not in out.err + out.out
    assert "resuming from step 6" in out.out


@pytest.fixture(scope="module")
def run_d32(tmp_path_factory):
  """A 3-step run of the tiny model (d_model=32) with a checkpoint at step 3."""
  workdir = tmp_path_factory.mktemp("d32") / "run"
  train.train(make_tiny_config(), str(workdir), progress=False)
  return workdir


_SHAPES = (r"parameter `embed/table` has shape \(64, 32\) there but \(64, 48\) in "
           r"the model .* builds \(\d+ more parameters differ\)\. The model differs "
           r"from the one saved with that step in model\.d_model 32 -> 48\.")


def test_resume_into_other_model_shape_is_a_config_error(run_d32, monkeypatch):
  """Named before the data is made (a long tokenization would come first)."""
  from train import loop

  def no_data(*args):
    raise AssertionError("the data was made before the model was checked")

  monkeypatch.setattr(loop, "make_data", no_data)
  c = make_tiny_config()
  c.model.d_model = 48
  c.train.steps = 4
  for fallback in (False, True):  # an earlier step would not fit either
    c.checkpoint.fallback = fallback
    with pytest.raises(sharding.ConfigError, match=_SHAPES) as err:
      train.train(c, str(run_d32), progress=False)
    assert err.value.field == "model.d_model"
    assert "--config.model.d_model=32" in err.value.fix
  with open(run_d32 / "config.json") as f:  # the refused resume left it alone
    assert json.load(f)["model"]["d_model"] == 32


def test_a_shape_refusal_in_a_workdir_with_spaces_gives_flags_a_shell_keeps_whole(
    run_d32, tmp_path):
  """The fix's flags (the saved model's fields, the saved-config file with the
  workdir) are each one shell word with the path as it is: a workdir with a
  space or `$` was written unquoted."""
  import shlex
  work = tmp_path / "my runs" / "d32 $x"
  shutil.copytree(run_d32, work)
  c = make_tiny_config()
  c.model.d_model = 48
  with pytest.raises(sharding.ConfigError, match=_SHAPES) as err:
    train.train(c, str(work), progress=False)
  # the prose's "(" and ", " around a flag are not part of it
  words = [w.lstrip("(").rstrip(".,)") for w in shlex.split(err.value.fix)]
  assert "--config.model.d_model=32" in words
  assert any(w.startswith("--config=") and w.endswith(f"saved.py:{work}")
             for w in words), err.value.fix


def test_a_shape_refusal_whose_saved_model_this_mesh_refuses_says_what_it_needs(
    run_d32):
  """Resuming the 2-layer run as 4 layers over mesh.stage=4: the fix's "resume
  with the saved model" flags alone met the next refusal (2 layers do not split
  over 4 stages). The fix now adds what that model needs on this mesh, and the
  saved flags with those flags validate."""
  from conftest import assert_followed_fix_validates, fix_alternatives
  c = make_tiny_config()
  c.model.num_layers = 4
  c.mesh.update(stage=4, data=-1)
  c.pipeline.microbatches = 4
  with pytest.raises(sharding.ConfigError, match=r"model\.num_layers 2 -> 4") as err:
    train.train(c, str(run_d32), progress=False)
  fix = err.value.fix
  assert f"--config=experiments/saved.py:{run_d32} (the run's saved config)" in fix
  saved, needs = fix.split(" with what that model needs on this run's mesh ")
  assert saved.endswith("or --config.model.num_layers=2"), fix
  assert needs.startswith("(`mesh.stage`: the model's 2 layers do not split"), fix
  followed = ["--config.model.num_layers=2", *fix_alternatives(needs)[0]]
  assert any(f.startswith("--config.mesh.stage=") for f in followed), followed
  assert_followed_fix_validates(c, followed, 8, err.value)
  # where the saved model fits this mesh, the fix stays the plain one
  c.model.num_layers, c.mesh.stage, c.pipeline.microbatches = 4, 2, 2
  with pytest.raises(sharding.ConfigError) as err:
    train.train(c, str(run_d32), progress=False)
  assert "with what that model needs" not in err.value.fix
  assert err.value.fix.startswith("resume with the saved model "
                                  "(--config.model.num_layers=2, or --config="), err.value.fix


@pytest.mark.parametrize("damage", ["removed", "garbage"])
def test_inspect_of_a_step_whose_metadata_is_damaged_says_so(run_d32, tmp_path,
                                                             damage):
  """inspect still describes the run (its steps, config, logs) and says which
  step's parameter metadata cannot be read, instead of failing."""
  from train.inspect_run import describe_run
  work = tmp_path / "run"
  shutil.copytree(run_d32, work)
  whole = describe_run(str(work))
  assert "parameters at step 3 (" in whole
  # mesh.data=-1 (auto) as saved reads as the size the step was saved on
  # (8 devices), not as -1
  assert "tokens a step); mesh data=8\n" in whole, whole
  meta = work / "checkpoints" / "3" / "state" / "_METADATA"
  if damage == "removed":
    meta.unlink()
  else:
    meta.write_text("{not json")
  text = describe_run(str(work))
  assert "parameters at step 3: its metadata cannot be read" in text, text
  assert "parameters at step 3 (" not in text
  # with no metadata to size it, the auto axis reads as such
  assert "tokens a step); mesh data=auto\n" in text, text
  # everything above the parameters is as before (the step's size and the
  # mesh aside)
  above = lambda t: [line for line in t.split("parameters at step 3")[0].splitlines()  # noqa: E731
                     if not line.startswith(("  step ", "training: "))]
  assert above(text) == above(whole)


def test_load_and_export_with_a_changed_config_json_name_the_field(run_d32, tmp_path):
  import infer
  from train import hf
  work = tmp_path / "run"
  shutil.copytree(run_d32 / "checkpoints", work / "checkpoints")
  with open(run_d32 / "config.json") as f:
    config = json.load(f)
  config["model"]["d_model"] = 48
  with open(work / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(sharding.ConfigError, match=_SHAPES) as err:
    infer.load(str(work))
  assert err.value.field == "model.d_model" and "config.json" in str(err.value)
  with pytest.raises(sharding.ConfigError, match=_SHAPES):
    hf.export_hf(str(work), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_a_saved_model_is_not_fixed_by_growing_it(run_d32,
                                                                          tmp_path):
  """A run with checkpoints (an import, a resume) and a tokenizer of more ids than
  its model: the fix said "set model.vocab_size" and then the resume said "resume
  with the saved vocab_size", a loop. Now it names the tokenizer."""
  from conftest import write_word_tokenizer
  c = make_tiny_config()
  c.train.steps = 4
  (tmp_path / "text.txt").write_text("w1 w2 w3\n")
  c.data.update(source="text", path=str(tmp_path / "text.txt"))
  c.data.tokenizer = write_word_tokenizer(
      tmp_path / "tokenizer.json", ["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(78)])
  with pytest.raises(sharding.ConfigError, match="vocabulary of data.tokenizer") as err:
    train.train(c, str(run_d32), progress=False)
  assert err.value.field == "data.tokenizer"
  assert "hold a model of 64 token rows" in err.value.fix
  assert "model.vocab_size" not in err.value.fix
  # without checkpoints the fix is still to grow the model
  with pytest.raises(sharding.ConfigError) as err:
    train.train(c, str(tmp_path / "new"), progress=False)
  assert err.value.field == "model.vocab_size"


def test_serving_another_model_shape_says_how_to_load_the_saved_one(run_d32):
  """generate with a config of another model (e.g. moe_tiny's on a dense run):
  the fix loads the saved model; it does not say "resume" or "train"."""
  import infer
  c = make_tiny_config()
  c.model.d_model = 48
  with pytest.raises(sharding.ConfigError, match=_SHAPES) as err:
    infer.load(str(run_d32), config=c)
  assert err.value.field == "model.d_model"
  assert err.value.fix == ("load it with the model it was saved with: drop --config "
                           "(the run's saved config is the default), or pass "
                           "--config.model.d_model=32.")


def test_cli_resume_into_other_model_shape_exits_2(run_d32):
  proc = run_cli("train", f"--config=experiments/saved.py:{run_d32}",
                 f"--workdir={run_d32}", "--config.model.d_model=48",
                 "--config.train.steps=4")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Config error in `model.d_model`" in proc.stderr
  assert "`embed/table` has shape (64, 32) there but (64, 48)" in proc.stderr
  assert "model.d_model 32 -> 48" in proc.stderr
  assert "Traceback" not in proc.stderr and "strict=False" not in proc.stderr


def test_reading_a_step_that_is_not_saved_is_a_config_error(run_d32, tmp_path):
  """generate / export-hf / the Python API on a step the run did not save, or on a
  run stopped before its first save (config.json, no checkpoint): a ConfigError
  naming the flag and the saved steps, not Orbax's FileNotFoundError; a bad
  model override and ids outside the vocabulary are errors too."""
  import infer
  from train import hf
  for read in (lambda w, s: infer.load(w, step=s),
               lambda w, s: hf.export_hf(w, str(tmp_path / "out"), s)):
    with pytest.raises(sharding.ConfigError) as err:
      read(str(run_d32), 2)
    assert err.value.field == "--step" and "(saved: 3)" in str(err.value)
    assert "--step=3" in err.value.fix
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(run_d32 / "config.json", empty / "config.json")
  with pytest.raises(sharding.ConfigError, match="holds a run config but no saved "
                     "checkpoint") as err:
    infer.load(str(empty))
  assert err.value.field == "--workdir"
  assert "a run stopped before its first save" in err.value.problem
  # Trained to the end with checkpoint.every_steps=0, which saves nothing: said so,
  # and the fix is a setting that saves.
  saved = json.loads((empty / "config.json").read_text())
  saved["checkpoint"]["every_steps"] = 0
  (empty / "config.json").write_text(json.dumps(saved))
  with pytest.raises(sharding.ConfigError) as err:
    infer.load(str(empty))
  assert "trained with checkpoint.every_steps=0, which saves nothing" in err.value.problem
  assert "--config.checkpoint.every_steps above 0" in err.value.fix
  from train import run_config
  config = run_config.load(str(run_d32))
  config.model.compute_dtype = "float16"
  with pytest.raises(sharding.ConfigError) as err:
    infer.load(str(run_d32), config=config)
  assert err.value.field == "model.compute_dtype"
  model, config = infer.load(str(run_d32))
  vocab = config.model.vocab_size
  with pytest.raises(ValueError, match=f"prompt 1 holds token id {vocab}, outside"):
    infer.generate(model, [[1, 2], [3, vocab]], max_new_tokens=2)
  with pytest.raises(ValueError, match="stop_tokens"):
    infer.generate(model, [[1, 2]], max_new_tokens=2, stop_tokens=[-1])


def test_a_resume_with_another_seed_or_window_length_says_the_order_restarts():
  """A trial: train.seed and data.seq_len changes were listed as trajectory changes
  but nothing said the data order starts anew from the same window number (the
  data schedule continues batch and weight changes, not these)."""
  from train.loop import _new_window_order_note
  c = make_tiny_config()
  saved = json.loads(c.to_json())
  assert _new_window_order_note(saved, c, 10) is None
  c.train.seed, c.data.seq_len = c.train.seed + 1, c.data.seq_len * 2
  note = _new_window_order_note(saved, c, 10)
  assert note.startswith(f"data: train.seed {c.train.seed - 1} -> {c.train.seed} and "
                         f"data.seq_len {c.data.seq_len // 2} -> {c.data.seq_len}: ")
  assert "step 11 reads on from the same window number of the new order" in note
  assert _new_window_order_note({}, c, 10) is None  # nothing saved to compare


@pytest.mark.parametrize("steps", [2, 1])
def test_a_run_resumed_at_or_past_train_steps_says_there_is_nothing_to_train(
    steps, tmp_path, capsys):
  """Rerunning a finished run (or with train.steps below its step) listed the
  steps change and exited 0 having done nothing, without saying so."""
  c = make_tiny_config()
  c.train.steps = 2
  c.checkpoint.every_steps = 2
  train.train(c, str(tmp_path), progress=False)
  c.train.steps = steps
  capsys.readouterr()
  rows = train.train(c, str(tmp_path), progress=False)
  assert not [r for r in rows if "loss" in r]
  assert ("nothing to train: the run is at step 2, and train.steps is "
          f"{steps}; pass --config.train.steps above 2 to train it further"
          ) in capsys.readouterr().out
