"""Each config mistake gets a message naming field, numbers and fix; the CLI exits 2."""

import ast
import itertools
import math
import re

import pytest

import train
from conftest import assert_fixes_validate, run_cli, run_cli_many
from experiments import llama_tiny
from sharding import ConfigError

# (overrides, field named in the message, fragment with the numbers)
CASES = {
    "mesh_product": ({"mesh.data": 3}, "mesh.data", "has 3 devices but 8 are available"),
    "heads": ({"model.num_heads": 12, "mesh.tensor": 8, "mesh.data": 1},
              "model.num_heads", "12 heads cannot be split over mesh.tensor=8"),
    "kv_heads": ({"mesh.tensor": 8, "mesh.data": 1}, "model.num_kv_heads",
                 "4 kv heads cannot be split over mesh.tensor=8"),
    "seq_len": ({"data.seq_len": 250, "mesh.sequence": 4, "mesh.data": 2},
                "data.seq_len", "seq_len=250 cannot be split over mesh.sequence=4"),
    "batch": ({"train.batch_size": 12}, "train.batch_size",
              "batch_size=12 does not split over the data-parallel size 8"),
    "seed": ({"train.seed": 2 ** 32}, "train.seed",
             "is 4294967296; JAX's random keys hold 32 bits"),
    "block": ({"model.block": "ladderr"}, "model.block", "'ladderr' is not one of"),
    "embed_lookup": ({"model.embed_lookup": "iota"}, "model.embed_lookup",
                     "'iota' is not one of gather, one_hot."),
    "loss_chunks": ({"model.loss_chunks": 3}, "model.loss_chunks",
                    "holds 2 sequences, which do not split into 3 loss chunks"),
    "loss_chunks_zero": ({"model.loss_chunks": 0}, "model.loss_chunks",
                         "0 is not a number of chunks"),
    "scan_layers_pipelined": ({"model.scan_layers": False, "pipeline.microbatches": 2},
                              "model.scan_layers",
                              "is False in a pipelined model"),
    "prefetch_negative": ({"data.prefetch_batches": -1}, "data.prefetch_batches",
                          "must be at least 0, got -1"),
    # keep=0 kept 1 checkpoint, as if it were 1; negative settings ran silently
    "keep_zero": ({"checkpoint.keep": 0}, "checkpoint.keep", "must be at least 1, got 0"),
    "keep_best_negative": ({"checkpoint.keep_best": -2}, "checkpoint.keep_best",
                           "must be at least 0, got -2"),
    "checkpoint_every_negative": ({"checkpoint.every_steps": -5},
                                  "checkpoint.every_steps", "must be at least 0, got -5"),
    "attention_block_negative": ({"model.attention_block_kv": -128},
                                 "model.attention_block_kv", "-128 is not a tile size"),
    # a hybrid's layers on a standard block were ignored silently
    "ladder_layers_on_standard": ({"model.ladder_layers": "upper:1"},
                                  "model.ladder_layers", "'upper:1' picks ladder "
                                  "layers, but model.block='standard' has none"),
    # (from a ladder trial: one picking every layer was accepted and ignored)
    "ladder_layers_all_on_standard": ({"model.ladder_layers": "upper:4"},
                                      "model.ladder_layers", "'upper:4' picks ladder "
                                      "layers, but model.block='standard' has none"),
    "ladder_list_on_parallel": ({"model.block": "parallel",
                                 "model.ladder_layers": "0,1,2,3"},
                                "model.ladder_layers", "'0,1,2,3' picks ladder "
                                "layers, but model.block='parallel' has none"),
    "ring_unsplit": ({"model.attention": "ring"}, "model.attention",
                     "'ring', which exchanges the sequence between the devices of the "
                     "mesh axis the rules split `length` over, but mesh.sequence=1 does "
                     "not split it"),
    "ulysses_unsplit": ({"model.attention": "ulysses"}, "model.attention",
                        "but mesh.sequence=1 does not split it"),
    "ulysses_heads": ({"model.attention": "ulysses", "model.num_heads": 6,
                       "model.num_kv_heads": 2, "mesh.sequence": 4, "mesh.data": 2},
                      "model.attention", "heads per device (6 = heads 6 / 1) is not a "
                      "multiple of sequence=4. Fix: use --config.model.attention="
                      "ring_zigzag (or ring), or --config.mesh.sequence=2 "
                      "--config.mesh.data=-1, the largest smaller sequence size "
                      "Ulysses can split these heads over."),
}


def _apply(config, overrides):
  for path, value in overrides.items():
    *groups, name = path.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[name] = value
  return config


@pytest.mark.parametrize("case", CASES)
def test_library_raises_config_error(case):
  """Each mistake names its field and numbers, and every fix it offers in flags
  works as given (a trial followed one that met another refusal)."""
  overrides, field, numbers = CASES[case]
  err = assert_fixes_validate(_apply(llama_tiny.get_config(), overrides))
  assert err.field == field
  assert numbers in str(err)
  assert "Fix:" in str(err)


