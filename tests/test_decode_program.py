"""`python -m experiment compile --what=decode` compiles the program `infer.generate`
serves: the same function, on the same argument shapes and shardings."""

import re

import jax
import optax
from flax import nnx

import infer
import sharding
from aot import compile as aot_compile
from aot import hlo
from conftest import make_tiny_config
from infer import decode
from model import ModelConfig
from train.state import init_state, model_spec


def _entry_parameters(text: str) -> list[str]:
  """The ENTRY computation's parameters: shape, layout and sharding, by number."""
  entry = hlo.parse(text)["ENTRY"]
  params = [i for i in entry if i.opcode == "parameter"]
  number = lambda i: int(re.search(r"parameter\((\d+)\)", i.text).group(1))  # noqa
  layout = lambda i: re.search(r"sharding=(\{[^}]*\})", i.text).group(1)  # noqa
  return [f"{i.shape} {layout(i)}" for i in sorted(params, key=number)]


def test_compiled_decode_is_the_program_generate_runs(monkeypatch):
  config = make_tiny_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  rules = sharding.normalize_rules(config.mesh.rules)
  cfg = ModelConfig.from_config(config.model)
  spec = model_spec(cfg, rules)
  prompts, new = [[1, 2, 3, 4, 5]] * 4, 3  # 4 rows: the batch splits over 4 devices

  fn, args = aot_compile.decode_program(cfg, spec, mesh, rules, batch=4,
                                        max_length=5 + new)
  assert fn is decode.decode_step
  with jax.set_mesh(mesh):
    compiled = fn.lower(*args).compile().as_text()

  served = []
  real = decode.decode_step
  monkeypatch.setattr(decode, "decode_step",
                      lambda *a: served.append(a) or real(*a))
  params = init_state(spec, optax.sgd(0.1), mesh, seed=0).params
  infer.generate(nnx.merge(spec.graphdef, params), prompts, max_new_tokens=new,
                 on_token=lambda column: None)
  assert served, "generate did not run the decode program"
  with jax.set_mesh(mesh):
    served_text = real.lower(*served[0]).compile().as_text()

  assert _entry_parameters(served_text) == _entry_parameters(compiled)
  assert hlo.collective_counts(served_text) == hlo.collective_counts(compiled)
  assert hlo.collective_counts(compiled)  # tensor=2: the step communicates
