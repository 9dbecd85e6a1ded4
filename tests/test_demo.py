"""The embedded demo: its dataset, its classifier, and `python -m pixart_jax.demo` end to end.

A short run checks that every stage produces what it promises; the full default run (what `make demo` does,
~5 min on 2 cores) checks the acceptance target: prompt adherence >= 90 % with guidance.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixart_jax.data import demo as demo_data
from train_testlib import run_demo


def test_digits_source_pairs_each_image_with_captions_naming_its_digit():
  src = demo_data.DigitsSource()
  assert len(src) == 1797
  words = demo_data.WORDS
  for i in (0, 1, 2, 3, 500, 1796):
    ex = src[i]
    d = ex.meta["label"]
    assert ex.image.shape == (8, 8, 3) and ex.image.dtype == np.uint8
    for text in (ex.caption, ex.long_caption):
      tokens = text.replace(",", " ").split()
      assert words[d] in tokens or str(d) in tokens, text
  # all four phrasings are used, and they name different digits differently
  caps = demo_data.all_captions()
  assert len(set(caps)) == 40


def test_pixels_round_trip_into_the_classifier_space():
  raw, labels = demo_data.load_digits()
  rgb = demo_data.to_rgb(raw)
  feats = demo_data.from_rgb(rgb.astype(np.float32) / 127.5 - 1.0)
  np.testing.assert_allclose(feats, raw.reshape(len(raw), 64), atol=16 / 255 + 1e-5)
  with pytest.raises(ValueError, match="8, 8, 3"):
    demo_data.from_rgb(np.zeros((2, 16, 16, 3), np.float32))


def test_demo_classifier_recognises_real_digits():
  from pixart_jax.demo import classifier

  clf, held_out = classifier()
  assert held_out > 0.97
  raw, labels = demo_data.load_digits()
  feats = demo_data.from_rgb(demo_data.to_rgb(raw).astype(np.float32) / 127.5 - 1.0)
  assert np.mean(clf.predict(feats) == labels) > 0.99


@pytest.mark.slow  # prepare + 40 train steps + sampling in a subprocess: ~20 s on 2 cores
def test_demo_runs_end_to_end(tmp_path):
  work = tmp_path / "demo"
  proc, report = run_demo(work, "--steps", "40", "--per_digit", "2", "--batch_size", "32")
  assert report["train_steps"] == 40 and report["batch_size"] == 32
  for key in ("adherence_guided", "adherence_unguided"):
    assert 0.0 <= report[key] <= 1.0
  assert report["classifier_held_out_accuracy"] > 0.97
  assert np.isfinite(report["final_loss"])
  for key in ("fid_digits_guided", "fid_digits_unguided", "fid_digits_real_subset"):  # tests/test_demo_fid.py
    assert np.isfinite(report[key]) and report[key] > 0
  manifest = json.loads((work / "data" / "manifest.json").read_text())
  assert manifest["num_records"] == 1797
  assert manifest["buckets"]["1.00"]["latent_shape"] == [4, 4, 12]
  for d in range(10):
    for i in range(2):
      with Image.open(work / "samples" / f"digit_{d}_{i}.png") as im:
        assert im.size == (64, 64)
  with Image.open(work / "samples" / "contact_sheet.png") as sheet:
    assert sheet.size[0] >= 2 * 48 and sheet.size[1] >= 10 * 48
  assert (work / "train" / "checkpoints" / "40").is_dir()
  assert "prompt adherence" in proc.stdout


@pytest.mark.slow  # the full default demo (4,000 steps): ~5 min on 2 cores, shared by the session (conftest)
def test_demo_meets_the_prompt_adherence_target(trained_demo_dir):
  report = json.loads((trained_demo_dir / "demo_report.json").read_text())
  assert report["train_steps"] == 4000 and report["guidance_scale"] == 4.5
  assert report["adherence_guided"] >= 0.9, report
  assert report["adherence_guided"] > report["adherence_unguided"], report


@pytest.mark.slow  # builds on the session's trained demo
def test_a_reloaded_demo_run_samples_what_the_run_sampled(trained_demo):
  """load_trained (what metrics, ControlNet and distillation build on) restores the EMA weights and encoders."""
  from flax import nnx

  from pixart_jax.demo import classifier, sample_digits

  report = trained_demo.report
  graphdef, params = nnx.split(trained_demo.model, nnx.Param)
  guided, _, labels = sample_digits(graphdef, params, trained_demo.encoders.text, 10, report["guidance_scale"],
                                    report["seed"] + 1)
  clf, _ = classifier()
  adherence = float(np.mean(clf.predict(demo_data.from_rgb(trained_demo.encoders.decode(guided))) == labels))
  assert abs(adherence - report["adherence_guided"]) <= 0.02, (adherence, report)
