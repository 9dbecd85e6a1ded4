"""One GPU, one run: the XL/2 1024 px train step (bf16, attention auto = cuDNN, two remat policies) with MFU,
20-step CFG sampling at 1024 px against diffusers' PixArtSigmaPipeline on the same random weights, and 2K / 4K
sampling time and peak GPU memory; writes a markdown report. Started by `bench/gpu/run.sh` (which installs the
missing wheels first); see bench/gpu/README.md.

    PYTHONPATH=. python bench/gpu/bench_gpu.py --out bench/results/gpu.md         # the real thing (H100 / H200)
    PYTHONPATH=. python bench/gpu/bench_gpu.py --dry --out /tmp/gpu.md             # toy sizes on the CPU

Weights: one random PixArt-Sigma pipeline in the diffusers format (`pixart_jax.testing.make_tiny_pipeline` at full
size: DiT XL/2 = 28 x 1152 (16 heads x 72), 1024 px table; the SDXL VAE layout (128/256/512/512); T5 of width 4096
with 2 layers instead of T5-XXL's 24 (the DiT's caption width is real; the text encoder is a small part of the
sampling time on both sides and its 19 GB of random weights would only slow the setup). Both frameworks load the
same files.

Each measurement runs in its own process (`--part`), so the peak GPU memory (JAX: `memory_stats()
["peak_bytes_in_use"]`, torch: `max_memory_allocated`) is that measurement's alone; JAX does not preallocate
(XLA_PYTHON_CLIENT_PREALLOCATE=false) so both frameworks share the GPU. A part that fails (e.g. out of memory) is
reported in the table with its error; the others still run.

  train    `bench_train_step.JaxTrainStep` (the trainer's step: IDDPM loss, AdamW, clipping) for each --remat
           policy, bf16 compute / fp32 parameters; MFU = analytic FLOPs (`train.flops.train_step_flops`,
           3 x forward) / step time / the chip's dense bf16 peak (`parallel.chips`).
  sample   `bench_sampling.compare`: our Pipeline vs diffusers, bf16 on both sides, same prompt and latents,
           20 DPM-Solver++ steps, guidance 4.5, first call and the median of later calls.
  hires    our Pipeline at --size (no binning), 10 steps with CFG (the time per step is what matters); 4096 px
           uses KV compression on the deep half ('ave' mode, which has no parameters, so the same weights load);
           the VAE decode is tiled by the Pipeline's rule.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # bench/: common, bench_train_step, bench_sampling

FULL = dict(layers=28, heads=16, head_dim=72, t5_dim=4096, sample_size=128, vae_channels=(128, 256, 512, 512),
            vae_layers=2, vae_groups=32, train_size=1024, train_batch=4, sample_size_px=1024, steps=20,
            hires=(2048, 4096), hires_steps=10, runs=3)  # 10 hi-res steps keep the run under 8 minutes
DRY = dict(layers=2, heads=2, head_dim=8, t5_dim=32, sample_size=32, vae_channels=(8, 8, 16, 16), vae_layers=1,
           vae_groups=4, train_size=64, train_batch=2, sample_size_px=256, steps=3, hires=(512,), hires_steps=2,
           runs=1)
PROMPT = "a small wooden cabin in a snowy forest at night"
DEEP_HALF_KV = lambda depth: tuple(range(depth // 2, depth))  # noqa: E731


def _device_peak_bytes() -> int | None:
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dtype(dry: bool):
  import jax.numpy as jnp
  return jnp.float32 if dry else jnp.bfloat16


# ------------------------------------------------------------------------------------------------- parts
def part_train(path: pathlib.Path, sizes: dict, remats: list[str], dry: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from bench_train_step import JaxTrainStep
  from common import time_fn
  from pixart_jax.convert.dit import load_transformer
  from pixart_jax.models.attention_backends import resolve_backend
  from pixart_jax.parallel.chips import chip_of
  from pixart_jax.train.flops import train_step_flops

  b, lat, s = sizes["train_batch"], sizes["train_size"] // 8, 300
  rng = np.random.default_rng(0)
  model = load_transformer(path, dtype=_dtype(dry), param_dtype=jnp.float32, attention="auto")
  cfg = model.cfg
  arrays = {"latents": (rng.standard_normal((b, lat, lat, 4), dtype=np.float32) * 0.5),
            "caption": (rng.standard_normal((b, s, cfg.caption_channels), dtype=np.float32) * 0.1),
            "mask": (np.arange(s)[None] < np.array([[120]] * b)).astype(np.int32)}
  del model
  flops = train_step_flops(cfg, b, lat, lat, s)
  chip = chip_of(jax.devices()[0].device_kind)
  backend, why = resolve_backend("auto", _dtype(dry))
  rows = []
  for remat in remats:
    try:
      model = load_transformer(path, dtype=_dtype(dry), param_dtype=jnp.float32, attention="auto", remat=remat)
      graphdef, params = nnx.split(model, nnx.Param)
      step = JaxTrainStep(graphdef, arrays, learn_sigma=True)
      step.start(params)
      del model, params
      mem = step.compiled.memory_analysis()
      t = time_fn(step, warmup=2, runs=sizes["runs"] + 2)
      step.stop()
      mfu = flops / t.median / chip.bf16_flops if chip else None
      rows.append({"remat": remat, "median_s": t.median, "min_s": t.min, "compile_s": step.compile_s,
                   "tflops": flops / t.median / 1e12, "mfu": mfu,
                   "temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem else None})
    except Exception as e:  # noqa: BLE001 - reported in the table (e.g. out of memory), the next policy runs
      rows.append({"remat": remat, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
  return {"batch": b, "size": sizes["train_size"], "tokens": (lat // 2) ** 2, "flops": flops,
          "chip": chip.name if chip else jax.devices()[0].device_kind, "attention": f"{backend.value} ({why})",
          "rows": rows, "peak_bytes": _device_peak_bytes(), "rss_bytes": _rss_bytes()}


def part_sample(path: pathlib.Path, sizes: dict, dry: bool) -> dict:
  import numpy as np
  import torch
  from diffusers import PixArtSigmaPipeline

  import pixart_jax as pj
  from bench_sampling import compare
  from pixart_jax.models.flops import sampling_flops

  device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
  tdtype = torch.float32 if dry else torch.bfloat16
  ref = PixArtSigmaPipeline.from_pretrained(path, torch_dtype=tdtype).to(device)
  ref.set_progress_bar_config(disable=True)
  ours = pj.Pipeline.from_pretrained(path, dtype=_dtype(dry), text_dtype=_dtype(dry), attention="auto")
  size, steps = sizes["sample_size_px"], sizes["steps"]
  lat = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 4)).astype(np.float32)
  res = compare(ours, ref, [PROMPT], lat, size=size, steps=steps, guidance=4.5, runs=sizes["runs"],
                torch_device=device)
  cfg = ours.transformer.cfg
  return {"size": size, "steps": steps, "torch_device": device, "torch_dtype": str(tdtype),
          "first_jax": res["first_jax"], "first_torch": res["first_torch"], "jax_s": res["jax"].median,
          "torch_s": res["torch"].median, "split": res["split"], "max_diff": res["max_diff"],
          "dit_flops": sampling_flops(cfg, size // 8, size // 8, steps, batch=1, guidance=True),
          "jax_peak_bytes": _device_peak_bytes(),
          "torch_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
          "rss_bytes": _rss_bytes()}


def part_hires(path: pathlib.Path, sizes: dict, size: int, dry: bool) -> dict:
  import jax.numpy as jnp

  import pixart_jax as pj
  from pixart_jax.convert.dit import load_transformer
  from pixart_jax.models.text_encoder import TextEncoder
  from pixart_jax.convert.vae_keys import load_vae

  dit = load_transformer(path, dtype=_dtype(dry), param_dtype=jnp.float32 if dry else jnp.bfloat16,
                         attention="auto")
  kv = size >= 4096 or dry  # the dry run goes through the 4K configuration at a toy size
  if kv:
    cfg = dit.cfg.replace(kv_compress_layers=DEEP_HALF_KV(dit.cfg.depth), kv_compress_mode="ave")
    dit = load_transformer(path, config=cfg, dtype=_dtype(dry), param_dtype=jnp.float32 if dry else jnp.bfloat16,
                           attention="auto")
  pipe = pj.Pipeline(TextEncoder.from_pretrained(path, dtype=_dtype(dry)), dit, load_vae(path, dtype=_dtype(dry)))
  layout = pipe.layout(1, size, size)
  kw = dict(height=size, width=size, use_resolution_binning=False, steps=sizes["hires_steps"], guidance_scale=4.5)
  t0 = time.perf_counter()
  pipe([PROMPT], seed=0, **kw)
  first = time.perf_counter() - t0
  timings: dict = {}
  t0 = time.perf_counter()
  pipe([PROMPT], seed=1, timings=timings, **kw)
  return {"size": size, "steps": sizes["hires_steps"], "first_s": first, "s": time.perf_counter() - t0,
          "split": timings, "kv_compress": "deep half, ave" if kv else "none",
          "vae_tile_latent": layout.vae_tile_latent, "peak_bytes": _device_peak_bytes(), "rss_bytes": _rss_bytes()}


# ------------------------------------------------------------------------------------------------- report
def _gib(n) -> str:
  return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def report(results: dict, meta: dict) -> str:
  from common import fmt_table

  out = [f"# GPU benchmark ({'DRY RUN: toy sizes on the CPU, numbers mean nothing' if meta['dry'] else 'one GPU'})",
         "", f"Machine: {meta['machine']}", f"Command: `{meta['command']}`; total {meta['seconds']:.0f} s.", ""]
  tr = results.get("train", {})
  out.append("## XL/2 train step" if not meta["dry"] else "## Train step (toy DiT)")
  if "error" in tr:
    out.append(f"failed: {tr['error']}")
  else:
    out += [f"{tr['size']} px, batch {tr['batch']}, {tr['tokens']} tokens, bf16 compute / fp32 params, attention "
            f"{tr['attention']}, chip {tr['chip']}, {tr['flops'] / 1e12:.2f} TFLOP per step (3 x forward). "
            "Target: MFU >= 50 %.", ""]
    rows = []
    for r in tr["rows"]:
      if "error" in r:
        rows.append([r["remat"], "failed", r["error"], "", "", "", ""])
      else:
        rows.append([r["remat"], f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.1f}", f"{r['compile_s']:.0f}",
                     f"{r['tflops']:.1f}", "n/a" if r["mfu"] is None else f"**{100 * r['mfu']:.1f} %**",
                     _gib(r["temp_gib"] * 2**30 if r["temp_gib"] is not None else None)])
    out.append(fmt_table(["remat", "step ms (median)", "min ms", "compile s", "TFLOP/s", "MFU",
                          "XLA temporaries"], rows))
  out.append("")
  sa = results.get("sample", {})
  out.append("## 20-step CFG sampling, ours vs diffusers PixArtSigmaPipeline (same weights, same latents)")
  if "error" in sa:
    out.append(f"failed: {sa['error']}")
  else:
    sp = sa["split"]
    out += [f"{sa['size']} px, {sa['steps']} DPM-Solver++ steps, guidance 4.5, batch 1; diffusers on "
            f"{sa['torch_device']} in {sa['torch_dtype']}. Target: >= 1.5x faster than diffusers.", "",
            fmt_table(["", "first call s", "later calls s (median)", "peak GPU memory"],
                      [["pixart_jax Pipeline", f"{sa['first_jax']:.2f}", f"{sa['jax_s']:.2f}",
                        _gib(sa["jax_peak_bytes"])],
                       ["diffusers", f"{sa['first_torch']:.2f}", f"{sa['torch_s']:.2f}",
                        _gib(sa["torch_peak_bytes"])]]), "",
            f"diffusers / ours = **{sa['torch_s'] / sa['jax_s']:.2f}x** (> 1: ours faster); our split: encode "
            f"{sp.get('encode', 0):.2f} s, denoise {sp.get('denoise', 0):.2f} s, decode {sp.get('decode', 0):.2f} s; "
            f"max |uint8 ours - diffusers| = {sa['max_diff']}."]
  out += ["", "## High-resolution sampling (ours; CFG, no binning)", ""]
  rows = []
  for key in sorted(k for k in results if k.startswith("hires")):
    h = results[key]
    if "error" in h:
      rows.append([key.split("_")[1], "failed", h["error"], "", "", "", ""])
      continue
    sp = h["split"]
    rows.append([f"{h['size']}x{h['size']}", h["steps"], f"{h['first_s']:.1f}", f"{h['s']:.1f}",
                 f"denoise {sp.get('denoise', 0):.1f} s, decode {sp.get('decode', 0):.1f} s",
                 f"{h['kv_compress']}; VAE tiles {h['vae_tile_latent'] or 'none'}",
                 _gib(h["peak_bytes"]) if h["peak_bytes"] is not None else f"RSS {_gib(h['rss_bytes'])}"])
  out.append(fmt_table(["size", "steps", "first call s", "second call s", "split", "layout", "peak memory"], rows))
  return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- driver
def _run_part(args, part: list[str], path: pathlib.Path, timeout: float) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    cmd = [sys.executable, __file__, "--weights", str(path), "--result", f.name, *part] + (["--dry"] if args.dry
                                                                                            else [])
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"[bench_gpu] {' '.join(part)}", flush=True)
    try:
      r = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout:.0f} s"}
    if r.returncode != 0:
      tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
      print(r.stderr[-3000:], file=sys.stderr)
      return {"error": f"exit {r.returncode}: {tail[0][:300]}"}
    return json.loads(pathlib.Path(f.name).read_text())


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dry", action="store_true", help="toy sizes on the CPU (checks the script, not the GPU)")
  ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.md"), help="markdown report to write")
  ap.add_argument("--remat", default="none,dots", help="remat policies of the train step, comma-separated")
  ap.add_argument("--train-batch", type=int, default=None, help="train batch (default: 4; dry: 2)")
  ap.add_argument("--part-timeout", type=float, default=360, help="seconds per part before it is reported failed")
  ap.add_argument("--weights", help=argparse.SUPPRESS)   # internal: a part's weights dir
  ap.add_argument("--result", help=argparse.SUPPRESS)    # internal: where a part writes its JSON
  ap.add_argument("--part", choices=["train", "sample", "hires"], help=argparse.SUPPRESS)
  ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
  args = ap.parse_args()
  sizes = dict(DRY if args.dry else FULL)
  if args.train_batch:
    sizes["train_batch"] = args.train_batch
  remats = [r.strip() for r in args.remat.split(",") if r.strip()]
  if args.dry:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  if args.part:  # one measurement in this process
    path = pathlib.Path(args.weights)
    if args.part == "train":
      res = part_train(path / "transformer", sizes, remats, args.dry)
    elif args.part == "sample":
      res = part_sample(path, sizes, args.dry)
    else:
      res = part_hires(path, sizes, args.size, args.dry)
    pathlib.Path(args.result).write_text(json.dumps(res))
    return 0

  from common import machine_description
  from pixart_jax.testing import make_tiny_pipeline

  t0 = time.perf_counter()
  machine = machine_description()
  print(machine, flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as d:
    path = make_tiny_pipeline(d, sample_size=sizes["sample_size"], layers=sizes["layers"], heads=sizes["heads"],
                              head_dim=sizes["head_dim"], t5_dim=sizes["t5_dim"],
                              vae_channels=sizes["vae_channels"], vae_layers=sizes["vae_layers"],
                              vae_groups=sizes["vae_groups"])
    print(f"[bench_gpu] weights written in {time.perf_counter() - t0:.0f} s", flush=True)
    results["train"] = _run_part(args, ["--part", "train", "--remat", ",".join(remats),
                                        "--train-batch", str(sizes["train_batch"])], path, args.part_timeout)
    results["sample"] = _run_part(args, ["--part", "sample"], path, args.part_timeout)
    for size in sizes["hires"]:
      results[f"hires_{size:05d}"] = _run_part(args, ["--part", "hires", "--size", str(size)], path,
                                               args.part_timeout)
  meta = {"dry": args.dry, "machine": machine, "seconds": time.perf_counter() - t0,
          "command": "bench/gpu/run.sh" + (" --dry" if args.dry else "")}
  text = report(results, meta)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(text)
  failed = [k for k, v in results.items() if "error" in v or any("error" in r for r in v.get("rows", []))]
  if failed:
    print(f"[bench_gpu] failed parts: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
