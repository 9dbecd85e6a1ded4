"""Hostile files and data loss: a table of bad weight files, images, dataset and output folders, each refused with
one clear error naming the file, the value and what is valid, and nothing the tools did not write deleted or
overwritten. Rows: (id, setup(tmp) -> (call, kept), expected exception, message regex); `kept` maps paths to the
bytes they must still hold afterwards (None: the path must still exist, e.g. a folder)."""
import collections
import json
import os
import pickle
import signal
import struct
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from pixart_jax.convert import hub, orbax_io
from pixart_jax.convert.dit import export_transformer
from pixart_jax.convert.pipeline_export import export_pipeline
from pixart_jax.convert.sources import open_tensors
from pixart_jax.convert.strict import Put, WeightLoadError, load_strict
from pixart_jax.convert.torch_pickle import TorchFormatError
from pixart_jax.data import image_io, prepare_lib, records, sources
from pixart_jax.data.image_io import SkipExample
from pixart_jax.outputs import MARKER, claim_output


# --------------------------------------------------------------------------------------------------- builders
def _safetensors(path, header, data=b""):
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
  return path


def _st_case(header, data=b""):
  def setup(tmp):
    p = _safetensors(tmp / "w.safetensors", header, data)
    return (lambda: open_tensors(p)), {}
  return setup


def _f32(n):
  return {"dtype": "F32", "shape": [n], "data_offsets": None}


def _load_cast(code, np_dtype):
  """A safetensors tensor of dtype `code` loaded into a float32 target."""
  def setup(tmp):
    arr = np.arange(4).astype(np_dtype)
    p = _safetensors(tmp / "w.safetensors", {"w": {"dtype": code, "shape": [4], "data_offsets": [0, arr.nbytes]}},
                     arr.tobytes())

    def call():
      with open_tensors(p) as src:
        load_strict({("w",): jax.ShapeDtypeStruct((4,), np.float32)}, src, lambda k: [Put(("w",))])
    return call, {}
  return setup


class _Reduce:
  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _zip_pth(path, obj, storages: dict[str, bytes], persistent=None):
  import io

  class P(pickle.Pickler):
    def persistent_id(self, o):
      return persistent(o) if persistent else None

  buf = io.BytesIO()
  P(buf, protocol=2).dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    for k, v in storages.items():
      z.writestr(f"archive/data/{k}", v)
  return path


def _pth_stride0(tmp):
  import torch
  p = tmp / "bomb.pth"
  torch.save({"w": torch.zeros(1).expand(10**6, 10**6)}, p)  # 4 TB when materialized, 4 bytes stored
  return (lambda: open_tensors(p).get("w")), {}


def _pth_bytearray(tmp):
  p = _zip_pth(tmp / "bytearray.pth", {"w": _Reduce(bytearray, (10**13,))}, {})
  return (lambda: open_tensors(p)), {}


def _pth_huge_storage(tmp):
  import torch
  sentinel = object()
  rebuild = _Reduce(torch._utils._rebuild_tensor_v2, (sentinel, 0, (10,), (1,), False, collections.OrderedDict()))
  p = _zip_pth(tmp / "huge.pth", {"w": rebuild}, {"0": b"\0" * 40},
               persistent=lambda o: ("storage", torch.FloatStorage, "0", "cpu", 10**12) if o is sentinel else None)
  return (lambda: open_tensors(p)), {}


