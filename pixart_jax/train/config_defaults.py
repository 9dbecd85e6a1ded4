"""Shared pieces of the training configs (`configs/*.py` import this as `common`): `parse_arg`, the default experiment, and the `smoke` shrinker.

A config file defines `get_config(arg=None)`; `arg` is the text after `:` in `--config=configs/FILE.py:ARG`,
e.g. `:smoke` or `:smoke=True,steps=50`, parsed by `parse_arg` (big_vision style) against typed defaults.

Fields of the experiment (every recipe has all of them; `lock_config=True` makes a typo in an override an error):

  seed                        the run's seed (init, noise, data order)
  model.preset                a `pixart_jax.models.config` preset name
  model.overrides.<field>     any DiTConfig field (the architecture); None keeps the preset's value
  model.dtype / param_dtype   compute dtype (bfloat16 on accelerators) / parameter storage (float32)
  model.remat, model.scan     remat policy (none | full | dots | dots_no_batch), scanned blocks
  model.attention.*           how attention runs (`models.attention_backends.AttentionOptions`): backend (auto |
                              xla | blockwise | splash | cudnn; auto = splash on TPU, cuDNN on GPU for bf16/fp16,
                              blockwise otherwise), min_seq (xla below it), block_sizes (splash tiles), interpret
                              (None = Pallas interpret mode iff not on a TPU), sequence_parallel,
                              blockwise_block_q / blockwise_block_kv (blockwise tiles)
  mesh                        ((axis, size), ...) over data / fsdp / tensor / sequence; one size may be -1
  sharding_rules              ((logical name, mesh axes), ...) replacing entries of parallel.sharding.LOGICAL_RULES
  data.*                      the input pipeline (dir of prepared records, or synthetic=True), global batch
  optimizer.*                 came | adamw, lr (at batch 256; see auto_lr), betas, eps, weight_decay, clip, warmup,
                              auto_lr: 'sqrt' (official: lr * sqrt(global_batch / 256)), 'linear' or 'none'
  grad_accum                  micro-batches per update (the global batch is split K ways inside the step)
  ema.rate                    None = no EMA (the official Sigma script keeps none), e.g. 0.9999
  steps, log_every, ckpt_every, keep   run length, logging and checkpoint cadence, checkpoints kept
  max_in_flight               train steps the host may dispatch ahead of the device (`train.in_flight`; >= 1)
  sample.*                    sampling grid every `sample.every` steps (0 = off)
  eval.*                      FID / CLIP score every `eval.every` steps (0 = off; `train.eval_hook`): `num` images
                              of the fixed `prompts` (cycled) with the EMA (`use_ema`) or current weights, the T5 and
                              VAE of `pipeline` (default: sample.pipeline), Inception weights `inception`, reference
                              statistics `ref_stats` (.npz from `python -m pixart_jax.evaluate stats`), optional CLIP
                              model `clip`; the best checkpoint by `best_metric` (fid | clip_score | "" = none) is kept
                              in `<workdir>/best/`
  init_from                   weights to start from when the workdir has no checkpoint: released weights (.pth,
                              diffusers dir, Hub id), an Orbax dir from `convert`, or another run's workdir
                              (weak-to-strong rules: new KV layers at average init, PE change, dropped micro-conds)
  lora.*                      rank (None = full fine-tune), alpha, targets, rslora: train adapters only
  distill.*                   enabled (latent consistency distillation of init_from, the teacher), guidance (the
                              teacher's fixed CFG scale), num_ddim_timesteps (skipping-step grid), loss (huber | l2),
                              huber_c, timestep_scaling; with lora.rank set: LCM-LoRA (train.trainables.distill)
  controlnet.blocks           copied blocks of a ControlNet branch (None = off): train the branch only
  class_dropout_prob          caption dropout for classifier-free guidance (0.1)
"""
from __future__ import annotations

import dataclasses

import ml_collections as mlc
from ml_collections import config_dict

from pixart_jax.models.attention_backends import AttentionOptions
from pixart_jax.models.config import DiTConfig


