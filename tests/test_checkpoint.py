"""Exact resume, resharding, init_from and unreadable checkpoints."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

import sharding
import train
from model import ModelConfig
from train.checkpoint import Checkpointer, CheckpointError
from train.optimizer import make_optimizer
from train.state import abstract_state, model_spec


def _ckpt_config(tiny_config, steps, total=6):
  tiny_config.train.steps = steps
  tiny_config.optim.decay_steps = total
  tiny_config.checkpoint.update(every_steps=3, keep=5)
  return tiny_config


def _restore(config, workdir, step=None, devices=None):
  mesh = sharding.make_mesh(config.mesh, devices)
  spec = model_spec(ModelConfig.from_config(config.model),
                    sharding.normalize_rules(config.mesh.rules))
  tx = make_optimizer(config.optim, config.train.steps)
  ckpt = Checkpointer(str(workdir), config.checkpoint, read_only=True)
  state = ckpt.restore(abstract_state(spec, tx, mesh), step=step)
  ckpt.close()
  return state


def _losses(rows):
  return [r["loss"] for r in rows if "loss" in r]


def test_exact_resume_bit_identical(tiny_config, tmp_path):
  from conftest import make_tiny_config
  whole = train.train(_ckpt_config(tiny_config, 6), str(tmp_path / "a"), progress=False)
  first = train.train(_ckpt_config(make_tiny_config(), 3), str(tmp_path / "b"),
                      progress=False)
  second = train.train(_ckpt_config(make_tiny_config(), 6), str(tmp_path / "b"),
                       progress=False)
  assert _losses(first) + _losses(second) == _losses(whole)  # bit for bit
  a = _restore(tiny_config, tmp_path / "a", 6)
  b = _restore(tiny_config, tmp_path / "b", 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved_on_data8(tmp_path_factory):
  """A run saved at step 3 on data=8, and the loss of its 4th step on data=8."""
  from conftest import make_tiny_config
  root = tmp_path_factory.mktemp("reshard")
  c = _ckpt_config(make_tiny_config(), 3, total=4)
  c.model.num_kv_heads = 8  # so that tensor=8 divides it
  c.mesh.update(data=8)
  train.train(c, str(root / "run"), progress=False)
  shutil.copytree(root / "run", root / "cont")
  c.train.steps = 4
  next_loss = _losses(train.train(c, str(root / "cont"), progress=False))
  return root / "run", next_loss


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=2, tensor=4), dict(data=1, tensor=8),
                                  "one_device"])
def test_restore_onto_other_mesh(mesh, saved_on_data8, tiny_config, tmp_path):
  run, next_loss = saved_on_data8
  c = _ckpt_config(tiny_config, 3, total=4)
  c.model.num_kv_heads = 8
  c.mesh.update(data=8)
  saved = _restore(c, run, 3)
  devices = None
  if mesh == "one_device":
    mesh, devices = dict(data=1), jax.devices()[:1]
  c.mesh.update(**mesh)
  resharded = _restore(c, run, 3, devices)
  for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(resharded)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  param = resharded.params["layers"]["mlp"]["gate"]
  assert len(param.sharding.device_set) == (1 if devices else 8)
  # Continue one step on the new mesh: same loss as continuing on data=8.
  shutil.copytree(run, tmp_path / "cont")
  c.train.steps = 4
  loss = _losses(train.train(c, str(tmp_path / "cont"), devices=devices,
                             progress=False))
  np.testing.assert_allclose(loss, next_loss, rtol=1e-5)


def test_init_from_loads_params_only(tiny_config, tmp_path):
  from conftest import make_tiny_config
  from train.data import make_data
  from train.step import batch_sharding, loss_fn
  train.train(_ckpt_config(tiny_config, 3), str(tmp_path / "src"), progress=False)
  c = _ckpt_config(make_tiny_config(), 1)
  c.checkpoint.init_from = f"{tmp_path / 'src'}:3"
  rows = train.train(c, str(tmp_path / "ft"), progress=False)
  assert rows[0]["step"] == 1  # a new run: step and optimizer start afresh
  # Its first loss is the source's step-3 parameters on the first batch.
  src = _restore(tiny_config, tmp_path / "src", 3)
  mesh = sharding.make_mesh(c.mesh)
  rules = sharding.normalize_rules(None)
  spec = model_spec(ModelConfig.from_config(c.model), rules)
  data = make_data(c, batch_sharding(mesh, rules, 8, 16))
  with jax.set_mesh(mesh):
    nll = loss_fn(spec, 0.0)(src.params, next(data.train))[1]
  assert rows[0]["loss"] == pytest.approx(float(nll), rel=1e-5)


def test_init_from_shape_mismatch_names_parameter(tiny_config, tmp_path):
  from conftest import make_tiny_config
  train.train(_ckpt_config(tiny_config, 3), str(tmp_path / "src"), progress=False)
  c = _ckpt_config(make_tiny_config(), 1)
  c.model.d_ff = 96
  c.checkpoint.init_from = str(tmp_path / "src")
  with pytest.raises(sharding.ConfigError,
                     match=r"`layers/mlp/down` has shape \(2, 64, 32\) in .* but "
                           r"\(2, 96, 32\) in this model"):
    train.train(c, str(tmp_path / "ft"), progress=False)
  # a step the source does not have, and sources without checkpoints: each error
  # says what the value was read as and gives a fix that works
  from train.checkpoint import load_init_params
  cases = [(f"{tmp_path / 'src'}:7", r"has no step 7 \(steps: \[3\]\)\. Fix: give "
            rf"DIR:STEP with a saved step, e\.g\. {tmp_path / 'src'}:3"),
           (str(tmp_path / "nowhere"), r"'.*nowhere' is read as a run directory, "
            r"and .* holds no checkpoints\. Fix: give DIR of a run"),
           ("None", r"holds no checkpoints \(a value of None on the command line is "
            r"the word, not unset\)\. Fix: pass an empty value, "
            r"--config\.checkpoint\.init_from=, to start")]
  for spec, message in cases:
    with pytest.raises(sharding.ConfigError, match=message):
      load_init_params(spec, None, c.checkpoint)
  assert not (tmp_path / "nowhere").exists()  # looking created nothing


def _corrupt(workdir, step):
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  for root, _, files in os.walk(state_dir):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")


def _remove(workdir, step, *parts):
  os.remove(os.path.join(workdir, "checkpoints", str(step), *parts))


# A failed read leaves TensorStore callbacks that find Orbax's event loop closed
# (the launcher drops those reports; from Python they reach pytest as warnings).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_checkpoint_error_and_fallback(tiny_config, tmp_path, capsys):
  """Three kinds of damage to the latest step: garbage arrays, no array metadata
  (an AttributeError before the fallback was tried), no data position (an
  IndexError; restoring the rest would have read the data from its start). Each
  is an error naming the step; with fallback the run resumes from the step
  before, exactly as it first trained, says so, and sets the damaged step aside,
  so that step is saved again (Orbax skipped it: it existed) and the run resumes
  from it."""
  import shutil
  c = _ckpt_config(tiny_config, 6)
  first = train.train(c, str(tmp_path / "first"), progress=False)
  losses = {r["step"]: r["loss"] for r in first if "loss" in r}
  for kind, damage in (("arrays", _corrupt),
                       ("metadata", lambda w, s: _remove(w, s, "state", "_METADATA")),
                       ("data", lambda w, s: _remove(w, s, "data",
                                                     "process_0-of-1.json"))):
    run = tmp_path / kind
    shutil.copytree(tmp_path / "first", run)
    damage(run, 6)
    c.train.steps, c.checkpoint.fallback = 7, False
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*step 6.*"
                       r"--config.checkpoint.fallback=true"):
      train.train(c, str(run), progress=False)
    c.checkpoint.fallback = True
    capsys.readouterr()
    rows = train.train(c, str(run), progress=False)
    out = capsys.readouterr().out
    assert [r["step"] for r in rows if "loss" in r] == [4, 5, 6, 7], kind  # from 3
    assert all(r["loss"] == losses[r["step"]] for r in rows if r["step"] <= 6), kind
    aside = run / "checkpoints" / "6.unreadable"
    assert ("checkpoint.fallback: could not read step 6: " in out and
            f"restored step 3 instead, and set the unreadable step aside as {aside} "
            "(the run saves it again when it gets there)" in out), (kind, out)
    assert aside.is_dir()
    ckpt = Checkpointer(str(run), c.checkpoint, read_only=True)
    assert ckpt.all_steps() == [3, 6, 7], kind  # step 6 saved again
    ckpt.close()
    c.train.steps = 8
    capsys.readouterr()
    train.train(c, str(run), progress=False)
    assert "resuming from step 7" in capsys.readouterr().out


def test_the_fallback_says_which_unreadable_steps_the_run_saves_again(tiny_config):
  """From a pipelines trial: a run's last save (step 8, not a multiple of
  every_steps=3) set aside as unreadable was promised "the run saves it again
  when it gets there", and a resume to 9 did not. The note follows the loop's
  save rule: a multiple of checkpoint.every_steps, or the run's last step."""
  from train.loop import _saved_again
  c = tiny_config
  for every, last, steps, saved in ((3, 9, [8], []), (3, 9, [6], [6]), (3, 8, [8], [8]),
                                    (3, 9, [6, 8], [6]), (0, 9, [8], []),
                                    (3, 7, [9], [])):
    c.checkpoint.every_steps, c.train.steps = every, last
    note = _saved_again(steps, c)
    assert note.startswith("the run saves") == bool(saved), note
    assert ("not step" in note) == (saved != steps), note
  c.checkpoint.every_steps, c.train.steps = 3, 9
  assert _saved_again([8], c) == ("not step 8: this run saves steps that are multiples "
                                  "of checkpoint.every_steps=3 and its last, 9")


