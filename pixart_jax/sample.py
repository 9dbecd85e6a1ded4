"""Text -> PNG images with PixArt-Sigma.

  python -m pixart_jax.sample --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \\
      --prompt "a small wooden cabin in a snowy forest at night" --size 1024x768 --steps 20 --out samples/
  python -m pixart_jax.sample --model DIR --prompts_file prompts.txt --sampler sa-solver --guidance 3 --seed 7
  python -m pixart_jax.sample --model DIR --prompt "a watercolor cabin" --init_image cabin.png --strength 0.6
  python -m pixart_jax.sample --model DIR --prompt "a red door" --init_image house.png --mask door_mask.png

Each PNG carries the prompt, seed and settings in its metadata (tEXt chunks); several images also give a
contact sheet. Progress shows the stages (encode, compile, sample, decode) of every batch.

Devices: `--mesh` is the mesh of each host's local devices (default `data=-1`: data parallel over all of them;
e.g. `data=4,sequence=2` or `fsdp=8`); the Pipeline turns data devices a small batch leaves idle into
sequence-parallel shards of each image (pixart_jax.pipeline.Pipeline). Several hosts (a TPU pod slice joins
automatically; elsewhere pass --coordinator_address, --num_processes and --process_id to every process) split
the run by batches: batch k (images k*B .. k*B+B-1, B = --batch_size) is sampled by host k mod (number of hosts)
and written by it, so every device of every host works, file names (the image's index in the run) stay unique
and ordered, and each image is the one a single host would draw. The contact sheet is written by single-host
runs only.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A diffusers PixArt-Sigma pipeline dir or Hub id (transformer/, text_encoder/, "
                    "tokenizer/, vae/).", required=True)
flags.DEFINE_string("transformer", None, "Optional other DiT weights (.pth, Orbax dir from `convert`, transformer/ "
                    "dir, Hub id), combined with --model's T5 and VAE.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line (blank lines skipped).")
flags.DEFINE_string("negative", "", "Negative prompt.")
flags.DEFINE_string("size", None, "WIDTHxHEIGHT in pixels (default: the checkpoint's resolution). Binned to the "
                    "closest aspect-ratio bucket, then resized and center-cropped back.")
flags.DEFINE_integer("steps", None, "Sampling steps (default per sampler: dpm-solver 20, sa-solver 25, iddpm 100, "
                     "ddim 50, lcm 4).")
flags.DEFINE_enum("sampler", "dpm-solver", ["dpm-solver", "dpm-solver-official", "sa-solver", "iddpm", "ddim", "lcm"],
                  "Sampler (lcm: only for consistency-distilled models, e.g. PixArt-LCM or `train` distillation).")
flags.DEFINE_float("guidance", 4.5, "Classifier-free guidance scale (<= 1 disables guidance).")
flags.DEFINE_enum("guidance_mode", "diffusers", ["diffusers", "official"], "Mask of the unconditional branch: its "
                  "own (diffusers) or the prompt's (official PixArt).")
flags.DEFINE_integer("seed", 0, "Seed; image i of the run uses seed + i // batch_size and its batch position.")
flags.DEFINE_integer("batch_size", None, "Prompts per jitted call (default: 4 rounded up to a multiple of the "
                     "mesh's batch shards).")
flags.DEFINE_string("mesh", "data=-1", "Mesh of each host's local devices: AXIS=SIZE,... over data, fsdp, tensor, "
                    "sequence; one size may be -1 (the remaining devices). Default: data parallel over all of them.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs off a TPU VM).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs off a TPU VM).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs off a TPU VM).")
flags.DEFINE_enum("cpu_collectives", "gloo", ["gloo", "mpi", "none"],
                  "Cross-process collectives on the CPU backend (multi-process CPU runs).")
flags.DEFINE_integer("images_per_prompt", 1, "Images per prompt (different seeds).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "DiT and T5 compute dtype.")
flags.DEFINE_string("out", "samples", "Output directory.")
flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache directory.")
flags.DEFINE_boolean("no_binning", False, "Sample exactly at --size (must be a multiple of 16).")
flags.DEFINE_string("init_image", None, "Image-to-image / inpainting: the image to edit (PNG, JPEG, ...). It sets the "
                    "output size (no --size).")
flags.DEFINE_float("strength", None, "Image-to-image strength in (0, 1]: the share of the steps that run, from "
                   "--init_image noised to the first of them (default 0.8; with --mask 1.0).")
flags.DEFINE_string("mask", None, "Inpainting mask image at --init_image's size: white (>= 50%) = repaint, black = "
                    "keep.")
flags.DEFINE_boolean("paste_back", False, "With --mask: paste the kept pixels of --init_image over the result.")
flags.DEFINE_string("control", None, "A control image (PNG/JPEG) for the ControlNet given by --controlnet; every "
                    "prompt is sampled under it.")
flags.DEFINE_string("controlnet", None, "ControlNet weights in the official PixArt ControlNet-Half layout: a branch "
                    "file (`controlnet.*` keys, as training exports it) or a whole ControlPixArtHalf checkpoint.")
flags.DEFINE_boolean("offload_text_encoder", False, "Keep T5's weights in host memory, on the device only while "
                     "encoding (one device per host: --mesh data=1): 4K fits one 16 GiB v5e chip.")
flags.DEFINE_boolean("full_captions", False, "Encode and attend to all 300 caption positions (diffusers' shapes, one "
                     "program for every prompt) instead of the caption bucket of each batch's longest prompt (same "
                     "images to float rounding, less work; see Pipeline trim_captions).")
flags.DEFINE_float("control_scale", 1.0, "Weight of the ControlNet branch (1 = the official ControlNet).")


def read_prompts_file(path: str) -> list[str]:
  """The non-blank lines of a UTF-8 text file; ValueError naming the file and the byte offset of bad text."""
  data = pathlib.Path(path).read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    bad = data[e.start:e.start + 4]
    raise ValueError(f"--prompts_file {path}: not UTF-8 text (byte offset {e.start}: {bad!r}); save it as UTF-8"
                     ) from None
  return [line.strip() for line in text.splitlines() if line.strip()]


def _prompts() -> list[str]:
  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    from_file = read_prompts_file(FLAGS.prompts_file)
    if not from_file:
      raise ValueError(f"--prompts_file {FLAGS.prompts_file} holds no prompt (only blank lines)")
    prompts += from_file
  if not prompts:
    raise ValueError("no prompt: give --prompt (repeatable) or --prompts_file")
  return [p for p in prompts for _ in range(FLAGS.images_per_prompt)]


def _size() -> tuple[int | None, int | None]:
  if not FLAGS.size:
    return None, None
  m = re.fullmatch(r"(\d+)[xX](\d+)", FLAGS.size)
  if not m:
    raise ValueError(f"--size must look like 1024x768 (WIDTHxHEIGHT in pixels), got {FLAGS.size!r}")
  w, h = int(m.group(1)), int(m.group(2))
  if not (w and h):
    raise ValueError(f"--size {FLAGS.size}: width and height must be positive pixel counts, e.g. 1024x768")
  return h, w


def _check_flags() -> None:
  """Every numeric flag, before any model loads (Pipeline.__call__ checks the same values by the same rules)."""
  from pixart_jax import checks

  checks.positive("--batch_size", FLAGS.batch_size, allow_none=True)
  checks.positive("--images_per_prompt", FLAGS.images_per_prompt)
  checks.positive("--steps", FLAGS.steps, allow_none=True)
  checks.finite("--guidance", FLAGS.guidance)
  checks.seed("--seed", FLAGS.seed)
  checks.finite("--control_scale", FLAGS.control_scale)
  if (FLAGS.control is None) != (FLAGS.controlnet is None):
    raise ValueError("--control IMAGE and --controlnet WEIGHTS go together: give both or neither")
  for flag in ("control", "controlnet"):
    value = getattr(FLAGS, flag)
    if value is not None and not os.path.exists(value):
      raise ValueError(f"--{flag} {value}: no such file")
  if FLAGS.init_image is None:
    for name in ("strength", "mask"):
      if getattr(FLAGS, name) is not None:
        raise ValueError(f"--{name} needs --init_image (the image to edit)")
    if FLAGS.paste_back:
      raise ValueError("--paste_back needs --init_image and --mask")
  else:
    if FLAGS.size:
      raise ValueError(f"--size {FLAGS.size} with --init_image: the image sets the size; drop --size or resize the "
                       f"image")
    if FLAGS.strength is not None:
      checks.strength("--strength", FLAGS.strength)


def _read_image(flag: str, path: str):
  """--init_image / --mask / --control file -> (H W 3) uint8; ValueError naming the flag and the file."""
  from pixart_jax.data.image_io import SkipExample, decode_image

  try:
    return decode_image(path)
  except SkipExample as e:
    raise ValueError(f"--{flag} {path}: {e.detail} ({e.reason}); give a PNG / JPEG image file") from None


def _edit_args() -> dict:
  """The Pipeline keywords of --init_image / --strength / --mask / --paste_back (empty without --init_image)."""
  if FLAGS.init_image is None:
    return {}
  from pixart_jax import checks

  image = _read_image("init_image", FLAGS.init_image)
  edit = {"image": image, "strength": FLAGS.strength if FLAGS.strength is not None else
          (1.0 if FLAGS.mask else 0.8)}
  if FLAGS.mask:
    mask = _read_image("mask", FLAGS.mask).mean(-1) / 255.0
    h, w = image.shape[:2]
    if mask.shape != (h, w):
      raise ValueError(f"--mask {FLAGS.mask} is {mask.shape[1]}x{mask.shape[0]} pixels but --init_image is {w}x{h}: "
                       f"the mask must have the image's size")
    edit["mask"] = checks.mask("--mask", mask, 1, h, w)
    edit["paste_back"] = FLAGS.paste_back
  elif FLAGS.paste_back:
    raise ValueError("--paste_back needs --mask")
  return edit


def _control_image():
  """The --control image as (H W 3) uint8, or None."""
  return None if FLAGS.control is None else _read_image("control", FLAGS.control)


def _slug(text: str, n: int = 40) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def host_batches(num_images: int, batch_size: int, process_index: int, process_count: int) -> list[int]:
  """Start indices of the batches host `process_index` of `process_count` samples: batch k starts at
  k * batch_size and belongs to host k mod process_count."""
  return [k * batch_size for k in range(-(-num_images // batch_size)) if k % process_count == process_index]


def default_batch_size(mesh) -> int:
  """4 rounded up to a multiple of the mesh's batch shards (every data-parallel device gets whole prompts)."""
  from pixart_jax.parallel.sharding import LOGICAL_RULES, batch_shards

  n = batch_shards(mesh, LOGICAL_RULES)
  return -(-4 // n) * n


def main(argv):
  del argv
  from pixart_jax.parallel import distributed
  from pixart_jax.parallel.mesh import make_mesh, parse_mesh

  _check_flags()  # every user error before joining other processes or loading anything
  prompts = _prompts()
  height, width = _size()
  edit = _edit_args()
  mesh_spec = parse_mesh(FLAGS.mesh)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         cpu_collectives=FLAGS.cpu_collectives)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tqdm import tqdm

  import pixart_jax as pj
  from pixart_jax import checks
  from pixart_jax.images import contact_sheet, save_png
  from pixart_jax.outputs import claim_output

  logging.getLogger().setLevel(logging.INFO)
  if FLAGS.compilation_cache_dir:
    pj.enable_compilation_cache(FLAGS.compilation_cache_dir)
  try:
    mesh = make_mesh(mesh_spec, devices=jax.local_devices())
  except ValueError as e:
    raise ValueError(f"--mesh {FLAGS.mesh}: {e} (this host has {jax.local_device_count()} devices)") from None
  if FLAGS.offload_text_encoder and mesh.size > 1:
    raise ValueError(f"--offload_text_encoder keeps T5 on the host for one device, but --mesh {FLAGS.mesh} spans "
                     f"{mesh.size} devices: add --mesh data=1 (or drop --offload_text_encoder)")
  batch_size = FLAGS.batch_size or default_batch_size(mesh)
  last_seed = FLAGS.seed + (len(prompts) - 1) // batch_size
  checks.seed("--seed + the number of batches - 1 (the last batch's seed)", last_seed)
  host, hosts = jax.process_index(), jax.process_count()
  starts = host_batches(len(prompts), batch_size, host, hosts)
  logging.info("host %d of %d: %d of %d batches of %d on mesh %s", host, hosts, len(starts),
               -(-len(prompts) // batch_size), batch_size, dict(mesh.shape))
  dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
  control_image = _control_image()
  control = {} if control_image is None else {"control_image": control_image, "control_scale": FLAGS.control_scale}
  # sample's own folder (a rerun adds to it, replacing its own same-named images); others refused before loading
  out = claim_output(FLAGS.out, tool="sample", resume=True)
  t0 = time.perf_counter()
  pipe = pj.Pipeline.from_pretrained(FLAGS.model, transformer=FLAGS.transformer, dtype=dtype, mesh=mesh,
                                     progress=True, controlnet=FLAGS.controlnet,
                                     offload_text_encoder=FLAGS.offload_text_encoder)
  logging.info("loaded models in %.1fs", time.perf_counter() - t0)
  digits = max(4, len(str(len(prompts) - 1)))
  all_images, written = [], []
  with tqdm(total=sum(len(prompts[s:s + batch_size]) for s in starts), unit="img", desc="sampling") as bar:
    for start in starts:  # the bar is closed (newline) on errors too
      batch = prompts[start:start + batch_size]
      seed = FLAGS.seed + start // batch_size
      first = pipe.num_traces
      timings: dict = {}
      bar.set_description(f"batch {start // batch_size}: encode+sample")
      images = pipe(batch, negative_prompt=FLAGS.negative, height=height, width=width, steps=FLAGS.steps,
                    guidance_scale=FLAGS.guidance, sampler=FLAGS.sampler, seed=seed,
                    guidance_mode=FLAGS.guidance_mode, use_resolution_binning=not FLAGS.no_binning, timings=timings,
                    trim_captions=not FLAGS.full_captions, **edit, **control)
      compiled = pipe.num_traces > first
      bar.set_postfix(compile_and_sample=f"{timings['denoise']:.1f}s" if compiled else None,
                      sample=None if compiled else f"{timings['denoise']:.1f}s", decode=f"{timings['decode']:.1f}s")
      for i, (prompt, img) in enumerate(zip(batch, images)):
        meta = {"prompt": prompt, "negative_prompt": FLAGS.negative, "seed": seed, "batch_index": i,
                "sampler": FLAGS.sampler, "steps": FLAGS.steps or "default", "guidance_scale": FLAGS.guidance,
                "guidance_mode": FLAGS.guidance_mode, "size": f"{img.shape[1]}x{img.shape[0]}",
                "model": FLAGS.model, "transformer": FLAGS.transformer or "", "software": "pixart_jax"}
        if edit:
          meta.update(init_image=FLAGS.init_image, strength=edit["strength"], mask=FLAGS.mask or "")
        if control:
          meta.update(control=FLAGS.control, controlnet=FLAGS.controlnet, control_scale=FLAGS.control_scale)
        path = out / f"{start + i:0{digits}d}_{_slug(prompt)}.png"
        save_png(img, path, meta)
        written.append(path)
      all_images.extend(images)
      bar.update(len(batch))
  if hosts == 1 and len(all_images) > 1 and len({im.shape for im in all_images}) == 1:
    contact_sheet(np.stack(all_images)).save(out / "contact_sheet.png")
  logging.info("wrote %d images to %s", len(written), out)


def run():
  from pixart_jax import cli_errors

  app.run(cli_errors.guard(main))


if __name__ == "__main__":
  run()
