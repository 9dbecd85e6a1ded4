"""ControlNet for PixArt-Sigma: parity with the official ControlNet-Half forward (PyTorch reference written from the
published source, tests/controlnet_reference.py), strict loading of the official key layout, export round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import pixart_jax.convert.dit as dit_convert
from controlnet_reference import control_forward, make_controlnet, official_controlnet_state_dict
from dit_reference import diffusers_forward, rel_err, tiny_diffusers_transformer
from pixart_jax.convert import controlnet_keys
from pixart_jax.convert.strict import WeightLoadError
from pixart_jax.models.controlnet import ControlPixArtSigma, with_control
from test_dit_loading import official_state_dict


def _inputs(seed=0, b=2, hw=(8, 12), s=6, c=24):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, *hw, 4)).astype(np.float32)
  ctrl = rng.standard_normal((b, *hw, 4)).astype(np.float32)
  t = np.array([3.0, 700.5][:b], np.float32)
  y = rng.standard_normal((b, s, c)).astype(np.float32)
  mask = (np.arange(s)[None] < np.array([[2], [s]])[:b]).astype(np.int64)
  return x, t, y, mask, ctrl


@pytest.fixture(scope="module")
def ref():
  return tiny_diffusers_transformer(layers=4)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("scan", [True, False])
def test_forward_matches_official_controlnet(tmp_path, ref, n, scan):
  ctrl = make_controlnet(ref, n)
  ref.save_pretrained(tmp_path / "transformer")
  base = dit_convert.load_transformer(tmp_path / "transformer", scan=scan)
  path = tmp_path / "control.pth"
  torch.save({"state_dict": official_controlnet_state_dict(ctrl)}, path)
  model = controlnet_keys.load_controlnet(path, base=base)
  assert model.controlnet.num_blocks == n
  x, t, y, mask, c = _inputs()
  want = control_forward(ref, ctrl, x, t, y, mask, c)
  got = np.asarray(model(x, t, y, mask, control=c))
  assert rel_err(got, want) <= 1e-5, rel_err(got, want)
  # the control actually steers the output, and control=None / scale 0 is the base model
  base_out = diffusers_forward(ref, x, t, y, mask)
  assert rel_err(want, base_out) > 1e-3
  assert rel_err(np.asarray(model(x, t, y, mask)), base_out) <= 1e-5
  assert rel_err(np.asarray(model(x, t, y, mask, control=c, control_scale=0.0)), base_out) <= 1e-5


def test_whole_official_checkpoint_and_export_round_trip(tmp_path, ref):
  ctrl = make_controlnet(ref, 2)
  cfg = dit_convert.config_from_diffusers(dict(ref.config))
  sd = {f"base_model.{k}": v for k, v in official_state_dict(ref).items()}
  sd.update(official_controlnet_state_dict(ctrl))
  torch.save({"state_dict": sd}, tmp_path / "whole.pth")
  model = controlnet_keys.load_controlnet(tmp_path / "whole.pth", config=cfg)
  x, t, y, mask, c = _inputs(1)
  want = control_forward(ref, ctrl, x, t, y, mask, c)
  assert rel_err(np.asarray(model(x, t, y, mask, control=c)), want) <= 1e-5
  # export: the branch in the official layout, bitwise the reference's tensors, and it loads back
  out = controlnet_keys.export_controlnet(model.controlnet, cfg, tmp_path / "branch.safetensors")
  from safetensors.numpy import load_file
  written, official = load_file(out), official_controlnet_state_dict(ctrl)
  assert sorted(written) == sorted(official)
  for k, v in official.items():
    np.testing.assert_array_equal(written[k], v.numpy(), err_msg=k)
  again = controlnet_keys.load_controlnet(out, base=model.base_model)
  assert rel_err(np.asarray(again(x, t, y, mask, control=c)), want) <= 1e-5
  with pytest.raises(FileExistsError, match="does not overwrite"):
    controlnet_keys.export_controlnet(model.controlnet, cfg, out)


def test_strict_loading_names_the_key(tmp_path, ref):
  ctrl = make_controlnet(ref, 2)
  base = dit_convert.load_transformer(_saved(ref, tmp_path))
  sd = official_controlnet_state_dict(ctrl)
  bad = dict(sd)
  del bad["controlnet.1.copied_block.mlp.fc2.bias"]
  torch.save(bad, tmp_path / "missing.pth")
  with pytest.raises(WeightLoadError, match="mlp"):
    controlnet_keys.load_controlnet(tmp_path / "missing.pth", base=base)
  bad = dict(sd, **{"controlnet.1.extra.weight": torch.zeros(3)})
  torch.save(bad, tmp_path / "extra.pth")
  with pytest.raises(WeightLoadError, match="controlnet.1.extra.weight"):
    controlnet_keys.load_controlnet(tmp_path / "extra.pth", base=base)
  bad = dict(sd, **{"controlnet.0.after_proj.weight": torch.zeros(16, 8)})
  torch.save(bad, tmp_path / "shape.pth")
  with pytest.raises(WeightLoadError, match="after_proj"):
    controlnet_keys.load_controlnet(tmp_path / "shape.pth", base=base)


def _saved(ref, tmp_path):
  ref.save_pretrained(tmp_path / "transformer")
  return tmp_path / "transformer"


def test_fresh_branch_is_the_base_and_copies_its_blocks(tmp_path, ref):
  base = dit_convert.load_transformer(_saved(ref, tmp_path))
  model = with_control(base, 3)
  x, t, y, mask, c = _inputs(2)
  np.testing.assert_array_equal(np.asarray(model(x, t, y, mask, control=c)), np.asarray(base(x, t, y, mask)))
  blk = nnx.state(model.controlnet.blocks[2], nnx.Param)
  np.testing.assert_array_equal(np.asarray(blk["mlp"]["fc1"]["kernel"][...]),
                                np.asarray(nnx.state(base, nnx.Param)["stages"][0]["mlp"]["fc1"]["kernel"][...][2]))
  with pytest.raises(ValueError, match="control blocks must lie in"):
    with_control(base, 4)
  with pytest.raises(ValueError, match="control latent has shape"):
    model(x, t, y, mask, control=c[:, :4])
  assert isinstance(model, ControlPixArtSigma)


def test_micro_conditioned_base_matches_official_ms_controlnet(tmp_path):
  """ControlPixArtMSHalf: the base's csize / aspect-ratio embeddings enter t0 of base and control blocks alike."""
  ref = tiny_diffusers_transformer(layers=3, heads=3, head_dim=8, micro=True)
  ctrl = make_controlnet(ref, 2)
  base = dit_convert.load_transformer(_saved(ref, tmp_path))
  torch.save(official_controlnet_state_dict(ctrl), tmp_path / "ms.pth")
  model = controlnet_keys.load_controlnet(tmp_path / "ms.pth", base=base)
  x, t, y, mask, c = _inputs(3)
  kw = dict(resolution=np.array([[512.0, 768.0], [1024, 1024]], np.float32),
            aspect_ratio=np.array([[1.5], [1.0]], np.float32))
  want = control_forward(ref, ctrl, x, t, y, mask, c, **kw)
  assert rel_err(np.asarray(model(x, t, y, mask, control=c, **kw)), want) <= 1e-5


