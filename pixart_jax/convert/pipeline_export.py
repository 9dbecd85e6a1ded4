"""Export a (fine-tuned) transformer as a complete diffusers PixArt-Sigma pipeline directory.

The text encoder, tokenizer and VAE are the frozen ones of a base pipeline (copied file by file); the scheduler is
the base's, or DPM-Solver++ as configured for PixArt-Sigma when the base has none. The result loads with
`diffusers.PixArtSigmaPipeline.from_pretrained(out_dir)`.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

from pixart_jax.convert.dit import write_transformer_files
from pixart_jax.convert.hub import read_json, resolve_local
from pixart_jax.convert.writers import replace_atomically
from pixart_jax.outputs import check_disjoint, claim_output

SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
    "timestep_spacing": "linspace", "thresholding": False, "use_karras_sigmas": False,
}
_COMPONENTS = ("text_encoder", "tokenizer", "vae")


def export_pipeline(transformer, base: str | os.PathLike, out_dir: str | os.PathLike, *,
                    max_shard_bytes: int = 10 * 2**30, overwrite: bool = False) -> pathlib.Path:
  """transformer: our PixArtSigma; base: a diffusers PixArt-Sigma pipeline dir or Hub id.

  `out_dir` must not overlap `base`, and must be new, empty, or an earlier export of ours with `overwrite=True`
  (`pixart_jax.outputs.claim_output`); both are checked before anything is written."""
  base = resolve_local(base)
  check_disjoint(out_dir, {"--base": base})
  missing = [c for c in _COMPONENTS if not (base / c).is_dir()]
  if missing:
    raise FileNotFoundError(f"base pipeline {base} lacks {missing}")
  index = read_json(base / "model_index.json", "pipeline index") if (base / "model_index.json").exists() else {}
  out = claim_output(out_dir, tool="convert", overwrite=overwrite)
  # everything is built in a staging folder inside our marked folder and swapped in at the end, so a failed
  # export leaves an earlier export whole
  stage, old = out / ".export-staging", out / ".export-previous"
  if old.exists():  # a swap of ours was interrupted: what it had moved aside is the earlier export; put it back
    for c in old.iterdir():
      if not (out / c.name).exists():
        os.replace(c, out / c.name)
    shutil.rmtree(old)
  if stage.exists():  # an unfinished build of ours
    shutil.rmtree(stage)
  stage.mkdir()
  try:
    for c in _COMPONENTS:
      shutil.copytree(base / c, stage / c)
    if (base / "scheduler").is_dir():
      shutil.copytree(base / "scheduler", stage / "scheduler")
    else:
      (stage / "scheduler").mkdir()
      (stage / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    write_transformer_files(transformer, stage / "transformer", max_shard_bytes=max_shard_bytes)
  except BaseException:
    shutil.rmtree(stage)
    raise
  index.update({"_class_name": "PixArtSigmaPipeline",
                "transformer": ["diffusers", "PixArtTransformer2DModel"]})
  index.setdefault("scheduler", ["diffusers", "DPMSolverMultistepScheduler"])
  for c, cls in (("text_encoder", ["transformers", "T5EncoderModel"]), ("tokenizer", ["transformers", "T5Tokenizer"]),
                 ("vae", ["diffusers", "AutoencoderKL"])):
    index.setdefault(c, cls)
  old.mkdir()
  for c in (*_COMPONENTS, "scheduler", "transformer"):
    if (out / c).exists():
      os.replace(out / c, old / c)
    os.replace(stage / c, out / c)
  text = json.dumps(index, indent=2)
  replace_atomically(out / "model_index.json", lambda f: f.write(text), mode="w")
  shutil.rmtree(old)
  stage.rmdir()
  return out
