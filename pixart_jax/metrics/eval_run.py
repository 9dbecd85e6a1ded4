"""Running one evaluation into an output folder (the library behind `python -m pixart_jax.evaluate`, whose docstring
describes the folder and the behaviour): claiming and resuming the folder, the reference statistics, sampling and
measuring the batches not yet done, the report and the contact sheet; and the images of a prepared dataset, for
reference statistics. The metrics themselves are `metrics.evaluation`.

Axis legend: B images per batch, H W image height/width.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Callable, Sequence

log = logging.getLogger("pixart_jax.evaluate")
TOOL = "evaluate"
SETTINGS = "evaluation.json"
SETTINGS_FORMAT = "pixart_jax.evaluation/1"


def _atomic_savez(path: pathlib.Path, **arrays) -> None:
  import numpy as np

  tmp = path.with_name(f".{path.name}.tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _atomic_json(path: pathlib.Path, doc) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(doc, indent=2))
  os.replace(tmp, path)


def claim(out: pathlib.Path, settings: dict, *, check_only: bool = False) -> pathlib.Path:
  """`--out` is ours (`claim_output`, resumable); an earlier evaluation must have the same settings (the reference
  is not one of them: a rerun against other reference statistics rescores the kept batches). check_only: refuse
  a foreign folder or other settings, write nothing."""
  from pixart_jax.outputs import claim_output

  out = claim_output(out, tool=TOOL, resume=True, write_marker=not check_only)
  path = out / SETTINGS
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except ValueError as e:
      raise ValueError(f"{path} is not an evaluation settings file: {e}") from None
    old = old.get("settings") if isinstance(old, dict) else None
    if old != settings:
      diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
      raise ValueError(f"--out {out} holds an evaluation with other settings (differing: {', '.join(diff)}); "
                       "rerun with the same settings to resume it, or choose a new --out")
  elif not check_only:
    _atomic_json(path, {"format": SETTINGS_FORMAT, "settings": settings})
  if check_only:
    return out
  (out / "images").mkdir(exist_ok=True)
  (out / "batches").mkdir(exist_ok=True)
  return out


def reference(out: pathlib.Path, metrics, *, ref_stats: str | None, ref_images: str | None, batch_size: int):
  """The reference FIDStats: loaded from `ref_stats`, or computed from the folder `ref_images` once (kept in `out`
  as ref_stats_<hash of the folder>.npz); checked against the Inception's feature width."""
  from pixart_jax.metrics.evaluation import image_dir_batches, reference_stats
  from pixart_jax.metrics.fid_stats import FIDStats

  if ref_stats:
    stats = FIDStats.load(ref_stats)
  else:  # computed once per reference folder, kept in the output folder
    key = hashlib.sha256(str(pathlib.Path(ref_images).absolute()).encode()).hexdigest()[:12]
    cached = out / f"ref_stats_{key}.npz"
    if cached.exists():
      return FIDStats.load(cached)
    stats = reference_stats(metrics, image_dir_batches(ref_images, batch_size), progress=True)
    stats.save(cached)
  if stats.mu.shape[0] != metrics.feature_dim:
    raise ValueError(f"--ref-stats {ref_stats}: {stats.mu.shape[0]}-d features, the Inception of --inception "
                     f"gives {metrics.feature_dim}-d ones: compute the statistics with the same weights")
  return stats


