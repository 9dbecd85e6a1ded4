"""The TPU verdict table: every shipped recipe's train step and the whole sampling Pipeline, compiled ahead of time by
the TPU compiler (libtpu, `jax.experimental.topologies`; no TPU needed) for v5e / v6e / v5p slices.

    python bench/tpu_verdicts.py                 # runs every job not yet in the cache, then writes the table
    python bench/tpu_verdicts.py --only sample   # jobs whose name contains "sample"
    python bench/tpu_verdicts.py --report        # only rewrite bench/results/tpu_verdicts.md from the cache
    python bench/tpu_verdicts.py --list

Each job's result is saved in bench/results/tpu_verdicts.json as soon as it is compiled (the run can be stopped and
resumed). Every memory number is the TPU compiler's (`memory_analysis()`, or its out-of-memory refusal); the
"compiler's estimate" columns are its cost model (`cost_analysis()` optimal_seconds), not measurements.

Slices (Google's names): v5e-1 / v6e-1 = 1 chip; a v5e-8 / v6e-8 host = 8 chips (2x4); a v5p-8 host = 4 chips
(2x2x1: v5p names count TensorCores, 2 per chip); v5p-64 = 32 chips (2x4x4).
Train jobs: one example per chip (global batch = chips; the recipe's global batch is then reached by more chips or
grad_accum), the recipe's own dtype / remat / attention (auto = splash on TPU) / optimizer / mesh (fsdp over every
chip). Recipes with the same model and settings share one compiled program. Sample jobs: the Pipeline call for one
image with CFG (T5-XXL encode, 20 DPM-Solver++ steps, SDXL-VAE decode tiled above 2048 px), bf16 compute, fp32
DiT weights, bf16 T5 weights, at the size the Pipeline samples the request at (resolution binning: 3840x2160 is
sampled at 5376x3072 by the 4K model), all 300 caption tokens (the longest prompt; shorter ones are trimmed) -
the Pipeline's defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import pathlib
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # parallel runs (and other tools) may hold libtpu too
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / "results" / "tpu_verdicts.json"
REPORT = ROOT / "bench" / "results" / "tpu_verdicts.md"
SUMMARY = ROOT / "bench" / "results" / "tpu.md"  # the short section of bench/RESULTS.md (merge_results.py)

SLICES = {  # name -> (topology, chips, chip)
    "v5e-1": ("v5e:1x1", 1, "v5e"), "v6e-1": ("v6e:1x1", 1, "v6e"), "v5p-1": ("v5p:1x1x1", 1, "v5p"),
    "v5e-8": ("v5e:2x4", 8, "v5e"), "v6e-8": ("v6e:2x4", 8, "v6e"), "v5p-8": ("v5p:2x2x1", 4, "v5p"),
    "v5p-64": ("v5p:2x4x4", 32, "v5p"),
}
HOSTS = ("v5e-8", "v6e-8", "v5p-8")
RESOLUTIONS = {"1024x1024": "sigma-xl2-1024-ms", "2048x2048": "sigma-xl2-2k-ms", "3840x2160": "sigma-xl2-4k",
               "4096x4096": "sigma-xl2-4k"}


@dataclasses.dataclass(frozen=True)
class Job:
  name: str
  kind: str            # train | sample
  slice: str
  mesh: str            # AXIS=SIZE,...
  preset: str
  res: tuple[int, int]  # (W, H) pixels
  recipes: tuple[str, ...] = ()
  settings: tuple = ()  # train: the recipe settings as sorted items
  sequence_parallel: bool = False
  offload: bool = False  # sample: the Pipeline's offload_text_encoder (T5 on the device only while encoding)
  cost: bool = False
  target: str = ""


def recipe_groups() -> dict[tuple, list[str]]:
  """Every shipped recipe (configs/*.py, configs/weak_to_strong/*.py), grouped by the program it trains."""
  from pixart_jax.plan import _load_config, recipe_settings

  files = sorted(glob.glob(str(ROOT / "configs" / "*.py"))) + sorted(
      f for f in glob.glob(str(ROOT / "configs" / "weak_to_strong" / "*.py")) if not os.path.basename(f).startswith("_"))
  groups: dict[tuple, list[str]] = {}
  for f in files:
    r = recipe_settings(_load_config(f))
    key = (r["preset"], tuple(sorted(r["overrides"].items())), r["dtype"], r["param_dtype"], r["remat"], r["scan"],
           r["attention"].backend.value, r["optimizer"]["name"], r["ema"], r["grad_accum"], r["mesh"])
    groups.setdefault(key, []).append(f"{os.path.relpath(f, ROOT)} (batch {r['batch']})")
  return groups


def jobs() -> list[Job]:
  out = []
  # 1. the targets first
  out.append(Job("sample 1024x1024 v5e-1", "sample", "v5e-1", "data=1", "sigma-xl2-1024-ms", (1024, 1024),
                 cost=True, target="1024 px sampling of the whole pipeline fits v5e-1 (Colab)"))
  out.append(Job("sample 4096x4096 v5p-1", "sample", "v5p-1", "data=1", "sigma-xl2-4k", (4096, 4096),
                 target="4K sampling with CFG fits one v5p chip per image"))
  out.append(Job("sample 4096x4096 v5p-8 sp4", "sample", "v5p-8", "sequence=4", "sigma-xl2-4k", (4096, 4096),
                 sequence_parallel=True, target="4K sampling, sequence parallel across a v5p-8 host"))
  out.append(Job("sample 4096x4096 v6e-8 sp8", "sample", "v6e-8", "sequence=8", "sigma-xl2-4k", (4096, 4096),
                 sequence_parallel=True, target="4K sampling with CFG fits a v6e-8 host"))
  groups = recipe_groups()
  two_k = next(k for k in groups if k[0] == "sigma-xl2-2k-ms")
  out.append(Job("train sigma-xl2-2k-ms v5p-8", "train", "v5p-8", "fsdp=-1", "sigma-xl2-2k-ms", (2048, 2048),
                 recipes=tuple(groups[two_k]), settings=two_k, cost=True, target="2K training fits v5p-8"))
  out.append(Job("train sigma-xl2-4k v5p-64", "train", "v5p-64", "fsdp=-1", "sigma-xl2-4k", (4096, 4096),
                 recipes=("configs/pixart_sigma_2k_ms.py settings, preset sigma-xl2-4k",), settings=two_k,
                 cost=True, target="4K training fits v5p-64"))
  order = ["sigma-xl2-1024-ms", "sigma-xl2-2k-ms", "sigma-xl2-512-ms", "sigma-xl2-256", "sigma-xl2-1024-ms-kv",
           "sigma-xl2-2k-ms-kv"]
  for key, names in sorted(groups.items(), key=lambda kv: order.index(kv[0][0]) if kv[0][0] in order else 99):
    # 2. every recipe on every host
    for sl in HOSTS:
      preset = key[0]
      res = {"sigma-xl2-256": 256, "sigma-xl2-512-ms": 512}.get(preset, 2048 if "2k" in preset else 1024)
      if not any(j.name == f"train {preset} {sl}" for j in out):
        out.append(Job(f"train {preset} {sl}", "train", sl, "fsdp=-1", preset, (res, res), recipes=tuple(names),
                       settings=key, cost=True))
  for res, preset in RESOLUTIONS.items():  # 3. the sampling grid on one chip of each kind
    w, h = (int(x) for x in res.split("x"))
    for sl in ("v5e-1", "v6e-1", "v5p-1"):
      name = f"sample {res} {sl}"
      if not any(j.name == name for j in out):
        out.append(Job(name, "sample", sl, "data=1", preset, (w, h)))
  for res in ("3840x2160", "4096x4096"):  # 4. 4K on the other hosts with sequence parallelism
    w, h = (int(x) for x in res.split("x"))
    for sl, n in (("v5e-8", 8), ("v6e-8", 8), ("v5p-8", 4)):
      name = f"sample {res} {sl} sp{n}"
      if not any(j.name == name for j in out):
        out.append(Job(name, "sample", sl, f"sequence={n}", "sigma-xl2-4k", (w, h), sequence_parallel=True))
  for res in ("3840x2160", "4096x4096"):  # 5. 4K on one 16 GiB v5e chip (Colab): T5 offloaded
    w, h = (int(x) for x in res.split("x"))
    out.append(Job(f"sample {res} v5e-1 offload", "sample", "v5e-1", "data=1", "sigma-xl2-4k", (w, h), offload=True))
  return out


def run_job(job: Job) -> dict:
  from jax.experimental import topologies

  from pixart_jax.data import buckets
  from pixart_jax.models.attention_backends import AttentionOptions
  from pixart_jax.models.config import from_preset
  from pixart_jax.parallel import planning, sampling_plans
  from pixart_jax.parallel.mesh import make_mesh
  from pixart_jax.plan import _dtype, _parse_mesh
  from pixart_jax.train.optimizers import OptimizerConfig

  topo, chips, _ = SLICES[job.slice]
  devices = topologies.get_topology_desc(topo, "tpu").devices
  mesh = make_mesh(_parse_mesh(job.mesh), devices=devices)
  w, h = job.res
  t = time.perf_counter()
  if job.kind == "train":
    (preset, overrides, dtype, param_dtype, remat, scan, backend, opt, ema, accum, _) = job.settings
    cfg = from_preset(job.preset, dict(overrides) if job.preset == preset else {})
    work = planning.Workload(cfg, (h // 8, w // 8), chips, dtype=_dtype(dtype), param_dtype=_dtype(param_dtype),
                             remat=remat, scan=scan, ema=ema, grad_accum=accum,
                             attention=AttentionOptions(backend=backend))
    from pixart_jax.plan import _load_config, recipe_settings
    optimizer = OptimizerConfig.from_dict(recipe_settings(_load_config(str(ROOT / job.recipes[0].split(" ")[0])))[
        "optimizer"])  # every recipe of the group has the same optimizer settings but the lr
    p = planning.plan_train(work, mesh, optimizer=optimizer, cost=job.cost)
    return dict(job=dataclasses.asdict(job), plans=[p.as_dict()], seconds=time.perf_counter() - t)
  cfg = from_preset(job.preset)
  h, w = buckets.binned_size(h, w, cfg.sample_size)  # what the Pipeline samples (resolution binning, its default)
  work = planning.Workload(cfg, (h // 8, w // 8), 1, attention=AttentionOptions(
      sequence_parallel=job.sequence_parallel))
  t5, vae = sampling_plans.pipeline_models(cfg)
  tile = sampling_plans.pipeline_tile(h, w, mesh.devices.flat)
  # the encode (any resolution) and a tiled decode (any size above 2048 px) are the same program for every job
  # on this slice and mesh: compiled once, kept in STAGES
  enc = _stage(("encode", job.slice, job.mesh), lambda: sampling_plans.plan_encode(work, mesh, t5, cost=job.cost))
  den = sampling_plans.plan_sample(work, mesh, cost=job.cost)
  dec_key = ("decode", job.slice, job.mesh, f"tile {tile}" if tile else f"{h // 8}x{w // 8}")
  dec = (_stage(dec_key, lambda: sampling_plans.plan_decode(work, mesh, vae, tile, cost=job.cost)) if tile else
         sampling_plans.plan_decode(work, mesh, vae, None, cost=job.cost))
  if tile:  # the tile program's blend buffers and latents depend on the image size: recomputed from the shapes
    dec = _tiled_decode_at(dec, h // 8, w // 8, vae, tile, mesh)
  stages = sampling_plans.with_resident([enc, den, dec], offload_text_encoder=job.offload)
  return dict(job=dataclasses.asdict(job), plans=[p.as_dict() for p in stages], sampled=[w, h],
              pipeline=sampling_plans.pipeline_summary(stages), seconds=time.perf_counter() - t)



STAGES: dict[str, dict] = {}  # "encode|slice|mesh" -> a Plan's fields (shared through the cache file)


def _stage(key: tuple, make):
  from pixart_jax.parallel import planning

  name = "|".join(key)
  if name not in STAGES:
    STAGES[name] = dataclasses.asdict(make())
  fields = {f.name for f in dataclasses.fields(planning.Plan)}
  return planning.Plan(**{k: v for k, v in STAGES[name].items() if k in fields})


def _tiled_decode_at(dec, h: int, w: int, vae, tile: int, mesh):
  """The shared tiled-decode stage `dec` (one tile program, compiled once) for an image of latent (h, w): its tile
  count, and its resident bytes - the pruned encoder half (the program's own resident at its size minus its
  buffers there cancel out: recomputed), the full latents and the float32 blend buffers."""
  import jax
  import jax.numpy as jnp

  from pixart_jax.models import vae_tiling
  from pixart_jax.parallel import planning, sampling_layout
  from pixart_jax.parallel import sharding as sharding_lib

  f = vae.downsample_factor
  overlap = sampling_layout.vae_tiling(h * f, w * f, tile_latent=tile)[1]
  tiles = len(vae_tiling.tile_starts(h, tile, overlap)) * len(vae_tiling.tile_starts(w, tile, overlap))
  pruned = max(0, dec.params + dec.inputs - dec.argument)
  full = [(1, h, w, vae.latent_channels), (1, h * f, w * f, vae.out_channels)]
  resident = pruned + sum(planning.per_device_bytes(jax.ShapeDtypeStruct(
      shp, jnp.float32, sharding=sharding_lib.batch_sharding(mesh, sharding_lib.LOGICAL_RULES, shp)))
      for shp in full) + h * f * w * f * 4
  return dataclasses.replace(dec, resident=resident, what=f"decode ({tiles} tiles of {tile})")


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
  return f"{x / 2**30:.1f}"


def _hbm(chip: str) -> float:
  from pixart_jax.parallel import chips
  return chips.BY_NAME[chip].hbm_bytes


def _verdict(peak: float, chip: str, refused: bool) -> str:
  hbm = _hbm(chip)
  if refused:
    return f"**no**: refused, needs > {_gib(hbm)} GiB (+{_gib(peak - hbm)} GiB)"
  frac = peak / hbm
  if frac <= 0.9:
    return f"fits ({100 * frac:.0f} %)"
  if frac <= 1.0:
    return f"tight ({100 * frac:.0f} %)"
  return f"**no** ({100 * frac:.0f} %, +{_gib(peak - hbm)} GiB)"


def _est(cost: dict | None) -> str:
  if not cost or cost.get("predicted_seconds") is None:
    return ""
  mfu = "" if cost.get("mfu") is None else f", MFU {100 * cost['mfu']:.0f} %"
  return f"{cost['predicted_seconds']:.3g} s{mfu}"


def report(results: dict) -> str:
  by_name = {r["job"]["name"]: r for k, r in results.items() if k != "stages"}
  lines = [
      "# TPU verdicts: every recipe's train step and the whole sampling Pipeline (issue 14)",
      "",
      "Method: `python bench/tpu_verdicts.py` (this file is its output). Each program is the real jitted program "
      "(`train.step.jit_train_step`; the Pipeline's T5 encode, `diffusion.denoise.denoise` with CFG and its VAE "
      "decode) lowered on abstract inputs and compiled ahead of time by the **TPU compiler** (libtpu "
      f"{_libtpu_version()}, `jax.experimental.topologies`) on this CPU-only machine; memory is the compiler's "
      "`memory_analysis()` per chip, or its own out-of-memory refusal (then the figure is from its message). "
      "Peak = arguments + outputs - donated + temporaries + code (+ the other Pipeline models' weights, resident "
      "while a stage runs). Verdict: fits <= 90 % of HBM, tight <= 100 %. HBM per chip (`parallel.chips`): "
      "v5e 16 GiB, v6e 32 GiB, v5p 95.74 GiB. Attention: the default `auto` = splash on TPU.",
      "",
      "\"Compiler's estimate\": the XLA TPU cost model (`compiled.cost_analysis()` `optimal_seconds` of the program "
      "compiled with unrolled blocks; sampling: one step x 20; T5: one layer x 24; VAE: one tile x tiles) and MFU = "
      "analytic FLOPs / (that time x the chip's bf16 peak). It is the compiler's roofline estimate, **not a "
      "measurement** (no TPU was available).",
      "",
      "Slices: v5e-1 / v6e-1 / v5p-1 = 1 chip; v5e-8 / v6e-8 host = 8 chips (2x4); v5p-8 host = 4 chips (2x2x1); "
      "v5p-64 = 32 chips (2x4x4).",
      "",
  ]
  lines += ["## Targets", ""] + targets_table(by_name)
  lines += ["", "## Sampling: the whole Pipeline, one image, CFG, 20 steps", "",
            "| image | slice | mesh | encode peak | denoise peak | decode peak | pipeline peak GiB | verdict | "
            "compiler's estimate (whole call) | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in by_name.values():
    job = r["job"]
    if job["kind"] != "sample":
      continue
    chip = SLICES[job["slice"]][2]
    cells = []
    for p in r["plans"]:
      c = f"{_gib(p['peak'])}" + (" (refused)" if p["error"] else "")
      if p["what"].startswith("decode ("):
        c += f" [{p['what'][7:].strip('()')}]"
      cells.append(c)
    pipe = r["pipeline"]
    est = f"{pipe['predicted_seconds']:.3g} s" if "predicted_seconds" in pipe else ""
    image = f"{job['res'][0]}x{job['res'][1]}"
    sampled = "x".join(map(str, r.get("sampled", job["res"])))
    image += f" (sampled at {sampled})" if sampled != image else ""
    lines.append(f"| {image} | {job['slice']} | {job['mesh']}"
                 f"{' (SP)' if job['sequence_parallel'] else ''}{', T5 offloaded' if job.get('offload') else ''} | " + " | ".join(cells)
                 + f" | {_gib(pipe['peak'])} | {_verdict(pipe['peak'], chip, bool(pipe['refused']))} | {est} | "
                 f"{r['seconds']:.0f} |")
  lines += ["", "## Training: every shipped recipe, one example per chip", "",
            "| recipes | preset | slice | params + opt / chip GiB | temporaries GiB | peak GiB | verdict | est. max "
            "examples / chip | chips for the recipe's global batch (no grad_accum) | compiler's estimate (step, MFU) "
            "| compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in by_name.values():
    job = r["job"]
    if job["kind"] != "train":
      continue
    (p,) = r["plans"]
    chip = SLICES[job["slice"]][2]
    bmax, need = _max_batch(p, chip, [int(x.rsplit("batch ", 1)[1].rstrip(")")) for x in _recipes_for(job)
                                      if "batch " in x])
    lines.append(f"| {'<br>'.join(_recipes_for(job))} | {job['preset']} | {job['slice']} | "
                 f"{_gib(p['params'] + p['optimizer'])} | {_gib(p['temp'])}{' (refused)' if p['error'] else ''} | "
                 f"{_gib(p['peak'])} | {_verdict(p['peak'], chip, bool(p['error']))} | {bmax} | {need} | "
                 f"{_est(p.get('cost'))} | {r['seconds']:.0f} |")
  lines += ["", "\"est. max examples / chip\" = floor((0.9 HBM - weights - optimizer - code) / (temporaries + batch "
            "inputs at one example)): a linear estimate from the one-example compile (temporaries do not all grow "
            "with the batch, so it is conservative), not a compile at that batch. \"chips for the recipe's global "
            "batch\" = ceil(global batch / that), the slice without gradient accumulation; with `grad_accum=K` a "
            "K times smaller slice runs the same global batch.", ""]
  lines += ["## The compiler's cost estimate", "",
            "| job | program | analytic FLOPs / chip | compiler FLOPs | compiler bytes accessed | compiler's seconds "
            "(optimal_seconds) | MFU at that time | from |", "|---|---|---|---|---|---|---|---|"]
  for r in by_name.values():
    for p in r["plans"]:
      c = p.get("cost")
      if not c:
        continue
      secs = "not reported" if c["predicted_seconds"] is None else f"{c['predicted_seconds']:.3g} s"
      mfu = "" if c["mfu"] is None else f"{100 * c['mfu']:.0f} %"
      lines.append(f"| {r['job']['name']} | {p['what']} | {p['flops_analytic']:.3g} | {c['flops']:.3g} | "
                   f"{c['bytes'] / 1e9:.0f} GB | {secs} | {mfu} | {c['how']} |")
  lines += ["", "Reading: the TPU cost model reports `optimal_seconds` for the T5 encoder but not for the denoising "
            "step or the VAE decode (the key is absent from their `cost_analysis()`), so no compiler-estimated "
            "time is given for those; their FLOPs and bytes are. The compiler's FLOPs of the denoising step are "
            "below the analytic count by the self-attention FLOPs: the splash attention Pallas kernel is a custom "
            "call the cost model does not count (analytic 2.65e14 vs 1.80e14 at 1024 px: the 4.3e12 per step of "
            "QK^T and PV in 28 layers x CFG batch 2). VAE decode FLOPs are the compiler's own (no analytic "
            "counter).", ""]
  missing = [j.name for j in jobs() if j.name not in by_name]
  if missing:
    lines += ["Not yet compiled (rerun the script to add them): " + ", ".join(missing) + ".", ""]
  return "\n".join(lines)


def _recipes_for(job: dict) -> list[str]:
  """Every shipped recipe whose model is the job's (same preset, overrides equal to the preset's values), with its
  global batch; the job's own list when none matches (the 4K row)."""
  from pixart_jax.models.config import from_preset, get_preset

  out = []
  for key, names in recipe_groups().items():
    if key[0] == job["preset"] and from_preset(key[0], dict(key[1])) == get_preset(key[0]):
      out += names
  return sorted(set(out)) or list(job["recipes"])


def targets_table(by_name: dict) -> list[str]:
  lines = ["| target | job | verdict (TPU compiler) | peak / chip GiB | why (compiler numbers) |", "|---|---|---|---|---|"]
  for j in jobs():
    if not j.target:
      continue
    if j.name not in by_name:
      lines.append(f"| {j.target} | {j.name} | not compiled yet | | |")
      continue
    r = by_name[j.name]
    peak, refused, why = _summary(r)
    chip = SLICES[j.slice][2]
    est = _est(r["plans"][1].get("cost")) if r["job"]["kind"] == "sample" else _est(r["plans"][0].get("cost"))
    if r["job"]["kind"] == "sample" and "predicted_seconds" in r["pipeline"]:
      est = f"; compiler's estimate of the whole call {r['pipeline']['predicted_seconds']:.3g} s (denoise {est})"
    else:
      est = ""
    lines.append(f"| {j.target} | {j.name} | {_verdict(peak, chip, refused)} | {_gib(peak)} | {why}{est} |")
  return lines


def summary(results: dict) -> str:
  by_name = {r["job"]["name"]: r for k, r in results.items() if k != "stages"}
  done = len(by_name)
  return "\n".join([
      "# TPU verdicts (issue 14) — `bench/tpu_verdicts.py`",
      "",
      f"The TPU compiler's own memory verdicts (libtpu {_libtpu_version()} via `jax.experimental.topologies`, "
      "compiled ahead of time on this CPU-only machine, no TPU) for the whole sampling Pipeline (T5-XXL encode, "
      "20-step CFG denoise with splash attention, SDXL-VAE decode tiled above 2048 px, above 1024 px on a 16 GiB "
      "v5e) and every recipe's train step. "
      + (f"All {done} planned jobs compiled" if done >= len(jobs()) else
         f"{done} of {len(jobs())} planned jobs compiled so far (the others: rerun the script)")
      + " (a 2-core machine: 0.5-20 min per job); the full table and the method: "
      "[bench/results/tpu_verdicts.md](results/tpu_verdicts.md).",
      "",
      *targets_table(by_name),
      ""])


def _summary(r: dict) -> tuple[float, bool, str]:
  if r["job"]["kind"] == "sample":
    pipe = r["pipeline"]
    stages = "; ".join(f"{p['what']} {_gib(p['peak'])} (temps {_gib(p['temp'])}"
                       + (", refused" if p["error"] else "") + ")" for p in r["plans"])
    return pipe["peak"], bool(pipe["refused"]), f"largest stage {pipe['peak_stage']}; {stages}"
  (p,) = r["plans"]
  why = (f"weights+optimizer {_gib(p['params'] + p['optimizer'])}, temporaries {_gib(p['temp'])}"
         + (f"; compiler: {p['error'][:160]}" if p["error"] else ""))
  return p["peak"], bool(p["error"]), why


def _max_batch(p: dict, chip: str, global_batches: list[int]) -> tuple[str, str]:
  if p["error"]:
    return "0", "-"
  per_example = p["temp"] + p["inputs"]
  fixed = p["peak"] - per_example
  bmax = int((0.9 * _hbm(chip) - fixed) // per_example)
  if bmax < 1:
    return "< 1", "-"
  return str(bmax), ", ".join(f"{b}: {math.ceil(b / bmax)}" for b in sorted(set(global_batches))) or "-"


def _seed_stages(caches: list[dict]) -> None:
  """STAGES from saved caches: their "stages" entries, and the encode / tiled decode of finished sample jobs
  (resident minus the other stages' weights = the stage's own)."""
  for c in caches:
    STAGES.update(c.get("stages", {}))
    for name, r in c.items():
      if name == "stages" or r["job"]["kind"] != "sample":
        continue
      job, plans = r["job"], r["plans"]
      total = sum(p["params"] for p in plans)
      raw = [dict(p, resident=p["resident"] - (total - p["params"])) for p in plans]
      STAGES.setdefault("|".join(("encode", job["slice"], job["mesh"])), raw[0])
      if raw[2]["what"].startswith("decode ("):
        STAGES.setdefault("|".join(("decode", job["slice"], job["mesh"], "tile 128")), raw[2])


def _libtpu_version() -> str:
  try:
    from importlib.metadata import version
    return version("libtpu")
  except Exception:  # noqa: BLE001
    return "?"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default=None, help="run only jobs whose name contains this text")
  ap.add_argument("--report", action="store_true", help="only rewrite the markdown from the cache")
  ap.add_argument("--list", action="store_true", help="list the jobs and exit")
  ap.add_argument("--redo", action="store_true", help="recompile jobs already in the cache")
  ap.add_argument("--cache", default=str(CACHE), help="the JSON cache this run reads and writes")
  ap.add_argument("--merge", nargs="*", default=(), help="other caches to merge into --cache (then report)")
  ap.add_argument("--reverse", action="store_true", help="run the job list from its end (a second process)")
  ap.add_argument("--claims", default=None, help="a directory where parallel runs claim jobs")
  ap.add_argument("--peek", nargs="*", default=(), help="other processes' caches: skip the jobs they have done")
  args = ap.parse_args()
  todo = jobs()
  if args.list:
    for j in todo:
      print(j.name, "(target)" if j.target else "")
    return
  cache = pathlib.Path(args.cache)
  results = json.loads(cache.read_text()) if cache.exists() else {}
  _seed_stages([results] + [json.loads(pathlib.Path(o).read_text()) for o in (*args.peek, *args.merge)
                            if pathlib.Path(o).exists()])
  for other in args.merge:
    more = json.loads(pathlib.Path(other).read_text())
    results["stages"] = dict(more.get("stages", {}), **results.get("stages", {}))
    results.update({k: v for k, v in more.items() if k not in results})
  if args.merge:
    cache.write_text(json.dumps(results, indent=1, default=str))
  if not args.report:
    for j in (reversed(todo) if args.reverse else todo):
      elsewhere = set()
      for other in args.peek:  # another process's cache: skip what it has done
        if pathlib.Path(other).exists():
          elsewhere |= set(json.loads(pathlib.Path(other).read_text()))
      if (args.only and args.only not in j.name) or ((j.name in results or j.name in elsewhere) and not args.redo):
        continue
      if args.claims:  # processes sharing a claims dir never start the same job
        claim = pathlib.Path(args.claims) / j.name.replace(" ", "_")
        try:
          claim.parent.mkdir(parents=True, exist_ok=True)
          claim.touch(exist_ok=False)
        except FileExistsError:
          continue
      print(f"[{time.strftime('%H:%M:%S')}] {j.name} ...", flush=True)
      try:
        results[j.name] = run_job(j)
      except Exception:  # noqa: BLE001 - one failing job must not lose the others; the log has the traceback
        traceback.print_exc()
        if args.claims:
          claim.unlink(missing_ok=True)
        continue
      results["stages"] = dict(results.get("stages", {}), **STAGES)
      cache.write_text(json.dumps(results, indent=1, default=str))
      if cache == CACHE:
        REPORT.write_text(report(results))
        SUMMARY.write_text(summary(results))
      print(f"  done in {results[j.name]['seconds']:.0f} s: "
            + "; ".join(f"{p['what']} peak {_gib(p['peak'])} GiB" + (" REFUSED" if p["error"] else "")
                        for p in results[j.name]["plans"]), flush=True)
  if cache == CACHE:
    REPORT.write_text(report(results))
    SUMMARY.write_text(summary(results))
    print(f"wrote {REPORT} and {SUMMARY}")


if __name__ == "__main__":
  main()