def _gone(workdir, step):
  """The step's array files deleted (its manifest and metadata kept)."""
  for name in ("d", "ocdbt.process_0"):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state", name))


def _cut_manifest(workdir, step):
  os.truncate(os.path.join(workdir, "checkpoints", str(step), "state", "manifest.ocdbt"),
              100)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_reading_an_unreadable_step_s_parameters_names_it_and_the_step_before(
    tiny_config, tmp_path):
  """From a trial: generate, export-hf, infer.load and init_from read a step's
  parameters without the restore's error handling, so a damaged latest step was
  Orbax's raw traceback (exit 1, plus asyncio's never-retrieved report), and
  generate took --config.checkpoint.fallback=true and ignored it. Each kind of
  damage is now a CheckpointError naming the step, why, and the flag that reads
  the step before, which works; generate refuses the override, naming --step."""
  import infer
  from conftest import run_cli, run_cli_many
  from train import hf
  from train.checkpoint import load_init_params
  from train.state import abstract_params
  c = _ckpt_config(tiny_config, 6)
  train.train(c, str(tmp_path / "first"), progress=False)
  before = r"Read the step saved before it with {}\.$"
  for kind, damage in (("arrays", _corrupt), ("gone", _gone),
                       ("manifest", _cut_manifest)):
    run = tmp_path / kind
    shutil.copytree(tmp_path / "first", run)
    damage(str(run), 6)
    with pytest.raises(CheckpointError, match=rf"^cannot read step 6 in {run}/checkpoints: "
                       rf"\w+: .+\. {before.format('--step=3')}") as err:
      infer.load(str(run))
    assert "See full TensorStore details" not in str(err.value), kind
    model, _ = infer.load(str(run), step=3)  # what the error says to do
    assert model.cfg.num_layers == c.model.num_layers
  run = tmp_path / "gone"
  with pytest.raises(CheckpointError, match=before.format("--step=3")):
    hf.export_hf(str(run), str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists()
  spec = model_spec(ModelConfig.from_config(c.model), sharding.normalize_rules(None))
  target = abstract_params(spec, sharding.make_mesh(c.mesh))
  with pytest.raises(CheckpointError, match=before.format(
      f"--config.checkpoint.init_from={run}:3")):
    load_init_params(str(run), target, c.checkpoint)
  assert jax.tree.structure(load_init_params(f"{run}:3", target, c.checkpoint)) == (
      jax.tree.structure(target))
  # From the command line: one line, no traceback or asyncio report; its fix works.
  args = ("generate", f"--workdir={run}", "--prompt=12", "--max_new_tokens=2")
  proc = run_cli(*args)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert (f"Checkpoint error: cannot read step 6 in {run}/checkpoints: " in proc.stderr
          and "Read the step saved before it with --step=3." in proc.stderr)
  assert "Traceback" not in proc.stderr and "never retrieved" not in proc.stderr
  assert run_cli(*args, "--step=3").returncode == 0
  [refused] = run_cli_many([(*args, "--config.checkpoint.fallback=true")])
  assert refused.returncode == 2, refused.stderr[-2000:]
  assert ("drop --config.checkpoint.fallback (`train` reads it); generate reads one "
          "saved step: the latest, or --step=N." in refused.stderr), refused.stderr


def test_keeps_latest_and_best_by_eval_loss(tmp_path):
  import jax.numpy as jnp
  import ml_collections
  from train.state import TrainState
  cfg = ml_collections.ConfigDict(dict(keep=1, keep_best=1, async_save=True,
                                       fallback=False))
  ckpt = Checkpointer(str(tmp_path), cfg)
  for step, eval_loss in zip(range(1, 5), [3.0, 1.0, 2.0, 4.0]):
    state = TrainState(step=jnp.array(step), params={"w": jnp.ones(3) * step},
                       opt_state={})
    ckpt.save(state, None, {}, eval_loss=eval_loss)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4]  # best (lowest eval loss) and latest
  ckpt.close()


