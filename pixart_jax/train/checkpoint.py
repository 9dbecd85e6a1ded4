"""Checkpoints: an Orbax `CheckpointManager` with the items of a training run.

Items of step N (directory `<workdir>/checkpoints/<N>/`):
  state   the TrainState without the EMA (params, optimizer state, step, rng), array leaves only (StandardSave)
  ema     the EMA parameters (only when the run keeps an EMA)
  data    the data iterator's state, one JSON file per process (`process_<i>-of-<n>.json`)
  config  the experiment config as JSON (self-describing checkpoints)

Saves are asynchronous (device -> host copy, then the write runs in the background); `wait()` blocks until they
are on disk. Restores target abstract arrays that carry the CURRENT mesh's shardings, so a run can resume on a
different topology (e.g. saved on 8 devices with FSDP, restored on 4).

Verification: at save time a 64-bit digest of every array leaf (`tree_digests`: computed on device from the
arrays' bytes, independent of their sharding) is taken; once the step is complete on disk they are written
atomically to `<step>/checksums.json`. A restore recomputes them on the restored arrays and compares: a checkpoint
whose bytes changed (flipped bits, a partial copy that still parses) is treated like a truncated one. A step without
checksums (written by an older version, or killed between the write and the checksums) restores unverified, with a
warning.

A step directory that cannot be restored (truncated or corrupt, e.g. a half-written copy) is reported with a
warning naming the step, moved aside to `<step>.corrupt` (so the run can save that step again later), and the
previous step is tried. When no step restores, `CheckpointCorruptError` names the directory and every step's error.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

log = logging.getLogger(__name__)

ITEMS = ("state", "ema", "data", "config")
CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "pixart_jax.checkpoint_checksums/1"
_VERIFIED = ("state", "ema")


# -------------------------------------------------------------------------------------------------------------
# The data-iterator item: one JSON document per process.
# -------------------------------------------------------------------------------------------------------------
class ProcessJsonHandler(ocp.CheckpointHandler):
  """Writes a JSON value per process (`process_<i>-of-<n>.json`); bytes are stored base64-encoded.

  Restoring with a different process count is an error (iterator states are per host).
  """

  def save(self, directory: epath.Path, args: "ProcessJsonSave"):
    value = args.item
    if isinstance(value, (bytes, bytearray)):
      value = {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    (directory / _process_file()).write_text(json.dumps(value))

  def restore(self, directory: epath.Path, args: Optional["ProcessJsonRestore"] = None) -> Any:
    path = directory / _process_file()
    if not path.exists():
      have = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
      raise FileNotFoundError(f"no data-iterator state {path.name} in {directory} (found {have}); the checkpoint "
                              "was written by a different number of processes")
    value = json.loads(path.read_text())
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
      return base64.b64decode(value["__bytes__"])
    return value

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self):
    pass


def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  item: Any = None


# -------------------------------------------------------------------------------------------------------------
# Trees: nnx Variables are stripped for storage (plain array leaves) and restored into the abstract template.
# -------------------------------------------------------------------------------------------------------------
def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def to_pure(tree: Any) -> Any:
  """The tree with every nnx Variable replaced by its value (storage layout)."""
  return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def from_pure(template: Any, pure: Any) -> Any:
  """Puts stored values back into the Variables of `template` (same structure as `to_pure(template)`)."""
  return jax.tree.map(lambda t, v: t.replace(v) if _is_var(t) else v, template, pure, is_leaf=_is_var)


class CheckpointCorruptError(ValueError):
  """A checkpoint whose restored bytes do not match the checksums written when it was saved (or no step restores)."""


# -------------------------------------------------------------------------------------------------------------
# Checksums: per-leaf digests computed on device, so they do not depend on the sharding (or the mesh) of the arrays.
# -------------------------------------------------------------------------------------------------------------
def _fmix32(x):
  """murmur3's 32-bit finalizer (a bijection of uint32)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(x) -> jax.Array:
  """One uint32 per element holding the element's bytes (64-bit elements folded)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = np.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size == 8:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return w[..., 0] ^ _fmix32(w[..., 1] + jnp.uint32(0x9E3779B9))
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _leaf_digest(x) -> jax.Array:
  """(2,) uint32: two position-keyed sums of mixed words. Integer sums wrap and commute, so the digest is the same
  for any sharding; a change of any single element always changes it (fmix32 is a bijection)."""
  w = _words(x)
  idx = jnp.zeros(w.shape, jnp.uint32)
  for d in range(w.ndim):
    idx = idx * jnp.uint32(w.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d)
  a = jnp.sum(_fmix32(w ^ _fmix32(idx + jnp.uint32(0x2545F491))), dtype=jnp.uint32)
  b = jnp.sum(_fmix32(w + _fmix32(idx ^ jnp.uint32(0x68E31DA4)) * jnp.uint32(0x27D4EB2F)), dtype=jnp.uint32)
  return jnp.stack([a, b])


@jax.jit
def _digests(leaves: list) -> jax.Array:
  return jnp.stack([_leaf_digest(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def tree_digests(tree: Any) -> dict[str, str]:
  """{'params.stages.0.attn.q.kernel': '<16 hex digits>'} for every array leaf of `tree` (Variables allowed)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(to_pure(tree))
  named = [(".".join(_key_name(k) for k in path), leaf) for path, leaf in flat if hasattr(leaf, "dtype")]
  values = np.asarray(jax.device_get(_digests([jnp.asarray(leaf) for _, leaf in named])))
  return {name: f"{int(a):08x}{int(b):08x}" for (name, _), (a, b) in zip(named, values)}


