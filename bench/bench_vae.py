"""VAE throughput: our jitted NNX AutoencoderKL vs diffusers AutoencoderKL, same weights, same process.

    python bench/bench_vae.py                      # SDXL layout, 256x256, batch 1, fp32, CPU
    python bench/bench_vae.py --size 512 --runs 5
    python bench/bench_vae.py --tiling             # tiled vs untiled error, SDXL layout, random weights

Both models get the same random weights (diffusers -> save_pretrained -> load_vae; outputs compared before
the table). Timing protocol of bench/common.py: a warm-up call (compile for JAX), then the median of `--runs`
calls; JAX calls end with `block_until_ready`. torch is timed twice: default NCHW and `channels_last` (its
NHWC memory format, the fairer match for XLA's NHWC convs). Results: bench/results/vae.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", type=int, default=256, help="square image side in pixels (multiple of 8)")
  ap.add_argument("--batch", type=int, default=1, help="images per call")
  ap.add_argument("--runs", type=int, default=3, help="timed calls per measurement (median reported)")
  ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all cores)")
  ap.add_argument("--tiling", action="store_true",
                  help="instead of throughput, measure tiled vs untiled decode/encode error (384x512 image)")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from common import fmt_table, machine_description, set_torch_threads, time_fn
  from diffusers import AutoencoderKL as TorchAutoencoderKL
  from flax import nnx

  from pixart_jax.convert.vae_keys import load_vae

  set_torch_threads(args.torch_threads)
  torch.manual_seed(0)
  n = 4
  tvae = TorchAutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            scaling_factor=0.13025, force_upcast=False).eval()
  with tempfile.TemporaryDirectory() as d:
    tvae.save_pretrained(d)
    vae = load_vae(d)

  if args.tiling:
    _tiling_errors(vae, machine_description(), fmt_table)
    return

  b, s = args.batch, args.size
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
  z = rng.standard_normal((b, s // 8, s // 8, 4)).astype(np.float32) / 0.13025
  xt, zt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(z).permute(0, 3, 1, 2).contiguous()
  xj, zj = jnp.asarray(x), jnp.asarray(z)

  graphdef, state = nnx.split(vae)
  enc = jax.jit(lambda st, a: nnx.merge(graphdef, st).encode(a))
  dec = jax.jit(lambda st, a: nnx.merge(graphdef, st).decode(a))
  cl = torch.channels_last
  tvae_cl = copy.deepcopy(tvae).to(memory_format=cl)
  xt_cl, zt_cl = xt.to(memory_format=cl), zt.to(memory_format=cl)

  with torch.inference_mode():
    timings = {
        "encode": (time_fn(lambda: enc(state, xj).block_until_ready(), runs=args.runs),
                   time_fn(lambda: tvae.encode(xt).latent_dist.parameters, runs=args.runs),
                   time_fn(lambda: tvae_cl.encode(xt_cl).latent_dist.parameters, runs=args.runs)),
        "decode": (time_fn(lambda: dec(state, zj).block_until_ready(), runs=args.runs),
                   time_fn(lambda: tvae.decode(zt).sample, runs=args.runs),
                   time_fn(lambda: tvae_cl.decode(zt_cl).sample, runs=args.runs)),
    }
    # agreement check on the benchmarked inputs
    err_enc = float(np.abs(np.asarray(enc(state, xj)) - tvae.encode(xt).latent_dist.parameters.permute(0, 2, 3, 1)
                           .numpy()).max())
    err_dec = float(np.abs(np.asarray(dec(state, zj)) - tvae.decode(zt).sample.permute(0, 2, 3, 1).numpy()).max())

  print(machine_description())
  print(f"SDXL VAE fp32, {s}x{s}, batch {b}, median of {args.runs} after warm-up; "
        f"max abs diff encode {err_enc:.2e}, decode {err_dec:.2e}")
  print()
  rows = []
  for name, (tj, tt, tcl) in timings.items():
    best = min(tt.median, tcl.median)
    rows.append([name, f"{tj.median:.3f}", f"{tt.median:.3f}", f"{tcl.median:.3f}", f"{b / tj.median:.2f}",
                 f"{b / best:.2f}", f"{best / tj.median:.2f}x", f"{tj.first:.1f}"])
  print(fmt_table(["op", "JAX s/call", "torch NCHW s/call", "torch channels_last s/call", "JAX img/s",
                   "best torch img/s", "JAX / best torch speed", "JAX first call (compile) s"], rows))


def _tiling_errors(vae, machine: str, fmt_table):
  """Tiled vs untiled on the SDXL layout (random torch-init weights): latents N(0, 1) / scaling_factor, and a
  smooth image (bilinearly upsampled random 12x16 colours + 0.1 noise). Errors relative to max |untiled|."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from pixart_jax.models.vae_tiling import decode_tiled, encode_tiled

  graphdef, state = nnx.split(vae)
  z = jax.random.normal(jax.random.key(0), (1, 48, 64, 4)) / vae.config.scaling_factor
  lo = jax.random.uniform(jax.random.key(1), (1, 12, 16, 3), minval=-1, maxval=1)
  x = jnp.clip(jax.image.resize(lo, (1, 384, 512, 3), "bilinear")
               + 0.1 * jax.random.normal(jax.random.key(2), (1, 384, 512, 3)), -1, 1)
  full_dec = jax.jit(lambda st, a: nnx.merge(graphdef, st).decode(a))(state, z)
  full_enc = jax.jit(lambda st, a: nnx.merge(graphdef, st).encode(a))(state, x)

  def row(op, tile, ov, out, ref):
    d, m = jnp.abs(out - ref), float(jnp.abs(ref).max())
    return [op, tile, ov, f"{float(d.max()):.4f}", f"{float(d.max()) / m:.4f}", f"{float(d.mean()) / m:.5f}"]

  rows = []
  for ov in (0, 8, 16):
    rows.append(row("decode", "32 latent", f"{ov} latent", decode_tiled(vae, z, tile_latent=32, overlap_latent=ov),
                    full_dec))
  c = vae.config.latent_channels
  for ov in (0, 64, 128):
    tiled = encode_tiled(vae, x, tile=256, overlap=ov)
    rows.append(row("encode (mean)", "256 px", f"{ov} px", tiled[..., :c], full_enc[..., :c]))
    rows.append(row("encode (logvar)", "256 px", f"{ov} px", tiled[..., c:], full_enc[..., c:]))
  print(machine)
  print("SDXL layout, random weights, fp32; 48x64 latent / 384x512 image; errors relative to max|untiled|")
  print()
  print(fmt_table(["op", "tile", "overlap", "max abs", "rel max", "rel mean"], rows))


if __name__ == "__main__":
  main()
