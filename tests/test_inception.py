"""FID InceptionV3: parity with pytorch-fid's network (tests/inception_reference.py) on random weights and random
BatchNorm statistics, loaded strictly from pytorch-fid- and torchvision-layout .pth files."""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from inception_reference import Inception3, pytorch_fid_features, randomize_
from pixart_jax.convert.inception_keys import inception_keymap, load_inception
from pixart_jax.convert.strict import WeightLoadError
from pixart_jax.metrics.inception import InceptionConfig, resize_bilinear_matrix

WIDTH = 0.125  # 1/8 of every channel count: the same graph, ~64x fewer FLOPs


def _rel(got, want):
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _images(shape, seed):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


_features = nnx.jit(lambda net, x: net(x))


def _reference(x: np.ndarray, ref: Inception3, **kw) -> np.ndarray:
  return pytorch_fid_features(ref, torch.from_numpy(x).permute(0, 3, 1, 2), **kw).numpy()


@pytest.fixture(scope="module")
def fid_pth(tmp_path_factory):
  """A random-weight FID Inception saved like pytorch-fid's released file: Inception3(num_classes=1008,
  aux_logits=False) with FID blocks, legacy (non-zip) torch format."""
  ref = randomize_(Inception3(num_classes=1008, aux_logits=False, fid=True, width=WIDTH), seed=0)
  path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-random.pth"
  torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=False)
  return ref, path


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (3, 75, 100, 3)])
def test_fid_inception_matches_pytorch_fid(fid_pth, shape):
  ref, path = fid_pth
  net = load_inception(path, config=InceptionConfig(width=WIDTH))
  x = _images(shape, seed=shape[1])
  got, want = np.asarray(_features(net, x)), _reference(x, ref)
  assert got.shape == (shape[0], net.config.feature_dim) and got.dtype == np.float32
  assert _rel(got, want) <= 1e-4, _rel(got, want)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_torchvision_layout_and_blocks(tmp_path):
  """torchvision's Inception3 state dict (AuxLogits, 1000-way fc, num_batches_tracked) with its own blocks
  (count_include_pad avg pools, avg pool in Mixed_7c): pytorch-fid's use_fid_inception=False network."""
  ref = randomize_(Inception3(num_classes=1000, aux_logits=True, fid=False, width=WIDTH), seed=1)
  sd = ref.state_dict()
  assert any(k.startswith("AuxLogits.") for k in sd) and sd["fc.weight"].shape[0] == 1000
  torch.save(sd, tmp_path / "inception_v3_google.pth")
  tv = load_inception(tmp_path / "inception_v3_google.pth", config=InceptionConfig(width=WIDTH,
                                                                                  use_fid_inception=False))
  x = _images((2, 80, 72, 3), seed=2)
  got, want = np.asarray(_features(tv, x)), _reference(x, ref)
  assert _rel(got, want) <= 1e-4, _rel(got, want)
  # the same weights in the FID blocks give different features: the block choice is honoured
  fid = load_inception(tmp_path / "inception_v3_google.pth", config=InceptionConfig(width=WIDTH))
  assert _rel(np.asarray(_features(fid, x)), want) > 1e-3


def test_without_resize_and_normalisation(fid_pth):
  ref, path = fid_pth
  net = load_inception(path, config=InceptionConfig(width=WIDTH, resize_input=False, normalize_input=False))
  x = 2 * _images((2, 96, 80, 3), seed=3) - 1
  got, want = np.asarray(_features(net, x)), _reference(x, ref, resize_input=False, normalize_input=False)
  assert _rel(got, want) <= 1e-4, _rel(got, want)


@pytest.mark.parametrize("size", [(512, 333), (17, 299), (64, 100)])
def test_resize_is_torch_bilinear(size):
  """Up- and down-sampling: the weights are torch's bit for bit, the images equal F.interpolate(bilinear,
  align_corners=False) (no antialias) to float32 rounding."""
  h, w = size
  eye = torch.eye(h)[:, None, :, None]  # h one-hot images of height h: their resizes are the weight columns
  weights = F.interpolate(eye, size=(299, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].numpy().T
  np.testing.assert_array_equal(resize_bilinear_matrix(h, 299), weights)
  x = _images((2, h, w, 3), seed=h)
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                       align_corners=False).permute(0, 2, 3, 1).numpy()
  got = np.einsum("oh,bhwc->bowc", resize_bilinear_matrix(h, 299).astype(np.float64), x.astype(np.float64))
  got = np.einsum("pw,bowc->bopc", resize_bilinear_matrix(w, 299).astype(np.float64), got)
  np.testing.assert_allclose(got, want, atol=3e-7, rtol=0)


def test_loading_is_strict(tmp_path, fid_pth):
  ref, _ = fid_pth
  sd = dict(ref.state_dict())
  missing = dict(sd)
  del missing["Mixed_6c.branch7x7dbl_4.bn.running_var"]
  missing["Mixed_6c.branch7x7dbl_4.bn.running_varr"] = sd["Mixed_6c.branch7x7dbl_4.bn.running_var"]
  torch.save(missing, tmp_path / "renamed.pth")
  with pytest.raises(WeightLoadError) as e:
    load_inception(tmp_path / "renamed.pth", config=InceptionConfig(width=WIDTH))
  assert e.value.unexpected == ["Mixed_6c.branch7x7dbl_4.bn.running_varr (20,) float32"]
  assert len(e.value.missing) == 1 and e.value.missing[0].startswith("target Mixed_6c/branch7x7dbl_4/bn/var (20,)")
  with pytest.raises(WeightLoadError, match=r"source 'Conv2d_1a_3x3.conv.weight' \(4, 3, 3, 3\) -> transformed "
                     r"\(3, 3, 3, 4\) vs target Conv2d_1a_3x3/conv/kernel expecting \(3, 3, 3, 32\)"):
    load_inception(tmp_path / "renamed.pth")  # a width-1/8 file into the full network
  assert inception_keymap("Mixed_5b.branch_pool.bn.running_mean")[0].path == ("Mixed_5b", "branch_pool", "bn", "mean")
  assert inception_keymap("Mixed_5b.pool.bn.weight_g") is None


@pytest.mark.slow
def test_full_size_fid_inception_matches_pytorch_fid(tmp_path):
  """The real architecture (width 1, 2048-d pool3) at batch 1."""
  count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
  assert count(Inception3(num_classes=1000, aux_logits=True, fid=False)) == 27_161_264  # torchvision's docs
  ref = randomize_(Inception3(num_classes=1008, aux_logits=False, fid=True), seed=5)
  torch.save(ref.state_dict(), tmp_path / "w.pth", _use_new_zipfile_serialization=False)
  net = load_inception(tmp_path / "w.pth")
  x = _images((1, 160, 120, 3), seed=6)
  got, want = np.asarray(_features(net, x)), _reference(x, ref)
  assert got.shape == (1, 2048)
  assert sum(v.size for v in jax.tree.leaves(nnx.state(net, nnx.Param))) == count(ref) - count(ref.fc) == 21_785_568
  assert _rel(got, want) <= 1e-4, _rel(got, want)