def read_checksums(step_dir: epath.Path) -> dict[str, dict[str, str]] | None:
  """The `checksums.json` of a step ({item: {leaf: digest}}), None when it has none; CheckpointCorruptError when it
  is unreadable."""
  path = epath.Path(step_dir) / CHECKSUMS
  if not path.exists():
    return None
  try:
    doc = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointCorruptError(f"{path} is not valid JSON ({e})") from None
  items = doc.get("items") if isinstance(doc, dict) and doc.get("format") == CHECKSUMS_FORMAT else None
  if not isinstance(items, dict) or not all(isinstance(v, dict) for v in items.values()):
    raise CheckpointCorruptError(f"{path} is not a {CHECKSUMS_FORMAT} file")
  return items


def verify_item(step_dir: epath.Path, item: str, tree: Any, expected: dict[str, str] | None = None) -> bool:
  """Checks restored `tree` (item `item` of the step) against the step's checksums: True when verified, False when
  the step has none; raises CheckpointCorruptError naming the step, the item and the first differing arrays."""
  if expected is None:
    saved = read_checksums(step_dir)
    if saved is None:
      return False
    expected = saved.get(item)
    if expected is None:
      raise CheckpointCorruptError(f"{epath.Path(step_dir) / CHECKSUMS} has no checksums for item {item!r}")
  got = tree_digests(tree)
  bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
  if bad:
    raise CheckpointCorruptError(f"checkpoint {step_dir} ({item}): {len(bad)} of {len(got)} arrays differ from the "
                                 f"checksums written when it was saved (e.g. {bad[:3]}); the files are corrupt")
  return True


class EmaMissingError(ValueError):
  """The run keeps an EMA but the checkpoint has none."""


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays do not match the run's state (another model, optimizer, EMA setting)."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  """{'params.stages.0.attn.q.kernel': shape} for every array-like leaf (arrays, structs, Orbax metadata)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


@dataclasses.dataclass
class Restored:
  step: int
  state: Any          # state without the EMA (like the `state` template)
  ema: Any            # or None
  data: Any           # the data iterator state, or None when the checkpoint has none
  config: Any         # the saved config (dict)


