"""Output folders of `python -m pixart_jax.convert`: what may be written (and replaced) where.

A folder the tool writes gets a marker file, `.pixart_convert.json`, before anything else. Rules:
  * a new or empty folder is taken (marked);
  * a folder holding our marker (an earlier conversion) is replaced only with `overwrite=True` (`--overwrite`);
  * with `resume=True` a folder holding our marker of the same kind (`what`) is kept as it is: a rerun of a
    resumable tool (`evaluate`) continues in it, writing only what is missing;
  * any other existing folder (files this tool did not write, e.g. an unrelated `params/`) is refused, even with
    `overwrite`: nothing the tool did not write is ever deleted or overwritten;
  * an output overlapping an input (`--base`, `--source`) is refused before anything is touched.
Errors are ValueError / FileExistsError naming the folder, what is there and what is valid.
"""
from __future__ import annotations

import json
import os
import pathlib

__all__ = ["MARKER", "claim_output", "check_disjoint"]

MARKER = ".pixart_convert.json"
MARKER_FORMAT = "pixart_jax.convert_output/1"


def _real(p) -> pathlib.Path:
  return pathlib.Path(os.path.realpath(os.fspath(p)))


def check_disjoint(out, inputs: dict[str, object]) -> None:
  """Refuses `out` when it equals, lies inside or contains one of the local `inputs` ({flag name: path}); inputs
  that are not local paths (Hub ids) are skipped."""
  o = _real(out)
  for name, path in inputs.items():
    if path is None or not os.path.exists(os.fspath(path)):
      continue
    i = _real(path)
    if o == i or i in o.parents or o in i.parents:
      raise ValueError(f"--out {o} overlaps {name} {i}: the output must be a separate folder (writing it would "
                       f"replace or delete what is read)")


def _is_ours(out: pathlib.Path) -> bool:
  marker = out / MARKER
  try:
    doc = json.loads(marker.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT


def _kind(out: pathlib.Path) -> str | None:
  try:
    return json.loads((out / MARKER).read_text()).get("what")
  except (OSError, ValueError, AttributeError):
    return None


def claim_output(out, *, what: str, overwrite: bool = False, write_marker: bool = True,
                 resume: bool = False) -> pathlib.Path:
  """Makes `out` (an output folder of kind `what`) ours before anything is written: see the module doc.
  Returns its absolute path. `write_marker=False` checks only (other processes of a multi-host save).
  `resume=True`: an earlier output of ours of the same kind is returned untouched (continued, not replaced)."""
  out = pathlib.Path(out).absolute()
  if os.path.lexists(out) and not out.is_dir():
    raise FileExistsError(f"--out {out} exists and is not a folder")
  entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
  if entries:
    if not _is_ours(out):
      raise FileExistsError(
          f"--out {out} already holds {len(entries)} entries this tool did not write (e.g. {entries[:3]}; no "
          f"{MARKER}); they are never replaced or deleted: choose a new or empty folder")
    if resume and not overwrite:
      if _kind(out) != what:
        raise FileExistsError(f"--out {out} holds an output of another kind ({_kind(out)!r}, not {what!r}); "
                              "choose a new or empty folder")
      return out
    if not overwrite:
      raise FileExistsError(f"--out {out} holds an earlier conversion; pass --overwrite (overwrite=True) to replace "
                            "it, or choose a new folder")
  if write_marker:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"format": MARKER_FORMAT, "what": what}))
    os.replace(tmp, out / MARKER)
  return out
