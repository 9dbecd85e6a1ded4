"""Convert PixArt-Sigma transformer weights between formats.

  # official .pth / diffusers dir / pipeline dir / Hub id  ->  Orbax (fast reload, mesh-aware restore)
  python -m pixart_jax.convert --source PixArt-Sigma-XL-2-1024-MS.pth --out ckpt/sigma_1024
  python -m pixart_jax.convert --source PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --out ckpt/sigma_1024
  # Orbax (e.g. a fine-tune) or any loadable source  ->  a diffusers transformer/ directory
  python -m pixart_jax.convert --source ckpt/sigma_1024 --out export/transformer --to diffusers
  # a training workdir (newest checkpoint, EMA if kept) -> a complete diffusers pipeline directory (text encoder,
  # tokenizer, VAE, scheduler from --base), loadable by diffusers.PixArtSigmaPipeline.from_pretrained
  python -m pixart_jax.convert --source runs/sigma1024 --to diffusers --base PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \
      --out export/sigma1024_ft
"""
from __future__ import annotations

import logging

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "A .pth, a diffusers transformer/ or pipeline directory, a Hub id, or an Orbax "
                    "directory written by this tool.", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_enum("to", None, ["orbax", "diffusers"], "Output format (default: diffusers for an Orbax source, "
                  "orbax otherwise).")
flags.DEFINE_string("config", None, "DiT preset name (pixart_jax.models.config.PRESETS); needed for a .pth whose file "
                    "name does not identify the checkpoint.")
flags.DEFINE_string("base", None, "With --to=diffusers: a diffusers PixArt-Sigma pipeline dir or Hub id whose "
                    "text encoder, tokenizer, VAE and scheduler complete the output into a whole pipeline directory.")
flags.DEFINE_bool("overwrite", False, "Replace an earlier output of this tool in --out (a folder holding its "
                  ".pixart_output.json marker of convert). Folders holding anything else are never replaced.")
flags.DEFINE_integer("max_shard_mb", 10 * 1024, "Largest safetensors shard written by --to=diffusers, in MiB.")


def main(argv):
  del argv
  from pixart_jax import checks
  from pixart_jax.convert import dit, orbax_io, ours

  checks.positive("--max_shard_mb", FLAGS.max_shard_mb)

  logging.getLogger().setLevel(logging.INFO)
  src_is_ours = ours.is_ours(FLAGS.source)
  to = FLAGS.to or ("diffusers" if src_is_ours else "orbax")
  if FLAGS.base and to != "diffusers":
    raise app.UsageError("--base completes a diffusers pipeline: it needs --to=diffusers")
  from pixart_jax.outputs import claim_output

  claim_output(FLAGS.out, tool="convert", overwrite=FLAGS.overwrite, inputs={"--source": FLAGS.source, "--base": FLAGS.base},
               write_marker=False)  # refuse before loading anything
  if orbax_io.is_orbax_dir(FLAGS.source) and not FLAGS.config:
    model = orbax_io.load_transformer_orbax(FLAGS.source)
  else:
    model = dit.load_transformer(FLAGS.source, config=FLAGS.config, progress=True)
  if to == "orbax":
    out = orbax_io.save_transformer_orbax(model, FLAGS.out, overwrite=FLAGS.overwrite)
  elif FLAGS.base:
    from pixart_jax.convert.pipeline_export import export_pipeline

    out = export_pipeline(model, FLAGS.base, FLAGS.out, max_shard_bytes=FLAGS.max_shard_mb * 2**20,
                          overwrite=FLAGS.overwrite)
  else:
    out = dit.export_transformer(model, FLAGS.out, max_shard_bytes=FLAGS.max_shard_mb * 2**20,
                                 overwrite=FLAGS.overwrite)
  logging.info("wrote %s (%s)", out, to)


def run():
  from pixart_jax import cli_errors

  app.run(cli_errors.guard(main))


if __name__ == "__main__":
  run()
