"""Output folders: what a tool may write (and replace) where. The one rule for every tool that writes a folder
(`convert`, `prepare`, `sample`, `evaluate`, `sweep`, the demo).

A tool marks a folder as its own before it writes anything else there: `.pixart_output.json`, holding the tool's
name. Then:
  * a new or empty folder is taken (marked);
  * a folder marked by the same tool is taken again when the tool resumes into it (`resume=True`: prepare, sample,
    evaluate, sweep, the demo) or when the user asks to replace it (`overwrite=True`, `--overwrite`); otherwise it
    is refused (convert: an earlier conversion is never replaced silently);
  * a folder marked by another tool, and any other non-empty folder, is refused, even with `overwrite`: nothing a
    tool did not write is ever deleted or overwritten. A tool may recognise an unmarked folder as an older output
    of its own (`adopt`, e.g. a dataset written before markers existed);
  * an output overlapping one of the tool's local inputs (equal to it, inside it or around it) is refused before
    anything is touched.
Errors are ValueError / FileExistsError naming the flag, the folder, what is there and what is valid. Markers of
the previous layout (`.pixart_convert.json`, `.pixart_dataset.json`) are still recognised.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Callable, Collection, Mapping

from etils import epath

from pixart_jax.convert.hub import read_json

__all__ = ["MARKER", "claim_output", "check_disjoint", "owner"]

MARKER = ".pixart_output.json"
FORMAT = "pixart_jax.output/1"
# earlier marker file -> (its format, the tool that wrote it)
_LEGACY = {".pixart_convert.json": ("pixart_jax.convert_output/1", "convert"),
           ".pixart_dataset.json": ("pixart_jax.prepared_dataset/1", "prepare")}


def _real(p) -> pathlib.Path:
  return pathlib.Path(os.path.realpath(os.fspath(p)))


def check_disjoint(out, inputs: Mapping[str, object], *, flag: str = "--out",
                   may_lie_inside: Collection[str] = ()) -> None:
  """Refuses `out` when it equals, lies inside or contains one of the local `inputs` ({flag name: path}); inputs
  that are not local paths (Hub ids, None) are skipped. For the names in `may_lie_inside` (e.g. the folder of a
  manifest whose images may be anywhere) only equality and containment are refused."""
  if "://" in str(out):
    return  # a remote output cannot overlap a local input; remote inputs are not resolved
  o = _real(out)
  for name, path in inputs.items():
    if path is None or not os.path.exists(os.fspath(path)):
      continue
    i = _real(path)
    if o == i or o in i.parents or (i in o.parents and name not in may_lie_inside):
      raise ValueError(f"{flag} {o} overlaps {name} {i}: the output must be a separate folder (writing it would "
                       f"replace or delete what is read)")


def _as_path(out) -> pathlib.Path | epath.Path:
  """An absolute local path, or an `etils.epath.Path` for a remote folder (gs://...)."""
  text = os.fspath(out) if not isinstance(out, epath.Path) else str(out)
  return epath.Path(text) if "://" in text else pathlib.Path(text).absolute()


def _lexists(path) -> bool:
  return os.path.lexists(path) if isinstance(path, pathlib.Path) else path.exists()


def _read_marker(path, what: str) -> dict:
  if isinstance(path, pathlib.Path):
    return read_json(path, what)
  try:
    doc = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not a valid {what}: not JSON ({e})") from None
  if not isinstance(doc, dict):
    raise ValueError(f"{path} is not a valid {what}: a JSON {type(doc).__name__}, expected a JSON object")
  return doc


def owner(out) -> str | None:
  """The tool that marked folder `out`, or None when it holds no marker. A marker file that is not one raises
  ValueError naming it."""
  out = _as_path(out)
  for name, (fmt, tool) in ((MARKER, (FORMAT, None)), *_LEGACY.items()):
    path = out / name
    if not _lexists(path):
      continue
    doc = _read_marker(path, f"{name} output marker")
    if doc.get("format") != fmt or (tool is None and not isinstance(doc.get("tool"), str)):
      raise ValueError(f"{path} is not a pixart_jax output marker (format {doc.get('format')!r}, expected {fmt!r}); "
                       f"refusing to write into {out}")
    return tool or doc["tool"]
  return None


def _marker_name(entry: str) -> bool:
  return any(entry.startswith(m) for m in (MARKER, *_LEGACY))  # markers and their temporary names


def claim_output(out, *, tool: str, overwrite: bool = False, resume: bool = False,
                 inputs: Mapping[str, object] | None = None, may_lie_inside: Collection[str] = (),
                 adopt: Callable[[pathlib.Path], bool] | None = None, flag: str = "--out",
                 write_marker: bool = True) -> pathlib.Path | epath.Path:
  """Makes folder `out` the output of `tool` before anything is written there (module doc); returns its absolute
  path. `inputs` ({flag: path}) must not overlap it (`check_disjoint`). `write_marker=False` only checks (e.g.
  every process but the first of a multi-host run, or a check before loading anything). Every process may call
  it: the marker is written atomically under a per-process temporary name. Remote folders (gs://) are handled
  through `etils.epath`."""
  out = _as_path(out)
  if inputs:
    check_disjoint(out, inputs, flag=flag, may_lie_inside=may_lie_inside)
  if _lexists(out) and not out.is_dir():
    raise FileExistsError(f"{flag} {out} exists and is not a folder")
  entries = sorted(e.name for e in out.iterdir()) if out.is_dir() else []
  if entries:
    by = owner(out)
    foreign = [e for e in entries if not _marker_name(e)]
    if by is None and foreign and not (adopt is not None and adopt(out)):
      raise FileExistsError(
          f"{flag} {out} already holds {len(foreign)} entries {tool} did not write (e.g. {foreign[:3]}; no {MARKER}); "
          "they are never replaced or deleted: choose a new or empty folder")
    if by is not None and by != tool:
      raise FileExistsError(f"{flag} {out} holds the output of `{by}`, not of `{tool}`; it is never replaced by "
                            f"{tool}: choose a new or empty folder")
    if by == tool and not (resume or overwrite):
      raise FileExistsError(f"{flag} {out} holds an earlier {tool} output; pass --overwrite (overwrite=True) to "
                            "replace it, or choose a new folder")
  if write_marker and not (out / MARKER).exists():
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{MARKER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "tool": tool}))
    tmp.replace(out / MARKER)
  return out
