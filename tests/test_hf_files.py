"""What import-hf and export-hf leave on disk: nothing when interrupted (they stage
their files), the tokenizer's companion files (chat template) through import,
fine-tuning and export, and a Hugging Face model directory given where a run is
expected named as such and left as it was."""

import hashlib
import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import run_cli_many, write_word_tokenizer  # noqa: E402
from experiments import base  # noqa: E402
from sharding import ConfigError  # noqa: E402
from train import hf, staged  # noqa: E402

WORDS = ["[UNK]", "<s>", "</s>", *[f"w{i}" for i in range(13)]]
TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


def _hf_dir(path, chat=False, dtype=None, eos=2):
  """A 1-layer Llama over WORDS with its tokenizer (and, with `chat`, the files
  transformers 5 saves for a chat model: tokenizer_config.json and
  chat_template.jinja)."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
      bos_token_id=1, eos_token_id=eos)
  model = transformers.LlamaForCausalLM(config)
  model.to(dtype or torch.float32).save_pretrained(path)
  write_word_tokenizer(os.path.join(path, "tokenizer.json"), WORDS)
  if chat:
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                 "eos_token": "</s>", "unk_token": "[UNK]", "pad_token": "</s>"}, f)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
      f.write(TEMPLATE)
  return str(path)


def _digest(directory) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_the_chat_template_goes_through_import_a_moved_fine_tune_and_export(tmp_path):
  """transformers 5 saves a chat template as chat_template.jinja, which export-hf
  dropped (AutoTokenizer's chat_template None). A run fine-tuned from an import
  kept only tokenizer.json: once the imported run moved, its export wrote a
  tokenizer_config.json of bos / eos alone (pad and unk gone). Now every
  companion file goes into the import, into the fine-tuned run beside its copy
  of the tokenizer, and back out, byte for byte."""
  import train
  from experiments import saved
  source = _hf_dir(tmp_path / "hf", chat=True)
  run, tuned = str(tmp_path / "run"), str(tmp_path / "tuned")
  hf.import_hf(source, run, base.get_config())
  config = saved.get_config(run)
  config.data.update(source="synthetic", seq_len=8)
  config.train.update(steps=1, batch_size=8, eval_every=0)
  config.log.update(peak_flops=1e12, tensorboard=False)
  train.train(config, tuned, progress=False)
  shutil.move(run, tmp_path / "moved")  # the fine-tune's tokenizer path is gone
  for workdir, out in ((tuned, tmp_path / "out_tuned"),
                       (str(tmp_path / "moved"), tmp_path / "out_run")):
    hf.export_hf(workdir, str(out))
    for name in ("chat_template.jinja", "tokenizer_config.json"):
      with open(os.path.join(source, name), "rb") as a, open(out / name, "rb") as b:
        assert a.read() == b.read(), (workdir, name)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == TEMPLATE, workdir
    assert (tok.pad_token, tok.unk_token) == ("</s>", "[UNK]"), workdir
    assert tok.apply_chat_template([{"role": "user", "content": "w3"}],
                                   tokenize=False) == "<s>w3</s>"


def test_an_interrupted_import_or_export_leaves_nothing_and_runs_again(
    tmp_path, monkeypatch, capsys):
  """import-hf wrote config.json and the tokenizer into the run before its
  checkpoint, and export-hf its weights before config.json: a kill part-way left
  a run without a checkpoint (refused by the rerun as existing, by generate with
  a fix that did not help) or an HF directory transformers half-reads. Both now
  write into `<target>/.<command>.partial` and move the files in at the end: an
  interrupt (here Ctrl-C in the middle of the write) leaves nothing, a leftover
  of a SIGKILL is cleared by the rerun, and the launcher says so in one line."""
  source = _hf_dir(tmp_path / "hf")
  run, out = tmp_path / "run", tmp_path / "out"

  def interrupt(*args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as m:
    m.setattr(hf.Checkpointer, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
      hf.import_hf(source, str(run), base.get_config())
  assert os.listdir(run) == [], os.listdir(run)
  # A SIGKILL leaves the staging directory; the rerun clears it.
  leftover = run / staged.partial_name("import-hf")
  leftover.mkdir()
  (leftover / "config.json").write_text("{}")
  hf.import_hf(source, str(run), base.get_config())
  assert sorted(os.listdir(run)) == ["checkpoints", "config.json",
                                     "generation_config.json", "tokenizer.json"]

  from safetensors import numpy as st_numpy
  real = st_numpy.save_file

  def half_then_interrupt(tensors, path, **kwargs):
    real(dict(list(tensors.items())[:1]), path, **kwargs)
    raise KeyboardInterrupt

  with monkeypatch.context() as m:
    m.setattr(st_numpy, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
      hf.export_hf(str(run), str(out))
  assert os.listdir(out) == [], os.listdir(out)
  leftover = out / staged.partial_name("export-hf")
  leftover.mkdir()
  (leftover / "model.safetensors").write_bytes(b"half")
  hf.export_hf(str(run), str(out))  # a leftover is not "files already there"
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                     "model.safetensors", "tokenizer.json",
                                     "tokenizer_config.json"]
  transformers.LlamaForCausalLM.from_pretrained(out)

  from experiment.__main__ import _interrupted
  capsys.readouterr()
  for target, said in ((tmp_path / "new", "before it finished: none of its files are "
                        f"in {tmp_path / 'new'}; run the command again."),
                       (out, f"after it finished: {out} is complete.")):
    with pytest.raises(SystemExit) as exit_:
      with _interrupted("export-hf", str(target)):
        raise KeyboardInterrupt
    assert exit_.value.code == 130
    assert f"export-hf interrupted {said}" in capsys.readouterr().err


def test_an_hf_model_given_where_a_run_belongs_is_named_and_left_as_it_was(tmp_path):
  """`--workdir=` an HF model directory (its config.json is transformers'): inspect
  and export-hf raised AttributeError, generate and saved.py blamed
  experiments/saved.py with a KeyError, train wrote its config.json over the
  model's, and import-hf into it said "already holds a run ... remove that
  directory first", which deletes the model. Each now names the HF model, leaves
  every file as it was, and the import's fix is a new --workdir."""
  import infer
  model = _hf_dir(tmp_path / "hf", chat=True)
  before = _digest(model)
  said = f"{model} holds a Hugging Face model (LlamaForCausalLM)"
  cases = [("inspect", f"--workdir={model}"),
           ("export-hf", f"--workdir={model}", f"--out={tmp_path / 'out'}"),
           ("generate", f"--workdir={model}", "--prompt=w1"),
           ("train", f"--config=experiments/saved.py:{model}", f"--workdir={tmp_path}/t"),
           ("train", "--config=experiments/llama_tiny.py", f"--workdir={model}",
            "--config.train.steps=1"),
           ("import-hf", f"--hf_dir={model}", f"--workdir={model}")]
  for args, proc in zip(cases, run_cli_many(cases)):
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert said in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    fix = proc.stderr.split("Fix:")[1]
    assert "remove" not in fix, (args, fix)
    assert (("pass a new --workdir for the run" in fix) if args[0] == "import-hf" else
            f"import it first: python -m experiment import-hf --hf_dir={model} " in fix
            ), (args, fix)
  assert _digest(model) == before
  assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "t")
  with pytest.raises(ConfigError) as err:
    infer.load(model)
  assert err.value.field == "--workdir" and said in str(err.value)


def test_a_file_named_byte_beside_the_export_is_not_its_tokenizer(tmp_path, monkeypatch,
                                                                  capsys):
  """export-hf checked os.path.exists(data.tokenizer), so a byte-level run
  exported from a directory holding a file named `byte` copied that file as
  tokenizer.json (and failed reading it). A byte run exports no tokenizer and
  says so."""
  source = _hf_dir(tmp_path / "hf")
  os.remove(os.path.join(source, "tokenizer.json"))
  hf.import_hf(source, str(tmp_path / "run"), base.get_config())
  monkeypatch.chdir(tmp_path)
  (tmp_path / "byte").write_text("hello")
  capsys.readouterr()
  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  assert "tokenizer.json" not in os.listdir(tmp_path / "out")
  assert ("no tokenizer files: the run reads text as bytes (ids 0-255), which "
          "transformers has no tokenizer for") in capsys.readouterr().out


def test_import_warns_of_stop_ids_past_the_vocabulary_and_of_float16(tmp_path, capsys):
  """An eos id the embedding does not hold was imported silently, and generate
  refused it later; a float16 checkpoint was offered bfloat16, which rounds its
  mantissas. Import says both."""
  source = _hf_dir(tmp_path / "hf", dtype=torch.float16, eos=[2, 40])
  hf.import_hf(source, str(tmp_path / "run"), base.get_config())
  printed = capsys.readouterr().out
  assert ("stop tokens: [2, 40] (warning: 40 past the model's vocab_size of 16: the "
          "model cannot emit it, and generate refuses such stop ids") in printed
  assert ("weights: float16 in the checkpoint, held (and exported) as float32, "
          "model.param_dtype (twice the memory, exactly: rung holds no float16 "
          "parameters, and --config.model.param_dtype=bfloat16 would round their "
          "10-bit mantissas to 7)") in printed


def test_import_saves_parameters_alone_and_training_starts_any_optimizer_from_them(
    tmp_path, capsys):
  """import-hf saved AdamW's zero moments beside the weights (3x the disk of the
  parameters, and 3x the import's memory); a step-0 optimizer state is a fresh
  one, so it saves the parameters alone, and training makes the optimizer state
  it runs. Trained in place, the run is the same as one started from those
  parameters; when its later step cannot be read, the fallback to the import's
  step 0 starts the optimizer afresh and repeats the same losses."""
  import orbax.checkpoint as ocp

  import train
  from experiments import saved
  from test_checkpoint import _corrupt
  source = _hf_dir(tmp_path / "hf")
  run = tmp_path / "run"
  hf.import_hf(source, str(run), base.get_config())
  meta = ocp.PyTreeCheckpointer().metadata(str(run / "checkpoints" / "0" / "state"))
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  assert set(tree) == {"step", "params"}, set(tree)
  config = saved.get_config(str(run))
  config.data.update(source="synthetic", seq_len=8)
  config.train.update(steps=3, batch_size=8, eval_every=0)
  config.checkpoint.update(every_steps=2, fallback=True)
  config.log.update(peak_flops=1e12, tensorboard=False, every_steps=1)
  shutil.copytree(run, tmp_path / "copy")
  capsys.readouterr()
  first = {r["step"]: r["loss"] for r in train.train(config, str(run), progress=False)
           if "loss" in r}
  assert f"starting adamw from the step-0 parameters of {run / 'checkpoints'}" in (
      capsys.readouterr().out)
  _corrupt(run, 3)
  _corrupt(run, 2)
  again = {r["step"]: r["loss"] for r in train.train(config, str(run), progress=False)
           if "loss" in r}
  out = capsys.readouterr().out
  assert "restored step 0 instead" in out and "starting adamw from the step-0" in out
  assert again == first and len(first) == 3
  config.checkpoint.init_from = ""  # the same start in a copy, sgd: another state
  config.optim.name = "sgd"
  train.train(config, str(tmp_path / "copy"), progress=False)
  assert "starting sgd from the step-0 parameters" in capsys.readouterr().out
