"""FID and CLIP score of a PixArt-Sigma model: sample N images from a prompt file, compare them with real ones.

  python -m pixart_jax.evaluate --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --prompts coco_captions.txt \\
      --ref-stats coco_val_stats.npz --inception pt_inception-2015-12-05-6726825d.pth \\
      --clip openai/clip-vit-large-patch14 --num 10000 --out eval_1024/
  python -m pixart_jax.evaluate stats --images coco_val2014/ --inception pt_inception-...pth --out coco_val_stats.npz
  python -m pixart_jax.evaluate stats --prepared data/ [--vae PIPELINE] --inception ... --out ref.npz

Sampling: image i uses prompt i (the file cycled to N), batch b = images [b*B, (b+1)*B) uses seed `--seed + b`,
as `pixart_jax.sample` does; the Pipeline runs on `--mesh` (default: all devices on the data axis) and so do
the Inception (pytorch-fid's pool3 features, `metrics.inception`) and CLIP (`metrics.clip_score`).

Output folder (`--out`, claimed by `pixart_jax.outputs.claim_output`: new, empty or an earlier evaluation with the
SAME settings, which is resumed):
  evaluation.json     the settings (a rerun with other settings is refused)
  images/NNNNN.png    the samples (prompt and seed in their PNG text chunks)
  batches/NNNNN.npz   per finished batch: Inception features and CLIP scores; a rerun adds these back and samples
                      only the batches that have none
  ref_stats_*.npz     with --ref-images: the reference statistics, computed once per reference folder
  report.json         {"fid", "clip_score", "num_images", ...settings}
  contact_sheet.png   the first --sheet images

The reference is not a setting: rerunning against other statistics rescores the kept batches without sampling.

`stats` writes pytorch-fid's `.npz` (mu, sigma; plus num_samples), refusing to replace an existing file unless
--overwrite. --prepared reads a dataset written by `pixart_jax.prepare` and decodes its latents (the VAE of
--vae, or the demo's pixel space-to-depth when the dataset was prepared with it).

This file is the command line (parsers, checks of the arguments, main); the output folder, resuming, sampling and
the report are `metrics/eval_run.py`, the metrics `metrics/evaluation.py`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pathlib
import re
import sys



class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are ValueErrors (one `error:` line through cli_errors, exit code 1)."""

  def error(self, message):
    raise ValueError(f"{self.prog}: {message}")


def _common(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--inception", "--inception_weights", dest="inception",
                  help="Inception3 weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a torchvision "
                  "inception_v3 state dict with --torchvision_blocks)")
  ap.add_argument("--torchvision-blocks", "--torchvision_blocks", dest="torchvision_blocks", action="store_true",
                  help="the Inception's blocks are torchvision's, not pytorch-fid's FID blocks")
  ap.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8, help="images per batch")
  ap.add_argument("--mesh", default="data=-1", help="mesh axes AXIS=SIZE,... (data, fsdp, tensor, sequence)")
  ap.add_argument("-v", "--verbosity", type=int, default=0, help="1 or more: a traceback with every error")


def build_parser() -> argparse.ArgumentParser:
  ap = _Parser(prog="python -m pixart_jax.evaluate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", help="diffusers PixArt-Sigma pipeline dir or Hub id (as `pixart_jax.sample`)")
  ap.add_argument("--transformer", help="other DiT weights combined with --model's T5 and VAE (as `sample`)")
  ap.add_argument("--prompts", help="text file, one prompt per line (cycled to --num images)")
  ref = ap.add_mutually_exclusive_group()
  ref.add_argument("--ref-stats", "--ref_stats", dest="ref_stats", help="reference FID statistics (.npz)")
  ref.add_argument("--ref-images", "--ref_images", dest="ref_images", help="folder of reference images")
  ap.add_argument("--clip", help="transformers CLIPModel dir or Hub id (e.g. openai/clip-vit-large-patch14)")
  ap.add_argument("--num", type=int, default=None, help="images to sample (default: one per prompt)")
  ap.add_argument("--out", default="evaluation", help="output folder (resumed when rerun with the same settings)")
  ap.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels (default: the checkpoint's resolution)")
  ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
  ap.add_argument("--sampler", default="dpm-solver", help="sampler name (as `sample`)")
  ap.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale")
  ap.add_argument("--seed", type=int, default=0, help="batch b uses seed + b")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="DiT and T5 compute dtype")
  ap.add_argument("--no-binning", "--no_binning", dest="no_binning", action="store_true",
                  help="sample exactly at --size (a multiple of 16) instead of the closest aspect-ratio bucket")
  ap.add_argument("--sheet", type=int, default=64, help="images on the contact sheet (0: none)")
  _common(ap)
  return ap


