"""Our own checkpoints as weight sources: a training workdir or an Orbax dir from `python -m pixart_jax.convert`.

Both are read as a flat tensor source keyed by our parameter paths ("blocks.attn.q.kernel") and loaded with
`load_strict` through an identity key map into a model of a (possibly NEW) config, with the documented
weak-to-strong rules (docs/ARCHITECTURE.md §5.7):
  * PE interpolation / sample size changes: config only (the position embedding is recomputed, never stored);
  * new KV-compression parameters absent from the checkpoint: their average init (`weak_to_strong_init`,
    conv 1/R^2, bias 0, LayerNorm (1, 0)), allowed by `kv_compress_missing`;
  * micro-condition embedders (PixArt-alpha csize/ar) in the checkpoint but not in the new model: dropped.
Anything else that does not fit (other depth/width, missing blocks) is a `WeightLoadError` naming the keys.

Workdir: the newest step under `<workdir>/checkpoints/` whose item restores and matches the step's checksums.json
(written by the trainer); its `ema` item if present (the weights to continue from), else `state.params`.
"""
from __future__ import annotations

import functools
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from pixart_jax.convert import orbax_io
from pixart_jax.convert.sources import DictSource
from pixart_jax.convert.strict import Put, flat_targets, load_into
from pixart_jax.models.config import DiTConfig, from_preset
from pixart_jax.models.spec import ModelSpec, abstract
from pixart_jax.parallel.sharding import LOGICAL_RULES

log = logging.getLogger(__name__)

MICRO_PREFIX = "micro"


def _path(path) -> epath.Path:
  """Local paths made absolute (Orbax needs that); gs:// and other URLs kept."""
  s = os.fspath(path)
  return epath.Path(s if "://" in s else os.path.abspath(s))


def is_workdir(path: str | os.PathLike) -> bool:
  """A training workdir of ours (local or gs://): `<path>/checkpoints/<step>/` with a `state` item."""
  p = _path(path)
  ck = p / "checkpoints"
  return ck.is_dir() and any(d.name.isdigit() and (d / "state").is_dir() for d in ck.iterdir())


def _flatten(tree, prefix=()) -> dict[str, np.ndarray]:
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      out.update(_flatten(v, prefix + (str(i),)))
  elif hasattr(tree, "shape"):
    if prefix and prefix[-1] == "value":  # an nnx Variable stored as a node (Orbax dirs of `convert`)
      prefix = prefix[:-1]
    out[".".join(prefix)] = np.asarray(tree)
  return out


def _restore_tree(path):
  """The whole array tree of an Orbax item onto this process's first device (any saving topology)."""
  import orbax.checkpoint as ocp

  ckptr = ocp.StandardCheckpointer()
  path = _path(path)
  meta = ckptr.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
  return ckptr.restore(path, target)


def workdir_steps(workdir: str | os.PathLike) -> list[int]:
  """The checkpoint steps of a workdir, oldest first (FileNotFoundError naming the folder when it has none)."""
  ck = _path(workdir) / "checkpoints"
  steps = sorted(int(d.name) for d in ck.iterdir() if d.name.isdigit() and (d / "state").is_dir()) \
      if ck.is_dir() else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint step under {ck}")
  return steps


def workdir_step(workdir: str | os.PathLike) -> int:
  """The newest checkpoint step of a workdir."""
  return workdir_steps(workdir)[-1]


def _restore_verified(sdir: epath.Path, use_ema: bool) -> tuple[dict[str, np.ndarray], str]:
  """(flat weights, item name) of one step: its EMA (or state params), checked against the step's checksums.json
  (`train.checkpoint.verify_item`; a step without checksums is read unverified, with a warning)."""
  from pixart_jax.train.checkpoint import verify_item

  item = "ema" if use_ema and (sdir / "ema").is_dir() else "state"
  tree = _restore_tree(sdir / item)
  one_device = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("host",))
  with jax.set_mesh(one_device):  # the restored arrays live on one device, whatever mesh the caller has set
    verified = verify_item(sdir, item, tree)
  if not verified:
    log.warning("checkpoint %s has no checksums.json (an older version wrote it): read unverified", sdir)
  if item == "ema":
    return _flatten(tree), "ema"
  if "params" not in tree:
    raise ValueError(f"checkpoint {sdir}/state has no params (items {sorted(tree)})")
  return _flatten(tree["params"]), "params"


def open_workdir(workdir: str | os.PathLike, *, use_ema: bool = True) -> DictSource:
  """The newest restorable, verified checkpoint's EMA (or params) as a flat source keyed by dotted parameter paths.

  A step whose files do not restore or whose arrays differ from its checksums is reported (warning) and the
  previous one is read; the workdir is never modified (the trainer moves corrupt steps aside, not convert). When no
  step can be read: CheckpointCorruptError naming the workdir and the newest step's error."""
  from pixart_jax.train.checkpoint import CheckpointCorruptError

  wd = _path(workdir)
  steps = workdir_steps(wd)
  errors = []
  for step in reversed(steps):
    sdir = wd / "checkpoints" / str(step)
    try:
      flat, what = _restore_verified(sdir, use_ema)
    except Exception as e:  # noqa: BLE001 - any failure to read a step makes it unusable
      errors.append((step, e))
      log.warning("checkpoint step %d of %s cannot be used (%s: %s); trying the previous one", step, wd,
                  type(e).__name__, str(e).strip().splitlines()[0][:300] if str(e).strip() else "")
      continue
    if errors:
      log.warning("reading step %d of %s instead of the unusable newer step(s) %s", step, wd, [s for s, _ in errors])
    return DictSource(flat, name=f"{wd} step {step} ({what})")
  step, error = errors[0]
  first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
  raise CheckpointCorruptError(f"no checkpoint of {wd} can be read: all {len(steps)} steps {steps} are corrupt or "
                               f"unreadable; the newest, step {step}, failed with {type(error).__name__}: {first}")