def _float_fields(config, prefix=""):
  for name, value in config.items():
    if hasattr(value, "items"):
      yield from _float_fields(value, f"{prefix}{name}.")
    elif isinstance(value, float):
      yield f"{prefix}{name}"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(bad):
  """NaN passes every comparison check (`nan <= 0` is False): a NaN learning rate
  trained NaN losses whose checkpoints displaced every good one. Every float
  field of the config, NaN or infinite, is refused naming it."""
  fields = list(_float_fields(llama_tiny.get_config()))
  assert "optim.learning_rate" in fields and len(fields) > 10
  for field in fields:
    c = llama_tiny.get_config()
    *groups, name = field.split(".")
    node = c
    for g in groups:
      node = node[g]
    node[name] = bad
    with pytest.raises(ConfigError) as err:
      train.validate_config(c, 8)
    assert err.value.field == field, field
    assert "must be finite" in str(err.value)


@pytest.mark.parametrize("heads,kv_heads,tensor", [(6, 1, 2), (6, 2, 4), (12, 4, 8)])
def test_head_counts_the_tensor_axis_does_not_divide_name_every_rule_to_unsplit(
    heads, kv_heads, tensor):
  """The fix's "leave the heads unsplit" overrides, applied as given, pass: every
  rule that splits a count it does not divide (heads, act_heads, kv_heads,
  act_kv_heads) is in it, not only the first (a user met them one per run)."""
  import ml_collections
  import shlex
  c = _apply(llama_tiny.get_config(), {"model.num_heads": heads, "model.num_kv_heads":
                                       kv_heads, "model.d_model": 64,
                                       "mesh.tensor": tensor, "mesh.data": 8 // tensor})
  with pytest.raises(ConfigError) as err:
    train.validate_config(c, 8)
  overrides = shlex.split(err.value.fix.split("unsplit: ")[1].rstrip("."))
  assert overrides
  for flag in overrides:
    name, value = flag.removeprefix("--config.mesh.rules.").split("=")
    assert value == "()"
    c.mesh.rules[name] = ()
  assert isinstance(c.mesh.rules, ml_collections.ConfigDict)
  train.validate_config(c, 8)  # passes


@pytest.mark.parametrize("value", [
    "swiglu", "2,3", "my runs/a b", "it's $HOME; rm -rf ~", "/tmp/run:3", "", 3, -1,
    2.5, True, False, (1, 2), ["a", "b c"], ()])
def test_a_fix_flag_pastes_into_a_shell_and_parses_back_to_the_value(value):
  """`sharding.flag`, which every fix naming a value from a file or a path uses,
  gives one shell word that ml_collections' config flags parse back to the value
  (a list as the tuple a config holds): a value with spaces, quotes or `$` was
  pasted unquoted before."""
  import shlex

  import ml_collections
  from absl import flags
  from ml_collections import config_flags

  import sharding
  other = (not value if isinstance(value, bool) else ("other",)
           if isinstance(value, (list, tuple)) else value + "x"
           if isinstance(value, str) else value + 1)  # the default, of its type
  config = ml_collections.ConfigDict(dict(v=other))
  pasted = shlex.split(f"prog {sharding.flag('config.v', value)}")
  assert len(pasted) == 2, pasted
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", config, flag_values=values,
                                  sys_argv=pasted)
  values(pasted)
  assert values.config.v == (tuple(value) if isinstance(value, list) else value)


def test_model_config_from_python_takes_moe_as_a_dict():
  """ModelConfig(moe=dict(...)) failed later with "'dict' object has no attribute
  'num_experts'"; it now builds the MoEConfig, with the same field checks as a
  config file, and anything else for moe is a ConfigError."""
  from model import ModelConfig
  from model.config import MoEConfig
  cfg = ModelConfig(moe=dict(num_experts=4, top_k=1))
  assert cfg.moe == MoEConfig(num_experts=4, top_k=1)
  assert ModelConfig.from_config(llama_tiny.get_config().model).moe == MoEConfig()
  with pytest.raises(ConfigError) as err:
    ModelConfig(moe=dict(num_expert=4))
  assert err.value.field == "model.moe.num_expert" and "num_experts" in str(err.value)
  with pytest.raises(ConfigError) as err:
    ModelConfig(moe=4)
  assert err.value.field == "model.moe"


def _choices():
  from model.config import BLOCKS, DTYPES, REMAT
  from model.embedding import LOOKUPS
  from train import data, galore, optimizer
  return {"optim.name": optimizer.NAMES, "optim.galore_projector": galore.PROJECTORS,
          "optim.state_dtype": optimizer.STATE_DTYPES, "model.block": BLOCKS,
          "model.remat": REMAT, "model.embed_lookup": LOOKUPS,
          "model.compute_dtype": tuple(DTYPES), "data.source": data.SOURCES}


@pytest.mark.parametrize("field", sorted(_choices()))
def test_a_misspelt_choice_names_the_one_meant(field):
  """Every value of a choice field, typed in capitals or with a letter doubled,
  gets a fix that names that value and validates when followed; a value like
  none of them lists them all. A data source that reads files is named with a
  path when none is set, and a document source with the byte tokenizer's 256 ids
  under a smaller model (each was the next error)."""
  allowed = _choices()[field]
  # (a field checked only where it is read, train/unread.py)
  reader = {"optim.galore_projector": {"optim.name": "galore"}}.get(field, {})
  contexts = ([{}, {"data.path": "/data/x"}, {"model.vocab_size": 64}]
              if field == "data.source" else [{}])
  for meant, context, typo in itertools.product(
      allowed, contexts, ("upper", "doubled")):
    typo = meant.upper() if typo == "upper" else meant + meant[-1]
    config = _apply(llama_tiny.get_config(), {**reader, **context, field: typo})
    err = assert_fixes_validate(config)
    assert err.field == field
    assert err.problem == f"{typo!r} is not one of {', '.join(allowed)}."
    assert err.fix.startswith(f"set --config.{field}={meant}")
    assert err.fix.endswith(" (or another of those)."), err.fix
  with pytest.raises(ConfigError) as err:
    train.validate_config(_apply(llama_tiny.get_config(), {**reader, field: "qqqq"}),
                          8)
  assert err.value.fix == f"set --config.{field} to one of them."


@pytest.mark.parametrize("impl", ["ring", "ring_zigzag", "ulysses"])
def test_sequence_parallel_attention_fix_works(impl):
  """The fix that the unsplit-length error gives validates."""
  config = _apply(llama_tiny.get_config(), {"model.attention": impl})
  with pytest.raises(ConfigError) as err:
    train.validate_config(config, 8)
  assert "Fix: set --config.mesh.sequence=2 (or more" in str(err.value)
  assert train.validate_config(_apply(config, {"mesh.sequence": 2}), 8)["sequence"] == 2


def test_ladder_layers_listed_twice_are_refused_with_a_fix_that_works():
  config = _apply(llama_tiny.get_config(), {"model.block": "ladder",
                                            "model.ladder_layers": "3,2,3"})
  with pytest.raises(ConfigError, match="'3,2,3' lists layer 3 more than once") as err:
    train.validate_config(config, 8)
  assert err.value.fix.endswith("--config.model.ladder_layers='2,3'.")
  train.validate_config(_apply(config, {"model.ladder_layers": "2,3"}), 8)


@pytest.mark.parametrize("layers", [1, 2, 3, 8])
@pytest.mark.parametrize("spec", ["upper:40", "5,6", "-1", "x"])
def test_ladder_layers_out_of_range_give_examples_that_fit_the_model(layers, spec):
  """The examples were fixed ('upper:4', '2,3'), and refused on a model with
  fewer layers (the 'upper:4' fix repeated the value refused). Every
  alternative of the fix now validates on the model at hand."""
  config = _apply(llama_tiny.get_config(), {"model.block": "ladder",
                                            "model.num_layers": layers,
                                            "model.ladder_layers": spec})
  if layers == 8 and spec == "5,6":
    train.validate_config(config, 8)  # in range there
    return
  err = assert_fixes_validate(config)
  assert err.field == "model.ladder_layers", err


@pytest.mark.parametrize("fields", [
    {"mesh.rules.experts": ("tensor",), "mesh.tensor": 2},
    {"mesh.rules.experts": ("expert", "tensor"), "mesh.tensor": 2, "mesh.expert": 2},
    {"mesh.rules.experts": ("data",), "model.moe.num_experts": 4},
    {"mesh.rules.experts": ("data",), "model.moe.num_experts": 2, "mesh.data": -1},
])
def test_experts_mapped_onto_other_axes_are_refused_with_fixes_that_work(fields):
  """Experts on `tensor`, which also splits each expert's hidden dimension,
  crashed inside shard_map (exit 1). Experts on `data` (mesh.data=-1, 8 devices)
  were offered --config.mesh.data=1, which fits no devices, and its refusal
  repeated that flag. Both are refused before compiling, and every alternative
  of the fix validates."""
  from experiments import moe_tiny
  err = assert_fixes_validate(_apply(moe_tiny.get_config(), fields))
  assert err.field in ("mesh.rules.experts", "model.moe.num_experts"), err


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_a_norm_eps_that_is_not_positive_is_refused(eps):
  """model.norm_eps=-1 trained: eval loss NaN at step 0, then "Diverged" blamed on
  the learning rate five steps later."""
  err = assert_fixes_validate(_apply(llama_tiny.get_config(), {"model.norm_eps": eps}))
  assert err.field == "model.norm_eps" and "must be positive" in str(err)


def test_every_field_but_a_placeholder_refuses_none():
  """A config file's `model.d_model = None` (or train.steps, mesh.data, ...)
  crashed in the first comparison with a TypeError, exit 1; some (model.norm_eps,
  model.tie_embeddings) validated and ran on None. The launcher refuses None for
  every field that experiments/base.py gives a value, naming it, with the
  default as the example; placeholders, None by default, validate. (A
  ConfigDict resolved with copy_and_resolve_references loses what tells a
  placeholder apart, so the comparison is with base's values.)"""
  from experiment.config_errors import unset_field
  from experiments import base

  def fields(node, prefix=""):
    for name in node.keys():
      if hasattr(node[name], "get_type") and name not in ("mixture", "rules"):
        yield from fields(node[name], f"{prefix}{name}.")
      else:
        yield f"{prefix}{name}", node[name] is None
  everything = list(fields(base.get_config()))
  assert len(everything) > 100
  for path, placeholder in everything:
    config = base.get_config()
    *groups, name = path.split(".")
    node = config
    for g in groups:
      node = node[g]
    default = node[name]
    node[name] = None
    err = unset_field(config, base.get_config())
    if placeholder:
      assert err is None, err
      train.validate_config(config, 8)
      continue
    assert err.field == path and "is None" in str(err), (path, err)
    from sharding import flag
    assert flag(f"config.{path}", default) in err.fix, err.fix


def test_a_config_file_setting_a_field_to_none_is_a_config_error(tmp_path):
  (tmp_path / "exp.py").write_text(
      "from experiments import llama_tiny\n\n\ndef get_config():\n"
      "  c = llama_tiny.get_config()\n  c.model.d_model = None\n  return c\n")
  proc = run_cli("train", f"--config={tmp_path / 'exp.py'}",
                 f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "Config error in `model.d_model`: is None, but it is not a field that may be " \
      "unset" in proc.stderr


def test_ladder_layers_fix_works():
  config = _apply(llama_tiny.get_config(), {"model.ladder_layers": "upper:1"})
  with pytest.raises(ConfigError, match="set --config.model.block=ladder for a hybrid"):
    train.validate_config(config, 8)
  train.validate_config(_apply(config, {"model.block": "ladder"}), 8)
  for block in ("standard", "parallel"):  # 'all' and 'none' leave nothing to ignore
    for layers in ("all", "none"):
      train.validate_config(_apply(config, {"model.block": block,
                                            "model.ladder_layers": layers}), 8)


def test_moe_mlp_and_batch_on_one_mesh_axis():
  config = llama_tiny.get_config()
  config.model.moe.num_experts = 4
  config.mesh.rules.mlp = ("data",)
  with pytest.raises(ConfigError) as err:
    train.validate_config(config, 8)
  assert err.value.field == "mesh.rules.mlp"
  assert "split over mesh axes ['data']" in str(err.value)
  config.model.moe.num_experts = 0  # a dense MLP may share them (plain GSPMD)
  train.validate_config(config, 8)


CLI_CASES = {
    **{k: ([f"--config.{p}={v}" for p, v in o.items()], f, n)
       for k, (o, f, n) in CASES.items()},
    "unknown_key": (["--config.model.num_layer=3"], "model.num_layer",
                    "did you mean `model.num_layers`?"),
    "unknown_group": (["--config.optimizer.learning_rate=1"], "optimizer",
                      "did you mean `optim`?"),
    "wrong_type": (["--config.train.steps=ten"], "train.steps",
                   "'ten' is not a valid int"),
    # the example is the value meant (it was the current one, true)
    "bool_word": (["--config.model.scan_layers=no"], "model.scan_layers",
                  "e.g. --config.model.scan_layers=false."),
    "rules_misspelt_axis": (["--config.mesh.rules.embed=('fdsp',)"],
                            "mesh.rules.embed",
                            "'fdsp' is not a mesh axis; the mesh axes are diloco, data, stage, fsdp"),
    "rules_none": (["--config.mesh.rules.embed=None"], "mesh.rules.embed",
                   "None is not a mesh axis; the mesh axes are diloco, data, stage, fsdp"),
    "placeholder_none": (["--config.optim.decay_steps=None"], "optim.decay_steps",
                         "is an optional int, unset (None) unless given. Fix: pass "
                         "a value of type int, e.g. --config.optim.decay_steps=100"),
    "moe_experts": (["--config.model.moe.num_experts=6", "--config.mesh.expert=4",
                     "--config.mesh.data=2"], "model.moe.num_experts",
                    "6 experts cannot be split over mesh.expert=4"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """Every CLI case's `python -m experiment train ...`, each its own process
  (forked from one interpreter that imported the launcher: conftest.run_cli_many)."""
  workdir = tmp_path_factory.mktemp("cli")
  runs = run_cli_many([("train", "--config=experiments/llama_tiny.py",
                        f"--workdir={workdir}", *args)
                       for args, _, _ in CLI_CASES.values()])
  return dict(zip(CLI_CASES, runs))


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_exits_2_with_message(case, cli_runs):
  _, field, numbers = CLI_CASES[case]
  proc = cli_runs[case]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"Config error in `{field}`" in proc.stderr
  assert numbers in proc.stderr
  assert "Traceback" not in proc.stderr


def test_unknown_command_exits_2():
  proc = run_cli("trian")
  assert proc.returncode == 2
  assert "unknown command 'trian'" in proc.stderr


def test_help_lists_commands():
  proc = run_cli("--help")
  assert proc.returncode == 0
  assert "train" in proc.stdout and "Commands:" in proc.stdout


@pytest.mark.parametrize("axes,problem", [
    (("fdsp",), "'fdsp' is not a mesh axis"), ((None,), "None is not a mesh axis"),
    (("fsdp", "fsdp"), "a mesh axis appears twice"), (("tensr",), "'tensr' is not")])
def test_rules_name_real_mesh_axes(axes, problem):
  import sharding
  config = llama_tiny.get_config()
  config.mesh.rules.mlp = axes
  with pytest.raises(ConfigError) as err:
    train.validate_config(config, 8)
  assert err.value.field == "mesh.rules.mlp"
  assert problem in str(err.value)
  assert ", ".join(sharding.AXES) in str(err.value)
  with pytest.raises(ConfigError):  # every user of the rules gets the same check
    sharding.normalize_rules({"mlp": axes})
  assert sharding.normalize_rules({"mlp": None, "embed": "fsdp"}) == (
      ("mlp", ()), ("embed", ("fsdp",)))


def test_splits_are_checked_over_the_axes_the_rules_name():
  """Heads mapped to `fsdp` are checked against mesh.fsdp, the sequence mapped to
  `data` against mesh.data (a fixed `tensor` / `sequence` would pass both)."""
  config = llama_tiny.get_config()
  config.model.update(num_heads=12, num_kv_heads=12, head_dim=16)
  config.mesh.update(data=1, fsdp=8)
  config.mesh.rules.update(heads=("fsdp",), act_heads=("fsdp",), embed=())
  with pytest.raises(ConfigError) as err:
    train.validate_config(config, 8)
  assert err.value.field == "model.num_heads"
  assert "12 heads cannot be split over mesh.fsdp=8" in str(err.value)
  config = llama_tiny.get_config()
  config.data.seq_len = 250
  config.mesh.update(data=4, fsdp=2)
  config.mesh.rules.update(length=("data",), batch=("fsdp",))
  with pytest.raises(ConfigError) as err:
    train.validate_config(config, 8)
  assert err.value.field == "data.seq_len"
  assert "seq_len=250 cannot be split over mesh.data=4" in str(err.value)


def test_a_length_rule_on_an_axis_of_the_batch_is_refused_with_a_fix_that_works():
  """From a fresh-user trial: `length` mapped to `fsdp` while `batch` also splits
  over it validated, then crashed at trace time (ring, Ulysses) or silently did
  not split the length (the batch takes the axis first). Refused on the length
  rule, for every attention; each fix validates (the other axis it names is one
  of size > 1 the batch leaves free, or none, in words)."""
  for attention, length, mesh in (("ring", ("fsdp",), dict(data=4, fsdp=2)),
                                  ("auto", ("data", "sequence"), dict(data=4, fsdp=2)),
                                  ("ring", ("fsdp",), dict(data=2, fsdp=2, sequence=2))):
    config = llama_tiny.get_config()
    config.model.attention = attention
    config.mesh.update(**mesh)
    config.mesh.rules.update(length=length)
    err = assert_fixes_validate(config)
    assert err.field == "mesh.rules.length", str(err)
    taken = [a for a in length if a in ("data", "fsdp")]
    assert f"splits the length over {taken}" in str(err)
    fix = re.search(r'--config\.mesh\.rules\.batch="(.*?)"', err.fix).group(1)
    assert not set(ast.literal_eval(fix)) & set(length)
    free = "--config.mesh.rules.length=\"('sequence',)\"" in err.fix
    assert free == ("sequence" in mesh), err.fix


def test_a_layer_split_error_suggests_stages_and_repeats_that_split():
  """Layers that mesh.stage x pipeline.repeats do not divide: the flags in the
  fix give a config that validates, over layer counts, stages, repeats and batch
  sizes on 8 devices (fewer stages leave more replicas, so the fix also names
  microbatches that split each replica's rows where the old ones do not)."""
  import itertools
  fixed = 0
  for layers, stages, repeats, batch in itertools.product((3, 4, 6), (2, 4, 8),
                                                          (1, 2, 3), (16, 64)):
    c = llama_tiny.get_config()
    c.model.num_layers = layers
    c.train.batch_size = batch
    c.mesh.update(data=-1, stage=stages)
    c.pipeline.update(schedule="circular" if repeats > 1 else "gpipe",
                      repeats=repeats, microbatches=stages)
    try:
      train.validate_config(c, 8)
      continue
    except ConfigError as err:
      if err.field not in ("mesh.stage", "pipeline.repeats"):
        continue
    assert_fixes_validate(c)
    fixed += 1
  assert fixed > 20


@pytest.mark.parametrize("seq_len,context", [(16, 16), (17, 16), (512, 8192), (4096, 2048)])
def test_training_past_the_declared_context_is_a_note_with_a_fix(seq_len, context):
  """Sequences up to model.max_position_embeddings say nothing; longer ones get a
  note whose flag, applied, silences it."""
  from train.validate import context_note
  config = llama_tiny.get_config()
  config.data.seq_len, config.model.max_position_embeddings = seq_len, context
  note = context_note(config)
  assert bool(note) == (seq_len > context)
  if note:
    assert f"data.seq_len={seq_len} is past model.max_position_embeddings={context}" in note
    config.model.max_position_embeddings = int(
        note.split("--config.model.max_position_embeddings=")[1].split()[0])
    assert context_note(config) == ""


def test_python_config_mistakes_are_errors_that_name_the_field():
  """From Python as from the command line: the base config is locked (a misspelt
  field is an error suggesting the field meant), a model config with an unknown
  field is a ConfigError naming it, and a Decoder built directly gets the
  launcher's checks."""
  from flax import nnx
  from experiments import base
  from model import Decoder, ModelConfig
  c = llama_tiny.get_config()
  with pytest.raises(AttributeError, match='Did you mean "warmup_steps"'):
    c.optim.warmup_step = 3
  with pytest.raises(KeyError, match='Did you mean "num_layers"'):
    c.model.update(num_layer=2)
  c.model.num_layers = 2  # a field that exists still changes
  assert c.model.num_layers == 2
  fields = base.get_config().model.to_dict()
  with pytest.raises(ConfigError) as err:
    ModelConfig.from_config({**fields, "num_layer": 2})
  assert (err.value.field, "did you mean `model.num_layers`?" in str(err.value)) == (
      "model.num_layer", True)
  with pytest.raises(ConfigError) as err:
    ModelConfig.from_config({**fields, "moe": {**fields["moe"], "topk": 1}})
  assert err.value.field == "model.moe.topk" and "`model.moe.top_k`" in str(err.value)
  with pytest.raises(TypeError, match=r"ModelConfig.from_config\(config.model\)"):
    Decoder(c.model, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError) as err:
    Decoder(ModelConfig(head_dim=31), rngs=nnx.Rngs(0))
  assert err.value.field == "model.head_dim"


@pytest.mark.parametrize("field,bad", [
    ("muon_rms", -1.0), ("galore_scale", -1.0), ("galore_scale", 0.0), ("eps", 0.0),
    ("b1", 1.0), ("b2", -0.1), ("min_lr_ratio", 1.5), ("decay_steps", -5),
    ("decay_steps", 0)])
def test_optimizer_scales_and_rates_out_of_range_and_their_fix(field, bad):
  """A negative muon_rms or galore_scale trained uphill (loss 5.5 -> 7.9); each
  such value is refused, and the value the fix names validates."""
  import re
  config = llama_tiny.get_config()
  # each under an optimizer that reads it (only such fields are checked)
  config.optim.name = {"muon_rms": "muon", "galore_scale": "galore"}.get(field, "adamw")
  config.optim[field] = bad
  with pytest.raises(ConfigError) as err:
    train.validate_config(config, 8)
  assert err.value.field == f"optim.{field}"
  fixed = re.search(rf"--config\.optim\.{field}=([-\d.e]+)", err.value.fix)
  config.optim[field] = (type(bad)(float(fixed.group(1).rstrip("."))) if fixed
                         else None)
  train.validate_config(config, 8)


def test_a_matrices_regex_that_matches_nothing_is_refused():
  """Muon on `attn/qq` trained bit for bit as AdamW, its log naming attn/qq; the
  fix's regex (the default) validates."""
  import shlex
  config = llama_tiny.get_config()
  config.optim.update(name="muon", matrices="attn/qq")
  with pytest.raises(ConfigError, match=r"'attn/qq' matches none of the model's "
                     r"parameters \(embed/table, .*layers/attn/q.*\), so muon would "
                     "act on nothing") as err:
    train.validate_config(config, 8)
  flag, = [w for w in shlex.split(err.value.fix) if w.startswith("--config")]
  config.optim.matrices = flag.split("=", 1)[1].rstrip(".")
  train.validate_config(config, 8)


def test_batch_fixes_pass_every_batch_check():
  """The batch_size fix suggested a multiple of the data-parallel size alone, and
  the run then failed on grad_accum_steps; the batch_size and fewer-micro-batches
  fixes then ignored model.loss_chunks, and the run failed on those (batch 8,
  accumulation 3, 4 loss chunks was offered batch 6: 2 rows, no 4 chunks). Each
  fix now passes validation as printed, for every batch 1-40 over data-parallel
  sizes 1-8, 1-4 micro-batches and 1-4 loss chunks."""
  import re

  import sharding
  from conftest import make_tiny_config
  checked = 0
  for dp in (1, 2, 4, 8):
    for accum in (1, 2, 3, 4):
      for chunks in (1, 2, 3, 4):
        for batch in range(1, 41):
          c = make_tiny_config()
          c.mesh.update(data=dp, fsdp=1, tensor=1, sequence=1, expert=1)
          given = {"train.batch_size": batch, "train.grad_accum_steps": accum,
                   "model.loss_chunks": chunks}
          c.update_from_flattened_dict(given)
          try:
            sharding.validate_plan(c, dp)
            continue
          except ConfigError as err:
            message = str(err)
          assert " 1 sequences" not in message, message
          fixes = re.findall(r"--config\.(train\.batch_size|train\.grad_accum_steps"
                             r"|model\.loss_chunks)=(\d+)", message)
          assert fixes, message
          for field, value in fixes:  # each alternative alone is a fix
            c.update_from_flattened_dict({**given, field: int(value)})
            try:
              sharding.validate_plan(c, dp)
            except ConfigError as then:
              raise AssertionError(f"{given} refused with {message!r}; {field}="
                                   f"{value} then: {then}") from None
            checked += 1
  assert checked > 400


@pytest.mark.parametrize("file_at", ["workdir", "checkpoints"])
def test_a_file_where_the_run_directory_goes_is_refused_before_any_data(tmp_path,
                                                                        file_at):
  """A file in place of the workdir failed only after the data was tokenized, and
  a file in place of its checkpoints directory hung the run in Orbax's
  asynchronous save (SIGTERM could not end it). Both are a ConfigError naming
  --workdir, raised before the data is read (the data path here does not exist:
  reading it would raise a data error first)."""
  from conftest import make_tiny_config
  workdir = tmp_path / "run"
  if file_at == "workdir":
    workdir.write_text("x")
  else:
    workdir.mkdir()
    (workdir / "checkpoints").write_text("x")
  c = make_tiny_config()
  c.data.update(source="jsonl", path=str(tmp_path / "missing.jsonl"))
  c.model.vocab_size = 512  # the byte tokenizer's ids fit
  with pytest.raises(ConfigError) as err:
    train.train(c, str(workdir), progress=False)
  assert err.value.field == "--workdir"
  assert "is a file, not a directory" in str(err.value)
  assert (workdir / "checkpoints").is_file() or workdir.is_file()  # left alone


def test_a_mesh_fix_keeps_the_batch_split_or_names_a_batch_that_does():
  """Fixes that resize a mesh axis (heads or layers it does not divide, an axis
  DiLoCo or compression cannot share) give its devices to `data`, which changed
  the data-parallel size under the batch: following one met a batch_size
  refusal. Over head counts, tensor and stage sizes, fixed `data` sizes, batch
  sizes, microbatches and device counts, each fix in flags validates."""
  import itertools
  checked = 0
  for devices, tensor, data, batch, heads in itertools.product(
      (8, 12), (3, 6, 8), (-1, 1, 2), (16, 24), (4, 8)):
    c = llama_tiny.get_config()
    c.model.update(num_heads=heads, num_kv_heads=heads // 2)
    c.mesh.update(tensor=tensor, data=data, fsdp=-1 if data != -1 else 1)
    c.train.batch_size = batch
    try:
      train.validate_config(c, devices)
      continue
    except ConfigError:
      pass
    assert_fixes_validate(c, devices)
    checked += 1
  for stage, microbatches, batch in itertools.product((3, 6), (2, 4), (16, 24)):
    c = llama_tiny.get_config()
    c.mesh.update(stage=stage, data=-1)
    c.pipeline.microbatches = microbatches
    c.train.batch_size = batch
    assert_fixes_validate(c, 12 if stage == 6 else 6)
    checked += 1
  for change in (lambda c: c.optim.compression.update(method="topk"),
                 lambda c: c.optim.update(offload="cpu"),
                 lambda c: c.pipeline.update(microbatches=2)):
    c = llama_tiny.get_config()
    change(c)
    c.mesh.update(diloco=2, data=4)
    assert_fixes_validate(c)
    checked += 1
  assert checked > 40


def test_a_pipeline_schedule_fix_chain_does_not_lead_back():
  """pipeline.schedule=1f1b on one stage is unread, fixed by microbatches=2; with
  one sequence per replica that was refused with "microbatches=1, or
  batch_size=16", and microbatches=1 led back to the first refusal. The second
  fix now offers only what keeps the schedule read, and followed, validates."""
  from conftest import fix_alternatives
  from train.unread import unread_override
  config = _apply(llama_tiny.get_config(), {"train.batch_size": 8,
                                            "pipeline.schedule": "1f1b"})
  first = unread_override(config, ["pipeline.schedule"])
  assert first.field == "pipeline.schedule"
  assert ["--config.pipeline.microbatches=2"] in fix_alternatives(first.fix)
  second = assert_fixes_validate(_apply(config, {"pipeline.microbatches": 2}))
  assert "microbatches=1" not in second.fix, second.fix
  assert fix_alternatives(second.fix) == [["--config.train.batch_size=16"]]


# (heads, kv_heads, mesh sizes, K/V heads left unsplit by the rules): the trial's
# two (12 / 3 heads on tensor=2 was accepted and crashed in the kernel; 4 / 1 on
# tensor=2 x sequence=4 was refused although the kernel runs it), and neighbours
ULYSSES_HEADS = [
    (12, 3, dict(data=2, tensor=2, sequence=2), True),
    (4, 1, dict(tensor=2, sequence=4), True),
    (8, 2, dict(data=2, tensor=2, sequence=2), False),
    (6, 2, dict(tensor=2, sequence=4), True),
    (8, 8, dict(tensor=4, sequence=2), False),
    (4, 2, dict(data=2, sequence=4), False),
    (6, 6, dict(data=2, sequence=4), False),
]


@pytest.mark.parametrize("heads,kv_heads,sizes,unsplit_kv", ULYSSES_HEADS)
def test_ulysses_is_refused_exactly_where_its_kernel_cannot_split_the_heads(
    heads, kv_heads, sizes, unsplit_kv):
  """Validation asked the Ulysses head rule with the heads split as the rules say,
  the kernel with the heads split only over axes that divide both counts: a
  config could pass and crash after setup (exit 1), or be refused though it runs.
  Now a refusal is exactly a kernel ValueError, and an accepted config's kernel
  output is the reference's."""
  import jax
  import numpy as np
  import kernels
  import sharding
  config = llama_tiny.get_config()
  config.model.update(attention="ulysses", num_heads=heads, num_kv_heads=kv_heads,
                      d_model=16 * heads, head_dim=16)
  config.mesh.update(**{**dict(data=1, fsdp=1, tensor=1, sequence=1), **sizes})
  if unsplit_kv:
    config.mesh.rules.kv_heads = ()
    config.mesh.rules.act_kv_heads = ()
  try:
    train.validate_config(config, 8)
    refused = None
  except ConfigError as err:
    refused = err
  rules = sharding.normalize_rules(config.mesh.rules)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  rng = np.random.default_rng(0)
  q = rng.normal(size=(4, 32, heads, 8)).astype(np.float32)
  k, v = (rng.normal(size=(4, 32, kv_heads, 8)).astype(np.float32) for _ in "kv")
  with jax.set_mesh(mesh):
    try:
      out = kernels.attention(q, k, v, impl="ulysses", rules=rules, block_sizes=8)
    except ValueError as err:
      assert refused is not None, f"accepted, but the kernel raised: {err}"
      assert refused.field == "model.attention", refused
      return
  assert refused is None, f"refused, but the kernel runs: {refused}"
  want = kernels.attention(q, k, v, impl="reference")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)


def _numeric_fields(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _numeric_fields(value, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f"{prefix}{key}", value


def test_every_numeric_field_out_of_range_is_a_config_error_or_runs():
  """From a fresh-user trial: pipeline.microbatches=0 was a ZeroDivisionError in
  the batch check (exit 1) before the pipeline's own check could refuse it. Every
  numeric field of 7 configs (plain, stages, DiLoCo, top-k compression, GaLore,
  MoE, ring attention) set to 0, -1 or 3 (ints) or 0, -1, NaN, inf (floats) now
  validates or is a ConfigError, never another exception; and microbatches=0 is
  refused naming its field."""
  import copy
  from conftest import make_tiny_config
  variants = {"plain": make_tiny_config()}
  for name, mesh, change in [
      ("stages", dict(stage=2, data=4), lambda c: c.pipeline.update(microbatches=2)),
      ("diloco", dict(diloco=2, data=4), lambda c: None),
      ("topk", dict(data=8), lambda c: c.optim.compression.update(method="topk")),
      ("galore", {}, lambda c: c.optim.update(name="galore", galore_rank=8)),
      ("moe", dict(expert=2, data=4), lambda c: c.model.moe.update(num_experts=4)),
      ("ring", dict(sequence=2, data=4), lambda c: c.model.update(attention="ring"))]:
    c = make_tiny_config()
    c.mesh.update(**mesh)
    change(c)
    variants[name] = c
  crashes, tried = [], 0
  for name, base in variants.items():
    train.validate_config(copy.deepcopy(base), 8)
    for field, value in _numeric_fields(base.to_dict()):
      for bad in ([0, -1, 3] if isinstance(value, int)
                  else [0.0, -1.0, float("nan"), float("inf")]):
        c = copy.deepcopy(base)
        c.update_from_flattened_dict({field: bad})
        tried += 1
        try:
          train.validate_config(c, 8)
        except ConfigError:
          pass
        except Exception as err:  # noqa: BLE001 - what the test looks for
          crashes.append((name, field, bad, f"{type(err).__name__}: {err}"))
  assert not crashes, crashes
  assert tried > 1000
  c = copy.deepcopy(variants["stages"])
  c.pipeline.microbatches = 0
  with pytest.raises(ConfigError, match="must be at least 1, got 0") as err:
    train.validate_config(c, 8)
  assert err.value.field == "pipeline.microbatches"


@pytest.mark.parametrize("mesh,batch,accum,microbatches,chunks", [
    (dict(stage=2, data=2), 8, 1, 4, 1),  # the trial's: data=-1 leaves 2 rows
    (dict(data=2), 4, 2, 1, 1),           # data=-1: 8 replicas, 2 micro-batches
    (dict(data=2, fsdp=2), 8, 1, 1, 2),   # data=-1: 1 row, 2 loss chunks
    (dict(stage=2, data=3), 12, 1, 2, 1),  # 6 devices of 8: the other fix
    (dict(data=16), 16, 1, 1, 1),         # more than there are
])
def test_a_mesh_fix_for_the_device_count_keeps_the_batch_split(mesh, batch, accum,
                                                               microbatches, chunks):
  """From a fresh-user trial: stage=2 x data=2 on 8 devices was offered
  --config.mesh.data=-1, after which each of the 4 replicas held 2 sequences for
  4 pipeline microbatches and the run was refused again. A fix that resizes the
  mesh to the device count now adds a batch size that splits over the new mesh
  (with accumulation, microbatches and loss chunks), and each fix validates."""
  import sharding
  from conftest import assert_fixes_validate, make_tiny_config
  c = make_tiny_config()
  c.model.num_layers = 4
  c.mesh.update(**{a: 1 for a in sharding.AXES})
  c.mesh.update(**mesh)
  c.train.update(batch_size=batch, grad_accum_steps=accum)
  c.pipeline.microbatches = microbatches
  c.model.loss_chunks = chunks
  err = assert_fixes_validate(c)
  assert err.field.startswith("mesh.")


@pytest.mark.parametrize("mesh,named,near", [
    (dict(data=4, fsdp=2, tensr=2), "tensr", "tensor"),  # was a data x fsdp mesh
    (dict(data=8, Tensor=1), "Tensor", "tensor"),
    (dict(dat=4, data=2), "dat", "data"),  # was blamed on mesh.data
    (dict(data=8, pipeline=1), "pipeline", None),
])
def test_a_key_that_is_not_a_mesh_axis_is_named(mesh, named, near):
  """From a fresh-user trial: sharding.make_mesh(dict(data=4, fsdp=2, tensr=2))
  built data=4 x fsdp=2 and dropped the misspelt axis without a word. Any key
  but a mesh axis (or a config's `rules`) is a ConfigError naming it."""
  import jax

  import sharding
  with pytest.raises(ConfigError, match=f"'{named}' is not a mesh axis") as err:
    sharding.make_mesh(mesh, jax.devices())
  assert err.value.field == f"mesh.{named}"
  assert (f"e.g. {near} for '{named}'" in err.value.fix) == (near is not None)
  from conftest import make_tiny_config
  assert sharding.make_mesh(make_tiny_config().mesh, jax.devices()).size == 8
