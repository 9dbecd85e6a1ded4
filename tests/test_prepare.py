"""prepare: bitwise round trip of stored values, bad-input report, resumability, sources, records."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pixart_jax.data import buckets, pipeline, prepare_lib, sources
from pixart_jax.data.encoders import PixelEncoders, PretrainedEncoders
from pixart_jax.data.image_io import to_model_input
from pixart_jax.data.records import (BF16, LatentRecord, RecordError, deserialize_record, serialize_record,
                                     shard_paths)
from pixart_jax.models.t5 import T5Config, T5Encoder
from pixart_jax.models.text_encoder import TextEncoder
from pixart_jax.models.tokenizer import build_t5_tokenizer
from pixart_jax.models.vae import AutoencoderKL, VAEConfig, moments_to_mean_std

TABLE = {"0.5": (32, 64), "1.0": (48, 48), "2.0": (64, 32)}
CAPTIONS = ["a red square on a table", "two cats sleeping", "a blue circle", "green hills at dawn",
            "an old car in the rain", "a bowl of fruit"]
LONG = "a long and detailed description of the scene with many words about colors and shapes"


def random_module(make, seed):
  """An NNX module with N(0, 0.2) parameters, built abstractly (eager init is slow on CPU)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
  tok = build_t5_tokenizer(CAPTIONS * 4 + [LONG] * 4, tmp_path_factory.mktemp("tok"), vocab_size=48)
  return TextEncoder(tok, random_module(lambda: T5Encoder(T5Config.tiny(), rngs=nnx.Rngs(0)), 0))


@pytest.fixture(scope="module")
def pixel_encoders(text_encoder):
  return PixelEncoders(text_encoder, downsample=8, text_id="tiny-t5")


class Recorder:
  """Wraps Encoders and keeps every input and output (the ground truth for the round trip)."""

  def __init__(self, enc):
    self.enc, self.text_calls, self.image_calls = enc, [], []

  def __getattr__(self, name):
    return getattr(self.enc, name)

  def encode_text(self, prompts):
    emb, mask = self.enc.encode_text(prompts)
    self.text_calls.append((list(prompts), np.array(emb), np.array(mask)))
    return emb, mask

  def encode_images(self, x):
    moments = self.enc.encode_images(x)
    self.image_calls.append((np.array(x), np.array(moments)))
    return moments


def _save(path, hw, seed, fmt=None):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path, format=fmt)


def _all_records(out_dir, manifest):
  recs = []
  for shard in manifest["shards"]:
    from array_record.python.array_record_module import ArrayRecordReader
    r = ArrayRecordReader(os.path.join(out_dir, shard["records_file"]))
    recs += [deserialize_record(b) for b in r.read_all()]
    r.close()
  return recs