def test_opening_checkpoints_to_read_logs_no_orbax_warnings(tmp_path, caplog):
  """Loading for inference opens a read-only manager; Orbax's two warnings about
  that were printed on every load (twice per generate)."""
  from conftest import make_tiny_config
  from train.checkpoint import checkpoint_dir
  (tmp_path / "checkpoints").mkdir()
  with caplog.at_level(logging.WARNING):
    Checkpointer(str(tmp_path), make_tiny_config().checkpoint, read_only=True).close()
  assert not [r for r in caplog.records if "read" in r.getMessage()], caplog.text
  assert checkpoint_dir(str(tmp_path)) == str(tmp_path / "checkpoints")
  # The filter is gone afterwards: other absl warnings still reach the user.
  assert not logging.getLogger("absl").filters


def test_metrics_keep_one_trajectory_across_interrupted_attempts(tmp_path):
  """Rows past the step a run resumes from, and a line a kill cut short, leave
  metrics.jsonl before the run appends (plot_loss draws the file in order); a
  fresh start (step 0) drops every row, its step-0 evaluation included."""
  import json
  from train.metrics import MetricsWriter, read_metrics
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [
      {"step": 4, "eval_loss": 0.5}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
  writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, start=4)
  writer.write({"step": 5, "loss": 0.1})
  writer.close()
  assert writer.dropped == 3  # steps 5, 6 and the cut line
  assert read_metrics(str(tmp_path)) == [r for r in rows if r["step"] <= 4] + [
      {"step": 5, "loss": 0.1}]
  again = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, start=5)
  again.close()
  assert again.dropped == 0 and len(read_metrics(str(tmp_path))) == 6
  fresh = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, start=0)
  fresh.close()
  assert fresh.dropped == 6 and read_metrics(str(tmp_path)) == []


