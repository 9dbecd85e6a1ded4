"""Strict, streamed loading of a `TensorSource` into a flat abstract target (nnx State paths).

Each model owns a pure key map `source_key -> [Put, ...] | None`. `load_strict` walks the source once:
every source key must be mapped or dropped, every target completely filled (all layers of a stacked one),
every shape right; all problems are collected and raised as ONE `WeightLoadError`. `load_into` is what a loader
calls: it fills an abstract module (`nnx.eval_shape`, e.g. `models.spec.abstract`) and returns the concrete one,
each array placed straight into its sharding on a mesh.

Memory: at any time only the partially filled target buffers plus one source tensor live on the host; a
target is moved to the device (`jax.device_put`) and its host buffer freed as soon as it is complete, so peak
host RAM stays near 1x (at most ~2x) the size of the converted weights. Host buffers are 64-byte aligned,
so on the CPU backend the device_put adopts them without a copy. `source.get` must return a fresh array
(every TensorSource here does): it may become the returned jax.Array's memory.

    with open_tensors(path) as source:
      model = load_into(nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0))), source, keymap, mesh=mesh)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.convert.sources import TensorSource, empty_aligned
from pixart_jax.parallel.sharding import LOGICAL_RULES, Rules, state_shardings

__all__ = ["Put", "KeyMap", "WeightLoadError", "load_into", "load_strict", "flat_targets", "unflatten_into"]


@dataclasses.dataclass(frozen=True)
class Put:
  """Write (a transform of) one source tensor into the target at `path`.

  path:  key path into the flat target, a tuple of str/int as in `nnx.State.flat_state()`.
  index: position along the leading stacked (scanned layers) axis; None writes the whole array.
  fn:    transform of the source tensor (transpose, one slice of a fused qkv, ...), numpy in, numpy out.
  """
  path: tuple
  index: int | None = None
  fn: Callable[[np.ndarray], np.ndarray] | None = None


KeyMap = Callable[[str], "Sequence[Put] | None"]  # None: this source key is not mapped


class WeightLoadError(ValueError):
  """Weights do not fit the model. The message lists every offending key/path; the lists are attributes."""

  def __init__(self, message: str, *, unexpected=(), missing=(), mismatched=(), duplicates=(), invalid=()):
    super().__init__(message)
    self.unexpected, self.missing, self.mismatched = list(unexpected), list(missing), list(mismatched)
    self.duplicates, self.invalid = list(duplicates), list(invalid)


def _fmt_path(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _ranges(indices: Sequence[int]) -> str:
  """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
  out, idx = [], sorted(indices)
  i = 0
  while i < len(idx):
    j = i
    while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
      j += 1
    out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
    i = j + 1
  return ", ".join(out)


def _where(path: tuple, index: int | None) -> str:
  return _fmt_path(path) + ("" if index is None else f"[{index}]")


def _shape(shape) -> str:
  return str(tuple(int(n) for n in shape))


def _root_nbytes(a: np.ndarray) -> int:
  while isinstance(a.base, np.ndarray):
    a = a.base
  return a.nbytes


def _owned(arr: np.ndarray, copy: bool = False) -> np.ndarray:
  """`arr` itself if it is an aligned, C-contiguous array covering (about) all of its memory; else a copy.

  On CPU `jax.device_put` adopts such a buffer without copying, so a view must not pin a bigger array.
  """
  if not copy and arr.flags.c_contiguous and arr.ctypes.data % 64 == 0 and _root_nbytes(arr) <= arr.nbytes + 64:
    return arr
  out = empty_aligned(arr.shape, arr.dtype)
  out[...] = arr
  return out


def _kind(dtype) -> str:
  dtype = np.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return "float"
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return "complex"
  if dtype == np.bool_:
    return "bool"
  return "int" if jnp.issubdtype(dtype, jnp.integer) else str(dtype)


def _cast_problem(src, dst) -> str:
  """Why a source tensor of dtype `src` may not fill a target of dtype `dst` ("" when it may): weights are cast
  float -> float only (precision changes); an integer, bool or complex tensor for a float parameter (or the
  reverse) is a wrong or corrupt file, never silently converted."""
  if np.dtype(src) == np.dtype(dst) or _kind(src) == _kind(dst) in ("float", "int"):
    return ""
  return f"only float -> float casts are allowed ({_kind(src)} -> {_kind(dst)} would change the values' meaning)"


