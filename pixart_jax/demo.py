"""The embedded demo: the whole system, end to end, on a laptop CPU in minutes.

  python -m pixart_jax.demo --workdir workdir_demo          (what `make demo` runs)

1. Data: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package) as 8x8 RGB images,
   with captions that name the digit in four phrasings ("a handwritten seven", "the number 7", ...).
2. Encoders: a SentencePiece T5 tokenizer trained on the demo captions and our NNX T5 encoder with random weights
   (text features), and a lossless pixel "autoencoder" (2x2 space-to-depth: a 4x4x12 latent IS the 8x8x3 image).
3. `prepare` writes the ArrayRecord dataset; the real training code (`pixart_jax.train`) trains a tiny PixArt
   (AdamW, IDDPM loss, caption dropout for CFG, EMA) on the CPU mesh.
4. Sampling: 10 images per digit with DPM-Solver++ (20 steps) and classifier-free guidance, saved as
   samples/digit_<d>_<i>.png plus a contact sheet.
5. Prompt adherence: the share of samples that a classifier trained on the real digits assigns to the prompted
   digit, with and without guidance; and an FID of the samples against the real digits in that classifier's input
   space (`digit_fid`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

from absl import app, flags

# The run's shapes and config (in their own module: config files import them without this module's flags)
from pixart_jax.demo_config import CAPTION_TOKENS, DOWNSAMPLE, T5_WIDTH, latent_size, train_config  # noqa: F401

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir_demo", "Output directory (dataset, checkpoints, samples, report).")
flags.DEFINE_integer("steps", 4000, "Training steps.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_float("guidance", 4.5, "Guidance scale of the guided samples (PixArt-Sigma default).")
flags.DEFINE_integer("per_digit", 10, "Samples per digit.")
flags.DEFINE_integer("seed", 0, "Seed of the run.")

FEATURE_GAIN = 3.0  # caption features reach the projection GELU at std ~3 (see DemoTextEncoder)


class DemoTextEncoder:
  """Our T5 (random weights) padded/truncated to CAPTION_TOKENS, features rescaled.

  PixArt's caption projection is initialised N(0, 0.02), sized for 4096-wide T5-XXL features: a unit-RMS feature
  then reaches the first GELU at std 0.02 * sqrt(4096) ~ 1.3. A tiny random T5 has unit-RMS outputs but only
  `D` channels, so its features are scaled by FEATURE_GAIN / (0.02 * sqrt(D)) to give the projection a signal
  level of the same order.
  """

  def __init__(self, text_encoder, max_length: int):
    self.inner, self.max_length = text_encoder, max_length
    self.hidden_size = text_encoder.hidden_size
    self.scale = FEATURE_GAIN / (0.02 * self.hidden_size**0.5)

  def encode_prompts(self, prompts, max_length: int | None = None, *, trim: bool = False):
    emb, mask = self.inner.encode_prompts(list(prompts), max_length=max_length or self.max_length, trim=trim)
    return emb * self.scale, mask


def build_encoders(workdir: pathlib.Path, seed: int, *, reuse_tokenizer: bool = False):
  """The demo's text encoder (tokenizer trained on the captions into `workdir/tokenizer`, or reloaded from there
  when `reuse_tokenizer`; random T5 from `seed`) and its lossless pixel autoencoder."""
  import jax.numpy as jnp
  from flax import nnx

  from pixart_jax.data import demo as demo_data
  from pixart_jax.data.encoders import PixelEncoders
  from pixart_jax.models.t5 import T5Config, T5Encoder
  from pixart_jax.models.text_encoder import TextEncoder
  from pixart_jax.models.tokenizer import build_t5_tokenizer, load_tokenizer

  if reuse_tokenizer:
    tok = load_tokenizer(workdir / "tokenizer")
  else:
    tok = build_t5_tokenizer(demo_data.all_captions() * 8, workdir / "tokenizer", vocab_size=128)
  cfg = T5Config.tiny(vocab_size=max(128, tok.vocab_size), d_model=T5_WIDTH, d_ff=2 * T5_WIDTH, num_layers=2,
                      num_heads=4, d_kv=T5_WIDTH // 4)
  t5 = T5Encoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
  text = DemoTextEncoder(TextEncoder(tok, t5), CAPTION_TOKENS)
  return PixelEncoders(text, downsample=DOWNSAMPLE, text_id="demo-t5-random")


def prepare_dataset(work: pathlib.Path, seed: int, *, progress: bool = True):
  """Builds the encoders (`build_encoders`) and writes the digits dataset into `work/data`; returns the encoders."""
  from pixart_jax.data import demo as demo_data
  from pixart_jax.data.prepare_lib import PrepareOptions, prepare
  from pixart_jax.data.sources import resolve_source

  enc = build_encoders(work, seed)
  prepare(resolve_source("demo:digits"), enc, str(work / "data"), options=PrepareOptions(
      table={"1.00": (demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE)}, shard_size=600, batch_size=300, min_side=8,
      resample="nearest", num_threads=2), source_id="demo:digits", progress=progress)
  return enc


@dataclasses.dataclass
class TrainedDemo:
  """A finished demo run, reloaded: what the research features (metrics, ControlNet, distillation) build on.

  `model` holds the EMA weights of the last checkpoint; `encoders.text` is the demo's T5 (same seed, same
  tokenizer file), `encoders.decode` maps (B 4 4 12) latents to (B 8 8 3) images in [-1, 1].
  """
  workdir: pathlib.Path
  config: Any  # the run's ml_collections ConfigDict (train_config)
  spec: Any  # models.spec.ModelSpec
  model: Any  # models.dit.PixArtSigma
  encoders: Any  # data.encoders.PixelEncoders
  report: dict


def load_trained(workdir: str | pathlib.Path) -> TrainedDemo:
  """Reloads the demo run in `workdir` (written by `python -m pixart_jax.demo --workdir DIR`)."""
  from pixart_jax.convert.ours import load_ours
  from pixart_jax.train.loop import model_spec

  work = pathlib.Path(workdir).absolute()
  report_file = work / "demo_report.json"
  if not report_file.is_file():
    raise FileNotFoundError(f"demo workdir {work}: no demo_report.json (run `python -m pixart_jax.demo --workdir "
                            f"{work}` first)")
  report = json.loads(report_file.read_text())
  config = train_config(str(work / "data"), steps=report["train_steps"], batch=report["batch_size"],
                        seed=report.get("seed", 0))
  spec = model_spec(config.model)
  model = load_ours(work / "train", spec)
  return TrainedDemo(work, config, spec, model, build_encoders(work, report.get("seed", 0), reuse_tokenizer=True),
                     report)


def classifier():
  """An SVM on the real 8x8 digits; returns (model, held-out accuracy)."""
  from sklearn.model_selection import train_test_split
  from sklearn.svm import SVC

  from pixart_jax.data.demo import load_digits

  x, y = load_digits()
  x = x.reshape(len(x), -1)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
  held_out = SVC(gamma=0.001, C=10).fit(xtr, ytr).score(xte, yte)
  return SVC(gamma=0.001, C=10).fit(x, y), held_out


FID_METHOD = "eigh"  # the real digits' covariance is singular (border pixels are always blank): see digit_fid


def digit_features(images) -> "np.ndarray":
  """(N, 8, 8, 3) images in [-1, 1] -> (N, 64) float64: the SVM's inputs (grey levels 0..16), the demo's stand-in
  for the Inception features of FID."""
  import numpy as np

  from pixart_jax.data import demo as demo_data

  return demo_data.from_rgb(images).astype(np.float64)


def _stats(features, batch: int = 256):
  from pixart_jax.metrics.fid_stats import ActivationStats

  acc = ActivationStats(features.shape[1])
  for start in range(0, len(features), batch):  # streamed, as the FID of real images is
    acc.update(features[start:start + batch])
  return acc.fid_stats()


def real_digit_features() -> "np.ndarray":
  """(1797, 64) float64: the real digits in the SVM's input space."""
  import numpy as np

  from pixart_jax.data.demo import load_digits

  x, _ = load_digits()
  return x.reshape(len(x), -1).astype(np.float64)


