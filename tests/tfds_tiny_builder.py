"""A small TFDS builder for the `tfds:` source tests: images and captions from local files, no download.

The manual dir holds `<split>.jsonl` (one row per example: {"file": "x.png", "description": "...", "label": 3}) and
the image files it names. `build(manual_dir, data_dir)` writes the dataset in array_record format with
tensorflow-datasets alone (image files are stored as their encoded bytes, so TensorFlow is not needed to build it
either).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "validation")


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Captioned images from a manual dir; the caption is the `description` feature."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Place <split>.jsonl and the image files it names in the manual dir."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "description": tfds.features.Text(),
        "file": tfds.features.Text(),
        "label": np.int64,
    }))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(pathlib.Path(dl_manager.manual_dir), split) for split in SPLITS}

  def _generate_examples(self, root: pathlib.Path, split: str):
    for line in (root / f"{split}.jsonl").read_text().splitlines():
      row = json.loads(line)
      yield row["file"], {"image": root / row["file"], "description": row["description"], "file": row["file"],
                          "label": row["label"]}


def build(manual_dir, data_dir) -> str:
  """Writes `tiny_captions` (array_record) under `data_dir`; returns the dataset's name."""
  builder = TinyCaptions(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder.name
