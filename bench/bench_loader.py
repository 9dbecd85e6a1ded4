"""Input-pipeline throughput (records/s) vs what a PixArt-Sigma XL/2 train step consumes.

    python bench/bench_loader.py                               # 1024 buckets, 0 and 2 workers
    python bench/bench_loader.py --workers 0,2,4 --global_batch 32 --steps 30
    python bench/bench_loader.py --measured_steps_per_s 1.1 --chips_per_host 4

Writes a synthetic dataset with the real record structure and sizes (`data/synthetic.py`: bf16
VAE mean/std of 128x128x4 at 1024, trimmed bf16 T5-XXL embeddings of 8-120 tokens, half the
records with a 120-300-token long caption), then times `make_train_iterator` (decode, pad to 300,
latent sampling, assembly into jax.Arrays on this host's devices) with each worker count: the
first batch (start-up) separately, then `--steps` batches. The file cache is warm (the dataset was
just written), so this measures the CPU side of the loader, not the disk or GCS.

Consumption: training FLOPs per image of XL/2 (hidden 1152, depth 28, patch 2, 300 caption tokens)
counted analytically (3 x forward matmul + attention FLOPs), at --mfu of the --device's bf16 peak,
times --chips_per_host; or --measured_steps_per_s x per-host batch when a measured rate is known.
Results are recorded in bench/results/data.md (merged into bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import fmt_table, machine_description  # noqa: E402
from pixart_jax.data import buckets, pipeline, synthetic  # noqa: E402
from pixart_jax.data.encoders import local_mesh  # noqa: E402
from pixart_jax.parallel import chips  # noqa: E402


def train_flops_per_image(tokens: int, *, hidden: int = 1152, depth: int = 28, caption: int = 300,
                          caption_dim: int = 4096) -> float:
  """fwd+bwd (3x forward) FLOPs of one image with `tokens` image tokens through XL/2."""
  d = hidden
  per_layer = (2 * tokens * 14 * d * d              # self qkv+o (4 d^2), cross q+o (2 d^2), mlp (8 d^2)
               + 2 * caption * 2 * d * d            # cross-attention k, v of the caption
               + 2 * 2 * tokens * tokens * d        # self-attention scores and values
               + 2 * 2 * tokens * caption * d)      # cross-attention scores and values
  caption_proj = 2 * caption * (caption_dim * d + d * d)
  return 3.0 * (depth * per_layer + caption_proj)


def time_loader(data_dir, *, workers, global_batch, steps, read_threads, mesh) -> dict:
  it = pipeline.make_train_iterator(data_dir, global_batch_size=global_batch, mesh=mesh, seed=0,
                                    workers=workers, read_threads=read_threads)
  t0 = time.perf_counter()
  jax.block_until_ready(next(it)["latents"])
  first = time.perf_counter() - t0
  nbytes = 0
  t0 = time.perf_counter()
  for _ in range(steps):
    b = next(it)
    jax.block_until_ready(b["latents"])
    nbytes += sum(b[k].nbytes for k in pipeline.BATCH_KEYS)
  dt = time.perf_counter() - t0
  it.close()
  return {"first_s": first, "records_per_s": steps * global_batch / dt,
          "steps_per_s": steps / dt, "out_mb_per_s": nbytes / dt / 1e6}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--table", default="1024", help="bucket table of the synthetic dataset")
  p.add_argument("--buckets", default="1.0,0.57,1.75", help="comma-separated bucket keys")
  p.add_argument("--records_per_bucket", type=int, default=64, help="records written per bucket")
  p.add_argument("--global_batch", type=int, default=16, help="examples per step (this host = all)")
  p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
  p.add_argument("--workers", default="0,2", help="comma-separated grain worker counts to time")
  p.add_argument("--read_threads", type=int, default=2, help="grain ReadOptions.num_threads")
  p.add_argument("--device", default="v5p", choices=sorted(chips.BY_NAME), help="chip for the estimate")
  p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the estimate")
  p.add_argument("--chips_per_host", type=int, default=4, help="accelerator chips fed by one host")
  p.add_argument("--measured_steps_per_s", type=float, default=0.0,
                 help="use a measured train rate (steps/s of --global_batch per host) instead")
  p.add_argument("--no_mesh", action="store_true", help="yield host numpy (skip jax.Array assembly)")
  p.add_argument("--dir", default="", help="dataset dir (default: a temp dir, deleted afterwards)")
  args = p.parse_args()

  keys = args.buckets.split(",")
  table = buckets.get_table(args.table)
  data_dir = args.dir or tempfile.mkdtemp(prefix="bench_loader_")
  try:
    t0 = time.perf_counter()
    manifest = synthetic.write_synthetic_dataset(
        data_dir, {k: args.records_per_bucket for k in keys}, table=args.table, shard_size=64)
    size = sum(os.path.getsize(os.path.join(data_dir, s["records_file"])) for s in manifest["shards"])
    print(f"dataset: {manifest['num_records']} records, {size / 1e6:.0f} MB "
          f"({size / manifest['num_records'] / 1e6:.2f} MB/record), written in "
          f"{time.perf_counter() - t0:.1f} s")
    mesh = None if args.no_mesh else local_mesh()
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
      r = time_loader(data_dir, workers=w, global_batch=args.global_batch, steps=args.steps,
                      read_threads=args.read_threads, mesh=mesh)
      rows.append([w, f"{r['first_s']:.2f}", f"{r['records_per_s']:.1f}", f"{r['steps_per_s']:.2f}",
                   f"{r['out_mb_per_s']:.0f}"])
      print(f"workers={w}: {r}")
  finally:
    if not args.dir:
      shutil.rmtree(data_dir, ignore_errors=True)

  tokens = [table[k][0] * table[k][1] // 256 for k in keys]   # (H/16) (W/16) image tokens
  flops = float(np.mean([train_flops_per_image(t) for t in tokens]))
  peak = chips.BY_NAME[args.device].bf16_flops
  per_chip = peak * args.mfu / flops
  need = (args.measured_steps_per_s * args.global_batch if args.measured_steps_per_s
          else per_chip * args.chips_per_host)
  print()
  print(f"machine: {machine_description()}")
  print(f"command: python bench/bench_loader.py {' '.join(sys.argv[1:])}")
  print(fmt_table(["workers", "first batch (s)", "records/s", "steps/s", "output MB/s"], rows))
  print(f"XL/2 training: {flops / 1e12:.1f} TFLOP per image at {np.mean(tokens):.0f} tokens; "
        f"{args.device} at {args.mfu:.0%} MFU -> {per_chip:.1f} images/s per chip; "
        f"one host must supply {need:.1f} records/s"
        + (" (measured train rate)" if args.measured_steps_per_s else
           f" ({args.chips_per_host} chips/host)"))
  best = max(float(r[2]) for r in rows)
  print(f"best loader rate {best:.1f} records/s = {best / need:.2f} x the consumption rate")


if __name__ == "__main__":
  main()