def build_stats_parser() -> argparse.ArgumentParser:
  ap = _Parser(prog="python -m pixart_jax.evaluate stats",
               description="Reference FID statistics (pytorch-fid .npz) of a folder of images or a prepared dataset.")
  src = ap.add_mutually_exclusive_group()
  src.add_argument("--images", help="folder of images (searched recursively)")
  src.add_argument("--prepared", help="dataset written by `pixart_jax.prepare` (its latents are decoded)")
  ap.add_argument("--vae", help="--prepared: pipeline dir / Hub id (vae/) or VAE dir whose latents the dataset holds")
  ap.add_argument("--out", help="output .npz")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  _common(ap)
  return ap


# ---------------------------------------------------------------------------------------------------------------
def parse_mesh(text: str) -> list[tuple[str, int]]:
  out = []
  for part in filter(None, text.split(",")):
    m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", part)
    if not m:
      raise ValueError(f"--mesh {text!r}: bad entry {part!r}; expected AXIS=SIZE,..., e.g. data=-1 or data=4,fsdp=2")
    out.append((m.group(1), int(m.group(2))))
  if not out:
    raise ValueError("--mesh is empty; e.g. --mesh data=-1")
  return out


def _mesh(text: str):
  from pixart_jax.parallel.mesh import make_mesh

  return make_mesh(parse_mesh(text))


def _need(args, *names: str) -> None:
  for name in names:
    if getattr(args, name) in (None, ""):
      raise ValueError(f"--{name.replace('_', '-')} is required ({_NEED_WHY[name]})")


_NEED_WHY = {
    "model": "a diffusers PixArt-Sigma pipeline dir or Hub id",
    "prompts": "a text file with one prompt per line",
    "inception": "the FID Inception weights, pytorch-fid's pt_inception-2015-12-05-6726825d.pth",
    "clip": "a transformers CLIPModel dir or Hub id for the CLIP score",
    "out": "the .npz file to write",
}


def _size(text: str | None) -> tuple[int | None, int | None]:
  if not text:
    return None, None
  m = re.fullmatch(r"(\d+)[xX](\d+)", text)
  if not m or not int(m.group(1)) or not int(m.group(2)):
    raise ValueError(f"--size must look like 1024x768 (WIDTHxHEIGHT in pixels), got {text!r}")
  return int(m.group(2)), int(m.group(1))


def _abs(p) -> str | None:
  """A local path made absolute (a Hub id stays as given)."""
  if p is None:
    return None
  return str(pathlib.Path(p).expanduser().absolute()) if os.path.exists(os.path.expanduser(p)) else str(p)


def read_prompts(path: str) -> list[str]:
  """The non-blank lines of a UTF-8 text file (as `sample --prompts_file`, whose module defines absl flags and so
  is not imported here); ValueError naming the file and the byte offset of bad text."""
  data = pathlib.Path(path).read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompts {path}: not UTF-8 text (byte offset {e.start}: {data[e.start:e.start + 4]!r}); "
                     "save it as UTF-8") from None
  return [line.strip() for line in text.splitlines() if line.strip()]


