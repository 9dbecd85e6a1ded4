"""Local path or Hugging Face Hub id -> local path.

    resolve_local("/data/PixArt-Sigma-XL-2-1024-MS.pth")                        # an existing file or dir
    resolve_local("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/transformer")         # repo + subfolder
    resolve_local("PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers@main/vae")    # with a revision
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

__all__ = ["resolve_local", "parse_hub_id", "component_dir", "read_config", "read_json"]

_PART = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?"  # huggingface_hub's repo-id characters
_HUB_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[\w.-]+))?(?:/(?P<sub>[\w.-]+(?:/[\w.-]+)*))?")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".json", ".npz")


def parse_hub_id(src: str) -> tuple[str, str | None, str | None] | None:
  """'org/name[@revision][/sub/folder]' -> (repo_id, revision, subfolder), or None if it is not one."""
  if src.startswith(("/", ".", "~")) or "\\" in src or "--" in src or ".." in src or src.endswith(_FILE_SUFFIXES):
    return None
  m = _HUB_ID.fullmatch(src)
  if m is None or len(m["repo"]) > 96:
    return None
  return m["repo"], m["rev"], m["sub"]


def resolve_local(src: str | os.PathLike, *, allow_patterns: Sequence[str] | None = None) -> pathlib.Path:
  """An existing local file or directory -> its Path. Otherwise a Hub id `org/name[@revision][/subfolder]`
  -> `huggingface_hub.snapshot_download` (from the local cache when offline) and the (sub)folder's Path.

  `allow_patterns` (relative to the subfolder when one is given) limit the download; with a subfolder and
  no patterns only that subfolder is fetched. Raises FileNotFoundError naming `src` when it is neither an
  existing local path nor a reachable Hub id.
  """
  local = pathlib.Path(src).expanduser()
  if local.exists():
    return local
  text = os.fspath(src)
  parsed = parse_hub_id(text)
  if parsed is None:
    raise FileNotFoundError(f"{text!r} is neither an existing local path nor a Hub id of the form "
                            "'org/name[@revision][/subfolder]'")
  repo_id, revision, sub = parsed
  patterns = list(allow_patterns) if allow_patterns is not None else None
  if sub:
    patterns = [f"{sub}/{p}" for p in patterns] if patterns is not None else [f"{sub}/*"]
  import huggingface_hub  # looked up at call time so tests can monkeypatch snapshot_download

  try:
    root = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001 - offline, missing repo/revision, network, auth: one clear error
    raise FileNotFoundError(
        f"{text!r} is neither an existing local path nor a reachable Hub id (repo {repo_id!r}"
        f"{f', revision {revision!r}' if revision else ''}): {type(e).__name__}: {e}") from e
  path = pathlib.Path(root) / sub if sub else pathlib.Path(root)
  if not path.exists():
    raise FileNotFoundError(f"{text!r}: Hub repo {repo_id!r} has no folder {sub!r} (downloaded to {root})")
  return path


def component_dir(path: str | os.PathLike, component: str, what: str) -> pathlib.Path:
  """The directory holding a pipeline component's config.json: `path/<component>` for a pipeline dir, else `path`
  itself (a component dir). Raises FileNotFoundError naming `path` and what it lacks (`what`: "T5", "VAE", ...)."""
  path = pathlib.Path(path)
  if (path / component / "config.json").is_file():
    return path / component
  if (path / "config.json").is_file():
    return path
  raise FileNotFoundError(f"{path} holds neither a {what} config.json nor a {component}/ subfolder with one")


MAX_JSON_BYTES = 256 * 2**20  # a config / index / marker file


def read_json(path: str | os.PathLike, what: str, *, kind: type = dict):
  """The JSON document of a small file (a config, an index, a marker) that must be a `kind` (an object by default).
  Raises ValueError naming the file and `what` it should be when it is not UTF-8 JSON of that kind, and OSError
  (naming the file) when it is missing, not a regular file, or larger than MAX_JSON_BYTES."""
  path = pathlib.Path(path)
  if not path.is_file():  # follows symlinks; a FIFO or device is not read
    raise FileNotFoundError(f"{path}: no {what} file there" if not path.exists() else
                            f"{path} is not a regular file; expected the {what} (JSON)")
  size = path.stat().st_size
  if size > MAX_JSON_BYTES:
    raise ValueError(f"{path} holds {size} bytes; a {what} (JSON) is at most {MAX_JSON_BYTES}")
  try:
    doc = json.loads(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not a valid {what}: not UTF-8 text (byte {e.start})") from None
  except ValueError as e:
    raise ValueError(f"{path} is not a valid {what}: not JSON ({e})") from None
  if not isinstance(doc, kind):
    raise ValueError(f"{path} is not a valid {what}: a JSON {type(doc).__name__}, expected a JSON "
                     f"{'object' if kind is dict else kind.__name__}")
  return doc


def read_config(model_dir: str | os.PathLike, parse: Callable[[dict], T], *, name: str = "config.json") -> T:
  """`parse` of `model_dir/config.json` (a transformers / diffusers config, e.g. `T5Config.from_hf_config`); a
  ValueError / TypeError / KeyError / AttributeError it raises (a wrong-typed field) is re-raised as one ValueError naming the file."""
  path = pathlib.Path(model_dir) / name
  raw = read_json(path, "model config")
  try:
    return parse(raw)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ValueError(f"{path}: {e}") from None
