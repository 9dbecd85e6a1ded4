"""The legacy (pre-1.6, non-zip) torch format: read bitwise without running pickled code (convert/torch_legacy.py)."""
import pickle
import struct

import pytest
import torch

from pixart_jax.convert.sources import TorchSource, open_tensors
from pixart_jax.convert.torch_legacy import TorchLegacyArchive
from pixart_jax.convert.torch_pickle import TorchFormatError, UnsafePickleError, is_legacy_torch_file

_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


def _bytes(t: torch.Tensor) -> bytes:
  t = t.detach().contiguous().reshape(-1)
  return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _legacy(path, obj):
  torch.save(obj, path, _use_new_zipfile_serialization=False)
  assert is_legacy_torch_file(path)
  return path


def test_legacy_state_dict_bitwise(tmp_path):
  base = torch.randn(10)
  sd = {
      "conv.weight": torch.randn(4, 3, 3, 3),
      "bn.running_var": torch.rand(4).double(),
      "bn.num_batches_tracked": torch.tensor(7),
      "half": torch.randn(3, 2).half(),
      "bf16": torch.randn(5).bfloat16(),
      "mask": torch.tensor([True, False]),
      "transposed": torch.randn(3, 5).t(),       # non-contiguous view
      "slice": base[2:6],                         # shares `base`'s storage at an offset
      "base": base,
      "empty": torch.zeros(0, 3),
  }
  path = _legacy(tmp_path / "old.pth", {"state_dict": sd, "epoch": 3})
  with open_tensors(path) as src:
    assert isinstance(src, TorchSource) and isinstance(src._archive, TorchLegacyArchive)
    assert src.keys() == list(sd) and src.subkey == "state_dict" and src.raw["epoch"] == 3
    for k, t in sd.items():
      got = src.get(k)
      assert got.shape == tuple(t.shape) and str(got.dtype) == str(t.dtype).removeprefix("torch."), k
      assert got.flags.c_contiguous and got.tobytes() == _bytes(t), k


def test_legacy_refuses_code_and_modules_without_running(tmp_path):
  marker = tmp_path / "pwned"

  class Exec:
    def __reduce__(self):
      return exec, (f"open({str(marker)!r}, 'w').close()",)

  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    for part in (_MAGIC, 1001, {"little_endian": True}, {"w": Exec()}, []):
      pickle.dump(part, f, protocol=2)
  assert is_legacy_torch_file(path)
  with pytest.raises(UnsafePickleError, match=r"builtins\.exec"):
    open_tensors(path)
  assert not marker.exists()
  _legacy(tmp_path / "module.pth", torch.nn.Linear(2, 3))  # a whole pickled module, not a state dict
  with pytest.raises((UnsafePickleError, TorchFormatError), match=r"torch\.nn\.modules\.linear\.Linear|nn\.Module"):
    open_tensors(tmp_path / "module.pth")


def test_legacy_truncated_or_inconsistent_files_fail_clearly(tmp_path):
  path = _legacy(tmp_path / "w.pth", {"a": torch.randn(100), "b": torch.randn(3)})
  data = path.read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[:-10])
  with pytest.raises(TorchFormatError, match=r"cut\.pth is truncated: storage .* ends at byte"):
    open_tensors(tmp_path / "cut.pth")
  with TorchLegacyArchive(path) as arch:  # corrupt one size header: the count no longer matches the pickle
    key, offset = next(iter(arch._offsets.items()))
  bad = bytearray(data)
  bad[offset - 8:offset] = struct.pack("<q", 5)
  (tmp_path / "bad.pth").write_bytes(bytes(bad))
  with pytest.raises(TorchFormatError, match=rf"storage '{key}' holds 5 elements, the pickle expects"):
    open_tensors(tmp_path / "bad.pth")
