"""ControlNet training data: `prepare` stores a control latent per record (Canny edges, a blurred copy, or the
example's own control image), the input pipeline gives it as batch["control"], and the Canny transform finds
edges where they are."""
import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pixart_jax.data import buckets, control, pipeline, prepare_lib, sources
from pixart_jax.data.encoders import PixelEncoders
from pixart_jax.data.image_io import to_model_input
from pixart_jax.models.t5 import T5Config, T5Encoder
from pixart_jax.models.text_encoder import TextEncoder
from pixart_jax.models.tokenizer import build_t5_tokenizer

TABLE = {"1.0": (32, 32)}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  tok = build_t5_tokenizer(["a square", "a circle", "two lines"] * 8, tmp_path_factory.mktemp("tok"), vocab_size=40)
  return PixelEncoders(TextEncoder(tok, T5Encoder(T5Config.tiny(), rngs=nnx.Rngs(0))), downsample=8, text_id="t")


def _square(n=32, lo=8, hi=24):
  img = np.zeros((n, n, 3), np.uint8)
  img[lo:hi, lo:hi] = 255
  return img


def test_canny_finds_the_square_outline_and_blur_smooths():
  edges = control.canny(_square())[..., 0] > 0
  assert edges.dtype == bool and 40 <= edges.sum() <= 140  # a one-or-two-pixel outline of a 16x16 square
  ys, xs = np.nonzero(edges)
  assert ys.min() >= 6 and ys.max() <= 25 and xs.min() >= 6 and xs.max() <= 25
  assert not edges[12:20, 12:20].any() and not edges[:5].any()  # nothing inside or far outside
  assert not control.canny(np.full((16, 16, 3), 77, np.uint8)).any()  # flat image: no edges
  b = control.blur(_square(), 1.5)
  assert b.dtype == np.uint8 and 0 < b[8, 8, 0] < 255 and b[16, 16, 0] == 255 and b[0, 0, 0] == 0
  with pytest.raises(ValueError, match="control must be one of canny, blur, image"):
    prepare_lib.PrepareOptions(control="sobel").validate()


@pytest.mark.parametrize("kind", ["canny", "blur", "image"])
def test_prepare_stores_the_control_latent_and_the_pipeline_serves_it(tmp_path, encoders, kind):
  rows = []
  for i in range(3):
    Image.fromarray(_square(lo=4 + 2 * i)).save(tmp_path / f"x{i}.png")
    Image.fromarray(255 - _square(lo=6)).save(tmp_path / f"c{i}.png")
    rows.append({"image": f"x{i}.png", "caption": "a square", "control": f"c{i}.png"})
  (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  out = tmp_path / "out"
  manifest = prepare_lib.prepare(
      sources.resolve_source(str(tmp_path / "m.jsonl")), encoders, out, progress=False,
      options=prepare_lib.PrepareOptions(table=TABLE, batch_size=2, min_side=8, control=kind, control_sigma=1.5))
  assert manifest["control"] == kind and manifest["num_records"] == 3
  ab = pipeline.abstract_batches(manifest, 3)["1.0"]
  assert ab["control"].shape == ab["latents"].shape == (3, 4, 4, 192)
  batch = next(pipeline.make_train_iterator(out, global_batch_size=3, mesh=None, seed=0))
  for i, idx in enumerate(batch["index"]):
    img = np.asarray(Image.open(tmp_path / f"x{idx}.png"))
    want = {"canny": lambda: control.canny(img, sigma=1.5), "blur": lambda: control.blur(img, 1.5),
            "image": lambda: 255 - _square(lo=6)}[kind]()
    got = encoders.decode(batch["control"][i:i + 1])[0]  # the pixel encoder is lossless up to bf16 storage
    np.testing.assert_allclose(got, to_model_input(buckets.resize_and_center_crop(want, 32, 32, "bicubic")),
                               atol=2.0 ** -7)
  assert not np.allclose(batch["control"], batch["latents"])


def test_no_control_image_is_a_reported_skip(tmp_path, encoders):
  Image.fromarray(_square()).save(tmp_path / "x.png")
  (tmp_path / "m.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a square"}) + "\n" +
                                    json.dumps({"image": "x.png", "caption": "a circle", "control": "x.png"}))
  manifest = prepare_lib.prepare(
      sources.resolve_source(str(tmp_path / "m.jsonl")), encoders, tmp_path / "out", progress=False,
      options=prepare_lib.PrepareOptions(table=TABLE, batch_size=2, min_side=8, control="image"))
  assert manifest["num_records"] == 1 and manifest["skipped"]["by_reason"] == {"no_control": 1}
  # a dataset without control: no "control" in its batches
  plain = prepare_lib.prepare(
      sources.resolve_source(str(tmp_path / "m.jsonl")), encoders, tmp_path / "plain", progress=False,
      options=prepare_lib.PrepareOptions(table=TABLE, batch_size=2, min_side=8))
  assert "control" not in plain and "control" not in pipeline.abstract_batches(plain, 2)["1.0"]
  assert "control" not in next(pipeline.make_train_iterator(tmp_path / "plain", global_batch_size=2, mesh=None))
