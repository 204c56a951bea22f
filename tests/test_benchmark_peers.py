"""The peers benchmarks time rung against compute what rung computes: the plain
jax.numpy Llama of `benchmarks/common.py` (the "what XLA itself makes of this
model" row of train_throughput.py) gives transformers' loss on the same weights."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import common  # noqa: E402

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kv_heads,tie", [(2, False), (4, True)])
def test_plain_jax_llama_gives_transformers_loss(kv_heads, tie):
  from transformers import LlamaForCausalLM
  model = dict(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
               head_dim=8, d_ff=48, tie_embeddings=tie, rope_theta=500.0)
  torch.manual_seed(0)
  hf = LlamaForCausalLM(common.hf_llama_config(model)).eval()
  with torch.no_grad():  # norms away from 1, so a norm's weight that is dropped shows
    for name, w in hf.named_parameters():
      if name.endswith("norm.weight"):
        w.uniform_(0.5, 1.5)
  tokens = np.random.default_rng(1).integers(0, 96, (3, 17))
  with torch.no_grad():
    logits = hf(input_ids=torch.tensor(tokens[:, :-1])).logits
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 96), torch.tensor(tokens[:, 1:]).reshape(-1)).item()
  params = common.plain_llama_params({k: v.numpy() for k, v in hf.state_dict().items()})
  got = float(common.plain_llama_loss(params, tokens[:, :-1], tokens[:, 1:], model=model))
  assert got == pytest.approx(want, rel=1e-5)
  assert abs(want - np.log(96)) > 1e-3  # the weights are not ones that any model matches


def test_plain_jax_train_step_runs_and_reports_its_rate():
  model = dict(vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
               head_dim=8, d_ff=32)
  r = common.plain_jax_train_step(model, batch=2, seq_len=8, steps=2)
  assert r["step_time_s"] > 0 and r["tokens_per_sec"] == pytest.approx(16 / r["step_time_s"])


def test_plain_jax_greedy_decoder_gives_transformers_tokens():
  from transformers import LlamaForCausalLM
  model = dict(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8, d_ff=48)
  torch.manual_seed(0)
  config = common.hf_llama_config(model, eos_token_id=None, bos_token_id=None)
  hf = LlamaForCausalLM(config).eval()
  with torch.no_grad():  # sharper logits than the random init's: greedy ties are rare
    for w in hf.parameters():
      w.mul_(4.0)
  prompts = np.random.default_rng(2).integers(0, 96, (3, 5))
  with torch.no_grad():
    want = hf.generate(torch.tensor(prompts), max_new_tokens=12, min_new_tokens=12,
                       do_sample=False)[:, 5:].numpy()
  params = common.plain_llama_params({k: v.numpy() for k, v in hf.state_dict().items()})
  got = np.asarray(common.plain_llama_greedy(model, new=12)(params, prompts))
  np.testing.assert_array_equal(got, want)
  assert len(set(want.ravel().tolist())) > 3  # not one repeated token
