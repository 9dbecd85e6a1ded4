"""PixArt-Sigma XL/2 forward: our jitted NNX model vs diffusers PixArtTransformer2DModel, same weights, same run.

    python bench/bench_forward.py --batches 1,2            # 256 and 512 px, batch 1 and 2, fp32, CPU
    python bench/bench_forward.py --sizes 256 --batches 1 --runs 5
    python bench/bench_forward.py --xla-flags=--xla_cpu_use_xnnpack=true   # try an XLA CPU option (note the =)
    python bench/bench_forward.py --sizes 256 --dtypes float32,bfloat16     # also the opt-in bf16 compute path

Both models get the same random weights (diffusers model -> save_pretrained -> our loader) and the same inputs
(NHWC latents for JAX, NCHW for torch, 300 caption tokens with 120 valid); the first size's outputs are compared.
JAX: `jax.jit`, AOT-compiled (compile time reported), precision `--precision` (default 'highest' = true fp32;
'default' lets XLA CPU use its fastest fp32 path). torch: `inference_mode`, threads = cores. Timing: `--warmup`
untimed calls, median of `--runs`. FLOPs: `pixart_jax.models.flops.dit_forward_flops` (matmuls only, 2 x MACs);
GFLOP/s is compared with a measured fp32 matmul peak of this CPU (best of JAX and torch on a 2048^3 matmul).

`--dtypes ...,bfloat16`: bf16 compute with fp32 weights on both sides (ours: `load_transformer(dtype=bfloat16)`,
softmax and norms in fp32; torch: `torch.autocast("cpu", bfloat16)`). Native bf16 dots need avx512_bf16 / AMX (the
first line lists the CPU's flags); elsewhere they are emulated and slow. Its accuracy is reported against the fp32
torch output of the same inputs (max |out - ref| / max |ref|), and its speed against both torch bf16 and torch fp32.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default="256,512", help="comma list of square image sizes in pixels")
  ap.add_argument("--batches", default="1", help="comma list of batch sizes (e.g. 1,2)")
  ap.add_argument("--runs", type=int, default=2, help="timed calls per measurement (median)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed calls first")
  ap.add_argument("--depth", type=int, default=28, help="DiT blocks (28 = XL/2; fewer for a quick check)")
  ap.add_argument("--dtypes", default="float32",
                  help="comma list of compute dtypes: float32 (exact reference) and/or bfloat16 (opt-in)")
  ap.add_argument("--precision", default="highest", choices=["highest", "high", "default"],
                  help="jax_default_matmul_precision")
  ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this run (set before jax starts)")
  ap.add_argument("--no-torch", action="store_true", help="skip the diffusers reference")
  ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all cores)")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from diffusers import PixArtTransformer2DModel
  from flax import nnx

  from common import fmt_table, gflops, machine_description, measured_matmul_peak, set_torch_threads, time_fn
  from pixart_jax.convert.dit import load_transformer
  from pixart_jax.models.flops import dit_forward_flops

  jax.config.update("jax_default_matmul_precision", args.precision)
  set_torch_threads(args.torch_threads)
  print(machine_description())
  peak = measured_matmul_peak(reps=5)
  print(f"measured fp32 matmul peak (2048^3): JAX {peak['jax']:.1f} GFLOP/s, torch {peak['torch']:.1f} GFLOP/s; "
        f"jax_default_matmul_precision={args.precision}")

  torch.manual_seed(0)
  tmodel = PixArtTransformer2DModel(
      num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=args.depth,
      cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
      activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
      norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2.0, use_additional_conditions=False,
      caption_channels=4096).eval()
  with torch.no_grad():  # non-zero everywhere (the zero-initialised out projections too)
    for p in tmodel.parameters():
      p.normal_(0.0, 0.02)
  dtypes = [d.strip() for d in args.dtypes.split(",")]
  for d in dtypes:
    if d not in ("float32", "bfloat16"):
      raise SystemExit(f"--dtypes: {d!r} is not a compute dtype; valid: float32, bfloat16")
  tmpdir = tempfile.TemporaryDirectory()
  t0 = time.perf_counter()
  tmodel.save_pretrained(tmpdir.name)
  models = {d: load_transformer(tmpdir.name, dtype=jnp.dtype(d)) for d in dtypes}
  print(f"same weights via save_pretrained -> load_transformer in {time.perf_counter() - t0:.1f} s; "
        f"depth {args.depth}, compute {', '.join(dtypes)} (weights fp32)\n")
  cfg = next(iter(models.values())).cfg

  rng = np.random.default_rng(0)
  rows = []
  for px in [int(s) for s in args.sizes.split(",")]:
    for b in [int(s) for s in args.batches.split(",")]:
      lat = px // 8
      x = rng.standard_normal((b, lat, lat, 4), dtype=np.float32)
      t = np.full((b,), 500.0, np.float32)
      y = (rng.standard_normal((b, 300, 4096), dtype=np.float32) * 0.1).astype(np.float32)
      m = np.zeros((b, 300), np.int64)
      m[:, :120] = 1
      ja = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(m.astype(np.int32)))
      flops = dit_forward_flops(cfg, lat, lat, 300, b)
      if not args.no_torch:
        tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        targs = dict(encoder_hidden_states=torch.from_numpy(y), timestep=torch.from_numpy(t),
                     encoder_attention_mask=torch.from_numpy(m), added_cond_kwargs={"resolution": None,
                                                                                      "aspect_ratio": None},
                     return_dict=False)
        with torch.inference_mode():
          ref = tmodel(tx, **targs)[0].float().numpy().transpose(0, 2, 3, 1)
      for dt, model in models.items():
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda st, x, t, y, m, g=graphdef: nnx.merge(g, st)(x, t, y, m))
        c0 = time.perf_counter()
        compiled = fwd.lower(state, *ja).compile()
        compile_s = time.perf_counter() - c0
        tj = time_fn(lambda: compiled(state, *ja).block_until_ready(), warmup=args.warmup, runs=args.runs)
        row = [f"{px}x{px}", b, dt, (lat // 2) ** 2, f"{flops / 1e9:.1f}", f"{tj.median * 1e3:.0f}", f"{compile_s:.1f}",
               f"{gflops(flops, tj.median):.1f} ({100 * gflops(flops, tj.median) / peak['best']:.0f} %)"]
        line = f"  {px}px b={b} {dt}: JAX {tj.fmt()}"
        if not args.no_torch:
          err_j = _rel_err(np.asarray(compiled(state, *ja), np.float32), ref)
          autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bfloat16")
          with torch.inference_mode(), autocast:
            err_t = _rel_err(tmodel(tx, **targs)[0].float().numpy().transpose(0, 2, 3, 1), ref)
            tt = time_fn(lambda: tmodel(tx, **targs), warmup=args.warmup, runs=args.runs)
          row += [f"{err_j:.1e} / {err_t:.1e}", f"{tt.median * 1e3:.0f}", f"{gflops(flops, tt.median):.1f}",
                  f"**{tt.median / tj.median:.2f}x**"]
          line += f", torch {tt.fmt()}; error vs torch fp32: JAX {err_j:.1e}, torch {err_t:.1e}"
        rows.append(row)
        print(line, flush=True)

  header = ["size", "batch", "compute", "tokens", "GFLOP", "JAX ms", "JAX compile s", "JAX GFLOP/s (% of peak)"]
  if not args.no_torch:
    header += ["max err vs torch fp32: JAX / torch", "torch ms (same compute)", "torch GFLOP/s",
               "speedup torch/JAX (>1: JAX faster)"]
  print()
  print(fmt_table(header, rows))
  print(f"\npeak = {peak['best']:.1f} GFLOP/s (measured fp32 matmul, best of JAX {peak['jax']:.1f} / torch "
        f"{peak['torch']:.1f})")


def _rel_err(out, ref) -> float:
  """max |out - ref| / max |ref| (both B H W C float32)."""
  import numpy as np
  return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


if __name__ == "__main__":
  main()
