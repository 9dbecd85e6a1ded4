"""Image-to-image and inpainting measured on the embedded demo (a finished `python -m pixart_jax.demo` run).

  python -m pixart_jax.demo_edit --workdir workdir_demo                       (the numbers, as JSON)
  python -m pixart_jax.demo_edit --workdir workdir_demo --figure docs/img2img_strength_sweep.png

* Inpainting: the real digits of the classifier's held-out split (25 %, `classifier_split`) with their bottom half
  masked (4 of 8 pixel rows = 2 of 4 latent rows) are repainted by `diffusion.denoise` (DPM-Solver++, 20 steps,
  guidance 4.5) with the caption of the true digit, and with the caption of another digit; an SVM trained on the
  other 75 % of the real digits classifies the results. The demo's diffusion model itself trained on all 1,797
  scans (the demo has no held-out split for it), so these digits are held out from the classifier only.
* Image-to-image: one held-out digit per class, re-generated at strengths 0.2 ... 1.0 with the caption of the next
  digit ((d + 1) mod 10): how often the SVM still sees the input digit and how often the caption's digit.
Reads the workdir only.
"""
from __future__ import annotations

import functools
import json
import pathlib

from absl import app, flags

from pixart_jax import demo  # noqa: F401 - defines --workdir (here: a finished demo run, only read) and --seed

FLAGS = flags.FLAGS
flags.DEFINE_string("figure", None, "Write the img2img strength sweep contact sheet here (PNG).")

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
GUIDANCE = 4.5
SAMPLER, STEPS = "dpm-solver", 20


def classifier_split(seed: int = 0):
  """(train indices, held-out indices) of the real digits: the split of `demo.classifier` (25 % held out)."""
  import numpy as np
  from sklearn.model_selection import train_test_split

  from pixart_jax.data.demo import load_digits

  _, y = load_digits()
  return train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)


def held_out_classifier():
  """An SVM (the demo's settings) fitted on the training split only; returns (svm, held-out indices)."""
  from sklearn.svm import SVC

  from pixart_jax.data.demo import load_digits

  x, y = load_digits()
  train, test = classifier_split()
  return SVC(gamma=0.001, C=10).fit(x[train].reshape(len(train), -1), y[train]), test


class Editor:
  """The trained demo's EMA DiT, text encoder and pixel autoencoder, with one jitted `denoise` per setting."""

  def __init__(self, trained):
    import jax
    from flax import nnx

    from pixart_jax.diffusion.denoise import STATIC_ARGNAMES, denoise

    self.encoders = trained.encoders
    graphdef, self.params = nnx.split(trained.model, nnx.Param)
    self.run = jax.jit(functools.partial(denoise, graphdef), static_argnames=STATIC_ARGNAMES)

  def latents(self, images):
    """(N 8 8 3) images in [-1, 1] -> (N 4 4 12) latents (the pixel autoencoder's mean)."""
    import numpy as np

    moments = self.encoders.encode_images(np.asarray(images, np.float32))
    return moments[..., :self.encoders.latent_channels]

  def edit(self, images, digits, *, seed: int, strength: float = 1.0, pixel_mask=None):
    """Re-generates `images` (N 8 8 3, [-1, 1]) for the captions `caption(digits[i], 0)`: image-to-image at
    `strength`, inpainting where `pixel_mask` (N 8 8 1, 1 = repaint) is 1. Returns (N 8 8 3) images."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pixart_jax.data import demo as demo_data
    from pixart_jax.demo import DOWNSAMPLE
    from pixart_jax.pipeline import latent_mask

    text = self.encoders.text
    cond = text.encode_prompts([demo_data.caption(int(d), 0) for d in digits])
    uncond = text.encode_prompts([""] * len(digits))
    z = jnp.asarray(self.latents(images))
    x_T = jax.random.normal(jax.random.key(seed), z.shape, jnp.float32)
    kw = {}
    if pixel_mask is not None:
      kw["mask"] = latent_mask(jnp.asarray(pixel_mask, jnp.float32), DOWNSAMPLE)
    out = self.run(self.params, x_T, cond, uncond, jnp.float32(GUIDANCE), None, sampler=SAMPLER, steps=STEPS,
                   strength=strength, image_latents=z, **kw)
    return self.encoders.decode(np.asarray(out))


def bottom_half_mask(n: int):
  """(n 8 8 1) pixel mask, 1 on the bottom 4 rows (repaint)."""
  import numpy as np

  from pixart_jax.data.demo import IMAGE_SIZE

  m = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
  m[:, IMAGE_SIZE // 2:] = 1.0
  return m


def _real(indices):
  import numpy as np

  from pixart_jax.data.demo import load_digits, to_rgb

  x, y = load_digits()
  return to_rgb(x[indices]).astype(np.float32) / 127.5 - 1.0, y[indices]


def measure_inpainting(trained, seed: int = 0) -> dict:
  """The inpainting numbers (see the module docstring) over the classifier's held-out digits."""
  import numpy as np

  from pixart_jax.data import demo as demo_data

  clf, test = held_out_classifier()
  images, labels = _real(test)
  mask = bottom_half_mask(len(labels))
  editor = Editor(trained)
  other = (labels + np.random.default_rng(seed).integers(1, 10, len(labels))) % 10  # never the true digit
  true_caption = editor.edit(images, labels, seed=seed, pixel_mask=mask)
  other_caption = editor.edit(images, other, seed=seed, pixel_mask=mask)
  top_only = np.where(mask > 0.5, -1.0, images)  # the bottom half blanked, not repainted
  predict = lambda im: clf.predict(demo_data.from_rgb(im))  # noqa: E731
  p_true, p_other = predict(true_caption), predict(other_caption)
  return {
      "digits": int(len(labels)),
      "classifier_accuracy_on_the_real_digits": float(np.mean(predict(images) == labels)),
      "top_half_only_accuracy": float(np.mean(predict(top_only) == labels)),
      "true_caption_recognised": float(np.mean(p_true == labels)),
      "other_caption_follows_caption": float(np.mean(p_other == other)),
      "other_caption_keeps_true_digit": float(np.mean(p_other == labels)),
      "kept_half_max_abs_error": float(np.abs(np.where(mask > 0.5, 0.0, true_caption - images)).max()),
  }