def test_round_trip_bitwise(tmp_path, text_encoder):
  """JSONL source with long captions; real PretrainedEncoders (tiny T5 + tiny VAE, 8 devices)."""
  sizes = [(40, 80), (64, 64), (80, 40), (50, 100), (70, 66)]
  rows = []
  for i, hw in enumerate(sizes):
    _save(tmp_path / f"im{i}.png", hw, i)
    rows.append({"image": f"im{i}.png", "caption": CAPTIONS[i], "label": i,
                 **({"long_caption": LONG} if i % 2 else {})})
  (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  vae = random_module(lambda: AutoencoderKL(VAEConfig.tiny(), rngs=nnx.Rngs(1)), 1)
  enc = Recorder(PretrainedEncoders(text_encoder, vae, encoder_id="tiny"))
  out = tmp_path / "out"
  opts = prepare_lib.PrepareOptions(table=TABLE, shard_size=3, batch_size=2, min_side=16)
  manifest = prepare_lib.prepare(sources.resolve_source(str(tmp_path / "m.jsonl")), enc, out,
                                 options=opts, source_id="m", progress=False)
  assert manifest["num_records"] == 5 and manifest["skipped"]["count"] == 0
  assert {k: b["count"] for k, b in manifest["buckets"].items()} == {"0.5": 2, "1.0": 2, "2.0": 1}
  assert manifest["encoders"]["id"] == "tiny" and manifest["table"]["0.5"] == [32, 64]
  recs = {r.name: r for r in _all_records(out, manifest)}
  assert sorted(recs) == [f"im{i}.png" for i in range(5)]
  for i, hw in enumerate(sizes):
    rec = recs[f"im{i}.png"]
    key, (bh, bw) = buckets.closest_bucket(*hw, TABLE)
    assert rec.bucket == key and rec.orig_size == hw and rec.meta == {"label": i}
    img = np.asarray(Image.open(tmp_path / f"im{i}.png").convert("RGB"))
    x = to_model_input(buckets.resize_and_center_crop(img, bh, bw, "bicubic"))
    hits = [(xs, m, j) for xs, m in enc.image_calls for j in range(len(xs))
            if xs[j].shape == x.shape and np.array_equal(xs[j], x)]
    assert len(hits) == 1, "the encoder must have seen exactly the cover-resized, cropped image"
    _, moments, j = hits[0]
    c = vae.config.latent_channels
    assert rec.mean.dtype == BF16 and rec.mean.shape == (bh // 8, bw // 8, c)
    np.testing.assert_array_equal(rec.mean.view(np.uint16),
                                  moments[j, ..., :c].astype(BF16).view(np.uint16))
    _, std = jax.jit(moments_to_mean_std)(moments[j:j + 1])
    np.testing.assert_array_equal(rec.std.view(np.uint16),
                                  np.asarray(std[0]).astype(BF16).view(np.uint16))
    for text, emb in [(CAPTIONS[i], rec.caption_emb)] + ([(LONG, rec.long_caption_emb)] if i % 2 else []):
      n_tokens = int(text_encoder.tokenize([text])[1].sum())
      assert emb.shape == (n_tokens, text_encoder.hidden_size)
      prompts, e, m = next(c for c in enc.text_calls if text in c[0])
      r = prompts.index(text)
      assert int(m[r].sum()) == n_tokens
      np.testing.assert_array_equal(emb.view(np.uint16), e[r, :n_tokens].astype(BF16).view(np.uint16))
    assert (rec.long_caption_emb is None) == (i % 2 == 0)
  null = pipeline.null_caption(out)
  ref, _ = text_encoder.encode_prompts([""])
  assert null.shape == (300, text_encoder.hidden_size) and null.dtype == np.float32
  np.testing.assert_allclose(null, np.asarray(ref[0]), rtol=1e-6, atol=1e-6)


def test_bad_inputs_skipped_and_reported(tmp_path, pixel_encoders):
  src = tmp_path / "src"
  src.mkdir()
  _save(src / "good1.png", (64, 64), 0)
  _save(src / "good2.jpg", (48, 96), 1)
  _save(tmp_path / "full.jpg", (64, 64), 2)
  data = (tmp_path / "full.jpg").read_bytes()
  (src / "truncated.jpg").write_bytes(data[:len(data) // 2])
  (src / "empty.jpg").write_bytes(b"")
  (src / "notes.png").write_text("this is a text file, not a PNG\n")
  _save(src / "tiny.png", (1, 1), 3)
  _save(src / "wide.png", (16, 160), 4)   # aspect 10 > 4.5
  _save(src / "nocap.png", (64, 64), 5)   # no caption file
  for name in ["good1", "good2", "truncated", "empty", "notes", "tiny", "wide"]:
    (src / f"{name}.txt").write_text(f"caption of {name}")
  out = tmp_path / "out"
  opts = prepare_lib.PrepareOptions(table=TABLE, shard_size=4, batch_size=2, min_side=16)
  manifest = prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, out,
                                 options=opts, progress=False)
  assert manifest["num_records"] == 2
  assert sorted(r.name for r in _all_records(out, manifest)) == ["good1.png", "good2.jpg"]
  skipped = {s["name"]: s["reason"] for s in manifest["skipped"]["files"]}
  assert skipped == {"truncated.jpg": "corrupt", "empty.jpg": "empty_file",
                     "notes.png": "not_an_image", "tiny.png": "too_small",
                     "wide.png": "extreme_aspect", "nocap.png": "no_caption"}
  assert manifest["skipped"]["count"] == 6
  report = prepare_lib.format_report(manifest)
  for name, reason in skipped.items():
    assert f"skipped {name}: {reason}" in report


class _FailingSource:
  """Raises (a simulated crash) when item `fail_at` is read."""

  def __init__(self, source, fail_at):
    self.source, self.fail_at = source, fail_at

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i == self.fail_at:
      raise KeyboardInterrupt("simulated interruption")
    return self.source[i]


def test_resume_after_interrupt(tmp_path, pixel_encoders):
  src = tmp_path / "src"
  src.mkdir()
  for i, hw in enumerate([(64, 64), (40, 80), (80, 40), (64, 64), (40, 80)]):
    _save(src / f"im{i}.png", hw, i)
    (src / f"im{i}.txt").write_text(CAPTIONS[i])
  out = tmp_path / "out"
  opts = prepare_lib.PrepareOptions(table=TABLE, shard_size=2, batch_size=2, min_side=16)
  source = sources.resolve_source(str(src))
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.prepare(_FailingSource(source, fail_at=2), pixel_encoders, out, options=opts,
                        source_id="src", progress=False)
  assert sorted(os.listdir(out)) == [".pixart_output.json", "data-00000.array_record", "data-00000.json",
                                     "prepare_config.json"]  # shard 1 dropped, no temp files
  mtimes = [os.stat(p).st_mtime_ns for p in shard_paths(out, 0)]
  with pytest.raises(ValueError, match="shard_size"):   # a different config is refused
    prepare_lib.prepare(source, pixel_encoders, out, source_id="src", progress=False,
                        options=prepare_lib.PrepareOptions(table=TABLE, shard_size=3, min_side=16))
  manifest = prepare_lib.prepare(source, pixel_encoders, out, options=opts, source_id="src",
                                 progress=False)
  assert [os.stat(p).st_mtime_ns for p in shard_paths(out, 0)] == mtimes
  assert manifest["num_records"] == 5 and len(manifest["shards"]) == 3
  assert sorted(r.name for r in _all_records(out, manifest)) == [f"im{i}.png" for i in range(5)]


def test_hosts_split_shards(tmp_path, pixel_encoders):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(5):
    _save(src / f"im{i}.png", (64, 64), i)
    (src / f"im{i}.txt").write_text(CAPTIONS[i])
  source, out = sources.resolve_source(str(src)), tmp_path / "out"
  opts = prepare_lib.PrepareOptions(table=TABLE, shard_size=2, batch_size=2, min_side=16)
  kw = dict(options=opts, progress=False, process_count=2, barrier=lambda: None)
  assert prepare_lib.prepare(source, pixel_encoders, out, process_index=1, **kw) is None
  assert sorted(f for f in os.listdir(out) if f.endswith(".json")) == [
      ".pixart_output.json", "data-00001.json", "prepare_config.json"]   # host 1 owns shard 1 of 3
  with pytest.raises(RuntimeError, match="missing"):   # host 0 alone cannot finish: shard 2 absent
    prepare_lib.write_manifest(str(out), num_shards=3, table=TABLE, table_name=None,
                               encoders=prepare_lib.encoders_info(pixel_encoders),
                               null_caption=np.zeros((300, pixel_encoders.text_dim)))
  manifest = prepare_lib.prepare(source, pixel_encoders, out, process_index=0, **kw)
  assert manifest["num_records"] == 5
  assert sorted(r.name for r in _all_records(out, manifest)) == [f"im{i}.png" for i in range(5)]


def test_pixel_encoders_are_lossless(tmp_path, pixel_encoders):
  src = tmp_path / "src"
  src.mkdir()
  _save(src / "a.png", (40, 80), 0)
  (src / "a.txt").write_text(CAPTIONS[0])
  out = tmp_path / "out"
  prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, out, progress=False,
                      options=prepare_lib.PrepareOptions(table=TABLE, batch_size=1, min_side=16))
  batch = next(pipeline.make_train_iterator(out, global_batch_size=1, mesh=None, seed=0))
  img = np.asarray(Image.open(src / "a.png"))
  want = to_model_input(buckets.resize_and_center_crop(img, 32, 64, "bicubic"))
  got = pixel_encoders.decode(batch["latents"])[0]
  assert batch["latents"].shape == (1, 4, 8, 192)
  assert np.abs(got - want).max() <= 2.0 ** -8   # bf16 storage of values in [-1, 1]
  np.testing.assert_array_equal(np.round((got + 1) * 127.5), np.round((want + 1) * 127.5))


def test_csv_manifest_source(tmp_path):
  _save(tmp_path / "x.png", (8, 8), 0)
  (tmp_path / "m.csv").write_text("path,text,long,label\nx.png,a cat,,3\nmissing.png,,,4\n")
  src = sources.resolve_source(str(tmp_path / "m.csv"), image_field="path", caption_field="text",
                               long_caption_field="long")
  ex = src[0]
  assert (ex.name, ex.caption, ex.long_caption, ex.meta) == ("x.png", "a cat", None, {"label": "3"})
  with pytest.raises(sources.SkipExample, match="empty") as e:
    src[1]
  assert e.value.reason == "bad_caption" and e.value.name == "missing.png"
  with pytest.raises(ValueError, match="no column"):
    sources.resolve_source(str(tmp_path / "m.csv"))
  with pytest.raises(FileNotFoundError, match="registered"):
    sources.resolve_source("nope:nothing")
  sources.register_source("test:one", lambda: [ex])
  assert sources.resolve_source("test:one")[0] is ex


def test_record_decoding_is_safe():
  rng = np.random.default_rng(0)
  rec = LatentRecord(
      name="n", bucket="1.0", orig_size=(5, 6), mean=rng.standard_normal((2, 2, 4)).astype(BF16),
      std=np.ones((2, 2, 4), BF16), caption="c", caption_emb=np.ones((3, 8), BF16))
  data = serialize_record(rec)
  back = deserialize_record(data)
  np.testing.assert_array_equal(back.mean.view(np.uint16), rec.mean.view(np.uint16))
  assert back.caption_len == 3 and back.long_caption_emb is None
  d = msgpack.unpackb(data)
  bad = dict(d, mean=dict(d["mean"], dtype="object"))
  with pytest.raises(RecordError, match="disallowed dtype"):
    deserialize_record(msgpack.packb(bad))
  with pytest.raises(RecordError, match="bytes do not hold"):
    deserialize_record(msgpack.packb(dict(d, mean=dict(d["mean"], shape=[3, 2, 4]))))
  with pytest.raises(RecordError, match="extension"):
    deserialize_record(msgpack.packb(dict(d, name=msgpack.ExtType(1, b"x"))))
  with pytest.raises(RecordError, match="token counts"):
    deserialize_record(msgpack.packb(dict(d, caption_len=7)))
  with pytest.raises(RecordError, match="not valid msgpack"):
    deserialize_record(data[:20])


def test_cli_help_lists_flags():
  out = subprocess.run([sys.executable, "-m", "pixart_jax.prepare", "--help"],
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert "Precompute a training dataset" in out.stdout, out.stderr   # absl exits 1 after --help
  for flag in ("--source", "--encoders", "--out", "--table", "--shard_size", "--batch_size",
               "--caption_field", "tensorflow_datasets"):
    assert flag in out.stdout


@pytest.mark.slow
def test_cli_end_to_end_matches_torch_reference(tmp_path):
  """`python -m pixart_jax.prepare` on a diffusers-layout dir (tiny random T5 + VAE saved by
  transformers / diffusers): stored bf16 moments and embeddings match the PyTorch models."""
  import torch
  from diffusers import AutoencoderKL as TorchVAE
  from transformers import T5Config as HFT5Config, T5EncoderModel
  from pixart_jax.models.tokenizer import load_tokenizer

  model_dir = tmp_path / "model"
  build_t5_tokenizer(CAPTIONS * 4, model_dir / "tokenizer", vocab_size=40)
  torch.manual_seed(0)
  t5 = T5EncoderModel(HFT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
  t5.save_pretrained(model_dir / "text_encoder")
  vae = TorchVAE(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                 latent_channels=4).eval()
  vae.save_pretrained(model_dir / "vae")
  src = tmp_path / "src"
  src.mkdir()
  _save(src / "square.png", (256, 256), 0)     # exactly the 256-table "1.0" bucket: no resampling
  _save(src / "wide.png", (176, 352), 1)       # exactly the "0.5" bucket
  (src / "square.txt").write_text(CAPTIONS[0])
  (src / "wide.txt").write_text(CAPTIONS[1])
  out = tmp_path / "out"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "pixart_jax.prepare", f"--source={src}",
                         f"--encoders={model_dir}", f"--out={out}", "--table=256", "--batch_size=2",
                         "--dtype=float32", "--noprogress"], capture_output=True, text=True,
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)), env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 records in 2 buckets, 0 skipped" in proc.stdout
  manifest = pipeline.load_manifest(out)
  tok = load_tokenizer(model_dir)
  for rec in _all_records(out, manifest):
    img = np.asarray(Image.open(src / rec.name))
    with torch.no_grad():
      x = torch.from_numpy(to_model_input(img)).permute(2, 0, 1)[None]
      dist = vae.encode(x).latent_dist
      ids, mask = tok.tokenize([rec.caption])
      emb = t5(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state[0].numpy()
    for ours, ref in ((rec.mean, dist.mean), (rec.std, dist.std)):
      ref = ref[0].permute(1, 2, 0).numpy()
      assert ours.shape == ref.shape
      np.testing.assert_allclose(ours.astype(np.float32), ref, rtol=2 ** -8, atol=1e-5)
    n = int(mask.sum())
    assert rec.caption_len == n
    np.testing.assert_allclose(rec.caption_emb.astype(np.float32), emb[:n], rtol=2 ** -8, atol=1e-5)


def test_fifo_and_device_named_as_images_are_skipped(tmp_path, pixel_encoders):
  """A FIFO and a /dev/zero link named as images (and a FIFO caption): skipped as not_a_file / bad_caption, the real
  image encoded. Before, the FIFO blocked forever and /dev/zero exhausted memory."""
  import signal

  src = tmp_path / "src"
  src.mkdir()
  _save(src / "good.png", (64, 64), 0)
  os.mkfifo(src / "fifo.png")
  os.symlink("/dev/zero", src / "zero.png")
  _save(src / "cap.png", (64, 64), 1)
  for n in ("good", "fifo", "zero"):
    (src / f"{n}.txt").write_text(CAPTIONS[0])
  os.symlink("/dev/zero", src / "cap.txt")

  def alarm(*_):
    raise TimeoutError("prepare blocked on a FIFO")

  old = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(120)
  try:
    manifest = prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, tmp_path / "out",
                                   options=prepare_lib.PrepareOptions(table=TABLE, batch_size=2, min_side=16),
                                   progress=False)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  assert manifest["num_records"] == 1
  assert {f["name"]: f["reason"] for f in manifest["skipped"]["files"]} == {
      "fifo.png": "not_a_file", "zero.png": "not_a_file", "cap.png": "no_caption"}


def test_prepare_refuses_a_foreign_output_folder(tmp_path, pixel_encoders):
  """An unrelated folder holding manifest.json / data-00000.* is refused before anything is written, with
  --overwrite (overwrite=True) too."""
  src = tmp_path / "src"
  src.mkdir()
  _save(src / "a.png", (64, 64), 0)
  (src / "a.txt").write_text(CAPTIONS[0])
  out = tmp_path / "mine"
  out.mkdir()
  (out / "manifest.json").write_text("precious")
  (out / "notes.txt").write_text("mine")
  opts = prepare_lib.PrepareOptions(table=TABLE, batch_size=2, min_side=16)
  with pytest.raises(FileExistsError, match="prepare did not write"):
    prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, out, options=opts, progress=False)
  assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt"] and (out / "manifest.json").read_text() == "precious"
  with pytest.raises(ValueError, match="overlaps the input folder"):
    prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, src / "out", options=opts, progress=False)
  assert not (src / "out").exists()
  with pytest.raises(FileExistsError, match="never replaced or deleted"):
    prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, out, options=opts, progress=False,
                        overwrite=True)
  assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt"] and (out / "manifest.json").read_text() == "precious"


