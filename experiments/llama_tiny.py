"""A 3M-parameter Llama that learns Python on a laptop CPU in minutes.

  python -m experiment train --config=experiments/llama_tiny.py --workdir=runs/tiny

Data: bytes of the Python standard library's own sources (present wherever Python
is), 2% held out. Expected on a 2-core CPU: about 4,000 tokens/s; eval loss falls
from ln(256) = 5.55 nats/byte (uniform) to about 1.9 in 200 steps, under 4 minutes
(the README shows a measured curve).
"""

from experiments import base


def get_config(arg=None):
  base.no_variants("experiments/llama_tiny.py", arg)
  c = base.get_config()
  c.model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=4,
                 head_dim=32, d_ff=704)
  c.data.seq_len = 256
  c.train.update(steps=200, batch_size=16, eval_every=50, eval_steps=4)
  c.optim.update(learning_rate=3e-3, warmup_steps=20)
  c.log.every_steps = 10
  return c
