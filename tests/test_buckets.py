"""Bucket tables and resolution binning (pixart_jax.data.buckets) vs diffusers and the official source."""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as df_alpha
from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as df_sigma

from pixart_jax.data import _tables, buckets

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_script():
  spec = importlib.util.spec_from_file_location(
      "extract_bucket_tables", ROOT / "scripts" / "extract_bucket_tables.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_generated_module_is_up_to_date():
  """_tables.py == what the script renders from the verbatim snapshot of the official file."""
  script = _load_script()
  text = script.SOURCE.read_text(encoding="utf-8")
  generated = (ROOT / "pixart_jax" / "data" / "_tables.py").read_text(encoding="utf-8")
  assert generated == script.render(text)
  assert script.main(["--check"]) == 0
  # The parser reads the literals (not a hand-made list): every table of the snapshot is present.
  assert text.count("ASPECT_RATIO_") == len(script.parse_tables(text)) == 10


@pytest.mark.parametrize("name,n", [("256", 40), ("512", 40), ("1024", 40), ("2048", 40), ("2880", 40),
                                    ("256_test", 33), ("512_test", 33), ("1024_test", 33),
                                    ("2048_test", 33), ("4096", 33), ("256_bin", 33),
                                    ("512_bin", 33), ("1024_bin", 33), ("2048_bin", 40)])
def test_table_sizes(name, n):
  assert len(buckets.TABLES[name]) == n


@pytest.mark.parametrize("name,theirs", [("256_bin", df_alpha.ASPECT_RATIO_256_BIN),
                                         ("512_bin", df_alpha.ASPECT_RATIO_512_BIN),
                                         ("1024_bin", df_alpha.ASPECT_RATIO_1024_BIN),
                                         ("2048_bin", df_sigma.ASPECT_RATIO_2048_BIN),
                                         ("2048", df_sigma.ASPECT_RATIO_2048_BIN),
                                         ("1024_test", df_alpha.ASPECT_RATIO_1024_BIN)])
def test_equal_to_diffusers_bins(name, theirs):
  ours = buckets.TABLES[name]
  assert list(ours) == list(theirs)  # same keys, same order (order decides ties)
  for k, (h, w) in theirs.items():
    assert ours[k] == (int(h), int(w)) and float(h) == int(h) and float(w) == int(w)


@pytest.mark.parametrize("name,scale", [("256", 0.25), ("512", 0.5), ("2048", 2.0),
                                        ("256_test", 0.25), ("512_test", 0.5)])
def test_tables_are_the_1024_table_scaled(name, scale):
  ref = buckets.TABLES["1024" if "_test" not in name else "1024_test"]
  t = buckets.TABLES[name]
  assert list(t) == list(ref)
  for k, (h, w) in ref.items():
    assert t[k] == (int(h * scale), int(w * scale))
  assert buckets.base_resolution(name) == int(1024 * scale)


def test_test_tables_and_4k_table():
  t1024, tt = buckets.TABLES["1024"], buckets.TABLES["1024_test"]
  assert set(t1024) - set(tt) == {"0.26", "0.27", "2.89", "3.11", "3.62", "3.75", "3.88"}
  assert all(tt[k] == t1024[k] for k in tt)
  t2048, t2048t = buckets.TABLES["2048"], buckets.TABLES["2048_test"]
  assert set(t2048t) <= set(t2048) and all(t2048t[k] == t2048[k] for k in t2048t)
  t4k = buckets.TABLES["4096"]  # ASPECT_RATIO_2880_TEST = 2048_TEST x 2
  assert list(t4k) == list(t2048t)
  assert all(t4k[k] == (2 * h, 2 * w) for k, (h, w) in t2048t.items())
  assert buckets.base_resolution("4096") == 4096 and dict(buckets.TABLES["2880_test"]) == dict(t4k)
  t2880 = buckets.TABLES["2880"]
  assert t2880["1.0"] == (2880, 2880) and all(h % 64 == 0 and w % 64 == 0 for h, w in t2880.values())
  # Official 1024 buckets never exceed 4096 tokens (patch 16) and have even token grids.
  for h, w in t1024.values():
    assert (h // 16) * (w // 16) <= 4096 and h % 32 == 0 and w % 32 == 0
  assert _tables.SOURCE_COMMIT == "9ba985e32d95a9cc9fabca5909c9860aa038a6a6"


@pytest.mark.parametrize("name", sorted(buckets.TABLES))
def test_binning_agrees_with_diffusers(name):
  """diffusers' classify_height_width_bin (the same expression as the official get_closest_ratio)."""
  rng = np.random.default_rng(0)
  table = buckets.TABLES[name]
  as_diffusers = {k: [float(h), float(w)] for k, (h, w) in table.items()}
  hs = rng.integers(16, 9000, size=300)
  ws = rng.integers(16, 9000, size=300)
  # Plus sizes whose aspect ratio is the midpoint of two neighbouring keys (tie candidates).
  keys = [float(k) for k in table]
  mids = [((a + b) / 2) for a, b in zip(keys, keys[1:])]
  hs = np.concatenate([hs, [int(round(m * 1000)) for m in mids]])
  ws = np.concatenate([ws, [1000] * len(mids)])
  for h, w in zip(hs.tolist(), ws.tolist()):
    want = PixArtImageProcessor.classify_height_width_bin(h, w, as_diffusers)
    assert buckets.classify_height_width_bin(h, w, name) == want
    key, hw = buckets.closest_bucket(h, w, name)
    assert hw == want and table[key] == hw


def test_closest_bucket_examples():
  assert buckets.closest_bucket(1024, 1024, "1024") == ("1.0", (1024, 1024))
  assert buckets.closest_bucket(768, 1365, "1024") == ("0.57", (768, 1344))  # 16:9
  assert buckets.closest_bucket(4000, 1000, "512") == ("4.0", (1024, 256))
  assert buckets.closest_bucket(100, 10000, "512") == ("0.25", (256, 1024))  # clamps to the edge
  with pytest.raises(ValueError, match="height"):
    buckets.closest_bucket(0, 5, "1024")
  with pytest.raises(ValueError, match="unknown bucket table"):
    buckets.closest_bucket(5, 5, "999")


def test_table_choices():
  assert [buckets.bin_table_for_sample_size(s) for s in (32, 64, 128, 256, 512)] == [
      "256_bin", "512_bin", "1024_bin", "2048_bin", "4096_bin"]
  assert buckets.TABLES["4096_bin"]["1.0"] == (4096, 4096)
  with pytest.raises(ValueError, match="sample_size 100"):
    buckets.bin_table_for_sample_size(100)
  sizes = (512, 1024, 2048)
  assert [buckets.training_table_for_image_size(s) for s in sizes] == ["512", "1024", "2048"]
  with pytest.raises(ValueError, match="image size 640"):
    buckets.training_table_for_image_size(640)
  assert buckets.train_resample("1024") == "bicubic" and buckets.train_resample("2880") == "lanczos"


def test_check_request():
  buckets.check_request(1024, 1024, "1024")
  buckets.check_request(2048, 512, "1024")  # aspect 4, 1M pixels
  buckets.check_request(512, 512, "1024")  # exactly 1/4 of the base pixels
  with pytest.raises(ValueError, match="aspect ratio h/w = 4.2.*range \\[0.25, 4\\]"):
    buckets.check_request(2100, 500, "1024")
  with pytest.raises(ValueError, match="aspect ratio"):
    buckets.check_request(100, 1000, "1024")
  with pytest.raises(ValueError, match="too far from the table's base resolution 1024x1024"):
    buckets.check_request(4096, 4096, "1024")
  with pytest.raises(ValueError, match="too far"):
    buckets.check_request(256, 256, "1024")
  buckets.check_request(4096, 4096, "4096")
  with pytest.raises(ValueError, match="width must be a positive number"):
    buckets.check_request(1024, -3, "1024")


def test_resize_and_center_crop_centering():
  """No resize needed along one axis -> the output is an exact slice, offset round(excess / 2)."""
  rng = np.random.default_rng(1)
  for excess, offset in [(10, 5), (7, 4), (5, 2), (1, 0), (3, 2)]:  # Python/torchvision rounding
    img = rng.integers(0, 256, size=(64, 96 + excess, 3), dtype=np.uint8)
    out = buckets.resize_and_center_crop(img, 64, 96)
    np.testing.assert_array_equal(out, img[:, offset:offset + 96])
    out_t = buckets.resize_and_center_crop(img.transpose(1, 0, 2).copy(), 96, 64)
    np.testing.assert_array_equal(out_t, img.transpose(1, 0, 2)[offset:offset + 96])


def test_resize_and_center_crop_shapes_and_cover():
  rng = np.random.default_rng(2)
  for _ in range(20):
    h, w = rng.integers(5, 300, size=2).tolist()
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    key, (bh, bw) = buckets.closest_bucket(h, w, "256")
    out = buckets.resize_and_center_crop(img, bh, bw, resample=buckets.train_resample("256"))
    assert out.shape == (bh, bw, 3) and out.dtype == np.uint8
  gray = rng.integers(0, 256, size=(40, 30, 1), dtype=np.uint8)
  assert buckets.resize_and_center_crop(gray, 16, 24, "lanczos").shape == (16, 24, 1)
  # A white image never gets padding, whatever the aspect ratio.
  white = np.full((17, 301, 3), 255, np.uint8)
  assert (buckets.resize_and_center_crop(white, 128, 512, "bilinear") == 255).all()
  with pytest.raises(ValueError, match="uint8"):
    buckets.resize_and_center_crop(np.zeros((4, 4, 3), np.float32), 2, 2)
  with pytest.raises(ValueError, match="unknown resample"):
    buckets.resize_and_center_crop(white, 2, 2, "cubic-ish")


def test_resize_and_center_crop_matches_diffusers_geometry():
  """Smooth image, upscaling with bilinear: same content as diffusers' resize_and_crop_tensor."""
  yy, xx = np.meshgrid(np.arange(30), np.arange(50), indexing="ij")
  img = (np.stack([yy * 8, xx * 5, (yy + xx) * 3], -1)).astype(np.uint8)  # (30, 50, 3) smooth ramps
  for bh, bw in [(120, 120), (60, 200), (90, 150)]:
    ours = buckets.resize_and_center_crop(img, bh, bw, "bilinear").astype(np.float32)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    theirs = PixArtImageProcessor.resize_and_crop_tensor(t, bw, bh)[0].permute(1, 2, 0).numpy()
    assert ours.shape == theirs.shape
    # measured 0.75 (uint8 rounding, PIL fixed-point weights); a 1-px offset gives >= 1.6
    assert np.abs(ours - theirs).max() <= 1.0