def load_strict(
    targets: Mapping[tuple, jax.ShapeDtypeStruct],
    source: TensorSource,
    keymap: KeyMap,
    *,
    drop: Callable[[str], bool] = lambda k: False,
    shardings: Mapping[tuple, jax.sharding.Sharding] | None = None,
    allow_missing: Callable[[tuple], bool] = lambda p: False,
    progress: bool = False,
) -> dict[tuple, jax.Array]:
  """Loads `source` into `targets` through `keymap`; returns `{path: jax.Array}` in the target dtypes.

  drop:          source keys consumed without being written (non-learned buffers, replaced embeddings).
  shardings:     per-path placement; a path not listed uses the target's own `.sharding` if it has one,
                 else the default device.
  allow_missing: target paths that may stay completely unfilled (they are then absent from the result);
                 a stacked target filled for only some layers is always an error.
  Raises WeightLoadError listing unexpected source keys, missing targets (with missing layer indices),
  shape mismatches, targets filled twice, bad key-map entries, failed transforms and dtype casts other than
  float -> float (or int -> int).
  """
  targets = dict(targets)
  shardings = dict(shardings or {})
  unexpected, mismatched, duplicates, invalid = [], [], [], []
  buffers: dict[tuple, np.ndarray] = {}          # partially filled stacked targets
  filled: dict[tuple, dict[int | None, str]] = {}  # path -> {index (None = whole): source key}
  out: dict[tuple, jax.Array] = {}
  failed: dict[tuple, set[int | None]] = {}       # (path, index) whose write was rejected (already reported)

  def place(path, arr):
    if unexpected or mismatched or duplicates or invalid:
      return  # the load will fail: skip the device copy
    sharding = shardings.get(path) or getattr(targets[path], "sharding", None)
    out[path] = jax.device_put(arr, sharding) if sharding is not None else jax.device_put(arr)

  keys = source.keys()
  if progress:
    from tqdm.auto import tqdm
    keys = tqdm(keys, desc=f"loading {getattr(source, 'name', 'weights')}", unit="tensor")
  for key in keys:
    if drop(key):
      continue
    puts = keymap(key)
    if puts is None:
      unexpected.append(f"{key} {_shape(source.shape(key))} {source.dtype(key)}")
      continue
    puts = [puts] if isinstance(puts, Put) else list(puts)  # an empty list consumes the key, like `drop`
    bad = [p for p in puts if not isinstance(p, Put) or tuple(p.path) not in targets]
    if bad:
      invalid.extend(f"source {key!r} is mapped to {p!r}, which is not a target path" for p in bad)
      continue
    tensor, tensor_placed = source.get(key), False
    for put in puts:
      path, index, target = tuple(put.path), put.index, targets[tuple(put.path)]
      try:
        value = np.asarray(put.fn(tensor) if put.fn is not None else tensor)
      except Exception as e:  # noqa: BLE001 - reported with the key, like every other problem
        failed.setdefault(path, set()).add(index)
        invalid.append(f"transform of source {key!r} {_shape(tensor.shape)} for target {_where(path, index)} "
                       f"raised {type(e).__name__}: {e}")
        continue
      want = tuple(target.shape) if index is None else tuple(target.shape[1:])
      if index is not None and not (len(target.shape) >= 1 and 0 <= index < target.shape[0]):
        invalid.append(f"source {key!r} is mapped to {_where(path, index)} but target {_fmt_path(path)} has "
                       f"shape {_shape(target.shape)} (index out of range)")
        continue
      if value.shape != want:
        failed.setdefault(path, set()).add(index)  # reported here, not again as missing
        mismatched.append(f"source {key!r} {_shape(tensor.shape)}" + ("" if put.fn is None else
                          f" -> transformed {_shape(value.shape)}") + f" vs target {_where(path, index)} "
                          f"expecting {_shape(want)}" + ("" if index is None else f" (stacked {_shape(target.shape)})"))
        continue
      cast = _cast_problem(value.dtype, target.dtype)
      if cast:
        failed.setdefault(path, set()).add(index)
        invalid.append(f"source {key!r} {_shape(tensor.shape)} is {value.dtype} but target {_where(path, index)} is "
                       f"{np.dtype(target.dtype)}: {cast}")
        continue
      seen = filled.setdefault(path, {})
      clash = seen.get(index) or (seen.get(None) if index is not None else next(iter(seen.values()), None))
      if clash is not None:
        duplicates.append(f"target {_where(path, index)} is filled by both {clash!r} and {key!r}")
        continue
      seen[index] = key
      if index is None:
        arr = _owned(np.asarray(value, dtype=target.dtype))
        if np.may_share_memory(arr, tensor):  # may become the jax.Array's memory: hand it out only once
          if tensor_placed:
            arr = _owned(arr, copy=True)
          tensor_placed = True
        place(path, arr)
        arr = None
        continue
      buf = buffers.get(path)
      if buf is None:
        buf = buffers[path] = empty_aligned(target.shape, target.dtype)
      buf[index] = value
      if len(seen) == target.shape[0]:
        place(path, buffers.pop(path))
      del buf
    tensor = value = None  # keep at most one source tensor alive

  missing = []
  for path, target in targets.items():
    seen, bad = filled.get(path, {}), failed.get(path, set())
    if None in seen or None in bad:
      continue
    if not seen and not bad:
      if not allow_missing(path):
        missing.append(f"target {_fmt_path(path)} {_shape(target.shape)} {target.dtype}: not filled")
      continue
    absent = sorted(set(range(target.shape[0])) - set(seen) - bad)
    if absent:
      missing.append(f"target {_fmt_path(path)} {_shape(target.shape)} {target.dtype}: layer indices "
                     f"{_ranges(absent)} of {target.shape[0]} not filled")
  buffers.clear()

  if unexpected or missing or mismatched or duplicates or invalid:
    sections = [("unexpected source keys (neither mapped nor dropped)", unexpected), ("missing targets", missing),
                ("shape mismatches", mismatched), ("filled twice", duplicates), ("bad key-map entries", invalid)]
    lines = [f"cannot load {getattr(source, 'name', 'weights')}: " + ", ".join(
        f"{len(items)} {title.split(' (')[0]}" for title, items in sections if items)]
    for title, items in sections:
      if items:
        lines.append(f"{title}:")
        lines.extend(f"  {item}" for item in sorted(items))
    raise WeightLoadError("\n".join(lines), unexpected=sorted(unexpected), missing=sorted(missing),
                          mismatched=sorted(mismatched), duplicates=sorted(duplicates), invalid=sorted(invalid))
  check_finite(out, getattr(source, "name", "weights"))
  return out