SAMPLE_PROMPTS = (
    "a photo of a corgi wearing sunglasses on a beach", "a watercolor painting of a lighthouse at dawn",
    "an astronaut riding a horse on the moon, cinematic", "a bowl of ramen with chopsticks, studio lighting",
    "a cozy wooden cabin in a snowy forest at night", "portrait of an old fisherman, film grain",
    "a futuristic city skyline with flying cars at sunset", "macro shot of a dew drop on a green leaf",
)


def parse_arg(arg: str | None, **spec) -> mlc.ConfigDict:
  """Parses `"a=1,b=x,flag"` against typed defaults `spec`; a bare name sets a bool to True.

  Unknown names and values that do not parse as the default's type raise ValueError naming them.
  """
  out = mlc.ConfigDict(spec)
  if not arg:
    return out
  for token in (t.strip() for t in arg.split(",")):
    if not token:
      continue
    name, _, value = token.partition("=")
    name = name.strip()
    if name not in spec:
      raise ValueError(f"unknown config argument {name!r} in {arg!r}; known: {sorted(spec)}")
    default = spec[name]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {name!r} needs a value ({name}=...)")
      out[name] = True
      continue
    out[name] = _parse_value(name, value.strip(), default)
  return out


def _parse_value(name: str, value: str, default):
  if isinstance(default, bool):
    low = value.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"config argument {name}={value!r} is not a boolean")
  if default is None or isinstance(default, str):
    return value
  try:
    return type(default)(value)
  except ValueError:
    raise ValueError(f"config argument {name}={value!r} is not a {type(default).__name__}") from None


def _dit_overrides() -> mlc.ConfigDict:
  """One typed placeholder (None = keep the preset) per DiTConfig field."""
  types = {"int": int, "float": float, "bool": bool, "str": str}
  out = {}
  for f in dataclasses.fields(DiTConfig):
    t = str(f.type)
    kind = tuple if t.startswith("tuple") else types.get(t, str)
    out[f.name] = config_dict.placeholder(kind)
  return mlc.ConfigDict(out)


def _attention() -> mlc.ConfigDict:
  """`config.model.attention`: the AttentionOptions fields at their defaults (backend auto: splash on TPU, cuDNN on
  GPU for bf16/fp16, blockwise otherwise)."""
  d = AttentionOptions()
  return mlc.ConfigDict(dict(backend=d.backend.value, min_seq=d.min_seq, block_sizes=dataclasses.astuple(d.block_sizes),
                             interpret=config_dict.placeholder(bool), sequence_parallel=d.sequence_parallel,
                             blockwise_block_q=d.blockwise_block_q, blockwise_block_kv=d.blockwise_block_kv))


