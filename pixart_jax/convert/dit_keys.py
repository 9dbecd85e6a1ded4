"""PixArt-Sigma transformer key maps: diffusers layout <-> our NNX paths, and official `.pth` -> ours.

One table (`diffusers_table`) serves both directions. Official keys are translated to diffusers keys first
(splitting the fused `qkv` / `kv_linear` weights), so there is exactly one place that knows our paths.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator

import numpy as np

from pixart_jax.convert.strict import Put
from pixart_jax.models.config import DiTConfig

# Layout rules (PyTorch -> ours). Each is paired with its inverse for export.
_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),                                   # (out, in) <-> (in, out)
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # (O,I,kh,kw) <-> (kh,kw,I,O)
}


@dataclasses.dataclass(frozen=True)
class Entry:
  key: str               # diffusers-layout key
  path: tuple            # our flat state path
  index: int | None      # layer index inside a stacked stage
  layout: str            # a key of _LAYOUTS


def _linear(prefix: str, path: tuple, index=None) -> list[Entry]:
  return [Entry(f"{prefix}.weight", path + ("kernel",), index, "linear"),
          Entry(f"{prefix}.bias", path + ("bias",), index, "copy")]


def diffusers_table(cfg: DiTConfig) -> list[Entry]:
  """Every diffusers-layout key of a model with this config, with its target path."""
  t: list[Entry] = [
      Entry("pos_embed.proj.weight", ("patch_embed", "kernel"), None, "conv"),
      Entry("pos_embed.proj.bias", ("patch_embed", "bias"), None, "copy"),
      *_linear("adaln_single.emb.timestep_embedder.linear_1", ("t_embedder", "linear_1")),
      *_linear("adaln_single.emb.timestep_embedder.linear_2", ("t_embedder", "linear_2")),
      *_linear("adaln_single.linear", ("t_block",)),
      *_linear("caption_projection.linear_1", ("caption", "mlp", "fc1")),
      *_linear("caption_projection.linear_2", ("caption", "mlp", "fc2")),
      Entry("scale_shift_table", ("final", "scale_shift_table"), None, "copy"),
      *_linear("proj_out", ("final", "linear")),
  ]
  if cfg.micro_conditions:
    for name in ("resolution", "aspect_ratio"):
      for lin in ("linear_1", "linear_2"):
        t += _linear(f"adaln_single.emb.{name}_embedder.{lin}", ("micro", name, lin))
  for s, (start, count, ratio) in enumerate(cfg.stages()):
    for j in range(count):
      i, b, st = start + j, f"transformer_blocks.{start + j}", ("stages", s)
      t.append(Entry(f"{b}.scale_shift_table", st + ("scale_shift_table",), j, "copy"))
      for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0")):
        t += _linear(f"{b}.attn1.{theirs}", st + ("attn", ours), j)
        t += _linear(f"{b}.attn2.{theirs}", st + ("cross_attn", ours), j)
      t += _linear(f"{b}.ff.net.0.proj", st + ("mlp", "fc1"), j)
      t += _linear(f"{b}.ff.net.2", st + ("mlp", "fc2"), j)
      if cfg.qk_norm:
        for n in ("q", "k"):
          t.append(Entry(f"{b}.attn1.{n}_norm.weight", st + ("attn", f"{n}_norm_scale"), j, "copy"))
          t.append(Entry(f"{b}.attn1.{n}_norm.bias", st + ("attn", f"{n}_norm_bias"), j, "copy"))
      if ratio > 1 and cfg.kv_compress_mode == "conv":
        # Not in diffusers (it has no KV compression); named after the official modules.
        t.append(Entry(f"{b}.attn1.sr.weight", st + ("attn", "compress", "kernel"), j, "conv"))
        t.append(Entry(f"{b}.attn1.sr.bias", st + ("attn", "compress", "bias"), j, "copy"))
        t.append(Entry(f"{b}.attn1.norm.weight", st + ("attn", "compress", "norm_scale"), j, "copy"))
        t.append(Entry(f"{b}.attn1.norm.bias", st + ("attn", "compress", "norm_bias"), j, "copy"))
  return t


def diffusers_keymap(cfg: DiTConfig) -> Callable[[str], list[Put] | None]:
  """Source-key -> Puts for a diffusers-format transformer state dict."""
  table = {e.key: e for e in diffusers_table(cfg)}

  def keymap(key: str) -> list[Put] | None:
    e = table.get(key)
    if e is None:
      return None
    return [Put(e.path, e.index, _LAYOUTS[e.layout][0])]

  return keymap


def export_tensors(cfg: DiTConfig, flat: dict[tuple, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
  """Our flat state (path -> array) -> (diffusers key, PyTorch-layout array), in table order."""
  for e in diffusers_table(cfg):
    a = np.asarray(flat[e.path])
    if e.index is not None:
      a = a[e.index]
    yield e.key, np.ascontiguousarray(_LAYOUTS[e.layout][1](a))


# -------------------------------------------------------------------------------------------------------------
# Official PixArt checkpoints (.pth, docs/ARCHITECTURE.md §9.1)
# -------------------------------------------------------------------------------------------------------------
OFFICIAL_DROP = ("pos_embed", "y_embedder.y_embedding")  # non-learned PE buffer; null caption (replaced by T5(""))

_OFFICIAL_FIXED = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
_OFFICIAL_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "attn.q_norm": "attn1.q_norm",
    "attn.k_norm": "attn1.k_norm",
    "attn.sr": "attn1.sr",
    "attn.norm": "attn1.norm",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _chunk(n: int, i: int) -> Callable[[np.ndarray], np.ndarray]:
  def f(a: np.ndarray) -> np.ndarray:
    size = a.shape[0] // n
    return a[i * size:(i + 1) * size]
  return f


def official_to_diffusers(key: str) -> list[tuple[str, Callable | None]] | None:
  """An official key -> [(diffusers key, slicing fn or None)], or None when it has no counterpart."""
  if key == "final_layer.scale_shift_table":
    return [("scale_shift_table", None)]
  m = re.match(r"^blocks\.(\d+)\.scale_shift_table$", key)
  if m:
    return [(f"transformer_blocks.{m.group(1)}.scale_shift_table", None)]
  m = _BLOCK_RE.match(key)
  if m:
    i, mod, kind = m.groups()
    b = f"transformer_blocks.{i}"
    if mod == "attn.qkv":
      return [(f"{b}.attn1.{n}.{kind}", _chunk(3, j)) for j, n in enumerate(("to_q", "to_k", "to_v"))]
    if mod == "cross_attn.kv_linear":
      return [(f"{b}.attn2.{n}.{kind}", _chunk(2, j)) for j, n in enumerate(("to_k", "to_v"))]
    if mod in _OFFICIAL_BLOCK:
      return [(f"{b}.{_OFFICIAL_BLOCK[mod]}.{kind}", None)]
    return None
  mod, _, kind = key.rpartition(".")
  if mod in _OFFICIAL_FIXED:
    return [(f"{_OFFICIAL_FIXED[mod]}.{kind}", None)]
  return None


def official_keymap(cfg: DiTConfig) -> Callable[[str], list[Put] | None]:
  """Source-key -> Puts for an official PixArt state dict."""
  dmap = diffusers_keymap(cfg)

  def keymap(key: str) -> list[Put] | None:
    pairs = official_to_diffusers(key)
    if pairs is None:
      return None
    puts = []
    for dkey, pre in pairs:
      inner = dmap(dkey)
      if inner is None:
        return None
      for p in inner:
        puts.append(Put(p.path, p.index, (lambda f, g: (lambda a: g(f(a))))(pre, p.fn) if pre else p.fn))
    return puts

  return keymap


def official_drop(key: str) -> bool:
  return key in OFFICIAL_DROP
