"""Image + caption sources for `prepare`: random-access sequences of `RawExample`s.

Source specs accepted by `resolve_source` (and `prepare --source`):

  DIR                      a folder of images (.jpg .jpeg .png .webp .bmp .gif .tif .tiff, searched
                           recursively, sorted) with same-name captions: `cat.jpg` + `cat.txt`; an
                           optional long caption in `cat.long.txt`.
  FILE.jsonl / FILE.csv    a manifest with one row per image: `image_field` (a path, relative to the
                           manifest's folder), `caption_field`, optional `long_caption_field`; other
                           scalar columns are kept as record `meta`.
  tfds:NAME[:SPLIT]        a TFDS dataset prepared in array_record format, read through
                           `tfds.data_source` (needs `tensorflow_datasets`, not TensorFlow).
                           Split defaults to "train"; fields as above.
  a registered name        e.g. `demo:digits`: `register_source(name, factory)` with a zero-argument
                           factory returning a Source (see BUILTIN_SOURCE_MODULES).

A `Source` is any sequence (`len`, `[i]`) whose items are `RawExample`s; `[i]` may raise
`SkipExample` (e.g. a missing caption) -- `prepare` records it and moves on.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import os
from typing import Any, Callable, Protocol, Sequence

from pixart_jax.data.image_io import ImageLike, SkipExample, read_regular_file

MAX_CAPTION_BYTES = 2**20  # one caption file
MAX_MANIFEST_BYTES = 4 * 2**30  # a .jsonl / .csv manifest
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Registered-name prefix -> module whose import registers it (imported lazily on first use).
BUILTIN_SOURCE_MODULES = {"demo": "pixart_jax.data.demo"}


@dataclasses.dataclass
class RawExample:
  """One source item: an image (bytes, path, PIL image or H W [C] uint8 array) and its caption(s)."""

  name: str
  image: ImageLike
  caption: str
  long_caption: str | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  control_image: ImageLike | None = None  # ControlNet data (`prepare` with control="image")


class Source(Protocol):

  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> RawExample: ...


def _check_caption(text: Any, name: str, what: str = "caption") -> str:
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError:
      raise SkipExample("bad_caption", f"{what} is not UTF-8", name=name) from None
  if not isinstance(text, str):
    raise SkipExample("bad_caption", f"{what} is a {type(text).__name__}, not text", name=name)
  text = text.strip()
  if not text:
    raise SkipExample("bad_caption", f"{what} is empty", name=name)
  return text


def _scalar_meta(row: dict, skip: set) -> dict:
  return {k: v for k, v in row.items() if k not in skip and isinstance(v, (int, float, str, bool))}


class FolderSource:
  """Images in a folder tree with same-name `.txt` captions (and optional `.long.txt`)."""

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"image folder {self.root!r} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(self.root):
      dirnames.sort()
      files.extend(os.path.join(dirpath, f) for f in filenames
                   if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    self.files = sorted(os.path.relpath(f, self.root) for f in files)
    if not self.files:
      raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root!r}")

  def __len__(self) -> int:
    return len(self.files)

  def _read_text(self, path: str, name: str, what: str) -> str:
    try:
      data = read_regular_file(path, MAX_CAPTION_BYTES)
    except SkipExample as e:
      reason = "no_caption" if e.reason == "unreadable" else "bad_caption"
      raise SkipExample(reason, f"cannot read {what} file {os.path.basename(path)}: {e.detail}", name=name) from None
    return _check_caption(data, name, what)

  def __getitem__(self, i: int) -> RawExample:
    rel = self.files[i]
    path = os.path.join(self.root, rel)
    stem = os.path.splitext(path)[0]
    if not os.path.isfile(stem + ".txt"):
      raise SkipExample("no_caption", f"no caption file {os.path.basename(stem)}.txt", name=rel)
    caption = self._read_text(stem + ".txt", rel, "caption")
    long_caption = None
    if os.path.isfile(stem + ".long.txt"):
      long_caption = self._read_text(stem + ".long.txt", rel, "long caption")
    return RawExample(name=rel, image=path, caption=caption, long_caption=long_caption)


class ManifestSource:
  """Rows of a JSONL or CSV manifest: image path (relative to the manifest), caption[, long caption]."""

  def __init__(self, path: str | os.PathLike, *, image_field: str = "image",
               caption_field: str = "caption", long_caption_field: str | None = "long_caption",
               control_field: str | None = "control"):
    self.path = os.fspath(path)
    self.base = os.path.dirname(os.path.abspath(self.path))
    self.image_field, self.caption_field = image_field, caption_field
    self.long_caption_field = long_caption_field or None
    self.control_field = control_field or None  # optional column: a control image path (ControlNet data)
    try:
      text = read_regular_file(self.path, MAX_MANIFEST_BYTES).decode("utf-8")
    except SkipExample as e:
      raise ValueError(f"manifest {self.path}: {e.detail}") from None
    except UnicodeDecodeError as e:
      raise ValueError(f"manifest {self.path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if self.path.endswith(".csv"):
      try:
        self.rows = [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
      except csv.Error as e:
        raise ValueError(f"manifest {self.path} is not valid CSV ({e})") from None
    else:
      self.rows = []
      for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}:{n}: not valid JSON ({e.msg})") from None
          if not isinstance(row, dict):
            raise ValueError(f"{self.path}:{n}: each line must be a JSON object")
          self.rows.append(row)
    if not self.rows:
      raise ValueError(f"manifest {self.path!r} has no rows")
    missing = [f for f in (image_field, caption_field) if f not in self.rows[0]]
    if missing:
      raise ValueError(f"manifest {self.path!r} has no column(s) {missing}; its columns are "
                       f"{sorted(self.rows[0])} (set --image_field / --caption_field)")

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> RawExample:
    row = self.rows[i]
    rel = row.get(self.image_field)
    if not isinstance(rel, str) or not rel:
      raise SkipExample("source_error", f"no image path in {self.image_field!r}", name=f"row {i}")
    caption = _check_caption(row.get(self.caption_field), rel)
    long_caption = None
    if self.long_caption_field and row.get(self.long_caption_field) not in (None, ""):
      long_caption = _check_caption(row[self.long_caption_field], rel, "long caption")
    fields = {self.image_field, self.caption_field, self.long_caption_field, self.control_field}
    control = row.get(self.control_field) if self.control_field else None
    control = os.path.join(self.base, control) if isinstance(control, str) and control else None
    return RawExample(name=rel, image=os.path.join(self.base, rel), caption=caption,
                      long_caption=long_caption, meta=_scalar_meta(row, fields), control_image=control)


class TfdsSource:
  """A TFDS dataset in array_record format through `tfds.data_source` (no TensorFlow needed)."""

  def __init__(self, name: str, split: str = "train", *, image_field: str = "image",
               caption_field: str = "caption", long_caption_field: str | None = None,
               data_dir: str | None = None):
    try:
      import tensorflow_datasets as tfds  # optional dependency
    except ImportError:
      raise ImportError("a tfds: source needs tensorflow-datasets: `pip install -e .[tfds]` (TensorFlow is not "
                        "needed: the dataset must be prepared in array_record format)") from None
    self.name, self.split = name, split
    try:
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir)
    except ValueError as e:  # DatasetNotFoundError, an unknown split: the first line names it (a list follows)
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      where = f" in --tfds_data_dir {data_dir}" if data_dir else " (default TFDS data_dir; see --tfds_data_dir)"
      raise ValueError(f"source tfds:{name}:{split}{where}: {first}") from None
    self.image_field, self.caption_field = image_field, caption_field
    self.long_caption_field = long_caption_field or None
    features = sorted(self.ds.dataset_info.features.keys())
    if self.long_caption_field == "long_caption" and "long_caption" not in features:
      self.long_caption_field = None  # the default name, absent: no long captions
    for flag, field in (("--image_field", image_field), ("--caption_field", caption_field),
                        ("--long_caption_field", self.long_caption_field)):
      if field is not None and field not in features:
        raise ValueError(f"source tfds:{name}:{split} has no feature {field!r} ({flag}); its features: {features}")

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> RawExample:
    label = f"{self.name}/{self.split}[{i}]"
    try:
      ex = self.ds[i]
    except Exception as e:  # noqa: BLE001 -- a bad stored example is a skip, not a crash
      raise SkipExample("source_error", f"{type(e).__name__}: {e}", name=label) from None
    if self.image_field not in ex or self.caption_field not in ex:
      raise SkipExample("source_error", f"no field {self.image_field!r} / "
                        f"{self.caption_field!r}; fields: {sorted(ex)}", name=label)
    caption = _check_caption(ex[self.caption_field], label)
    long_caption = None
    if self.long_caption_field and ex.get(self.long_caption_field) is not None:
      long_caption = _check_caption(ex[self.long_caption_field], label, "long caption")
    meta = {k: _tfds_scalar(v) for k, v in ex.items()
            if k not in (self.image_field, self.caption_field, self.long_caption_field)}
    return RawExample(name=label, image=ex[self.image_field], caption=caption,
                      long_caption=long_caption, meta=_scalar_meta(meta, set()))


def _tfds_scalar(v: Any) -> Any:
  """A TFDS feature value as record meta: 0-d arrays become Python scalars, Text features (bytes) become str when
  they are UTF-8; anything else is returned as is (and dropped by `_scalar_meta` unless it is a scalar)."""
  if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
    v = v.item()
  if isinstance(v, bytes):
    try:
      return v.decode("utf-8")
    except UnicodeDecodeError:
      return v
  return v


_REGISTRY: dict[str, Callable[[], Source]] = {}


def register_source(name: str, factory: Callable[[], Source]) -> None:
  """Registers a built-in source under `name` (e.g. "demo:digits"); factory() -> Source."""
  if not isinstance(name, str) or not name or os.sep in name:
    raise ValueError(f"source name must be a non-empty string without {os.sep!r}, got {name!r}")
  _REGISTRY[name] = factory


def registered_sources() -> list[str]:
  return sorted(_REGISTRY)


class Subset:
  """Items [start, stop) of a source (for tests and partial runs)."""

  def __init__(self, source: Source, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> RawExample:
    return self.source[self.indices[i]]


def resolve_source(spec: str, *, image_field: str = "image", caption_field: str = "caption",
                   long_caption_field: str | None = "long_caption",
                   tfds_data_dir: str | None = None) -> Source:
  """A source from its spec string (module doc). Raises ValueError/FileNotFoundError naming it."""
  if not isinstance(spec, str) or not spec:
    raise ValueError("source spec must be a non-empty string")
  if spec.startswith("tfds:"):
    parts = spec[len("tfds:"):].split(":")
    if not parts[0] or len(parts) > 2:
      raise ValueError(f"tfds source must be tfds:NAME[:SPLIT], got {spec!r}")
    return TfdsSource(parts[0], parts[1] if len(parts) == 2 else "train", image_field=image_field,
                      caption_field=caption_field, long_caption_field=long_caption_field,
                      data_dir=tfds_data_dir)
  if spec not in _REGISTRY and ":" in spec and not os.path.exists(spec):
    module = BUILTIN_SOURCE_MODULES.get(spec.split(":", 1)[0])
    if module is not None:
      try:
        importlib.import_module(module)  # registers its sources
      except ModuleNotFoundError as e:
        if e.name != module:
          raise
  if spec in _REGISTRY:
    return _REGISTRY[spec]()
  if os.path.isdir(spec):
    return FolderSource(spec)
  if os.path.isfile(spec):
    if spec.endswith((".jsonl", ".json", ".csv")):
      return ManifestSource(spec, image_field=image_field, caption_field=caption_field,
                            long_caption_field=long_caption_field)
    raise ValueError(f"source file {spec!r} is not a .jsonl or .csv manifest")
  raise FileNotFoundError(
      f"source {spec!r} is not a folder, a .jsonl/.csv manifest, a tfds:NAME[:SPLIT] or a registered "
      f"source (registered: {registered_sources() or 'none'})")
