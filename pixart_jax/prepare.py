r"""Precompute a training dataset: images + captions -> ArrayRecord shards of VAE latents and T5 embeddings.

    python -m pixart_jax.prepare --source /data/images --encoders PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \
        --out /data/prepared --table 1024

Each image goes to the closest bucket of the --table (aspect-ratio buckets), is cover-resized and
center-cropped to it, encoded by the VAE (mean and std stored as bf16) and its caption(s) by T5
(stored trimmed to the real token count, bf16). Corrupt, unreadable, too small or extreme-aspect
images are skipped and listed with their reason in manifest.json. Rerunning the same command
resumes: finished shards are kept, an interrupted shard is redone. On a multi-host TPU slice run
the same command on every host with --distributed; hosts split the source.
"""
from __future__ import annotations

import importlib.util
import os

from absl import app, flags

_HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None

_SOURCE = flags.DEFINE_string(
    "source", None,
    "Images and captions: a folder of images with same-name .txt captions (optional .long.txt long "
    "captions); a .jsonl or .csv manifest (columns set by --image_field/--caption_field/"
    "--long_caption_field, image paths relative to the manifest); tfds:NAME[:SPLIT] for a TFDS "
    "dataset prepared in array_record format (needs the tensorflow_datasets package, not TensorFlow; "
    f"{'installed' if _HAS_TFDS else 'NOT installed here'}); or a registered source such as "
    "demo:digits.")
_ENCODERS = flags.DEFINE_string(
    "encoders", None,
    "Diffusers-format pipeline directory or Hub id holding text_encoder/, tokenizer/ and vae/ "
    "(e.g. PixArt-alpha/PixArt-Sigma-XL-2-1024-MS).")
_OUT = flags.DEFINE_string(
    "out", None, "Output dataset directory: new or empty (created, marked as prepare's with .pixart_output.json); "
    "reruns resume into it. Never inside or around the --source folder, never a folder holding other files.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a dataset that prepare wrote into --out with another configuration (its files are "
    "deleted first; nothing else there is touched). Folders prepare did not mark are never written.")
_MAX_IMAGE_MB = flags.DEFINE_integer(
    "max_image_mb", 256, "Skip image files larger than this many MiB ('too_large'); only regular files are read "
    "(FIFOs, devices and sockets are skipped as 'not_a_file').")
_TABLE = flags.DEFINE_string(
    "table", "1024", "Aspect-ratio bucket table: 256, 512, 1024, 2048 or 2880 (training tables).")
_SHARD_SIZE = flags.DEFINE_integer(
    "shard_size", 256, "Source items per shard (the unit of resumption; ~1 GB per shard at 1024).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Encoder batch size per host (padded to a multiple of the local devices).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Compute and parameter dtype of T5 and the VAE.")
_IMAGE_FIELD = flags.DEFINE_string("image_field", "image", "Manifest/TFDS field with the image.")
_CAPTION_FIELD = flags.DEFINE_string("caption_field", "caption", "Manifest/TFDS field with the caption.")
_LONG_FIELD = flags.DEFINE_string(
    "long_caption_field", "long_caption",
    "Manifest/TFDS field with an optional long caption (empty: none).")
_MIN_SIDE = flags.DEFINE_integer("min_side", 64, "Skip images whose shorter side is below this (px).")
_MAX_ASPECT = flags.DEFINE_float(
    "max_aspect", 4.5, "Skip images with max(h/w, w/h) above this (the official filter is 4.5).")
_RESAMPLE = flags.DEFINE_string(
    "resample", "", "PIL resize filter (bicubic, lanczos, ...); empty: the official choice for the "
    "table (lanczos for 2048/2880, bicubic otherwise).")
_CONTROL = flags.DEFINE_enum(
    "control", None, ["canny", "blur", "image"],
    "ControlNet training data: also store a control latent per image, from Canny edges of the image, a blurred "
    "copy (--control_sigma), or the example's own control image (image: a manifest's `control` column).")
_CONTROL_SIGMA = flags.DEFINE_float("control_sigma", 1.0, "Gaussian sigma in pixels of --control blur / canny.")
_THREADS = flags.DEFINE_integer("num_threads", 8, "Image decode/resize threads per host.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", None, "data_dir for tfds: sources.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run first (jax.distributed.initialize with cluster detection; "
    "multi-host TPU slices); a failure to join is an error.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar with images/s.")

flags.mark_flags_as_required(["source", "encoders", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax.numpy as jnp

  from pixart_jax.data import prepare_lib, sources
  from pixart_jax.data.encoders import PretrainedEncoders

  options = prepare_lib.PrepareOptions(
      table=_TABLE.value, shard_size=_SHARD_SIZE.value, batch_size=_BATCH_SIZE.value,
      resample=_RESAMPLE.value or None, min_side=_MIN_SIDE.value, max_aspect=_MAX_ASPECT.value,
      num_threads=_THREADS.value, max_image_bytes=_MAX_IMAGE_MB.value * 2**20, control=_CONTROL.value,
      control_sigma=_CONTROL_SIGMA.value)
  options.validate()  # bad numbers fail before any model loads
  if _DISTRIBUTED.value:
    from pixart_jax.parallel import distributed

    distributed.initialize(required=True)
  spec = _SOURCE.value
  source = sources.resolve_source(spec, image_field=_IMAGE_FIELD.value,
                                  caption_field=_CAPTION_FIELD.value,
                                  long_caption_field=_LONG_FIELD.value or None,
                                  tfds_data_dir=_TFDS_DIR.value)
  source_id = os.path.abspath(spec) if os.path.exists(spec) else spec
  encoders = PretrainedEncoders.from_pretrained(
      _ENCODERS.value, dtype=jnp.dtype(_DTYPE.value), progress=_PROGRESS.value)
  manifest = prepare_lib.prepare(source, encoders, _OUT.value, options=options,
                                 source_id=source_id, progress=_PROGRESS.value, overwrite=_OVERWRITE.value)
  if manifest is not None:
    print(prepare_lib.format_report(manifest))


def run():
  """Console-script entry point (`pixart-prepare`)."""
  from pixart_jax import cli_errors

  app.run(cli_errors.guard(main))


if __name__ == "__main__":
  run()