def test_cli_reports_an_unreadable_step_without_a_flood(tiny_config, tmp_path):
  """From a trial: a damaged array file printed the CheckpointError as a traceback
  followed by dozens of "RuntimeError: Event loop is closed" tracebacks (TensorStore
  callbacks after Orbax closed its loop). Now one line says what and how to go on;
  with fallback, the note and no traceback."""
  from conftest import run_cli
  c = _ckpt_config(tiny_config, 6)
  train.train(c, str(tmp_path), progress=False)
  data = max((p for p in (tmp_path / "checkpoints" / "6" / "state").glob(
      "ocdbt.process_0/d/*")), key=lambda p: p.stat().st_size)  # the largest arrays
  with open(data, "r+b") as f:
    f.truncate(100)
  args = ("train", f"--config=experiments/saved.py:{tmp_path}", f"--workdir={tmp_path}",
          "--config.train.steps=7")
  proc = run_cli(*args)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Checkpoint error: cannot read checkpoint" in proc.stderr
  assert "step 6: " in proc.stderr and "fallback=true" in proc.stderr
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  proc = run_cli(*args, "--config.checkpoint.fallback=true")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint.fallback: could not read step 6" in proc.stdout
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr


def test_the_launcher_drops_only_a_failed_read_or_write_s_leftovers(monkeypatch):
  """The reports `experiment.failed_checkpoint_io` drops, built as Python makes
  them: a RuntimeError raised inside asyncio on a closed loop, an Orbax coroutine
  closed with its exception set, asyncio's never-retrieved read error, Orbax's save
  threads' ERROR logs of a failed write. Any other report (an error elsewhere,
  another coroutine, another never-retrieved future, another Orbax error, the same
  words from another package) passes."""
  import asyncio
  import sys
  import types
  from experiment import failed_checkpoint_io
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
  monkeypatch.setattr(logging.getLogger("absl"), "filters", [])
  failed_checkpoint_io.install()
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as err:
    closed = types.SimpleNamespace(exc_type=RuntimeError, exc_value=err,
                                   exc_traceback=err.__traceback__.tb_next, object=None)
  try:
    raise RuntimeError("Event loop is closed")  # raised here, not inside asyncio
  except RuntimeError as err:
    ours = types.SimpleNamespace(exc_type=RuntimeError, exc_value=err,
                                 exc_traceback=err.__traceback__, object=None)
  orbax_code = types.SimpleNamespace(co_filename="/x/orbax/checkpoint/s.py")
  other_code = types.SimpleNamespace(co_filename="/x/mine.py")
  coroutine = lambda code: types.SimpleNamespace(  # noqa: E731
      exc_type=Exception, exc_value=Exception("x"), exc_traceback=None,
      object=types.SimpleNamespace(cr_code=code))
  for report in (closed, coroutine(orbax_code)):
    sys.unraisablehook(report)
  assert seen == []
  for report in (ours, coroutine(other_code)):
    sys.unraisablehook(report)
  assert len(seen) == 2
  logger = logging.getLogger("asyncio")
  record = lambda msg: logger.makeRecord("asyncio", logging.ERROR, "f", 1, msg,  # noqa: E731
                                         (), None)
  assert not logger.filter(record("_GatheringFuture exception was never retrieved\n"
                                  "future: <... Encountered error while reading array "
                                  "index: (slice(0, 2, 1),)>"))
  assert not logger.filter(record(  # a read of a step whose files are gone
      "Future exception was never retrieved\nfuture: <Future finished exception="
      "ValueError('NOT_FOUND: Error opening \"cast\" driver: Error reading \"params."
      "head/.zarray\" in OCDBT database at local file \"/r/checkpoints/6/state/\"')>"))
  assert logger.filter(record("Task exception was never retrieved\nfuture: <... "
                              "ValueError('mine')>"))
  assert not logger.filter(record(  # a failed write's (seen in one CI run)
      "Task exception was never retrieved\nfuture: <Task finished coro=<async_"
      "serialize_from_host() done, defined at /x/orbax/checkpoint/_src/serialization/"
      "serialization.py:126> exception=ValueError('OUT_OF_RANGE: Error writing "
      "\"w/0\" in OCDBT database')>"))
  assert logger.filter(record("Task exception was never retrieved\nfuture: <... "
                              "ValueError('Error writing my own file')>"))
  absl = logging.getLogger("absl")
  orbax_file = "/x/orbax/checkpoint/_src/futures/future.py"
  log = lambda path, msg, level=logging.ERROR: absl.makeRecord(  # noqa: E731
      "absl", level, path, 387, msg, (), None)
  for message in ("[process=0][thread=array_type_handler][operation_id=1] "
                  "_SignalingThread.run() raised an exception: RESOURCE_EXHAUSTED",
                  "[process=0] Failed to run 4 Handler Commit operations or the Commit "
                  "callback in background save thread, directory: /r/checkpoints/2",
                  "[process=0][step=2][wait_until_finished] Save Finalize thread "
                  "(save_finalize) failed."):
    assert not absl.filter(log(orbax_file, message)), message
    assert absl.filter(log("/x/mine.py", message)), message
  assert absl.filter(log(orbax_file, "Some other Orbax error"))
  assert absl.filter(log(orbax_file, "_SignalingThread.run() raised an exception",
                         logging.WARNING))