def run(out: pathlib.Path, metrics, ref, prompts: Sequence[str], *, num: int, batch_size: int, seed: int,
        load_pipeline: Callable[[], object], height: int | None, width: int | None, steps: int | None,
        guidance: float, sampler: str, binning: bool, settings: dict, reference_name: str | None,
        sheet: int) -> dict:
  """Samples and measures the batches of `out` (claimed by `claim`) not done yet, adds back the kept ones, writes
  report.json (and contact_sheet.png of the first `sheet` images) and returns the report.

  Image i uses prompt i (cycled), batch b = images [b*B, (b+1)*B) seed `seed + b`; `load_pipeline()` builds the
  Pipeline on the first batch to sample (none when every batch is kept)."""
  import numpy as np
  from tqdm import tqdm

  from pixart_jax.images import save_png
  from pixart_jax.metrics.evaluation import Measured, MetricsAccumulator

  bs = batch_size
  batches = (num + bs - 1) // bs
  acc = MetricsAccumulator(metrics.feature_dim)
  todo = []
  for b in range(batches):
    done = out / "batches" / f"{b:05d}.npz"
    if done.exists():
      with np.load(done, allow_pickle=False) as f:
        acc.add(Measured.from_arrays(f))
    else:
      todo.append(b)
  if acc.num_images:
    log.info("resuming %s: %d images of %d already evaluated", out, acc.num_images, num)

  t0 = time.perf_counter()
  pipe = None
  with tqdm(total=num, initial=acc.num_images, unit="img", desc="evaluate") as bar:
    for b in todo:
      if pipe is None:
        pipe = load_pipeline()
      idx = list(range(b * bs, min(num, (b + 1) * bs)))
      batch = [prompts[i % len(prompts)] for i in idx]
      bar.set_description(f"batch {b}: sample")
      images = pipe(batch, height=height, width=width, steps=steps, guidance_scale=guidance,
                    sampler=sampler, seed=seed + b, use_resolution_binning=binning)
      for j, (i, prompt, img) in enumerate(zip(idx, batch, images)):
        save_png(img, out / "images" / f"{i:05d}.png",
                 {"prompt": prompt, "seed": seed + b, "batch_index": j, "sampler": sampler,
                  "steps": steps or "default", "guidance_scale": guidance, "software": "pixart_jax"})
      bar.set_description(f"batch {b}: metrics")
      m = metrics.measure(images, batch)
      _atomic_savez(out / "batches" / f"{b:05d}.npz", **m.arrays())  # the batch is done once this exists
      acc.add(m)
      bar.update(len(idx))

  sampled = sum(len(range(b * bs, min(num, (b + 1) * bs))) for b in todo)
  report = {**acc.result(ref), "reference": reference_name, "settings": settings,
            "sampled_this_run": sampled, "seconds_this_run": round(time.perf_counter() - t0, 1)}
  _atomic_json(out / "report.json", report)
  if sheet:
    write_sheet(out, min(sheet, num))
  log.info("FID %.4f, CLIP score %.4f over %d images; report %s", report.get("fid", float("nan")),
           report.get("clip_score", float("nan")), report["num_images"], out / "report.json")
  return report


def write_sheet(out: pathlib.Path, n: int) -> None:
  """contact_sheet.png of the first `n` images of `out` (none when their sizes differ)."""
  import numpy as np
  from PIL import Image

  from pixart_jax.images import contact_sheet

  images = [np.asarray(Image.open(out / "images" / f"{i:05d}.png").convert("RGB")) for i in range(n)]
  if len({im.shape for im in images}) == 1:
    contact_sheet(np.stack(images), gap=2).save(out / "contact_sheet.png")


def prepared_batches(data_dir, batch_size: int, vae_src: str | None = None, *, mesh=None):
  """uint8 batches (B H W 3) of the images a prepared dataset encodes: its latents' means decoded by the VAE of
  `vae_src` (or by the pixel space-to-depth the demo prepares with); one bucket (image size) per batch."""
  import einops
  import grain
  import jax
  import numpy as np

  from pixart_jax.data.pipeline import load_index
  from pixart_jax.data.records import deserialize_record
  from pixart_jax.images import to_uint8

  index = load_index(data_dir)
  enc = index.manifest["encoders"]
  if str(enc.get("id", "")).startswith("pixel-space-to-depth"):
    p = int(enc["downsample"])
    decode = lambda z: einops.rearrange(z, "b h w (p q c) -> b (h p) (w q) c", p=p, q=p)  # noqa: E731
  else:
    if not vae_src:
      raise ValueError(f"--prepared {data_dir} holds VAE latents (encoders {enc.get('id')!r}): give --vae, the "
                       "pipeline dir / Hub id whose vae/ encoded them")
    from flax import nnx

    from pixart_jax.convert.vae_keys import load_vae

    vae = load_vae(vae_src)
    graph, state = nnx.split(vae)
    jitted = jax.jit(lambda s, z: nnx.merge(graph, s).decode(z).astype(np.float32))
    decode = lambda z: np.asarray(jitted(state, z))  # noqa: E731
  source = grain.sources.ArrayRecordDataSource(list(index.record_paths))
  for ids in index.members:
    for start in range(0, len(ids), batch_size):
      recs = [deserialize_record(source[int(i)]) for i in ids[start:start + batch_size]]
      z = np.stack([np.asarray(r.mean, np.float32) for r in recs])
      yield to_uint8(decode(z))
