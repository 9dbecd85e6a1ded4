"""FID InceptionV3 weights: pytorch-fid / torchvision keys -> our NNX paths (`inception_keymap`), and `load_inception`.

    net = load_inception("pt_inception-2015-12-05-6726825d.pth")          # pytorch-fid's released weights
    net = load_inception("inception_v3_google-0cc3c7bd.pth", config=InceptionConfig(use_fid_inception=False))

Key map (P = any BasicConv2d: `Conv2d_1a_3x3`, `Mixed_6b.branch7x7dbl_2`, ...):

  P.conv.weight (O, I, kh, kw)      -> P/conv/kernel (kh, kw, I, O)
  P.bn.weight, P.bn.bias            -> P/bn/scale, P/bn/bias
  P.bn.running_mean, running_var    -> P/bn/mean, P/bn/var
  P.bn.num_batches_tracked          -> dropped (a training counter)
  fc.weight, fc.bias                -> dropped (the classifier; pool3 features are taken before it)
  AuxLogits.*                       -> dropped (torchvision's auxiliary classifier)

pytorch-fid's `pt_inception-2015-12-05-*.pth` is the state dict of torchvision's `Inception3(num_classes=1008,
aux_logits=False)` with the FID blocks swapped in (`fid_inception_v3()` in src/pytorch_fid/inception.py), so its
backbone keys are torchvision's. A torchvision-layout `inception_v3` state dict differs only in keys that are
dropped: `AuxLogits.{conv0,conv1}.*` and `AuxLogits.fc.*` (present with aux_logits=True, as in torchvision's
ImageNet weights), a 1000-way `fc` instead of 1008, and the BatchNorm `num_batches_tracked` buffers written by
torch >= 0.4.1. The file is read with `convert.sources.open_tensors` (zip or legacy torch format, never
`torch.load`). torchvision's ImageNet weights belong to its own blocks: load them with
`InceptionConfig(use_fid_inception=False)`, as pytorch-fid's `use_fid_inception=False` does.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.convert.hub import resolve_local
from pixart_jax.convert.sources import open_tensors
from pixart_jax.convert.strict import Put, load_into
from pixart_jax.metrics.inception import FIDInceptionV3, InceptionConfig
from pixart_jax.parallel.sharding import LOGICAL_RULES

__all__ = ["inception_keymap", "inception_drop", "load_inception", "inception_config_for"]

_KEY = re.compile(r"(?P<module>Conv2d_\w+|Mixed_\d[a-e]\.branch\w+)\.(?P<layer>conv|bn)\.(?P<leaf>\w+)")
_LEAVES = {("conv", "weight"): "kernel", ("bn", "weight"): "scale", ("bn", "bias"): "bias",
           ("bn", "running_mean"): "mean", ("bn", "running_var"): "var"}


def _conv(a: np.ndarray) -> np.ndarray:
  """(O, I, kh, kw) -> (kh, kw, I, O)."""
  return a.transpose(2, 3, 1, 0)


def inception_keymap(key: str) -> list[Put] | None:
  """pytorch-fid / torchvision Inception3 state-dict key -> [Put] into `FIDInceptionV3`; None for an unknown key."""
  m = _KEY.fullmatch(key)
  leaf = None if m is None else _LEAVES.get((m["layer"], m["leaf"]))
  if leaf is None:
    return None
  path = tuple(m["module"].split(".")) + (m["layer"], leaf)
  return [Put(path, fn=_conv if leaf == "kernel" else None)]


def inception_drop(key: str) -> bool:
  """Keys read past on purpose: the classifiers and BatchNorm's training counter."""
  return key.startswith(("fc.", "AuxLogits.")) or key.endswith(".num_batches_tracked")


def load_inception(src: str | os.PathLike, *, config: InceptionConfig | None = None, dtype=jnp.float32,
                   param_dtype=None, precision=jax.lax.Precision.HIGHEST, mesh: jax.sharding.Mesh | None = None,
                   rules=LOGICAL_RULES, progress: bool = False) -> FIDInceptionV3:
  """Loads an Inception3 state dict (.pth zip or legacy, .safetensors, or a dir holding one) strictly.

  config: network options (default: pytorch-fid's FID network). dtype: compute dtype; param_dtype: storage
  dtype (default: dtype). mesh: parameters are placed straight into their shardings (replicated by the default
  rules). Raises WeightLoadError naming every unexpected / missing / mis-shaped key.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  config = config or InceptionConfig()
  local = resolve_local(src, allow_patterns=["*.pth", "*.pt", "*.safetensors"])
  abstract = nnx.eval_shape(lambda: FIDInceptionV3(config, dtype=dtype, param_dtype=param_dtype,
                                                   precision=precision, rngs=nnx.Rngs(0)))
  with open_tensors(local) as source:
    return load_into(abstract, source, inception_keymap, drop=inception_drop, mesh=mesh, rules=rules,
                     progress=progress)


def inception_config_for(src: str | os.PathLike, *, use_fid_inception: bool = True) -> InceptionConfig:
  """The InceptionConfig whose channel counts fit the weights in `src`: `width` = the output channels of
  `Conv2d_1a_3x3` / 32 (1.0 for the released networks; tests save narrower random ones). The blocks (FID or
  torchvision) cannot be told apart by their keys and come from `use_fid_inception`."""
  local = resolve_local(src, allow_patterns=["*.pth", "*.pt", "*.safetensors"])
  key = "Conv2d_1a_3x3.conv.weight"
  with open_tensors(local) as source:
    if key not in source:
      raise ValueError(f"{src}: not an Inception3 state dict (no {key!r} among its {len(source)} tensors)")
    channels = source.shape(key)[0]
  return InceptionConfig(use_fid_inception=use_fid_inception, width=1.0 if channels == 32 else channels / 32)
