"""Optimizers for training: CAME (the PixArt-Sigma recipe) or AdamW, constant-with-warmup, global-norm clipping.

The experiment config is turned into an `OptimizerConfig` once (in the loop); `make_optimizer` builds

  optax.chain(clip_by_global_norm(clip), came | adamw (learning_rate = schedule))

Learning rate (docs/ARCHITECTURE.md §5.2): the official recipe inherits `auto_lr = dict(rule='sqrt')`: the configured lr is the lr
at a global batch of 256 and is multiplied by sqrt(global_batch / 256) before the optimizer is built
(`auto_scale_lr`). Here `global_batch` counts the examples behind one optimizer update (the batch of one train
step, all micro-batches of gradient accumulation included), exactly as the official
`train_batch_size * world_size * gradient_accumulation_steps`. `auto_lr="none"` uses the lr as given.

Schedule: diffusers `get_constant_schedule_with_warmup` driven by a LambdaLR stepped after each update: the update
with count k (0 first) uses lr * min(k / warmup, 1); so the very first update has lr 0 when warmup > 0 (as in the
official runs). warmup = 0 is constant.

CAME factors parameters as came_pytorch does on the PyTorch weights (`torch_layout_factored_dims`: per-layer
factoring of the scanned `layers` axis, conv kernels over (kh, kw)); this needs parameters that are nnx Variables
carrying their logical axis names, which is what the train state holds.

Gradient accumulation is not an optimizer wrapper here: the train step scans over micro-batches and makes one
update per step (see `pixart_jax.train.step`).
"""
from __future__ import annotations

import dataclasses
import math
import jax.numpy as jnp
import optax

from pixart_jax import checks
from pixart_jax.enums import ParsedEnum
from pixart_jax.train.came import came, torch_layout_factored_dims

BASE_BATCH = 256


class OptimizerName(ParsedEnum, what="optimizer"):
  CAME = "came"
  ADAMW = "adamw"


class LrRule(ParsedEnum, what="auto_lr rule"):
  SQRT = "sqrt"      # lr * sqrt(global_batch / base_batch)   (official auto_lr, the default)
  LINEAR = "linear"  # lr * global_batch / base_batch
  NONE = "none"      # lr as given


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Typed optimizer settings (from `config.optimizer`).

  name: came | adamw. lr: the lr at `base_batch` examples (see auto_lr). betas: 3 for CAME (b1, b2, b3),
  2 for AdamW. eps: 2 for CAME (eps1, eps2), 1 (or a float) for AdamW. clip: global-norm clip of the
  gradients (0 or None = off). warmup: linear warmup updates. clip_threshold: CAME's update-RMS clip.
  """
  name: OptimizerName = OptimizerName.CAME
  lr: float = 2e-5
  betas: tuple[float, ...] = (0.9, 0.999, 0.9999)
  eps: tuple[float, ...] = (1e-30, 1e-16)
  weight_decay: float = 0.0
  clip: float | None = 0.01
  warmup: int = 1000
  auto_lr: LrRule = LrRule.SQRT
  base_batch: int = BASE_BATCH
  clip_threshold: float = 1.0

  def __post_init__(self):
    checks.finite("optimizer.lr", self.lr, low=0.0, low_open=True)
    checks.non_negative("optimizer.warmup", self.warmup)
    if self.clip is not None:
      checks.finite("optimizer.clip (0 or None: off)", self.clip, low=0.0)
    checks.positive("optimizer.base_batch", self.base_batch)
    checks.finite("optimizer.weight_decay", self.weight_decay, low=0.0)
    checks.finite("optimizer.clip_threshold", self.clip_threshold, low=0.0, low_open=True)
    for b in self.betas:
      checks.finite(f"optimizer.betas entry (of {tuple(self.betas)})", b, low=0.0, high=1.0)
    for e in self.eps:
      checks.finite(f"optimizer.eps entry (of {tuple(self.eps)})", e, low=0.0)
    want_b, want_e = (3, 2) if self.name is OptimizerName.CAME else (2, 1)
    if len(self.betas) != want_b:
      raise ValueError(f"{self.name.value} needs {want_b} betas, got {self.betas}")
    if len(self.eps) != want_e:
      raise ValueError(f"{self.name.value} needs {want_e} eps value(s), got {self.eps}")

  @classmethod
  def from_dict(cls, d) -> "OptimizerConfig":
    """From a `config.optimizer` ConfigDict / mapping; strings parsed into enums, sequences into tuples."""
    d = dict(d)
    name = OptimizerName.parse(d.pop("name", "came"))
    rule = d.pop("auto_lr", "sqrt")
    rule = LrRule.parse("none" if rule is None else rule)
    eps = d.pop("eps", (1e-30, 1e-16) if name is OptimizerName.CAME else (1e-8,))
    eps = (float(eps),) if isinstance(eps, (int, float)) else tuple(float(e) for e in eps)
    betas = tuple(float(b) for b in d.pop("betas", (0.9, 0.999, 0.9999)))
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown optimizer settings {sorted(unknown)}; known: {sorted(fields)}")
    clip = d.pop("clip", 0.01)
    return cls(name=name, auto_lr=rule, eps=eps, betas=betas, clip=None if not clip else float(clip),
               **{k: v for k, v in d.items()})


def scaled_lr(cfg: OptimizerConfig, global_batch: int) -> float:
  """The peak lr after the batch-size rule (official `auto_scale_lr`, base batch 256)."""
  if global_batch < 1:
    raise ValueError(f"global batch must be >= 1, got {global_batch}")
  ratio = global_batch / cfg.base_batch
  if cfg.auto_lr is LrRule.SQRT:
    return cfg.lr * math.sqrt(ratio)
  if cfg.auto_lr is LrRule.LINEAR:
    return cfg.lr * ratio
  return cfg.lr


def constant_with_warmup(peak: float, warmup: int) -> optax.Schedule:
  """diffusers `get_constant_schedule_with_warmup`: count k -> peak * min(k / warmup, 1) (float32)."""
  if warmup <= 0:
    return lambda count: jnp.full([], peak, jnp.float32)

  def schedule(count):
    frac = jnp.minimum(jnp.asarray(count, jnp.float32) / float(warmup), 1.0)
    return jnp.float32(peak) * frac

  return schedule


def make_optimizer(cfg: OptimizerConfig, global_batch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule): global-norm clipping then CAME / AdamW with the warmup schedule.

  `schedule(count)` is the lr of the update with count `count` (= the train step), for logging.
  """
  schedule = constant_with_warmup(scaled_lr(cfg, global_batch), cfg.warmup)
  if cfg.name is OptimizerName.CAME:
    opt = came(schedule, betas=tuple(cfg.betas), eps=tuple(cfg.eps), clip_threshold=cfg.clip_threshold,
               weight_decay=cfg.weight_decay, factored_dims=torch_layout_factored_dims)
  else:
    opt = optax.adamw(schedule, b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps[0], weight_decay=cfg.weight_decay)
  parts = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip else []
  return optax.chain(*parts, opt), schedule