def base_config(*, preset: str, table: str | None, batch_size: int, warmup: int, lr: float = 2e-5,
                interpolation: float | None = None) -> mlc.ConfigDict:
  """The official Sigma recipe (docs/ARCHITECTURE.md §5.1) around a preset; recipe files change only what differs."""
  c = mlc.ConfigDict()
  c.seed = 43  # official `seed`
  c.model = mlc.ConfigDict(dict(preset=preset, overrides=_dit_overrides(), dtype="bfloat16", param_dtype="float32",
                                remat="full", scan=True, attention=_attention()))
  if interpolation is not None:
    c.model.overrides.interpolation_scale = interpolation
  c.mesh = (("fsdp", -1),)
  c.sharding_rules = ()
  c.data = mlc.ConfigDict(dict(
      dir=config_dict.placeholder(str),  # prepared ArrayRecord dataset (pixart_jax.prepare)
      synthetic=False,                   # random records with the real structure (benchmarks, smoke runs)
      table=table,                       # bucket table the dataset must have been prepared with (checked);
                                         # None = single scale / unchecked
      batch_size=batch_size,             # GLOBAL batch per optimizer update
      real_prompt_ratio=0.5,             # share of short (original) captions vs long ones
      num_workers=0,                     # Grain multiprocess prefetch workers per host
      shuffle_seed=config_dict.placeholder(int),  # None = the run seed
      synthetic_buckets=(),              # synthetic=True: ((H, W) pixels, ...); () = the table's square bucket
      synthetic_examples=64,             # synthetic=True: records per bucket
  ))
  c.optimizer = mlc.ConfigDict(dict(name="came", lr=lr, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                                    weight_decay=0.0, clip=0.01, warmup=warmup, auto_lr="sqrt", base_batch=256,
                                    clip_threshold=1.0))
  c.grad_accum = 1
  c.ema = mlc.ConfigDict(dict(rate=config_dict.placeholder(float)))
  c.steps = 10_000
  c.log_every = 10
  c.ckpt_every = 1000
  c.keep = 3
  c.max_in_flight = 4  # train.in_flight: more steps queued starve the CPU runtime's collectives (8 devices abort)
  c.sample = mlc.ConfigDict(dict(
      every=0,                           # steps between sampling grids; 0 = off
      pipeline=config_dict.placeholder(str),  # pipeline dir / Hub id with text_encoder/, tokenizer/, vae/
      prompts=SAMPLE_PROMPTS, num_steps=14, guidance=4.5, sampler="dpm-solver", seed=0))
  c.eval = mlc.ConfigDict(dict(
      every=0,                           # steps between evaluations; 0 = off
      pipeline=config_dict.placeholder(str),    # T5 + VAE (text_encoder/, tokenizer/, vae/); None = sample.pipeline
      inception=config_dict.placeholder(str),   # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
      ref_stats=config_dict.placeholder(str),   # reference FID statistics (.npz)
      clip=config_dict.placeholder(str),        # transformers CLIPModel dir / Hub id; None = no CLIP score
      prompts=SAMPLE_PROMPTS, num=32, batch_size=8, num_steps=14, guidance=4.5, sampler="dpm-solver", seed=0,
      use_ema=True,                      # evaluate the EMA weights when the run keeps them
      best_metric="fid"))                # fid (lower is better) | clip_score (higher) | "" (keep no best checkpoint)
  c.init_from = config_dict.placeholder(str)
  c.class_dropout_prob = 0.1
  # LoRA fine-tuning on the same trainer: rank None = off (full fine-tune). Targets are regexes over our paths.
  c.lora = mlc.ConfigDict(dict(rank=config_dict.placeholder(int), alpha=16.0,
                               targets=(r".*\.attn\.(q|k|v|out)\.kernel", r".*\.cross_attn\.(q|k|v|out)\.kernel"),
                               rslora=False))
  # Latent consistency distillation (train.trainables.distill): enabled=False = off. With lora.rank: LCM-LoRA.
  c.distill = mlc.ConfigDict(dict(enabled=False, guidance=5.5, num_ddim_timesteps=50, loss="huber", huber_c=0.001,
                                  timestep_scaling=10.0))
  # ControlNet (ControlNet-Half) on the frozen init_from model: blocks None = off. The data must carry a control
  # latent per example (`prepare --control canny|blur|image`); only the branch is trained and checkpointed.
  c.controlnet = mlc.ConfigDict(dict(blocks=config_dict.placeholder(int)))
  return c


def smoke(c: mlc.ConfigDict, *, kv: bool = False) -> mlc.ConfigDict:
  """Shrinks a recipe to a CPU run: tiny model in fp32, global batch 8, 6 steps, synthetic data unless data.dir is set."""
  c.model.preset = "tiny"
  c.model.overrides = _dit_overrides()
  if kv:
    c.model.overrides.kv_compress_layers = (1,)
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.mesh = (("data", -1),)
  c.data.synthetic = True
  c.data.table = None
  c.data.batch_size = 8
  c.optimizer.lr = 1e-4
  c.optimizer.warmup = 0
  c.optimizer.auto_lr = "none"
  c.steps = 6
  c.log_every = 1
  c.ckpt_every = 3
  c.keep = 2
  return c


