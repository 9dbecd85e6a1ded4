"""Loading the DiT: official .pth layout, strict errors, export round trip, weak-to-strong, sharded placement."""
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import pixart_jax.convert.dit as dit_convert
from dit_reference import diffusers_forward, rel_err, tiny_diffusers_transformer
from pixart_jax.convert.ours import kv_compress_missing
from pixart_jax.convert.strict import WeightLoadError
from pixart_jax.parallel.mesh import make_mesh


def _inputs(seed=0, b=2, hw=(8, 10), s=6, c=24):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, *hw, 4)).astype(np.float32)
  t = np.linspace(3.0, 900.0, b).astype(np.float32)
  y = rng.standard_normal((b, s, c)).astype(np.float32)
  mask = (np.arange(s)[None] < np.array([[2], [s]])[:b]).astype(np.int64)
  return x, t, y, mask


def official_state_dict(ref) -> dict:
  """diffusers -> official PixArt key layout (the inverse of the official converter), plus the buffers."""
  d = ref.state_dict()
  sd = {
      "x_embedder.proj.weight": d["pos_embed.proj.weight"], "x_embedder.proj.bias": d["pos_embed.proj.bias"],
      "final_layer.scale_shift_table": d["scale_shift_table"],
      "pos_embed": torch.randn(1, 16, ref.config.num_attention_heads * ref.config.attention_head_dim),
      "y_embedder.y_embedding": torch.randn(300, ref.config.caption_channels),
  }
  pairs = {"t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2", "t_block.1": "adaln_single.linear",
           "y_embedder.y_proj.fc1": "caption_projection.linear_1", "y_embedder.y_proj.fc2": "caption_projection.linear_2",
           "final_layer.linear": "proj_out"}
  for i in range(ref.config.num_layers):
    b = f"transformer_blocks.{i}"
    sd[f"blocks.{i}.scale_shift_table"] = d[f"{b}.scale_shift_table"]
    pairs.update({f"blocks.{i}.attn.proj": f"{b}.attn1.to_out.0", f"blocks.{i}.cross_attn.q_linear": f"{b}.attn2.to_q",
                  f"blocks.{i}.cross_attn.proj": f"{b}.attn2.to_out.0", f"blocks.{i}.mlp.fc1": f"{b}.ff.net.0.proj",
                  f"blocks.{i}.mlp.fc2": f"{b}.ff.net.2"})
    for kind in ("weight", "bias"):
      sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([d[f"{b}.attn1.to_{n}.{kind}"] for n in "qkv"])
      sd[f"blocks.{i}.cross_attn.kv_linear.{kind}"] = torch.cat([d[f"{b}.attn2.to_{n}.{kind}"] for n in "kv"])
  for ours, theirs in pairs.items():
    for kind in ("weight", "bias"):
      sd[f"{ours}.{kind}"] = d[f"{theirs}.{kind}"]
  return sd