def check_finite(flat: Mapping[tuple, jax.Array], name: str = "weights") -> None:
  """Refuses weights holding NaN or inf (they only ever sample black images): WeightLoadError naming the tensors.

  One jitted program over all floating arrays (one compilation per set of shapes, not one per shape), reducing
  each on the devices where it lives (sharded arrays reduce in place); only one bool per array reaches the host."""
  paths = [p for p, a in flat.items() if jnp.issubdtype(a.dtype, jnp.inexact)]
  groups: dict = {}  # committed arrays on different device sets cannot enter one program
  for p in paths:
    arr = flat[p]
    committed = isinstance(arr, jax.Array) and arr.committed
    groups.setdefault(frozenset(arr.sharding.device_set) if committed else None, []).append(p)
  bad = []
  for group in groups.values():
    finite = np.asarray(_all_finite(tuple(flat[p] for p in group)))
    bad.extend(_fmt_path(p) for p, ok in zip(group, finite) if not ok)
  if bad:
    shown = ", ".join(sorted(bad)[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
    raise WeightLoadError(f"cannot load {name}: {len(bad)} tensor(s) hold NaN or inf values: {shown}",
                          invalid=sorted(bad))


@jax.jit
def _all_finite(arrays: tuple[jax.Array, ...]) -> jax.Array:
  """(N,) bool: whether each array holds only finite values. sum(a * 0) is NaN exactly when `a` holds a NaN or an
  inf (IEEE: inf * 0 = NaN); one float reduction per array compiles ~2.5x faster on CPU than all(isfinite(a))."""
  return jnp.isfinite(jnp.stack([jnp.sum(a * 0) for a in arrays]))


def _leaf_value(leaf):
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _key(entry) -> str | int:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def _flat(state: Any) -> list[tuple[tuple, Any]]:
  """(path, leaf) pairs of an nnx State (`nnx.to_flat_state`, i.e. `State.flat_state()`) or of a pytree."""
  if isinstance(state, nnx.State):
    return [(tuple(p), leaf) for p, leaf in nnx.to_flat_state(state)]
  pairs, _ = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, (nnx.Variable, jax.ShapeDtypeStruct)))
  return [(tuple(_key(e) for e in p), leaf) for p, leaf in pairs]


