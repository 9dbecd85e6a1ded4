"""Inpainting and image-to-image on the trained demo (the session's shared run): the README's numbers."""
import pytest


@pytest.mark.slow  # builds on the session's trained demo; ~1-2 min on 2 cores
def test_inpainting_repaints_the_true_digit(trained_demo):
  from pixart_jax.demo_edit import measure_inpainting

  r = measure_inpainting(trained_demo, seed=0)
  assert r["digits"] == 450
  assert r["kept_half_max_abs_error"] == 0.0, r  # the kept half is the real digit, exactly (lossless autoencoder)
  assert r["true_caption_recognised"] >= 0.9, r
  assert r["top_half_only_accuracy"] < 0.6, r  # the masked half matters: the repaint is what gets recognised
  assert r["other_caption_follows_caption"] > 0.1, r  # another caption steers the repaint (measured ~50 %)


@pytest.mark.slow
def test_strength_moves_from_the_image_to_the_caption(trained_demo, tmp_path):
  from PIL import Image

  from pixart_jax.demo_edit import strength_sweep, sweep_figure

  rows, numbers = strength_sweep(trained_demo, seed=0, strengths=(0.2, 1.0))
  assert rows.shape == (10, 3, 8, 8, 3)
  assert numbers["0.2"]["input_digit"] > numbers["1"]["input_digit"], numbers
  assert numbers["1"]["caption_digit"] >= 0.9, numbers
  sweep_figure(rows, tmp_path / "sweep.png")
  assert Image.open(tmp_path / "sweep.png").size == (3 * 48 + 2 * 4, 10 * 48 + 9 * 4)