def evaluate(args) -> dict:
  """The main command (see the module doc); returns the report."""
  import jax.numpy as jnp

  import pixart_jax as pj
  from pixart_jax import checks
  from pixart_jax.metrics import eval_run
  from pixart_jax.metrics.evaluation import ImageMetrics

  _need(args, "model", "prompts", "inception", "clip")
  if not (args.ref_stats or args.ref_images):
    raise ValueError("give the reference: --ref-stats FILE.npz (from `python -m pixart_jax.evaluate stats`) or "
                     "--ref-images DIR")
  checks.positive("--batch-size", args.batch_size)
  parse_mesh(args.mesh)
  checks.positive("--num", args.num, allow_none=True)
  checks.positive("--steps", args.steps, allow_none=True)
  checks.non_negative("--sheet", args.sheet)
  checks.finite("--guidance", args.guidance)
  checks.seed("--seed", args.seed)
  height, width = _size(args.size)
  for flag, path in (("--prompts", args.prompts), ("--ref-stats", args.ref_stats), ("--ref-images", args.ref_images)):
    if path is not None and not os.path.exists(path):
      raise FileNotFoundError(f"{flag} {path}: no such file or folder")
  if args.ref_images:
    from pixart_jax.metrics.evaluation import image_dir_files

    image_dir_files(args.ref_images)
  prompts = read_prompts(args.prompts)
  if not prompts:
    raise ValueError(f"--prompts {args.prompts} holds no prompt (only blank lines)")
  num = args.num or len(prompts)
  bs = args.batch_size
  batches = (num + bs - 1) // bs
  checks.seed("--seed + the number of batches - 1 (the last batch's seed)", args.seed + batches - 1)
  mesh = _mesh(args.mesh)

  settings = {"model": _abs(args.model), "transformer": _abs(args.transformer),
              "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "num": num,
              "batch_size": bs, "size": args.size, "steps": args.steps, "sampler": args.sampler,
              "guidance": args.guidance, "seed": args.seed, "dtype": args.dtype, "binning": not args.no_binning,
              "inception": _abs(args.inception), "fid_blocks": not args.torchvision_blocks, "clip": _abs(args.clip)}
  eval_run.claim(pathlib.Path(args.out), settings, check_only=True)  # refused before any network loads
  metrics = ImageMetrics.from_files(args.inception, args.clip, mesh=mesh, use_fid_inception=not args.torchvision_blocks)
  out = eval_run.claim(pathlib.Path(args.out), settings)
  ref = eval_run.reference(out, metrics, ref_stats=args.ref_stats, ref_images=args.ref_images, batch_size=bs)

  def load_pipeline():
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    return pj.Pipeline.from_pretrained(args.model, transformer=args.transformer, dtype=dtype, mesh=mesh,
                                       progress=True)

  report = eval_run.run(out, metrics, ref, prompts, num=num, batch_size=bs, seed=args.seed,
                        load_pipeline=load_pipeline, height=height, width=width, steps=args.steps,
                        guidance=args.guidance, sampler=args.sampler, binning=not args.no_binning,
                        settings=settings, reference_name=_abs(args.ref_stats or args.ref_images), sheet=args.sheet)
  print(json.dumps({k: v for k, v in report.items() if k != "settings"}))
  return report


# ---------------------------------------------------------------------------------------------------------------
def stats(args) -> pathlib.Path:
  from pixart_jax import checks
  from pixart_jax.metrics.eval_run import prepared_batches
  from pixart_jax.metrics.evaluation import (ImageMetrics, check_source, image_dir_batches, image_dir_files,
                                             reference_stats)

  _need(args, "inception", "out")
  if not (args.images or args.prepared):
    raise ValueError("give the images: --images DIR (a folder of images) or --prepared DIR (a prepared dataset)")
  checks.positive("--batch-size", args.batch_size)
  parse_mesh(args.mesh)
  out = pathlib.Path(args.out)
  if out.suffix != ".npz":
    raise ValueError(f"--out {out}: FID statistics are written as a pytorch-fid .npz; give a name ending in .npz")
  if out.exists() and not args.overwrite:
    raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose another name")
  for flag, path in (("--images", args.images), ("--prepared", args.prepared)):
    if path is not None and not os.path.isdir(path):
      raise FileNotFoundError(f"{flag} {path}: no such folder")
  check_source("--inception", args.inception, "an Inception3 .pth/.safetensors")
  if args.images:
    image_dir_files(args.images)  # a folder without images is refused before the Inception loads
  else:
    from pixart_jax.data.pipeline import load_manifest

    load_manifest(args.prepared)
  mesh = _mesh(args.mesh)
  metrics = ImageMetrics.from_files(args.inception, mesh=mesh, use_fid_inception=not args.torchvision_blocks)
  batches = (image_dir_batches(args.images, args.batch_size) if args.images else
             prepared_batches(args.prepared, args.batch_size, args.vae))
  result = reference_stats(metrics, batches, progress=True)
  result.save(out, overwrite=args.overwrite)
  print(json.dumps({"out": str(out), "num_images": result.num_samples, "feature_dim": int(result.mu.shape[0])}))
  return out


def main(argv: list[str] | None = None):
  argv = list(sys.argv[1:] if argv is None else argv)
  logging.getLogger().setLevel(logging.INFO)
  if argv and argv[0] == "stats":
    return stats(build_stats_parser().parse_args(argv[1:]))
  return evaluate(build_parser().parse_args(argv))


def run() -> None:
  """Console entry: errors are one `error:` line and exit code 1 (`-v 1`: with the traceback)."""
  from pixart_jax import cli_errors

  cli_errors.run(main, sys.argv[1:])


if __name__ == "__main__":
  run()