def flat_targets(abstract_state: Any) -> dict[tuple, jax.ShapeDtypeStruct]:
  """`{path: ShapeDtypeStruct}` of an (abstract) nnx State, e.g. `nnx.state(nnx.eval_shape(f), nnx.Param)`.

  Paths are the `state.flat_state()` (= `nnx.to_flat_state(state)`) keys; plain pytrees (dicts) work too.
  A leaf's `.sharding`, if any (from `nnx.get_abstract_model`), is kept so `load_strict` places it there.
  Pass a filtered state (`nnx.split(abstract_model, nnx.Param, ...)`) to leave out RNG state.
  """
  state = nnx.state(abstract_state) if isinstance(abstract_state, nnx.Module) else abstract_state
  out = {}
  for path, leaf in _flat(state):
    v = _leaf_value(leaf)
    out[path] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
  return out


def unflatten_into(state: Any, flat: Mapping[tuple, Any], *, allow_abstract: bool = False):
  """Writes `flat` (`{path: array}`, e.g. from `load_strict`) into the nnx `state`, in place; returns it.

  The Variables keep their metadata (logical axis names). Because `nnx.state(model)` shares Variables with
  the model, writing into it updates the model; with an abstract state use `nnx.merge(graphdef, state)`.
  Unknown paths or shape/dtype changes raise ValueError; so does a leaf left abstract (ShapeDtypeStruct)
  unless `allow_abstract`.
  """
  leaves = dict(_flat(state))
  unknown = sorted(_fmt_path(p) for p in flat if tuple(p) not in leaves)
  wrong = []
  for path, arr in flat.items():
    if tuple(path) not in leaves:
      continue
    old = _leaf_value(leaves[tuple(path)])
    if tuple(arr.shape) != tuple(old.shape) or np.dtype(arr.dtype) != np.dtype(old.dtype):
      wrong.append(f"{_fmt_path(path)}: state {_shape(old.shape)} {old.dtype}, given {_shape(arr.shape)} {arr.dtype}")
  if unknown or wrong:
    raise ValueError("cannot write arrays into the state: " + "; ".join(
        ([f"paths not in the state: {unknown}"] if unknown else []) + sorted(wrong)))
  for path, arr in flat.items():
    leaf = leaves[tuple(path)]
    if isinstance(leaf, nnx.Variable):
      leaf.set_value(arr)
    else:
      node = state
      for part in path[:-1]:
        node = node[part]
      node[path[-1]] = arr
  if not allow_abstract:
    left = sorted(_fmt_path(p) for p, leaf in _flat(state) if isinstance(_leaf_value(leaf), jax.ShapeDtypeStruct))
    if left:
      raise ValueError(f"state leaves still abstract after writing (not in `flat`): {left}")
  return state


def _never(_) -> bool:
  return False


def load_into(abstract_module: nnx.Module, source: TensorSource, keymap: KeyMap, *,
              drop: Callable[[str], bool] = _never, mesh: jax.sharding.Mesh | None = None,
              rules: Rules = LOGICAL_RULES, allow_missing: Callable[[tuple], bool] | None = None,
              init_missing: Callable[[tuple, jax.ShapeDtypeStruct], Any] | None = None,
              progress: bool = False) -> nnx.Module:
  """`abstract_module` (ShapeDtypeStruct leaves, from `nnx.eval_shape`) filled from `source` through `keymap` by
  `load_strict`: the concrete module, no random init and no second copy of the weights.

  drop: source keys consumed without being written. mesh: every array goes straight into the sharding its
    Variable's logical names get from `rules`; None: the default device.
  allow_missing: target paths the source may lack (documented non-strict rules, e.g. new KV-compression layers);
    `init_missing(path, struct)` gives their values (required with allow_missing).
  Raises WeightLoadError (see `load_strict`).
  """
  if allow_missing is not None and init_missing is None:
    raise ValueError("load_into: allow_missing needs init_missing (the values of the targets left unfilled)")
  graphdef, state = nnx.split(abstract_module)
  targets = flat_targets(state)
  shardings = None
  if mesh is not None:
    shardings = {tuple(p): s for p, s in nnx.to_flat_state(state_shardings(state, mesh, rules))}
  flat = load_strict(targets, source, keymap, drop=drop, shardings=shardings, allow_missing=allow_missing or _never,
                     progress=progress)
  for path in [p for p in targets if p not in flat]:  # only reachable through allow_missing
    value = init_missing(path, targets[path])
    flat[path] = jax.device_put(value, shardings[path]) if shardings else value
  unflatten_into(state, flat)
  return nnx.merge(graphdef, state)