def check_config(c: mlc.ConfigDict) -> None:
  """Refuses numbers a run cannot use, before anything starts: one ValueError naming the field, the value and what
  is valid. Every numeric field of the experiment is checked here (the optimizer's own ranges in
  `train.optimizers.OptimizerConfig`, the architecture's in `models.config.DiTConfig`)."""
  from pixart_jax import checks

  def get(path: str):
    node = c
    for key in path.split("."):
      if node is None or key not in node:
        return _ABSENT
      node = node[key]
    return node

  def each(fn, paths, **kw):
    for path in paths:
      v = get(path)
      if v is not _ABSENT:
        fn(path, v, **kw)

  each(checks.positive, ("log_every", "ckpt_every", "keep", "grad_accum", "data.batch_size",
                         "data.synthetic_examples", "sample.num_steps", "optimizer.base_batch", "eval.num",
                         "eval.batch_size", "eval.num_steps"))
  # steps = 0 returns the state the run starts from, without training (weak-to-strong checks use it)
  each(checks.non_negative, ("steps", "data.num_workers", "sample.every", "optimizer.warmup", "eval.every"))
  each(checks.seed, ("seed", "sample.seed", "eval.seed"))
  if get("data.shuffle_seed") not in (None, _ABSENT):
    checks.seed("data.shuffle_seed", get("data.shuffle_seed"))
  each(checks.finite, ("data.real_prompt_ratio", "class_dropout_prob"), low=0.0, high=1.0)
  each(checks.finite, ("sample.guidance", "eval.guidance"))
  if get("ema.rate") not in (None, _ABSENT):
    checks.finite("ema.rate", get("ema.rate"), low=0.0, high=1.0)
  if get("lora.rank") not in (None, _ABSENT):
    checks.positive("lora.rank", get("lora.rank"))
    checks.finite("lora.alpha", get("lora.alpha"), low=0.0, low_open=True)
  if get("distill.enabled") not in (False, None, _ABSENT):
    from pixart_jax.train.trainables.distill import distill_config

    distill_config(c)
  if get("controlnet.blocks") not in (None, _ABSENT):
    checks.positive("controlnet.blocks", get("controlnet.blocks"))
  if get("optimizer") is not _ABSENT:
    from pixart_jax.train.optimizers import OptimizerConfig

    OptimizerConfig.from_dict(c.optimizer)
  if get("sample.every") not in (0, _ABSENT) and not get("sample.prompts"):
    raise ValueError("sample.prompts is empty but sample.every is set: give prompts or set sample.every=0")
  if get("eval.every") not in (0, _ABSENT):
    _check_eval(c.eval, get("sample.pipeline"))


def _check_eval(e, sample_pipeline) -> None:
  """What an evaluation every `eval.every` steps needs (`train.eval_hook`)."""
  from pixart_jax.train.eval_hook import BEST_METRICS

  if not (e.pipeline or sample_pipeline not in (None, _ABSENT)):
    raise ValueError("eval.every > 0 needs eval.pipeline (or sample.pipeline): a diffusers PixArt-Sigma pipeline dir "
                     "or Hub id with text_encoder/, tokenizer/ and vae/")
  for name, what in (("inception", "the FID Inception weights, pytorch-fid's pt_inception-2015-12-05-6726825d.pth"),
                     ("ref_stats", "reference FID statistics (.npz from `python -m pixart_jax.evaluate stats`)")):
    if not e[name]:
      raise ValueError(f"eval.every > 0 needs eval.{name}: {what}")
  if not e.prompts:
    raise ValueError("eval.prompts is empty but eval.every is set: give prompts or set eval.every=0")
  if e.best_metric not in BEST_METRICS:
    raise ValueError(f"eval.best_metric={e.best_metric!r} is not one of {sorted(BEST_METRICS)}")
  if e.best_metric == "clip_score" and not e.clip:
    raise ValueError("eval.best_metric='clip_score' needs eval.clip (a transformers CLIPModel dir or Hub id)")


_ABSENT = object()
