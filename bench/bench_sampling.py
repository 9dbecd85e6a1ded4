"""Text -> image, 20-step DPM-Solver++ with CFG: our Pipeline vs diffusers PixArtSigmaPipeline, same weights/latents.

    python bench/bench_sampling.py                                   # 256x256, mid-size DiT, batch 1, fp32, CPU
    python bench/bench_sampling.py --size 512 --layers 4 --runs 3

A random mid-size PixArt-Sigma pipeline is written in the real diffusers format (`pixart_jax.testing.
make_tiny_pipeline` with larger sizes: DiT `--layers` x (`--heads` x `--head-dim`), T5 width `--t5-dim`, the
small 4-level VAE of that helper); diffusers loads it with `from_pretrained`, we load it with
`Pipeline.from_pretrained` (fp32 compute, as the reference). Both get the same prompt, the negative prompt "",
the same initial latents, guidance 4.5, 20 steps, resolution binning on. Reported: the first call (JAX: trace +
compile + run), the median of `--runs` later calls, their ratio, the DiT FLOPs of the sampling loop
(`models.flops.sampling_flops`: 20 steps x batch 2 for CFG) and GFLOP/s, and the max uint8 difference of the
two images. Our timings dict splits encode / denoise / decode. Our Pipeline trims the captions to the caption
bucket of the longest prompt (`trim_captions`, its default: the pad positions are masked out of every attention, so
the images are the same); a third row times it with all 300 positions, diffusers' shapes (`--no-full-captions`
skips that row).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def compare(ours, ref, prompts: list[str], lat, *, size: int, steps: int, guidance: float, runs: int,
            torch_device: str = "cpu", torch_autocast_bf16: bool = False) -> dict:
  """Our Pipeline `ours` vs diffusers' PixArtSigmaPipeline `ref` drawing `prompts` from the same initial latents
  `lat` (B h w C numpy) at `size` px: the first call of each (JAX: trace + compile + run), `runs` later calls
  (`common.Timing`), our encode / denoise / decode split (seconds, last call) and the max uint8 difference.
  torch_autocast_bf16: run the reference under `torch.autocast(bfloat16)` (the counterpart of our bf16 compute)."""
  import numpy as np
  import torch

  from common import time_fn

  lat_t = torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()).to(torch_device)
  call_kw = dict(height=size, width=size, guidance_scale=guidance)
  timings: dict = {}

  def run_jax():
    return ours(prompts, steps=steps, latents=lat, timings=timings, **call_kw)

  def run_torch():
    autocast = torch.autocast(torch_device.split(":")[0], dtype=torch.bfloat16, enabled=torch_autocast_bf16)
    with torch.inference_mode(), autocast:
      out = ref(prompts, num_inference_steps=steps, latents=lat_t.clone().to(ref.transformer.dtype),
                output_type="np", clean_caption=False, **call_kw).images
    if torch_device != "cpu":
      torch.cuda.synchronize()
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)

  t0 = time.perf_counter()
  img_j = run_jax()
  first_j = time.perf_counter() - t0
  t0 = time.perf_counter()
  img_t = run_torch()
  first_t = time.perf_counter() - t0
  diff = int(np.abs(img_j.astype(int) - img_t.astype(int)).max())
  tj = time_fn(run_jax, warmup=0, runs=runs)
  split = dict(timings)
  tt = time_fn(run_torch, warmup=0, runs=runs)
  return {"first_jax": first_j, "first_torch": first_t, "jax": tj, "torch": tt, "split": split, "max_diff": diff}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", type=int, default=256, help="square image side in pixels (256 or 512 bins)")
  ap.add_argument("--layers", type=int, default=8, help="DiT blocks")
  ap.add_argument("--heads", type=int, default=6, help="DiT heads")
  ap.add_argument("--head-dim", type=int, default=64, help="DiT head width (width = heads x head_dim)")
  ap.add_argument("--t5-dim", type=int, default=64, help="T5 width (2 layers)")
  ap.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
  ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale (> 1 runs the unconditional branch)")
  ap.add_argument("--batch", type=int, default=1, help="prompts per call")
  ap.add_argument("--runs", type=int, default=2, help="timed calls after the first (median)")
  ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all cores)")
  ap.add_argument("--full-captions", action=argparse.BooleanOptionalAction, default=True,
                  help="also time our Pipeline with all 300 caption positions (trim_captions=False)")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                  help="DiT and T5 compute dtype (weights fp32, VAE fp32); bfloat16: torch runs under autocast(bf16)")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from diffusers import PixArtSigmaPipeline

  import pixart_jax as pj
  from common import fmt_table, gflops, machine_description, set_torch_threads
  from pixart_jax.models.flops import sampling_flops
  from pixart_jax.testing import make_tiny_pipeline

  jax.config.update("jax_default_matmul_precision", "highest")
  set_torch_threads(args.torch_threads)
  print(machine_description())
  prompts = ["a watercolor painting of mountains at sunrise", "a photo of a cat sitting on a red sofa",
             "an astronaut riding a horse on the moon", "a small wooden cabin in a snowy forest at night"]
  prompts = (prompts * args.batch)[: args.batch]
  lat_side = args.size // 8
  with tempfile.TemporaryDirectory() as d:
    path = make_tiny_pipeline(d, sample_size=lat_side, layers=args.layers, heads=args.heads,
                              head_dim=args.head_dim, t5_dim=args.t5_dim)
    ref = PixArtSigmaPipeline.from_pretrained(path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = pj.Pipeline.from_pretrained(path, dtype=jnp.dtype(args.dtype))
  cfg = ours.transformer.cfg
  print(f"pipeline: DiT {cfg.depth} x {cfg.hidden_size} ({cfg.num_heads} heads), T5 2 x {args.t5_dim}, "
        f"4-level VAE (8/8/16/16 ch); {args.size}x{args.size}, batch {args.batch}, {args.steps} steps, "
        f"CFG {args.guidance}, compute {args.dtype}\n")

  lat = np.random.default_rng(0).standard_normal((args.batch, lat_side, lat_side, 4)).astype(np.float32)
  res = compare(ours, ref, prompts, lat, size=args.size, steps=args.steps, guidance=args.guidance, runs=args.runs,
                torch_autocast_bf16=args.dtype == "bfloat16")
  first_j, first_t, tj, tt, split, diff = (res[k] for k in ("first_jax", "first_torch", "jax", "torch", "split",
                                                            "max_diff"))
  fl = sampling_flops(cfg, lat_side, lat_side, args.steps, batch=args.batch, guidance=args.guidance > 1)
  tokens = int(ours.encode(prompts + [""], trim_captions=True)[1].shape[1])
  full = None
  if args.full_captions:
    from common import time_fn

    def run_full():
      return ours(prompts, steps=args.steps, latents=lat, height=args.size, width=args.size,
                  guidance_scale=args.guidance, trim_captions=False)
    t0 = time.perf_counter()
    run_full()
    full = (time.perf_counter() - t0, time_fn(run_full, warmup=0, runs=args.runs))

  rows = [[f"JAX Pipeline (captions trimmed to {tokens} tokens)", f"{first_j:.2f}", f"{tj.median:.2f}", f"{gflops(fl, split['denoise']):.1f}",
           f"encode {split['encode'] * 1e3:.0f} ms, denoise {split['denoise']:.2f} s, decode "
           f"{split['decode'] * 1e3:.0f} ms"],
          ["diffusers PixArtSigmaPipeline", f"{first_t:.2f}", f"{tt.median:.2f}", f"{gflops(fl, tt.median):.1f} "
           "(whole call)", "300 caption positions"]]
  if full is not None:
    rows.insert(1, ["JAX Pipeline, trim_captions=False", f"{full[0]:.2f}", f"{full[1].median:.2f}", "",
                    "300 caption positions"])
  print(fmt_table(["", "first call s", f"later calls s (median of {args.runs})", "DiT GFLOP/s", "split"], rows))
  print(f"\nafter compile: diffusers / JAX = **{tt.median / tj.median:.2f}x** (>1: JAX faster); first call "
        f"(JAX compile included): {first_t / first_j:.2f}x; DiT sampling FLOPs {fl / 1e9:.1f} GFLOP; "
        f"max |uint8 JAX - diffusers| = {diff}")
  if full is not None:
    print(f"all 300 caption positions: diffusers / JAX = {tt.median / full[1].median:.2f}x (GFLOP/s above count "
          f"300 caption positions)")


if __name__ == "__main__":
  main()