def _index_case(weight_map):
  def setup(tmp):
    arr = np.zeros(2, np.float32)
    _safetensors(tmp / "a.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, arr.tobytes())
    (tmp / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return (lambda: open_tensors(tmp / "m.safetensors.index.json")), {}
  return setup


def _png(path, hw=(64, 64)):
  from PIL import Image
  Image.fromarray(np.random.default_rng(0).integers(0, 256, hw + (3,), dtype=np.uint8)).save(path)
  return path


def _decode_fifo(tmp):
  os.mkfifo(tmp / "x.png")  # opening it for reading blocks until a writer appears: must not be read at all
  return (lambda: image_io.decode_image(str(tmp / "x.png"))), {}


def _decode_dev_zero(tmp):
  os.symlink("/dev/zero", tmp / "zero.png")
  return (lambda: image_io.decode_image(str(tmp / "zero.png"))), {}


def _decode_too_big(tmp):
  p = _png(tmp / "big.png")
  return (lambda: image_io.decode_image(str(p), max_bytes=100)), {}


def _foreign_folder(tmp):
  """An unrelated folder holding files named like prepare's outputs."""
  out = tmp / "mine"
  out.mkdir()
  files = {out / "manifest.json": b'{"mine": 1}', out / "data-00000.json": b"precious",
           out / "data-00000.array_record": b"precious too"}
  for p, b in files.items():
    p.write_bytes(b)
  return out, files


def _prepare_foreign(overwrite):
  def setup(tmp):
    out, kept = _foreign_folder(tmp)
    return (lambda: prepare_lib.claim_output_dir(out, overwrite=overwrite)), kept
  return setup


def _other_tools_output(tmp):
  """A dataset folder (prepare's marker) given to convert --overwrite."""
  (tmp / "ds").mkdir()
  (tmp / "ds" / MARKER).write_text(json.dumps({"format": "pixart_jax.output/1", "tool": "prepare"}))
  (tmp / "ds" / "manifest.json").write_text("{}")
  return (lambda: orbax_io.save_transformer_orbax(None, tmp / "ds", overwrite=True)), {
      tmp / "ds" / "manifest.json": b"{}"}


def _marker_garbage(tmp):
  (tmp / "o").mkdir()
  (tmp / "o" / MARKER).write_text(json.dumps({"format": "something else"}))
  (tmp / "o" / "x.txt").write_text("x")
  return (lambda: claim_output(tmp / "o", tool="sample", resume=True)), {tmp / "o" / "x.txt": b"x"}


def _prepare_inside_input(tmp):
  (tmp / "images").mkdir()
  kept = {_png(tmp / "images" / "a.png"): None}
  src = sources.FolderSource(tmp / "images")
  return (lambda: prepare_lib.claim_output_dir(tmp / "images" / "out", src)), kept


def _prepare_around_input(tmp):
  (tmp / "images").mkdir()
  _png(tmp / "images" / "a.png")
  src = sources.FolderSource(tmp / "images")
  return (lambda: prepare_lib.claim_output_dir(tmp, src, overwrite=True)), {}


def _prepare_manifest_folder(tmp):
  (tmp / "manifest.json").write_text(json.dumps({"image": "a.png", "caption": "c"}) + "\n")
  src = sources.ManifestSource(tmp / "manifest.json")
  kept = {tmp / "manifest.json": (tmp / "manifest.json").read_bytes()}
  return (lambda: prepare_lib.claim_output_dir(tmp, src, overwrite=True)), kept


def _prepare_out_is_file(tmp):
  (tmp / "f").write_bytes(b"x")
  return (lambda: prepare_lib.claim_output_dir(tmp / "f")), {tmp / "f": b"x"}


def _manifest_not_utf8(tmp):
  (tmp / "m.jsonl").write_bytes(b'{"image": "a.png", "caption": "\xff\xfe"}\n')
  return (lambda: sources.ManifestSource(tmp / "m.jsonl")), {}


def _manifest_fifo(tmp):
  os.mkfifo(tmp / "m.jsonl")
  return (lambda: sources.ManifestSource(tmp / "m.jsonl")), {}


def _shard_index_garbage(tmp):
  (tmp / "data-00000.json").write_bytes(b"\x00garbage")
  return (lambda: records.read_shard_index(tmp, 0)), {}


def _shard_index_wrong_types(tmp):
  (tmp / "data-00000.json").write_text(json.dumps({"format": records.SHARD_INDEX_FORMAT, "records": "2",
                                                   "buckets": "ab", "names": [], "skipped": []}))
  return (lambda: records.read_shard_index(tmp, 0)), {}


def _base_pipeline(root):
  for c in ("text_encoder", "tokenizer", "vae", "scheduler"):
    (root / c).mkdir(parents=True)
    (root / c / "config.json").write_text(json.dumps({"component": c}))
  (root / "model_index.json").write_text("{}")
  return {root / c / "config.json": json.dumps({"component": c}).encode()
          for c in ("text_encoder", "tokenizer", "vae", "scheduler")}


def _export_base_is_out(tmp):
  kept = _base_pipeline(tmp / "base")
  return (lambda: export_pipeline(None, tmp / "base", tmp / "base", overwrite=True)), kept


def _export_out_inside_base(tmp):
  kept = _base_pipeline(tmp / "base")
  return (lambda: export_pipeline(None, tmp / "base", tmp / "base" / "export")), kept


def _export_base_inside_out(tmp):
  kept = _base_pipeline(tmp / "work" / "base")
  return (lambda: export_pipeline(None, tmp / "work" / "base", tmp / "work", overwrite=True)), kept


def _orbax_foreign_params(tmp):
  (tmp / "out" / "params").mkdir(parents=True)
  (tmp / "out" / "params" / "weights.bin").write_bytes(b"user data")
  return (lambda: orbax_io.save_transformer_orbax(None, tmp / "out")), {tmp / "out" / "params" / "weights.bin":
                                                                         b"user data"}


def _orbax_foreign_params_overwrite(tmp):
  call, kept = _orbax_foreign_params(tmp)
  return (lambda: orbax_io.save_transformer_orbax(None, tmp / "out", overwrite=True)), kept


def _transformer_foreign(tmp):
  (tmp / "t").mkdir()
  (tmp / "t" / "diffusion_pytorch_model.safetensors").write_bytes(b"theirs")
  return (lambda: export_transformer(None, tmp / "t", overwrite=True)), {
      tmp / "t" / "diffusion_pytorch_model.safetensors": b"theirs"}


def _pipeline_foreign_out(tmp):
  _base_pipeline(tmp / "base")
  (tmp / "out" / "vae").mkdir(parents=True)
  (tmp / "out" / "vae" / "mine.txt").write_bytes(b"mine")
  return (lambda: export_pipeline(None, tmp / "base", tmp / "out", overwrite=True)), {
      tmp / "out" / "vae" / "mine.txt": b"mine"}


def _ours_without_overwrite(tmp):
  (tmp / "o").mkdir()
  marker = json.dumps({"format": "pixart_jax.convert_output/1", "what": "orbax"})  # the earlier marker layout
  (tmp / "o" / ".pixart_convert.json").write_text(marker)
  (tmp / "o" / "pixart_config.json").write_text("{}")
  return (lambda: orbax_io.save_transformer_orbax(None, tmp / "o")), {tmp / "o" / "pixart_config.json": b"{}"}


def _config_case(text: bytes, reader):
  def setup(tmp):
    (tmp / "config.json").write_bytes(text)
    return (lambda: reader(tmp)), {}
  return setup


def _hub_config(tmp):
  return hub.read_config(tmp, lambda d: d)


def _orbax_config(tmp):
  (tmp / "pixart_config.json").write_bytes((tmp / "config.json").read_bytes())
  return orbax_io.read_config(tmp)


# --------------------------------------------------------------------------------------------------- the table
_HDR = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
ROWS = [
    # safetensors headers
    ("st-header-array", _st_case([1, 2]), ValueError, r"w\.safetensors is not a safetensors file: the header is a JSON list"),
    ("st-entry-not-object", _st_case({"w": [1]}), ValueError, r"header entry 'w' is \[1\]; expected an object"),
    ("st-entry-missing-field", _st_case({"w": {"dtype": "F32"}}), ValueError, r"expected an object with dtype"),
    ("st-negative-shape", _st_case({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
     ValueError, r"tensor 'w' has shape \[-2\]; expected a list of non-negative ints"),
    ("st-shape-not-list", _st_case({"w": {"dtype": "F32", "shape": "22", "data_offsets": [0, 8]}}, b"\0" * 8),
     ValueError, r"has shape '22'; expected a list"),
    ("st-float-shape", _st_case({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8),
     ValueError, r"has shape \[2\.0\]"),
    ("st-offsets-reversed", _st_case({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
     ValueError, r"data_offsets \[8, 0\]; expected \[begin, end\] with 0 <= begin <= end"),
    ("st-offsets-not-ints", _st_case({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, b"\0" * 8),
     ValueError, r"data_offsets \['0', '8'\]"),
    ("st-overlap", _st_case({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     ValueError, r"tensors 'a' and 'b' overlap \(bytes \[4, 8\)"),
    ("st-same-bytes", _st_case({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
     ValueError, r"overlap"),
    ("st-gap", _st_case({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
     ValueError, r"bytes \[0, 4\) of the data section belong to no tensor"),
    ("st-trailing-data", _st_case(_HDR, b"\0" * 12), ValueError, r"cover 8 bytes of data but the file holds 12"),
    ("st-size-mismatch", _st_case({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     ValueError, r"holding 8 bytes; its shape and dtype need 12"),
    ("st-shape-overflow", _st_case({"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}),
     ValueError, r"holding 0 bytes; its shape and dtype need 73786976294838206464"),
    ("st-unknown-dtype", _st_case({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
     ValueError, r"unsupported safetensors dtype 'F128'"),
    ("st-metadata-not-object", _st_case({"__metadata__": [1], **_HDR}, b"\0" * 8), ValueError,
     r"__metadata__ is a list, expected an object"),
    ("index-shard-path", _index_case({"w": "../a.safetensors"}), ValueError, r"are paths; an index may only name files"),
    ("index-weight-map-list", _index_case(["a.safetensors"]), ValueError, r"'weight_map' must be an object"),
    # dtype casts
    ("cast-int32", _load_cast("I32", np.int32), WeightLoadError, r"is int32 but target w is float32: only float -> float"),
    ("cast-complex", _load_cast("C64", np.complex64), WeightLoadError, r"is complex64 but target w is float32"),
    ("cast-bool", _load_cast("BOOL", np.bool_), WeightLoadError, r"is bool but target w is float32"),
    ("cast-uint8", _load_cast("U8", np.uint8), WeightLoadError, r"is uint8 but target w is float32"),
    # torch memory bombs
    ("pth-stride0", _pth_stride0, TorchFormatError, r"bomb\.pth: tensor of shape \[1000000, 1000000\] float32 would "
     r"take 4000000000000 bytes.*refusing to allocate"),
    ("pth-bytearray", _pth_bytearray, TorchFormatError, r"bytearray\(int\); only bytes or text"),
    ("pth-huge-storage", _pth_huge_storage, TorchFormatError, r"declares 1000000000000 elements \(4000000000000 bytes\), "
     r"more than the whole file"),
    # images and prepare inputs
    ("img-fifo", _decode_fifo, SkipExample, r"not_a_file: .*x\.png is a FIFO; only regular files are read"),
    ("img-dev-zero", _decode_dev_zero, SkipExample, r"not_a_file: .*zero\.png is a character device"),
    ("img-too-big", _decode_too_big, SkipExample, r"too_large: \d+ bytes, above the limit of 100 bytes"),
    ("manifest-not-utf8", _manifest_not_utf8, ValueError, r"m\.jsonl is not UTF-8 text"),
    ("manifest-fifo", _manifest_fifo, ValueError, r"m\.jsonl is a FIFO"),
    ("shard-index-garbage", _shard_index_garbage, records.RecordError, r"data-00000\.json is not a valid .* \(not JSON"),
    ("shard-index-types", _shard_index_wrong_types, records.RecordError, r"data-00000\.json is not a valid"),
    # prepare outputs
    ("prepare-foreign-out", _prepare_foreign(False), FileExistsError, r"mine already holds 3 entries prepare did not "
     r"write"),
    ("prepare-foreign-overwrite", _prepare_foreign(True), FileExistsError, r"never replaced or deleted"),
    ("prepare-out-in-input", _prepare_inside_input, ValueError, r"images/out overlaps the input folder .*images"),
    ("prepare-out-around-input", _prepare_around_input, ValueError, r"overlaps the input folder"),
    ("prepare-out-manifest-dir", _prepare_manifest_folder, ValueError, r"overlaps the manifest's folder"),
    ("prepare-out-is-file", _prepare_out_is_file, FileExistsError, r"exists and is not a folder"),
    # convert outputs
    ("export-base-is-out", _export_base_is_out, ValueError, r"--out .*base overlaps --base .*base"),
    ("export-out-in-base", _export_out_inside_base, ValueError, r"base/export overlaps --base"),
    ("export-base-in-out", _export_base_inside_out, ValueError, r"work overlaps --base .*work/base"),
    ("orbax-foreign-params", _orbax_foreign_params, FileExistsError, r"out already holds 1 entries convert did not "
     r"write \(e\.g\. \['params'\]"),
    ("orbax-foreign-overwrite", _orbax_foreign_params_overwrite, FileExistsError, r"never replaced or deleted"),
    ("transformer-foreign", _transformer_foreign, FileExistsError, r"did not write"),
    ("pipeline-foreign-out", _pipeline_foreign_out, FileExistsError, r"did not write"),
    ("ours-no-overwrite", _ours_without_overwrite, FileExistsError, r"holds an earlier convert output; pass "
     r"--overwrite"),
    ("other-tools-output", _other_tools_output, FileExistsError, r"ds holds the output of `prepare`, not of `convert`"),
    ("marker-garbage", _marker_garbage, ValueError, r"is not a pixart_jax output marker"),
    # config files
    ("config-not-json", _config_case(b"{oops", _hub_config), ValueError, r"config\.json is not a valid model config: "
     r"not JSON"),
    ("config-array", _config_case(b"[1]", _hub_config), ValueError, r"a JSON list, expected a JSON object"),
    ("config-not-utf8", _config_case(b'{"a": "\xff"}', _hub_config), ValueError, r"not UTF-8"),
    ("orbax-config-not-json", _config_case(b"nope", _orbax_config), ValueError,
     r"pixart_config\.json is not a valid DiT config: not JSON"),
]


def _alarm(signum, frame):
  raise TimeoutError("the call blocked (e.g. it opened a FIFO)")


@pytest.mark.parametrize("setup,exc,message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_file(tmp_path, setup, exc, message):
  call, kept = setup(tmp_path)
  before = {p: (p.read_bytes() if p.is_file() else None) for p in kept}
  old = signal.signal(signal.SIGALRM, _alarm)
  signal.alarm(20)
  try:
    with pytest.raises(exc, match=message) as e:
      call()
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  assert "\n" not in str(e.value) or exc is WeightLoadError, "one line"
  for p, b in kept.items():
    assert p.exists(), f"{p} was deleted"
    if b is not None:
      assert p.read_bytes() == b == before[p], f"{p} was overwritten"


assert len(ROWS) >= 30 and len({r[0] for r in ROWS}) == len(ROWS)


def test_only_kind_changing_casts_are_refused(tmp_path):
  """f16 / bf16 / f64 weights still load into float32 targets; an int32 tensor next to them is refused."""
  for code, dt in (("F16", np.float16), ("BF16", ml_dtypes.bfloat16), ("F64", np.float64)):
    arr = np.arange(4).astype(dt)
    p = _safetensors(tmp_path / f"{code}.safetensors", {"w": {"dtype": code, "shape": [4],
                                                              "data_offsets": [0, arr.nbytes]}}, arr.tobytes())
    with open_tensors(p) as src:
      out = load_strict({("w",): jax.ShapeDtypeStruct((4,), np.float32)}, src, lambda k: [Put(("w",))])
    np.testing.assert_array_equal(np.asarray(out[("w",)]), np.arange(4, dtype=np.float32))
  call, _ = _load_cast("I32", np.int32)(tmp_path)
  with pytest.raises(WeightLoadError, match="only float -> float"):
    call()


def test_prepare_claims_new_empty_and_own_folders(tmp_path):
  """A new folder and an empty one are taken (marked first); a marked one is taken again (resume), so is a dataset
  of the unmarked older layout (its prepare_config.json)."""
  new = prepare_lib.claim_output_dir(tmp_path / "new")
  assert os.listdir(new) == [MARKER]
  (tmp_path / "empty").mkdir()
  prepare_lib.claim_output_dir(tmp_path / "empty")
  (tmp_path / "new" / "data-00000.json").write_text("{}")
  prepare_lib.claim_output_dir(new)  # ours: a rerun resumes into it
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "prepare_config.json").write_text(json.dumps(dict.fromkeys(
      ["source", "source_items", "shard_size", "encoders", "table"], 1)))
  prepare_lib.claim_output_dir(tmp_path / "old")
  assert sorted(os.listdir(tmp_path / "old")) == [MARKER, "prepare_config.json"]