def strength_sweep(trained, seed: int = 0, strengths=STRENGTHS):
  """One held-out digit per class re-generated with the next digit's caption at each strength.

  Returns (rows (10, 1 + len(strengths), 8, 8, 3) in [-1, 1]: the input then each strength, numbers per strength:
  share recognised as the input digit / as the caption's digit)."""
  import numpy as np

  from pixart_jax.data import demo as demo_data

  clf, test = held_out_classifier()
  _, y = _real(test)
  pick = np.array([test[np.flatnonzero(y == d)[0]] for d in range(10)])
  images, labels = _real(pick)
  target = (labels + 1) % 10
  editor = Editor(trained)
  cols, numbers = [images], {}
  for s in strengths:
    out = editor.edit(images, target, seed=seed, strength=s)
    pred = clf.predict(demo_data.from_rgb(out))
    numbers[f"{s:g}"] = {"input_digit": float(np.mean(pred == labels)), "caption_digit": float(np.mean(pred == target))}
    cols.append(out)
  return np.stack(cols, axis=1), numbers


def sweep_figure(rows, path: str | pathlib.Path) -> None:
  """Rows of (input, strengths ...) as a contact sheet, each 8x8 image enlarged 6x (nearest)."""
  import numpy as np

  from pixart_jax.images import contact_sheet, to_uint8

  n, k = rows.shape[:2]
  cells = to_uint8(rows.reshape((n * k,) + rows.shape[2:]))
  big = np.repeat(np.repeat(cells, 6, axis=1), 6, axis=2)
  contact_sheet(big, cols=k, gap=4).save(path)


def main(argv):
  del argv
  from pixart_jax import checks
  from pixart_jax.demo import load_trained

  checks.seed("--seed", FLAGS.seed)
  if FLAGS.figure and not FLAGS.figure.lower().endswith(".png"):
    raise ValueError(f"--figure must name a .png file, got {FLAGS.figure!r}")
  trained = load_trained(FLAGS.workdir)
  report = {"inpainting": measure_inpainting(trained, FLAGS.seed)}
  rows, report["img2img_strength_sweep"] = strength_sweep(trained, FLAGS.seed)
  if FLAGS.figure:
    sweep_figure(rows, FLAGS.figure)
    report["figure"] = FLAGS.figure
  print(json.dumps(report, indent=2))


def run():
  from pixart_jax import cli_errors

  app.run(cli_errors.guard(main))


if __name__ == "__main__":
  run()