def test_official_pth(tmp_path):
  ref = tiny_diffusers_transformer(layers=2)
  cfg = dit_convert.config_from_diffusers(dict(ref.config))
  path = tmp_path / "PixArt-custom.pth"
  torch.save({"state_dict": official_state_dict(ref), "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, path)
  with pytest.raises(ValueError, match="pass config="):
    dit_convert.load_transformer(path)
  model = dit_convert.load_transformer(path, config=cfg)
  x, t, y, mask = _inputs()
  assert rel_err(np.asarray(model(x, t, y, mask)), diffusers_forward(ref, x, t, y, mask)) <= 1e-5


def test_official_filenames_pick_presets():
  assert dit_convert._preset_from_filename("PixArt-Sigma-XL-2-512-MS.pth").interpolation_scale == 1.0
  assert dit_convert._preset_from_filename("PixArt-Sigma-XL-2-256x256.pth").interpolation_scale == 0.5
  assert dit_convert._preset_from_filename("PixArt-Sigma-XL-2-2K-MS.pth").sample_size == 256


def _save_dir(path, ref, mutate):
  path.mkdir()
  sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
  mutate(sd)
  save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
  (path / "config.json").write_text(json.dumps(dict(ref.config)))
  return path


def test_strict_errors_name_the_key(tmp_path):
  ref = tiny_diffusers_transformer()
  missing = _save_dir(tmp_path / "missing", ref, lambda sd: sd.pop("transformer_blocks.1.attn2.to_k.weight"))
  with pytest.raises(WeightLoadError, match=r"transformer_blocks\.1\.attn2\.to_k\.weight"):
    dit_convert.load_transformer(missing)
  wrong = _save_dir(tmp_path / "wrong", ref, lambda sd: sd.update({"proj_out.bias": torch.zeros(5)}))
  with pytest.raises(WeightLoadError, match="proj_out.bias"):
    dit_convert.load_transformer(wrong)
  extra = _save_dir(tmp_path / "extra", ref, lambda sd: sd.update({"transformer_blocks.0.attn1.bogus": torch.zeros(2)}))
  with pytest.raises(WeightLoadError, match="attn1.bogus"):
    dit_convert.load_transformer(extra)


def test_export_round_trip(tmp_path):
  from diffusers import PixArtTransformer2DModel

  ref = tiny_diffusers_transformer(layers=3, interpolation_scale=0.5)
  ref.save_pretrained(tmp_path / "in")
  model = dit_convert.load_transformer(tmp_path / "in")
  out = dit_convert.export_transformer(model, tmp_path / "out", max_shard_bytes=20_000)  # force several shards
  assert (out / "diffusion_pytorch_model.safetensors.index.json").exists()
  back = PixArtTransformer2DModel.from_pretrained(out).eval()
  x, t, y, mask = _inputs(seed=4)
  ours = np.asarray(model(x, t, y, mask))
  assert rel_err(diffusers_forward(back, x, t, y, mask), ours) <= 1e-5
  reloaded = dit_convert.load_transformer(out)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reloaded))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def test_weak_to_strong_kv_compression(tmp_path):
  """An uncompressed checkpoint loads into a KV-compressed model only through the documented rule."""
  ref = tiny_diffusers_transformer(layers=3)
  ref.save_pretrained(tmp_path / "t")
  cfg = dit_convert.config_from_diffusers(dict(ref.config)).replace(kv_compress_layers=(1, 2))
  with pytest.raises(WeightLoadError, match=r"transformer_blocks\.1\.attn1\.sr\.weight"):
    dit_convert.load_transformer(tmp_path / "t", config=cfg)
  model = dit_convert.load_transformer(tmp_path / "t", config=cfg, allow_missing=kv_compress_missing)
  comp = model.stages[1].attn.compress
  np.testing.assert_array_equal(np.asarray(comp.kernel[...]), 0.25)
  np.testing.assert_array_equal(np.asarray(comp.norm_scale[...]), 1.0)
  plain = dit_convert.load_transformer(tmp_path / "t")
  np.testing.assert_array_equal(np.asarray(model.stages[1].mlp.fc1.kernel[...]),
                                np.asarray(plain.stages[0].mlp.fc1.kernel[...])[1:])


def test_load_born_sharded(tmp_path):
  ref = tiny_diffusers_transformer(heads=4, head_dim=8)  # D = 32: divisible by the fsdp axis
  ref.save_pretrained(tmp_path / "t")
  mesh = make_mesh([("fsdp", 4), ("data", 2)])
  model = dit_convert.load_transformer(tmp_path / "t", mesh=mesh)
  k = model.stages[0].mlp.fc1.kernel.get_value()
  assert isinstance(k.sharding, jax.sharding.NamedSharding) and "fsdp" in tuple(k.sharding.spec)
  assert len(k.sharding.device_set) == 8