def test_prepare_overwrite_replaces_only_its_own_dataset(tmp_path, pixel_encoders):
  """A rerun with another configuration is refused; with overwrite=True prepare deletes its own dataset files
  (config, manifest, shards) and writes the new one; a file the user put in the folder stays."""
  src = tmp_path / "src"
  src.mkdir()
  _save(src / "a.png", (64, 64), 0)
  (src / "a.txt").write_text(CAPTIONS[0])
  out = tmp_path / "ds"
  opts = prepare_lib.PrepareOptions(table=TABLE, batch_size=2, min_side=16)
  assert prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, out, options=opts,
                             progress=False)["num_records"] == 1
  (out / "notes.txt").write_text("mine")
  strict = prepare_lib.PrepareOptions(table=TABLE, batch_size=2, min_side=128)
  with pytest.raises(ValueError, match=r"min_side: was 16, now 128.*pass --overwrite"):
    prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, out, options=strict, progress=False)
  manifest = prepare_lib.prepare(sources.resolve_source(str(src)), pixel_encoders, out, options=strict,
                                 progress=False, overwrite=True)
  assert manifest["num_records"] == 0 and (out / "notes.txt").read_text() == "mine"
  assert json.loads((out / "prepare_config.json").read_text())["min_side"] == 128