def digit_fid(images) -> float:
  """FID of `images` (N, 8, 8, 3) in [-1, 1] against all 1,797 real digits, in the SVM's input space.

  The statistics are streamed exactly as for Inception features (`metrics.fid_stats.ActivationStats`); the
  Frechet distance uses the eigendecomposition form (`metrics.frechet`, method "eigh"), which is well defined for
  the real digits' rank-deficient covariance (pixels that are blank in every scan)."""
  from pixart_jax.metrics.frechet import frechet_distance

  return frechet_distance(*_stats(digit_features(images)), *_stats(real_digit_features()), method=FID_METHOD)


def real_subset_fid(n: int, seed: int = 0) -> float:
  """The same FID for `n` real digits drawn at random (without replacement): what a perfect model would score with
  `n` samples (FID is biased upwards at small sample counts)."""
  import numpy as np

  from pixart_jax.metrics.frechet import frechet_distance

  x = real_digit_features()
  pick = np.random.default_rng(seed).permutation(len(x))[:n]
  return frechet_distance(*_stats(x[pick]), *_stats(x), method=FID_METHOD)


def sample_digits(graphdef, params, text, per_digit: int, guidance: float, seed: int):
  """(guided latents, unguided latents, labels) for the prompts `caption(d, 0)`, per_digit each (same noise).

  `graphdef, params`: the split PixArtSigma (the EMA weights of a run)."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from pixart_jax.data import demo as demo_data
  from pixart_jax.diffusion.denoise import STATIC_ARGNAMES, denoise

  labels = np.repeat(np.arange(10), per_digit)
  prompts = [demo_data.caption(int(d), 0) for d in labels]
  cond = text.encode_prompts(prompts)
  uncond = text.encode_prompts([""] * len(prompts))
  n = latent_size()
  x_T = jax.random.normal(jax.random.key(seed), (len(prompts), n, n, 3 * DOWNSAMPLE**2), jnp.float32)
  run = jax.jit(functools.partial(denoise, graphdef), static_argnames=STATIC_ARGNAMES)
  kw = dict(sampler="dpm-solver", steps=20)
  guided = run(params, x_T, cond, uncond, jnp.float32(guidance), None, **kw)
  plain = run(params, x_T, cond, None, jnp.float32(1.0), None, **kw)
  return np.asarray(guided), np.asarray(plain), labels


def _check_flags() -> None:
  from pixart_jax import checks

  checks.positive("--steps", FLAGS.steps)
  checks.positive("--batch_size", FLAGS.batch_size)
  checks.positive("--per_digit", FLAGS.per_digit)
  checks.finite("--guidance", FLAGS.guidance)
  checks.seed("--seed", FLAGS.seed)
  checks.seed("--seed + 1 (the sampling seed)", FLAGS.seed + 1)


def main(argv):
  del argv
  import jax
  import numpy as np
  from PIL import Image
  from tqdm import tqdm

  from pixart_jax.data import demo as demo_data
  from pixart_jax.images import contact_sheet, to_uint8
  from pixart_jax.train.loop import model_spec, train_and_evaluate

  _check_flags()
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("pixart_jax").setLevel(logging.INFO)
  from pixart_jax.outputs import claim_output

  work = claim_output(FLAGS.workdir, tool="demo", resume=True, flag="--workdir")  # a rerun resumes; refuses others
  times = {}
  t0 = time.perf_counter()

  print(f"[demo] 1/5 encoders and dataset -> {work / 'data'}")
  enc = prepare_dataset(work, FLAGS.seed)
  times["prepare_s"] = time.perf_counter() - t0

  print(f"[demo] 2/5 training a tiny PixArt for {FLAGS.steps} steps (real trainer; checkpoints in {work / 'train'})")
  t1 = time.perf_counter()
  config = train_config(str(work / "data"), steps=FLAGS.steps, batch=FLAGS.batch_size, seed=FLAGS.seed)
  result = train_and_evaluate(config, str(work / "train"))
  times["train_s"] = time.perf_counter() - t1

  print("[demo] 3/5 sampling 10 images per digit with DPM-Solver++ (20 steps), with and without guidance")
  t2 = time.perf_counter()
  graphdef, _ = model_spec(config.model).split()
  params = result.state.ema if result.state.ema is not None else result.state.params
  guided, plain, labels = sample_digits(graphdef, params, enc.text, FLAGS.per_digit, FLAGS.guidance, FLAGS.seed + 1)
  images_g = enc.decode(guided)
  images_p = enc.decode(plain)
  times["sample_s"] = time.perf_counter() - t2

  print("[demo] 4/5 writing samples")
  out = work / "samples"
  out.mkdir(exist_ok=True)
  counters = {d: 0 for d in range(10)}
  u8 = to_uint8(images_g)
  for img, d in tqdm(list(zip(u8, labels)), desc="png", leave=False):
    Image.fromarray(img).resize((64, 64), Image.NEAREST).save(out / f"digit_{d}_{counters[d]}.png")
    counters[d] += 1
  big = np.stack([np.asarray(Image.fromarray(i).resize((48, 48), Image.NEAREST)) for i in u8])
  contact_sheet(big, cols=FLAGS.per_digit, gap=4).save(out / "contact_sheet.png")

  print("[demo] 5/5 prompt adherence (an SVM trained on the real digits classifies the samples) and FID")
  clf, held_out = classifier()
  adh_g = float(np.mean(clf.predict(demo_data.from_rgb(images_g)) == labels))
  adh_p = float(np.mean(clf.predict(demo_data.from_rgb(images_p)) == labels))
  fid_g, fid_p, fid_real = digit_fid(images_g), digit_fid(images_p), real_subset_fid(len(labels))
  times["total_s"] = time.perf_counter() - t0
  report = {"adherence_guided": adh_g, "adherence_unguided": adh_p, "guidance_scale": FLAGS.guidance,
            "fid_digits_guided": fid_g, "fid_digits_unguided": fid_p, "fid_digits_real_subset": fid_real,
            "classifier_held_out_accuracy": held_out, "train_steps": FLAGS.steps, "batch_size": FLAGS.batch_size,
            "seed": FLAGS.seed,
            "final_loss": float(result.last_metrics.get("loss", float("nan"))), "samples": str(out),
            "devices": jax.device_count(), **{k: round(v, 1) for k, v in times.items()}}
  (work / "demo_report.json").write_text(json.dumps(report, indent=2))
  print(json.dumps(report, indent=2))
  print(f"[demo] prompt adherence: {adh_g:.0%} with guidance {FLAGS.guidance}, {adh_p:.0%} without "
        f"(classifier accuracy on held-out real digits: {held_out:.1%}); contact sheet: {out / 'contact_sheet.png'}")
  print(f"[demo] FID against the real digits in the classifier's input space: {fid_g:.1f} with guidance, "
        f"{fid_p:.1f} without ({len(labels)} real digits score {fid_real:.1f})")


def run():
  from pixart_jax import cli_errors

  app.run(cli_errors.guard(main))


if __name__ == "__main__":
  run()