@pytest.mark.parametrize("log_every,save_every", [(1, 4), (50, 1)])
def test_a_diverged_run_stops_without_saving_it(log_every, save_every, tmp_path,
                                                caplog):
  """From a crash trial: a run whose loss went NaN trained on, and its NaN
  checkpoints rotated every good one out under checkpoint.keep. The loss and
  gradient norm are read at each logged row and before each save (both paths: a
  row every step, and saves between rows); a non-finite one stops the run with
  Diverged before that state is saved, so every kept checkpoint is finite, and the
  row goes to metrics.jsonl as strict JSON (null)."""
  import json
  from conftest import make_tiny_config
  from train import Diverged  # exported for Python callers (a trial found it was not)
  good = _ckpt_config(make_tiny_config(), 3, total=12)
  train.train(good, str(tmp_path), progress=False)
  c = _ckpt_config(make_tiny_config(), 12, total=12)
  c.optim.learning_rate = 1e30  # an update of ~1e30 per weight: the next step is NaN
  c.checkpoint.update(every_steps=save_every, keep=2)
  c.log.every_steps = log_every
  with pytest.raises(Diverged, match=r"^step (\d+): the training loss is \S+ and the "
                     r"gradient norm \S+: training diverged, and stops here without "
                     r"saving this state\. Its last checkpoint, step (\d+), is kept: "
                     r"resume from it .* --config\.optim\.learning_rate \(now 1e\+30\)"
                     ) as err:
    train.train(c, str(tmp_path), progress=False)
  import re
  bad, last = map(int, re.match(r"step (\d+):.*step (\d+), is kept", str(err.value)).groups())
  steps = Checkpointer(str(tmp_path), c.checkpoint, read_only=True).all_steps()
  assert steps and max(steps) == last < bad, (steps, str(err.value))
  for step in steps:
    params = _restore(c, tmp_path, step).params
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step
  rows = [json.loads(line, parse_constant=lambda s: pytest.fail(f"{s} in metrics.jsonl"))
          for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  if log_every == 1:  # the diverged step's row is written, its non-finite values null
    assert rows[-1]["step"] == bad and None in (rows[-1]["loss"], rows[-1]["grad_norm"])
    from train.inspect_run import describe_run  # reads the null back
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert f"last logged step {bad}: loss " in describe_run(str(tmp_path))
    # and, reading every item a step holds, it makes Orbax warn of nothing
    # (a notebook showed 7 absl warnings per call)
    assert not [r.getMessage() for r in caplog.records], caplog.records


def test_an_update_that_overflows_is_not_saved(tmp_path):
  """An update beyond float32 (learning rate 1e39) makes the parameters
  non-finite while that step's loss and gradient norm, computed before it, are
  finite: the state check before the save stops the run there, and the last
  checkpoint kept is the good run's, whose parameters are finite."""
  from conftest import make_tiny_config
  from train.loop import Diverged
  good = _ckpt_config(make_tiny_config(), 3)
  train.train(good, str(tmp_path), progress=False)
  c = _ckpt_config(make_tiny_config(), 6)
  c.optim.learning_rate = 1e39
  c.checkpoint.every_steps = 1
  c.log.every_steps = 50
  with pytest.raises(Diverged, match=r"^step 4: the training loss \(\S+\) and gradient "
                     r"norm \(\S+\) are finite but the state to be saved holds "
                     r"non-finite values .* Its last checkpoint, step 3, is kept"):
    train.train(c, str(tmp_path), progress=False)
  assert Checkpointer(str(tmp_path), c.checkpoint, read_only=True).all_steps() == [3]
  params = _restore(c, tmp_path, 3).params
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_a_save_that_cannot_be_written_is_reported_and_the_last_step_resumes(
    tmp_path, capsys):
  """From a crash trial (a full disk): a checkpoint write that fails surfaced as a
  traceback from the next save, after some 350 lines of Orbax's background
  threads' tracebacks. The write fails for real here (a per-file size limit,
  RLIMIT_FSIZE, below the checkpoint's data file): the CLI exits 1 with one
  CheckpointError naming the failed step and the intact one, prints no traceback,
  and a run without the limit resumes from the intact step and saves on."""
  import resource
  import signal
  import subprocess
  import sys

  from conftest import REPO
  from experiments import llama_tiny

  def config(steps):
    c = llama_tiny.get_config()
    c.train.update(steps=steps, eval_every=0)
    c.data.update(source="synthetic", seq_len=64)
    c.checkpoint.every_steps = 2
    return c

  train.train(config(2), str(tmp_path), progress=False)  # step 2 saved

  def limit():  # checkpoint data files exceed 4 MiB; a write past it fails (EFBIG)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  proc = subprocess.run(
      [sys.executable, "-m", "experiment", "train", "--config=experiments/llama_tiny.py",
       f"--workdir={tmp_path}", "--config.train.steps=4", "--config.train.eval_every=0",
       "--config.data.source=synthetic", "--config.data.seq_len=64",
       "--config.checkpoint.every_steps=2"], cwd=REPO, env=dict(env, PYTHONPATH=REPO),
      preexec_fn=limit, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"Checkpoint error: saving step 4 into {tmp_path}/checkpoints failed: " in (
      proc.stderr), proc.stderr[-3000:]
  assert ("step 2, the latest complete checkpoint, is intact and a resume reads it. "
          "Free space there (or fix the file system) and run again with the same "
          "--workdir") in proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  capsys.readouterr()
  train.train(config(4), str(tmp_path), progress=False)
  assert "resuming from step 2" in capsys.readouterr().out
  assert Checkpointer(str(tmp_path), config(4).checkpoint,
                      read_only=True).all_steps() == [2, 4]


def test_a_diverged_diloco_run_offers_the_outer_learning_rate_on_an_auto_mesh():
  """The divergence message's DiLoCo fix follows the run's resolved replica count:
  with `mesh.diloco=-1` (auto) it read the -1 as one replica and left it out."""
  from conftest import make_tiny_config
  from train import diloco, loop
  c = make_tiny_config()
  c.mesh.update(diloco=-1, data=1)
  c.diloco.outer_lr = 0.7
  metrics = {"loss": np.array([np.nan]), "grad_norm": np.array([1.0])}
  with pytest.raises(loop.Diverged, match=r"with DiLoCo, a lower "
                     r"--config\.diloco\.outer_lr \(now 0\.7\)"):
    loop._stop_if_diverged(5, metrics, 4, c, diloco.DiLoCo.from_config(c, 8))
  with pytest.raises(loop.Diverged) as err:  # one replica: no DiLoCo, no such fix
    loop._stop_if_diverged(5, metrics, 4, c, diloco.DiLoCo.from_config(c, 1))
  assert "outer_lr" not in str(err.value) and "resume from it" in str(err.value)