class Checkpointer:
  """The run's checkpoints under `directory` (local path or gs://...).

  keep: number of checkpoints kept (oldest deleted first). All processes must call save/restore.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "ema": ocp.StandardCheckpointHandler(),
                "data": ProcessJsonHandler(), "config": ocp.JsonCheckpointHandler()}
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS, item_handlers=handlers)
    self._pending: dict[int, dict[str, dict[str, str]]] = {}  # step -> checksums, written once the step is on disk

  # -- saving ------------------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, *, ema: Any = None, data: Any = None, config: dict | None = None) -> bool:
    """Starts an (async) save of step `step`; False when that step already exists."""
    if step in self._mgr.all_steps():
      return False
    if self._pending:
      self.wait()  # the manager waits for the previous save anyway; then its checksums are written
    sums = {"state": tree_digests(state)}
    if ema is not None:
      sums["ema"] = tree_digests(ema)
    items = {"state": ocp.args.StandardSave(to_pure(state))}
    if ema is not None:
      items["ema"] = ocp.args.StandardSave(to_pure(ema))
    if data is not None:
      items["data"] = ProcessJsonSave(data)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    started = self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
    if started:
      self._pending[step] = sums
    return started

  def wait(self) -> None:
    """Blocks until every started save is on disk (with its checksums)."""
    self._mgr.wait_until_finished()
    self._write_checksums()

  def _write_checksums(self) -> None:
    """Writes `<step>/checksums.json` (atomically, process 0) for every finished step saved by this run."""
    done = set(self._mgr.all_steps())
    for step in sorted(self._pending):
      sums = self._pending.pop(step)
      if step not in done or jax.process_index() != 0:
        continue  # deleted already (keep), or another process writes it
      path = self._step_dir(step) / CHECKSUMS
      tmp = path.parent / f".{CHECKSUMS}.tmp"
      tmp.write_text(json.dumps({"format": CHECKSUMS_FORMAT, "step": step, "items": sums}))
      tmp.rename(path)

  def reached_preemption(self, step: int) -> bool:
    """JAX's multi-host preemption sync point (False when no preemption service is running)."""
    return self._mgr.reached_preemption(step)

  def close(self) -> None:
    try:
      if self._pending:
        self.wait()
    finally:
      self._mgr.close()

  # -- restoring ---------------------------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def restore(self, step: int, state_target: Any, ema_target: Any = None) -> Restored:
    """Restores step `step` into the abstract targets (ShapeDtypeStructs with shardings, Variables allowed)."""
    saved = set(self._saved_items(step))
    missing = [n for n in ("state", "config") if n not in saved]
    if missing:
      raise ValueError(f"checkpoint step {step} in {self.directory} lacks the item(s) {missing}")
    if ema_target is not None and "ema" not in saved:
      raise EmaMissingError(f"checkpoint step {step} has no EMA but this run keeps one (config.ema.rate); start a new "
                       "workdir or turn the EMA off")
    self._check_shapes(step, "state", state_target)
    if ema_target is not None:
      self._check_shapes(step, "ema", ema_target)
    items = {"state": ocp.args.StandardRestore(to_pure(state_target)), "config": ocp.args.JsonRestore()}
    if ema_target is not None:
      items["ema"] = ocp.args.StandardRestore(to_pure(ema_target))
    if "data" in saved:
      items["data"] = ProcessJsonRestore()
    out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    sums = read_checksums(self._step_dir(step))
    if sums is None:
      log.warning("checkpoint step %d in %s has no %s (written by an older version, or stopped before they were "
                  "written): restored without verification", step, self.directory, CHECKSUMS)
    else:
      for item in ("state", "ema") if ema_target is not None else ("state",):
        verify_item(self._step_dir(step), item, out[item], sums.get(item))
    return Restored(step=step, state=from_pure(state_target, out["state"]),
                    ema=from_pure(ema_target, out["ema"]) if ema_target is not None else None,
                    data=out["data"] if "data" in saved else None, config=out["config"])

  def resume(self, target: Any, iterator=None) -> tuple[Any, int] | None:
    """(state with EMA, step) from the newest restorable checkpoint into `target` (a TrainState-like abstract
    tree with shardings and an `ema` field), restoring `iterator`'s data state too; None when there is none."""
    restored = self.restore_latest(dataclasses.replace(target, ema=None), target.ema)
    if restored is None:
      return None
    if restored.data is not None and iterator is not None:
      iterator.set_state(restored.data)
    return dataclasses.replace(restored.state, ema=restored.ema), restored.step

  def restore_latest(self, state_target: Any, ema_target: Any = None) -> Restored | None:
    """The newest restorable checkpoint, or None when there is none.

    A step that cannot be read (truncated or corrupt files) is reported (warning naming the step and the error)
    and the previous step is tried; when an older step restores, the unreadable newer ones are moved aside
    (`<step>.corrupt`) so the run can write those steps again. When no step can be read, nothing is moved and
    the newest step's error is raised. A readable checkpoint that does not fit the run (other shapes, EMA
    missing) raises `CheckpointMismatchError` / `EmaMissingError` at once: that is a config error, not corruption.
    """
    steps = self.all_steps()
    failed: list[tuple[int, Exception]] = []
    for step in reversed(steps):
      try:
        restored = self.restore(step, state_target, ema_target)
      except (CheckpointMismatchError, EmaMissingError):
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read a step makes it unusable
        failed.append((step, e))
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one", step,
                    self.directory, type(e).__name__, str(e).strip().splitlines()[0][:300] if str(e) else "")
        continue
      for bad, _ in failed:
        self._quarantine(bad)
      if failed:
        log.warning("resuming from checkpoint step %d instead of the unusable newer step(s) %s", step,
                    [s for s, _ in failed])
      return restored
    if failed:
      step, error = failed[0]
      first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
      raise CheckpointCorruptError(
          f"no checkpoint in {self.directory} can be restored: all {len(steps)} (steps {steps}) are corrupt or "
          f"unreadable; the newest, step {step}, failed with {type(error).__name__}: {first}. Move the directory "
          "aside to start fresh, or restore it from a copy") from error
    return None

  def _check_shapes(self, step: int, item: str, target: Any) -> None:
    """Compares the saved array tree of `item` (metadata only) with the target: names missing, unexpected and
    mis-shaped leaves (a checkpoint of another model / optimizer is an error, not corruption)."""
    meta = self._mgr.item_metadata(step)[item]
    saved = _flat_shapes(getattr(meta, "tree", meta))
    want = _flat_shapes(to_pure(target))
    problems = [f"missing from the checkpoint: {k}" for k in want if k not in saved]
    problems += [f"not in this run: {k}" for k in saved if k not in want]
    problems += [f"{k}: saved {saved[k]}, this run {want[k]}" for k in want if k in saved and saved[k] != want[k]]
    if problems:
      raise CheckpointMismatchError(f"checkpoint step {step} ({item}) does not fit this run ({len(problems)} "
                                    "arrays differ), e.g.\n  " + "\n  ".join(problems[:6]))

  def _saved_items(self, step: int) -> list[str]:
    path = self._step_dir(step)
    return [p.name for p in path.iterdir() if p.is_dir()] if path.exists() else []

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self._mgr.directory) / str(step)

  def _quarantine(self, step: int) -> None:
    """Renames step `step` to `<step>.corrupt[.k]` (process 0) so the manager no longer sees it."""
    src = self._step_dir(step)
    if jax.process_index() == 0 and src.exists():
      dst = src.parent / f"{step}.corrupt"
      k = 1
      while dst.exists():
        dst, k = src.parent / f"{step}.corrupt.{k}", k + 1
      src.rename(dst)
      log.warning("moved the unusable checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"pixart_jax_checkpoint_quarantine_{step}")
    self._mgr.reload()
