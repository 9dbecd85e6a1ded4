"""`prepare --source tfds:NAME[:SPLIT]` end to end on a real TFDS dataset in array_record format, built here from
local files by tests/tfds_tiny_builder.py, with the caption taken from a named feature. The reader runs with
TensorFlow blocked (tensorflow-datasets alone)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

pytest.importorskip("tensorflow_datasets")

from pixart_jax.data import pipeline, sources  # noqa: E402
from pixart_jax.data.records import deserialize_record  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ROWS = {
    "train": [("a.png", "a red square on a table", (64, 64)), ("b.png", "two cats sleeping", (48, 96)),
              ("c.png", "a blue circle", (64, 64))],
    "validation": [("d.png", "green hills at dawn", (96, 48)), ("e.png", "an old car in the rain", (64, 64))],
}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """(data_dir, name) of the built dataset."""
  import tfds_tiny_builder
  root = tmp_path_factory.mktemp("tfds")
  manual = root / "manual"
  manual.mkdir()
  rng = np.random.default_rng(0)
  for split, rows in ROWS.items():
    lines = []
    for i, (name, caption, (h, w)) in enumerate(rows):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(manual / name)
      lines.append(json.dumps({"file": name, "description": caption, "label": i}))
    (manual / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  name = tfds_tiny_builder.build(manual, root / "data")
  assert list((root / "data" / name / "1.0.0").glob("*.array_record-*")), "not built in array_record format"
  return root / "data", name


def test_source_reads_the_named_caption_feature(tfds_dir):
  data_dir, name = tfds_dir
  src = sources.resolve_source(f"tfds:{name}", caption_field="description", tfds_data_dir=str(data_dir))
  assert len(src) == len(ROWS["train"])  # the default split is train
  captions = {row[0]: row[1] for row in ROWS["train"]}
  for i in range(len(src)):
    ex = src[i]
    assert ex.caption == captions[ex.meta["file"]] and ex.long_caption is None
    assert np.asarray(ex.image).shape[:2] == next(r[2] for r in ROWS["train"] if r[0] == ex.meta["file"])


def test_source_errors_name_the_feature_the_dataset_and_the_split(tfds_dir):
  data_dir, name = tfds_dir
  with pytest.raises(ValueError, match=r"no feature 'caption' \(--caption_field\); its features: \['description'"):
    sources.resolve_source(f"tfds:{name}", tfds_data_dir=str(data_dir))
  with pytest.raises(ValueError, match=r"tfds:no_such_set:train in --tfds_data_dir .*: Dataset no_such_set not found"):
    sources.resolve_source("tfds:no_such_set", tfds_data_dir=str(data_dir))
  with pytest.raises(ValueError, match=r"Unknown split 'test'"):
    sources.resolve_source(f"tfds:{name}:test", caption_field="description", tfds_data_dir=str(data_dir))


def _tiny_pipeline_dir(model_dir: pathlib.Path) -> None:
  """A diffusers-layout encoders dir: tiny random T5 (transformers) + VAE (diffusers) and a SentencePiece
  tokenizer."""
  import torch
  from diffusers import AutoencoderKL as TorchVAE
  from transformers import T5Config as HFT5Config, T5EncoderModel

  from pixart_jax.models.tokenizer import build_t5_tokenizer

  build_t5_tokenizer([r[1] for rows in ROWS.values() for r in rows] * 8, model_dir / "tokenizer", vocab_size=40)
  torch.manual_seed(0)
  T5EncoderModel(HFT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            relative_attention_num_buckets=8, relative_attention_max_distance=20,
                            feed_forward_proj="gated-gelu", dropout_rate=0.0)).save_pretrained(model_dir / "text_encoder")
  TorchVAE(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
           latent_channels=4).save_pretrained(model_dir / "vae")


def _prepare_cli(tmp_path, *args):
  """Runs `python -m pixart_jax.prepare ARGS` with TensorFlow made unimportable (a `tensorflow` package that
  raises ImportError shadows any installed one)."""
  block = tmp_path / "block_tf"
  (block / "tensorflow").mkdir(parents=True, exist_ok=True)
  (block / "tensorflow" / "__init__.py").write_text("raise ImportError('TensorFlow is blocked in this test')\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([str(block), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return subprocess.run([sys.executable, "-m", "pixart_jax.prepare", *args, "--noprogress"], capture_output=True,
                        text=True, timeout=600, cwd=REPO, env=env)


@pytest.mark.slow
def test_prepare_cli_tfds_split_end_to_end(tfds_dir, tmp_path):
  data_dir, name = tfds_dir
  model_dir = tmp_path / "model"
  _tiny_pipeline_dir(model_dir)
  out = tmp_path / "out"
  proc = _prepare_cli(tmp_path, f"--source=tfds:{name}:validation", f"--tfds_data_dir={data_dir}",
                      "--caption_field=description", "--long_caption_field=", f"--encoders={model_dir}",
                      f"--out={out}", "--table=256", "--min_side=32", "--batch_size=2", "--dtype=float32")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 records in 2 buckets, 0 skipped" in proc.stdout, proc.stdout
  manifest = pipeline.load_manifest(out)
  assert manifest["source"] == f"tfds:{name}:validation"
  rows = {r[0]: r for r in ROWS["validation"]}
  seen = set()
  for shard in manifest["shards"]:
    reader = ArrayRecordReader(str(out / shard["records_file"]))
    for raw in reader.read_all():
      rec = deserialize_record(raw)
      file = rec.meta["file"]
      assert rec.caption == rows[file][1]
      assert tuple(rec.orig_size) == rows[file][2]
      assert rec.name.startswith(f"{name}/validation[") and rec.caption_len > 0
      assert np.isfinite(rec.mean.astype(np.float32)).all()
      seen.add(file)
    reader.close()
  assert seen == set(rows)

  # A feature the dataset lacks: one `error:` line naming it, exit 1, nothing written.
  bad = _prepare_cli(tmp_path, f"--source=tfds:{name}", f"--tfds_data_dir={data_dir}", f"--encoders={model_dir}",
                     f"--out={tmp_path / 'out2'}", "--table=256")
  assert bad.returncode == 1
  lines = bad.stderr.strip().splitlines()
  assert lines[-1].startswith("error: source tfds:tiny_captions:train has no feature 'caption'"), bad.stderr[-2000:]
  assert "Traceback" not in bad.stderr and not (tmp_path / "out2").exists()
