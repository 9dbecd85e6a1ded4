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
_SWAPPED = (*_COMPONENTS, "scheduler", "transformer")  # what an export builds aside and swaps in


def _clear_leftovers(out: pathlib.Path, stage: pathlib.Path, old: pathlib.Path) -> None:
  """Leftovers of an interrupted export of ours in `out`: an unfinished build (`stage`) is removed; components a
  swap had moved aside (`old`) are the earlier export and go back where the output lacks them. Either folder
  holding anything an export does not write there is refused (one line) and nothing is touched."""
  for d in (stage, old):
    if d.is_symlink() or (d.exists() and not d.is_dir()):
      raise FileExistsError(f"{d} is not a folder an export left: move it out of {out}")
    foreign = sorted(e.name for e in d.iterdir() if e.name not in _SWAPPED) if d.is_dir() else []
    if foreign:
      raise FileExistsError(f"{d} holds entries no export wrote ({foreign[:3]}): they are never deleted; move "
                            f"them out of {out} and export again")
  if old.exists():
    for c in old.iterdir():
      if not (out / c.name).exists():
        os.replace(c, out / c.name)
    shutil.rmtree(old)
  if stage.exists():
    shutil.rmtree(stage)


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
  _clear_leftovers(out, stage, old)
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
  for c in _SWAPPED:
    if (out / c).exists():
      os.replace(out / c, old / c)
    os.replace(stage / c, out / c)
  text = json.dumps(index, indent=2)
  replace_atomically(out / "model_index.json", lambda f: f.write(text), mode="w")
  shutil.rmtree(old)
  stage.rmdir()
  return out