def test_convert_cli_pth_to_orbax_to_diffusers(tmp_path):
  """`python -m pixart_jax.convert`: official .pth -> Orbax -> diffusers, outputs equal to the reference."""
  import subprocess
  import sys

  ref = tiny_diffusers_transformer(layers=2)
  cfg = dit_convert.config_from_diffusers(dict(ref.config))
  pth = tmp_path / "ckpt.pth"
  torch.save({"state_dict": official_state_dict(ref)}, pth)
  # The CLI needs a preset for an unknown .pth: register-free path -> use the Python API for .pth, CLI for the rest.
  from pixart_jax.convert import orbax_io

  orbax_io.save_transformer_orbax(dit_convert.load_transformer(pth, config=cfg), tmp_path / "orbax")
  env = {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  r = subprocess.run([sys.executable, "-m", "pixart_jax.convert", "--source", str(tmp_path / "orbax"), "--out",
                      str(tmp_path / "diff")], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  r = subprocess.run([sys.executable, "-m", "pixart_jax.convert", "--source", str(tmp_path / "diff"), "--out",
                      str(tmp_path / "orbax2")], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  x, t, y, mask = _inputs(seed=7)
  want = diffusers_forward(ref, x, t, y, mask)
  for src in ("orbax", "diff", "orbax2"):
    assert rel_err(np.asarray(dit_convert.load_transformer(tmp_path / src)(x, t, y, mask)), want) <= 1e-5, src


def test_configs_written_by_older_versions_still_load(tmp_path):
  """Older versions kept how attention runs in DiTConfig (and wrote it to converted Orbax dirs and workdir
  config.json files): reading an architecture drops those keys; `attention=` sets how the loaded model runs."""
  from pixart_jax.convert import orbax_io, ours
  from pixart_jax.models.attention_backends import AttentionBackend, AttentionOptions
  from pixart_jax.models.config import DiTConfig, get_preset
  from pixart_jax.models.dit import PixArtSigma

  legacy = dict(attention="splash", attention_min_seq=0, splash_block_sizes=[128, 128, 128], splash_interpret=None,
                sequence_parallel=True)
  cfg = get_preset("tiny", kv_compress_layers=(1,))
  model = PixArtSigma(cfg, rngs=nnx.Rngs(3))
  out = orbax_io.save_transformer_orbax(model, tmp_path / "orbax")
  saved = json.loads((out / orbax_io.CONFIG_FILE).read_text())
  assert not set(legacy) & set(saved)  # what we write now: the architecture only
  (out / orbax_io.CONFIG_FILE).write_text(json.dumps({**saved, **legacy}))  # as an older version wrote it
  assert orbax_io.read_config(out) == cfg and ours.saved_config(out) == cfg  # lists back to tuples, run keys gone
  x, t, y, mask = _inputs(seed=5, hw=(8, 8), s=16, c=32)
  want = np.asarray(model(x, t, y, mask))
  loaded = dit_convert.load_transformer(out)
  assert loaded.cfg == cfg and loaded.attention == AttentionOptions()
  np.testing.assert_array_equal(np.asarray(loaded(x, t, y, mask)), want)
  splash = dit_convert.load_transformer(out, attention="splash")
  assert splash.attention.backend is AttentionBackend.SPLASH
  assert splash.stages[0].attn.opts.backend is AttentionBackend.SPLASH
  # The weak-to-strong path (into a given config) reads the same file.
  into = dit_convert.load_transformer(out, config=cfg)
  np.testing.assert_array_equal(np.asarray(into(x, t, y, mask)), want)
  # A workdir's config.json of an older version: the run keys sat among model.overrides.
  wd = tmp_path / "workdir"
  wd.mkdir()
  overrides = {f: None for f in DiTConfig.__dataclass_fields__} | legacy | {"kv_compress_layers": [1]}
  (wd / "config.json").write_text(json.dumps({"model": {"preset": "tiny", "overrides": overrides}}))
  assert ours.saved_config(wd) == cfg
  # Anything else unknown is still an error naming the key and the file.
  (out / orbax_io.CONFIG_FILE).write_text(json.dumps({**saved, "depht": 3}))
  with pytest.raises(ValueError, match=r"unknown DiTConfig fields in pixart_config.json: \['depht'\]"):
    orbax_io.read_config(out)
  with pytest.raises(ValueError, match=r"unknown DiTConfig fields in .*config.json model.overrides: \['depht'\]"):
    (wd / "config.json").write_text(json.dumps({"model": {"preset": "tiny", "overrides": {"depht": 3}}}))
    ours.saved_config(wd)