def _perturbed(branch, seed):
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(branch, nnx.Param))):
    var.set_value(var.get_value() + jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), var.shape))
  return branch


def test_export_overwrite_is_atomic(tmp_path, ref, monkeypatch):
  """An existing export is refused without overwrite; with it the new weights land; a write that fails half way
  (disk full) keeps the previous file whole, also through the ControlNet trainable's export of a resumed run."""
  import types

  from safetensors.numpy import load_file

  from pixart_jax.convert import writers
  from pixart_jax.train.trainables import controlnet as trainable

  base = dit_convert.load_transformer(_saved(ref, tmp_path))
  cfg = base.cfg
  path = tmp_path / "out" / "branch.safetensors"
  first = controlnet_keys.export_controlnet(_perturbed(with_control(base, 1).controlnet, 1), cfg, path)
  old = first.read_bytes()
  second = _perturbed(with_control(base, 1).controlnet, 2)
  with pytest.raises(FileExistsError, match=r"branch.safetensors exists: .* overwrite=True"):
    controlnet_keys.export_controlnet(second, cfg, path)
  assert path.read_bytes() == old

  def disk_full(_):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(writers, "memoryview", disk_full, raising=False)  # fails after the header is written
  with pytest.raises(OSError, match="No space"):
    controlnet_keys.export_controlnet(second, cfg, path, overwrite=True)
  assert path.read_bytes() == old and sorted(p.name for p in path.parent.iterdir()) == [path.name]
  # the trainable (a resumed run whose export already exists) goes through the same path
  t = object.__new__(trainable.ControlNetTrainable)
  t._base_graph, t._base_shapes = nnx.split(base, nnx.Param)
  t.blocks, t.spec = 1, types.SimpleNamespace(cfg=cfg)
  state = types.SimpleNamespace(ema=None, params=nnx.state(second, nnx.Param))
  (tmp_path / "work" / "controlnet").mkdir(parents=True)
  (tmp_path / "work" / trainable.EXPORT).write_bytes(old)
  with pytest.raises(OSError, match="No space"):
    t.export(state, tmp_path / "work")
  assert (tmp_path / "work" / trainable.EXPORT).read_bytes() == old
  monkeypatch.undo()
  controlnet_keys.export_controlnet(second, cfg, path, overwrite=True)
  want = dict(controlnet_keys.branch_tensors(second, cfg))
  got = load_file(path)
  assert sorted(got) == sorted(want) and sorted(p.name for p in path.parent.iterdir()) == [path.name]
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], np.asarray(v, np.float32), err_msg=k)
  assert t.export(state, tmp_path / "work") == tmp_path / "work" / trainable.EXPORT
  assert (tmp_path / "work" / trainable.EXPORT).read_bytes() == path.read_bytes()
