"""Architecture presets for PixArt-Sigma (and the PixArt-alpha 1024 layout).

`DiTConfig` describes an architecture only (how the model runs, attention included, is a `models.spec.ModelSpec`);
experiments (ml_collections) pick a preset by name and override a few fields once, at the edge (`from_preset`).
Numbers follow docs/ARCHITECTURE.md §2 (the model), §3 (KV compression) and §2.1 (released checkpoints).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal, Mapping

from pixart_jax import checks

log = logging.getLogger(__name__)

KVMode = Literal["conv", "ave", "uniform"]

# How attention runs moved from DiTConfig to `AttentionOptions` (carried by `ModelSpec`). JSON written by older
# versions (converted Orbax dirs, a workdir's config.json, checkpoints' config items) still holds these keys:
# reading an architecture drops them.
RUN_FIELDS = ("attention", "attention_min_seq", "splash_block_sizes", "splash_interpret", "sequence_parallel")


_POSITIVE_INT_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "caption_channels",
                        "max_caption_len", "sample_size", "kv_compress_ratio", "image_size")
_POSITIVE_FLOAT_FIELDS = ("mlp_ratio", "interpolation_scale", "norm_eps")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """A PixArt-Sigma diffusion transformer.

  sample_size: latent side of the training resolution (image_size // 8); base_size = sample_size // patch_size.
  interpolation_scale: the PE interpolation (official `pe_interpolation`, diffusers `interpolation_scale`).
  kv_compress_layers / kv_compress_ratio / kv_compress_mode: KV token compression (docs/ARCHITECTURE.md §3); a list
    (a JSON round trip) is accepted and stored as a tuple of ints.
  """

  depth: int = 28
  hidden_size: int = 1152
  num_heads: int = 16
  patch_size: int = 2
  mlp_ratio: float = 4.0
  in_channels: int = 4
  learn_sigma: bool = True
  caption_channels: int = 4096
  max_caption_len: int = 300
  sample_size: int = 128
  interpolation_scale: float = 2.0
  micro_conditions: bool = False
  qk_norm: bool = False
  kv_compress_layers: tuple[int, ...] = ()
  kv_compress_ratio: int = 2
  kv_compress_mode: KVMode = "conv"
  norm_eps: float = 1e-6
  class_dropout_prob: float = 0.1
  # Which image-size table the checkpoint was trained on (data.buckets names); informational for sampling.
  image_size: int = 1024

  def __post_init__(self):
    for name in _POSITIVE_INT_FIELDS:
      object.__setattr__(self, name, checks.positive(f"DiTConfig.{name}", getattr(self, name)))
    for name in _POSITIVE_FLOAT_FIELDS:
      object.__setattr__(self, name, checks.finite(f"DiTConfig.{name}", getattr(self, name), low=0.0, low_open=True))
    object.__setattr__(self, "class_dropout_prob",
                       checks.finite("DiTConfig.class_dropout_prob", self.class_dropout_prob, low=0.0, high=1.0))
    for name in ("learn_sigma", "micro_conditions", "qk_norm"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"DiTConfig.{name} must be true or false, got {getattr(self, name)!r}")
    layers = self.kv_compress_layers
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
      raise ValueError(f"DiTConfig.kv_compress_layers must be a list of layer indices, got {layers!r}")
    object.__setattr__(self, "kv_compress_layers",
                       tuple(checks.non_negative("DiTConfig.kv_compress_layers entry", i) for i in layers))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    bad = [i for i in self.kv_compress_layers if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"kv_compress_layers {bad} outside [0, {self.depth})")
    if self.kv_compress_mode not in ("conv", "ave", "uniform"):
      raise ValueError(f"kv_compress_mode must be conv, ave or uniform, got {self.kv_compress_mode!r}")
    if self.kv_compress_layers and self.kv_compress_ratio < 2:
      raise ValueError("kv_compress_ratio must be >= 2 when kv_compress_layers is set")
    if self.micro_conditions and self.hidden_size % 3:
      raise ValueError("micro_conditions need hidden_size divisible by 3")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, what: str = "DiTConfig") -> "DiTConfig":
    """From a JSON dict of fields (`dataclasses.asdict`); see `architecture_fields`."""
    return cls(**architecture_fields(d, what=what))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def base_size(self) -> int:
    return self.sample_size // self.patch_size

  def replace(self, **kw) -> "DiTConfig":
    return dataclasses.replace(self, **kw)

  def kv_ratio(self, layer: int) -> int:
    return self.kv_compress_ratio if layer in self.kv_compress_layers else 1

  def stages(self) -> list[tuple[int, int, int]]:
    """Runs of consecutive blocks with the same KV ratio: [(start, count, ratio)], scanned one run at a time."""
    out: list[tuple[int, int, int]] = []
    for i in range(self.depth):
      r = self.kv_ratio(i)
      if out and out[-1][2] == r:
        s, c, _ = out[-1]
        out[-1] = (s, c + 1, r)
      else:
        out.append((i, 1, r))
    return out


_XL2 = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
KV_DEEP_HALF = tuple(range(14, 28))

PRESETS: dict[str, DiTConfig] = {
    # PixArt-Sigma XL/2, released checkpoints (docs/ARCHITECTURE.md §2.1).
    "sigma-xl2-256": DiTConfig(**_XL2, sample_size=32, interpolation_scale=0.5, image_size=256),
    "sigma-xl2-512-ms": DiTConfig(**_XL2, sample_size=64, interpolation_scale=1.0, image_size=512),
    "sigma-xl2-1024-ms": DiTConfig(**_XL2, sample_size=128, interpolation_scale=2.0, image_size=1024),
    "sigma-xl2-2k-ms": DiTConfig(**_XL2, sample_size=256, interpolation_scale=4.0, image_size=2048),
    # 4K: not released. Our choice: sample_size 512 (4096 px), pe_interpolation = 4096 / 512 = 8 (the
    # official rule image_size / 512), KV compression on the deep half as in the official KV configs.
    "sigma-xl2-4k": DiTConfig(**_XL2, sample_size=512, interpolation_scale=8.0, image_size=4096,
                              kv_compress_layers=KV_DEEP_HALF),
    # KV-compressed fine-tune layouts (official *_kvcompress configs).
    "sigma-xl2-1024-ms-kv": DiTConfig(**_XL2, sample_size=128, interpolation_scale=2.0, image_size=1024,
                                      kv_compress_layers=KV_DEEP_HALF),
    "sigma-xl2-2k-ms-kv": DiTConfig(**_XL2, sample_size=256, interpolation_scale=4.0, image_size=2048,
                                    kv_compress_layers=KV_DEEP_HALF),
    # PixArt-alpha 1024-MS layout: micro-conditions on, 120-token captions (alpha checkpoints for weak-to-strong).
    "alpha-xl2-1024-ms": DiTConfig(**_XL2, sample_size=128, interpolation_scale=2.0, image_size=1024,
                                   micro_conditions=True, max_caption_len=120),
    # Tiny model for tests and the CPU demo.
    "tiny": DiTConfig(depth=2, hidden_size=48, num_heads=4, patch_size=2, caption_channels=32,
                      max_caption_len=16, sample_size=8, interpolation_scale=1.0, image_size=64),
}


def get_preset(name: str, **overrides) -> DiTConfig:
  """Returns a preset by name, with field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown DiT preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def architecture_fields(d: Mapping[str, Any], *, what: str = "DiTConfig") -> dict[str, Any]:
  """The DiTConfig fields of `d`: keys of older versions' run settings (`RUN_FIELDS`) dropped (logged when set),
  any other unknown key an error naming it and `what` (the file or config it came from)."""
  d = dict(d)
  dropped = {k: d.pop(k) for k in RUN_FIELDS if k in d}
  dropped = {k: v for k, v in dropped.items() if v is not None}
  if dropped:
    log.info("%s: ignoring %s (how attention runs is not part of the architecture: set it with "
             "ModelSpec(attention=...) / config.model.attention)", what, dropped)
  fields = {f.name for f in dataclasses.fields(DiTConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"unknown DiTConfig fields in {what}: {unknown}")
  return d


def from_preset(name: str, overrides: Mapping[str, Any] | None = None, *, what: str = "model.overrides"
                ) -> DiTConfig:
  """A preset with the non-None entries of `overrides` (an experiment's `config.model.overrides`, also as saved in
  a workdir's config.json by older versions; see `architecture_fields`)."""
  given = {k: v for k, v in dict(overrides or {}).items() if v is not None}
  return get_preset(name, **architecture_fields(given, what=what))
