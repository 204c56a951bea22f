"""Defaults for every experiment, one group per subsystem.

Experiments start from `get_config()` here and change what they need; the command
line overrides any field, e.g. `--config.model.num_layers=4 --config.mesh.tensor=2`.
Fields that may be unset are placeholders (None until given). The config comes back
locked: changing a field works, adding one (a misspelt name) is an error that
suggests the field meant. Tables of named entries (`data.mixture`) are assigned
whole as a new ConfigDict.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from sharding import DEFAULT_RULES, ConfigError
from sharding.errors import closest, flag


def unknown_variant(file: str, arg, variants) -> ConfigError:
  """The error a config file raises for a `:VARIANT` it does not have (or for
  none, when it needs one); the fix names the closest variant, else the first."""
  problem = (f"{file} has no variant {arg!r}" if arg else f"{file} needs a variant")
  meant = closest(arg or "", variants) or variants[0]
  return ConfigError("--config", f"{problem}; its variants: {', '.join(variants)}.",
                     f"pass {flag('config', f'{file}:{meant}')}.")


def no_variants(file: str, arg) -> None:
  """Raises the config error for a `:VARIANT` given to a config file that has
  none (it was ignored: `llama_tiny.py:big` trained llama_tiny)."""
  if arg:
    raise ConfigError("--config", f"{file} has no variants, and was given {arg!r}.",
                      f"pass {flag('config', file)}; a config file built on it calls its "
                      "get_config() without the variant, which is the file's own.")


def get_config(arg=None) -> ConfigDict:
  no_variants("experiments/base.py", arg)
  c = ConfigDict()

  c.model = ConfigDict(dict(
      vocab_size=256,          # byte tokenizer; set from tokenizer.json otherwise
      d_model=256,
      num_layers=4,
      num_heads=8,
      num_kv_heads=8,          # < num_heads: grouped-query attention
      head_dim=32,
      d_ff=704,                # SwiGLU hidden size
      tie_embeddings=False,    # LM head shares the embedding table
      embed_lookup="gather",   # gather | one_hot (a matmul: model/embedding.py)
      rope_theta=10000.0,
      rope_type="default",     # default | linear | llama3 | yarn (model/rotary.py)
      rope_factor=1.0,         # linear, llama3, yarn: context extension factor
      rope_low_freq_factor=1.0,   # llama3: wavelengths > orig/low are divided by factor
      rope_high_freq_factor=4.0,  # llama3: wavelengths < orig/high are kept
      rope_original_max_positions=8192,  # llama3, yarn: pre-training context length
      rope_beta_fast=32.0,     # yarn: ramp bounds, in rotations over the orig. context
      rope_beta_slow=1.0,
      rope_attention_factor=placeholder(float),  # yarn cos/sin scale; None: 0.1ln(f)+1
      max_position_embeddings=8192,  # the context length exported to HF config.json
      qkv_bias=False,          # bias on q, k, v projections (Qwen2)
      qk_norm=False,           # per-head RMSNorm of q and k before rotary (Qwen3)
      sliding_window=0,        # keys per query (Mistral); 0 = full causal attention
      norm_eps=1e-5,
      init_std=0.02,
      compute_dtype="float32",  # float32 | bfloat16 (params stay param_dtype)
      param_dtype="float32",
      attention="auto",        # reference | flash | ring | ring_zigzag | ulysses | auto
      attention_block_q=0,     # flash tile rows (queries); 0: the backend's default
      attention_block_kv=0,    # flash tile columns; each backend rounds (docs/configuration.md)
      remat="none",            # none | full | save_dots | save_dots_attention | offload_dots
      loss_chunks=1,           # LM head + loss over this many row chunks (memory)
      scan_layers=True,        # False: layers unrolled in training (speed, compile)
      block="standard",        # standard | parallel | ladder
      ladder_layers="all",     # with block=ladder: all | none | upper:N | '2,3'
      moe=ConfigDict(dict(     # mixture of experts (model/moe.py)
          num_experts=0,       # 0 = dense MLP in every layer
          top_k=2,             # experts per token
          every_k_layers=1,    # layers k-1, 2k-1, ... are MoE; must divide num_layers
          capacity_factor=1.25,  # dispatch=capacity: slots = factor * tokens * top_k / E
          shared_expert=False,  # also a dense SwiGLU every token goes through
          aux_loss_weight=0.01,  # Switch load-balancing loss weight
          z_loss_weight=0.001,  # router z-loss weight
          dispatch="capacity",  # capacity | dropless
          renormalize=False,   # top_k gates divided by their sum (Mixtral)
      )),
  ))

  c.mesh = ConfigDict(dict(
      # Device counts per axis, outer to inner; one may be -1 (takes the rest).
      diloco=1, data=-1, stage=1, fsdp=1, expert=1, sequence=1, tensor=1,
      # logical axis -> mesh axes; replace entries to change the plan.
      rules=ConfigDict(DEFAULT_RULES),
  ))

  c.data = ConfigDict(dict(
      # text | jsonl | parquet | arrayrecord | hf_disk | tokens | synthetic
      source="text",
      path=placeholder(str),   # file, dir or glob; None = the Python stdlib sources
      text_field="text",       # jsonl / parquet / hf_disk: the field holding the text
      cache_dir=placeholder(str),  # token cache; None = ~/.cache/rung/tokens
      skip_bad_records=False,  # skip (and count) malformed records instead of failing
      tokenizer="byte",        # byte | path to an HF tokenizer.json
      eos_id=placeholder(int),  # document separator for tokens / tokenizer.json
      stop_ids=(),             # more generation stop ids (besides the eos); import-hf
                               # sets every eos_token_id of the checkpoint
      eos_stops=True,          # eos_id unset: the tokenizer's end-of-text id stops
                               # generation (import-hf: false for a model without one)
      bos_id=placeholder(int),  # beginning-of-text id, kept for export-hf only
      token_dtype="uint16",    # dtype of .bin files for source=tokens
      seq_len=256,
      eval_fraction=0.02,      # tail of the token stream held out for eval
      prefetch_batches=8,      # batches read ahead by the loader's two threads
      # name -> dict(source=..., path=..., text_field=..., weight=...): train on a
      # weighted mixture of sources instead of data.source / data.path (set it in
      # a config file; see docs/configuration.md). Empty: the single data.source.
      mixture=ConfigDict(),
  ))

  c.optim = ConfigDict(dict(
      learning_rate=3e-3,
      warmup_steps=100,
      min_lr_ratio=0.1,        # cosine decays to learning_rate * min_lr_ratio
      decay_steps=placeholder(int),  # length of warmup + cosine; None = train.steps
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1,
      no_decay="norm",         # comma-separated regexes of params without decay
      # Which params muon / normuon / galore treat as matrices (the rest: AdamW).
      matrices=r"attn/(q|k|v|o)$,mlp/(gate|up|down)$",
      clip_norm=1.0,           # global-norm clipping; 0 disables
      name="adamw",            # adamw | sgd | muon | normuon | galore
      momentum=0.95,           # sgd, muon and normuon (NorMuon's beta1)
      nesterov=True,           # sgd and muon
      ns_steps=5,              # Newton-Schulz iterations (muon, normuon)
      muon_rms=0.2,            # muon: update RMS matched to AdamW's; 0: width scaling
      normuon_b2=0.95,         # NorMuon's per-neuron second-moment decay
      galore_rank=128,
      galore_update_proj_gap=200,  # steps between projector refreshes
      galore_projector="randomized",  # randomized | svd: how a refresh finds P
      galore_scale=0.25,       # GaLore's alpha
      state_dtype="float32",   # float32 | bfloat16: dtype optimizer moments are kept in
      offload="none",          # none | host: optimizer state in pinned host memory
      # Gradient compression over the `data` axis (train/compression.py).
      compression=ConfigDict(dict(
          method="none",       # none | topk | dgc (Deep Gradient Compression)
          density=0.001,       # fraction of each tensor's entries sent per step
          warmup_steps=0,      # density 1/4, 1/16, 1/64, 1/256 in 4 stages, then density
          sample_fraction=1.0,  # <1: threshold from a sample this size (1: exact top-k)
          momentum_correction=True,  # dgc: momentum per replica, before selection
          local_clip=True,     # dgc: clip each replica at clip_norm / sqrt(replicas)
          momentum_masking=True,     # dgc: zero the velocity of what was sent
          error_feedback=True,       # topk: carry what was not sent to the next step
      )),
  ))

  # DiLoCo over the `diloco` mesh axis (train/diloco.py): active when mesh.diloco > 1.
  c.diloco = ConfigDict(dict(
      sync_every=100,          # H: inner steps between synchronisations of a fragment
      outer_lr=0.7,            # outer optimizer: SGD on the averaged outer gradient
      outer_momentum=0.9,
      nesterov=True,
      fragments=1,             # 1: DiLoCo; F > 1: Streaming DiLoCo, strided layer groups
      overlap_steps=0,         # tau: inner steps a fragment's exchange overlaps (0: blocking)
      alpha=0.5,               # tau > 0: weight of the local fragment when merging
      outer_dtype="float32",   # float32 | bfloat16 | e3m0 (4 bits): outer gradients sent as
  ))

  # Pipeline parallelism over the `stage` mesh axis (model/pipeline.py): the layer
  # stack in mesh.stage stages, each batch (each accumulation micro-batch) in
  # `microbatches`; active when mesh.stage > 1 or microbatches > 1.
  c.pipeline = ConfigDict(dict(
      microbatches=1,          # M: must divide the per-replica batch
      schedule="gpipe",        # gpipe | circular (interleaved: `repeats` groups/stage)
      #                          | 1f1b (forward and backward in one loop: memory
      #                          bounded by the stages, not the microbatches)
      repeats=1,               # R: circular only; layers must divide by stage * R
  ))

  c.train = ConfigDict(dict(
      steps=1000,
      batch_size=16,           # global, in sequences
      seed=0,
      grad_accum_steps=1,      # micro-batches per optimizer step
      z_loss=0.0,              # weight of mean(logsumexp(logits)^2)
      eval_every=100,          # steps; 0 disables
      eval_steps=8,            # held-out batches per evaluation
  ))

  c.checkpoint = ConfigDict(dict(
      every_steps=1000,        # save every N steps (and at the end); 0 disables
      keep=3,                  # latest checkpoints kept
      keep_best=0,             # also keep the N best by eval loss (0: off)
      async_save=True,         # write in the background while training goes on
      compress=False,          # zstd-compress arrays: ~8% less disk, half the speed
      fallback=False,          # unreadable latest step: resume from the one before
      init_from=placeholder(str),  # DIR or DIR:STEP: load params only (fine-tune)
  ))

  c.log = ConfigDict(dict(
      every_steps=10,
      tensorboard=True,
      peak_flops=placeholder(float),  # MFU denominator; None: measured or chip table
  ))
  return c.lock()