def open_orbax(path: str | os.PathLike) -> DictSource:
  """A converted Orbax dir (`DIR/params`) as a flat source keyed by dotted parameter paths."""
  p = pathlib.Path(path)
  return DictSource(_flatten(_restore_tree(p / "params")), name=str(p))


def is_ours(src) -> bool:
  return is_workdir(src) or orbax_io.is_orbax_dir(src)


def open_ours(src: str | os.PathLike) -> DictSource:
  """The checkpoint as a per-layer flat source (`unstack_layers` keys)."""
  if is_workdir(src) or orbax_io.is_orbax_dir(src):
    raw = open_workdir(src) if is_workdir(src) else open_orbax(src)
    return DictSource(unstack_layers(raw._t, saved_config(src)), name=raw.name)
  raise FileNotFoundError(f"{src} is neither a training workdir (checkpoints/<step>/state) nor an Orbax dir "
                          f"({orbax_io.CONFIG_FILE} + params/)")


def saved_config(src: str | os.PathLike) -> DiTConfig:
  """The DiTConfig the checkpoint was written with (workdir: config.json's model; Orbax: pixart_config.json)."""
  p = _path(src)
  if orbax_io.is_orbax_dir(src):
    return orbax_io.read_config(p)
  cfg_file = p / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"workdir {p} has no config.json: pass the model config explicitly")
  from pixart_jax.convert.hub import read_json
  model = read_json(cfg_file, "training config").get("model")
  if not isinstance(model, dict) or not isinstance(model.get("preset"), str):
    raise ValueError(f"{cfg_file} is not a valid training config: 'model' must be an object with a 'preset' name")
  return from_preset(model["preset"], model["overrides"], what=f"{cfg_file} model.overrides")


def unstack_layers(flat: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
  """"stages.<s>.<rest>" (stacked, leading axis = layers of stage s) -> "layers.<i>.<rest>" per global layer i.

  Stages depend on the KV-compression layout, layers do not: this is what lets a checkpoint load into a model
  whose stages differ (an uncompressed one into a KV-compressed one).
  """
  stages = list(cfg.stages())
  out = {}
  for key, arr in flat.items():
    parts = key.split(".")
    if parts[0] != "stages":
      out[key] = arr
      continue
    s = int(parts[1])
    if s >= len(stages):
      raise ValueError(f"checkpoint key {key}: its config has only {len(stages)} stages")
    start, count, _ = stages[s]
    if arr.shape[0] != count:
      raise ValueError(f"checkpoint key {key} has {arr.shape[0]} stacked layers, its config says {count}")
    for j in range(count):
      out[".".join(["layers", str(start + j)] + parts[2:])] = np.ascontiguousarray(arr[j])
  return out


def layer_keymap(targets, cfg):
  """Key map of `unstack_layers` keys onto the target paths of a model of config `cfg` (identity elsewhere)."""
  names = {".".join(str(x) for x in p): Put(p) for p in targets if p[0] != "stages"}
  for s, (start, count, _) in enumerate(cfg.stages()):
    for p in targets:
      if p[0] == "stages" and p[1] == s:
        for j in range(count):
          names[".".join(["layers", str(start + j)] + [str(x) for x in p[2:]])] = Put(p, index=j)

  def keymap(key: str):
    hit = names.get(key)
    return None if hit is None else [hit]

  return keymap


def load_ours(src, spec: ModelSpec, *, mesh=None, rules=LOGICAL_RULES, progress: bool = False):
  """Our checkpoint `src` (workdir / Orbax dir) into a model of `spec` (its config may differ from the saved one),
  by the weak-to-strong rules: new KV-compression parameters take their average init."""
  model = abstract(spec)
  targets = flat_targets(nnx.state(model))
  with open_ours(src) as source:
    return load_into(model, source, layer_keymap(targets, spec.cfg), drop=drop_rule(targets), mesh=mesh,
                     rules=rules, allow_missing=kv_compress_missing,
                     init_missing=functools.partial(weak_to_strong_init, spec.cfg), progress=progress)


def kv_compress_missing(path: tuple) -> bool:
  """allow_missing rule for loading an uncompressed checkpoint into a KV-compressed model."""
  return "compress" in path


def weak_to_strong_init(cfg: DiTConfig, path: tuple, struct: jax.ShapeDtypeStruct) -> jax.Array:
  """Init values of parameters that may be absent from a weaker checkpoint (documented non-strict rules).

  Only the KV-compression parameters qualify: conv = exact R x R average (1/R^2), bias 0, LayerNorm (1, 0).
  """
  if "compress" not in path:
    raise ValueError(f"{'.'.join(map(str, path))} is missing from the checkpoint and has no weak-to-strong init")
  name = path[-1]
  value = {"kernel": 1.0 / cfg.kv_compress_ratio**2, "bias": 0.0, "norm_scale": 1.0, "norm_bias": 0.0}[name]
  return jnp.full(struct.shape, value, struct.dtype)


def drop_rule(targets):
  """Source keys dropped by the weak-to-strong rules: micro-condition weights the new model has no place for."""
  has_micro = any(p[0] == MICRO_PREFIX for p in targets)
  return lambda key: not has_micro and key.split(".")[0] == MICRO_PREFIX
