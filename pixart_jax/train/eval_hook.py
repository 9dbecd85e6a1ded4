"""FID and CLIP score during training (off unless `eval.every` > 0), and the best checkpoint by one of them.

The same evaluation as `python -m pixart_jax.evaluate` (`metrics.evaluation`): `eval.num` images of the fixed
`eval.prompts` (cycled), batch b drawn from the noise of seed `eval.seed + b`, so every evaluation of a run sees
the same prompts and noise and only the weights change.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from pixart_jax.models.spec import ModelSpec

log = logging.getLogger(__name__)

EvalFn = Callable[[Any, int], dict]  # (params as nnx.State, step) -> {"eval/fid": ..., "eval/clip_score": ...}
BEST_METRICS = {"fid": "min", "clip_score": "max", "": None}  # eval.best_metric -> which way is better


def make_eval_fn(eval_cfg, spec: ModelSpec, graphdef, mesh, rules, caption_len: int, *,
                 pipeline: str | None = None) -> EvalFn:
  """An EvalFn for `config.eval` (see the module doc). `pipeline`: the T5 + VAE source when eval.pipeline is unset
  (the run's sample.pipeline).

  Set up once: the prompts (and "" for guidance) are encoded with the pipeline's T5 up to the caption bucket of the
  longest one (`text_encoder.caption_bucket`: pad positions are masked, the images do not change) and kept on
  the host, the T5 dropped; the VAE, the FID Inception (`eval.inception`), the CLIP scorer (`eval.clip`, optional) and the reference
  statistics (`eval.ref_stats`) are loaded. Each call: per batch one jitted program (denoise + decode, the batch
  over the mesh's batch axes), then the metrics (`metrics.evaluation.ImageMetrics`, sharded the same way). Every
  process takes part and gets the same numbers.
  """
  from pixart_jax.convert.vae_keys import load_vae
  from pixart_jax.images import to_uint8
  from pixart_jax.metrics.evaluation import ImageMetrics, MetricsAccumulator
  from pixart_jax.metrics.fid_stats import FIDStats
  from pixart_jax.metrics.sharded import to_host
  from pixart_jax.models.text_encoder import TextEncoder
  from pixart_jax.parallel.sharding import batch_sharding
  from pixart_jax.pipeline import initial_noise
  from pixart_jax.train.sample_hook import make_draw

  source = eval_cfg.pipeline or pipeline
  if not source:
    raise ValueError("eval.every > 0 needs eval.pipeline (or sample.pipeline): a diffusers PixArt-Sigma pipeline dir "
                     "or Hub id with text_encoder/, tokenizer/ and vae/")
  ref = FIDStats.load(eval_cfg.ref_stats)
  metrics = ImageMetrics.from_files(eval_cfg.inception, eval_cfg.clip or None, mesh=mesh, rules=rules)
  if ref.mu.shape[0] != metrics.feature_dim:
    raise ValueError(f"eval.ref_stats {eval_cfg.ref_stats}: {ref.mu.shape[0]}-d features, eval.inception gives "
                     f"{metrics.feature_dim}-d ones: compute the statistics with the same Inception weights")
  prompts_all = list(eval_cfg.prompts)
  num, bs = int(eval_cfg.num), int(eval_cfg.batch_size)
  batches = [[prompts_all[i % len(prompts_all)] for i in range(s, min(num, s + bs))] for s in range(0, num, bs)]

  text = TextEncoder.from_pretrained(source, mesh=mesh, rules=rules)
  unique = sorted(set(prompts_all))
  # one caption length for every batch (one program): the bucket of the longest prompt (`caption_bucket`)
  emb, mask = text.encode_prompts(unique + [""], max_length=caption_len, trim=True)
  table = {p: (np.asarray(emb[i]), np.asarray(mask[i])) for i, p in enumerate(unique)}
  null = (np.asarray(emb[-1]), np.asarray(mask[-1]))
  del text
  vae = load_vae(source, mesh=mesh, rules=rules)
  vae_graph, vae_state = nnx.split(vae)
  size, channels = spec.cfg.sample_size, spec.cfg.in_channels
  guidance = float(eval_cfg.guidance)
  draw = make_draw(graphdef, vae_graph, sampler=eval_cfg.sampler, steps=eval_cfg.num_steps)

  def inputs(b: int, batch: list[str]):
    n = len(batch)
    cond = (np.stack([table[p][0] for p in batch]), np.stack([table[p][1] for p in batch]))
    uncond = (np.repeat(null[0][None], n, 0), np.repeat(null[1][None], n, 0)) if guidance != 1.0 else None
    x_T = np.asarray(initial_noise(int(eval_cfg.seed) + b, n, (size, size, channels)))
    return jax.device_put((x_T, cond, uncond), batch_sharding(mesh, rules, (n,)))

  def eval_fn(params, step: int) -> dict:
    acc = MetricsAccumulator(metrics.feature_dim)
    for b, batch in enumerate(batches):
      x_T, cond, uncond = inputs(b, batch)
      with jax.set_mesh(mesh):
        images = draw(params, vae_state, x_T, cond, uncond, jnp.float32(guidance))
      acc.add(metrics.measure(to_uint8(to_host(images)), batch))
    result = acc.result(ref)
    log.info("eval at step %d over %d images: %s", step, result["num_images"],
             " ".join(f"{k}={v:.5g}" for k, v in result.items() if k != "num_images"))
    return {f"eval/{k}": v for k, v in result.items() if k != "num_images"}

  return eval_fn


class BestCheckpoint:
  """The best state by `metric` so far, in `<dir>/checkpoints` (one kept) with `<dir>/best.json` {"metric",
  "value", "step"} and the run's `<dir>/config.json`, so `convert.ours.load_ours(dir, spec)` (or `init_from`)
  reads it like a workdir; a resumed run continues from the recorded best."""

  def __init__(self, directory: epath.Path, metric: str, *, primary: bool, config_json: str | None = None):
    from pixart_jax.train.checkpoint import Checkpointer

    if metric not in BEST_METRICS or not metric:
      raise ValueError(f"best metric {metric!r} is not one of {sorted(k for k in BEST_METRICS if k)}")
    self.directory, self.metric, self.primary = epath.Path(directory), metric, primary
    self.mode = BEST_METRICS[metric]
    self.record = self.directory / "best.json"
    self.best: dict | None = json.loads(self.record.read_text()) if self.record.exists() else None
    self._ckpt = Checkpointer(self.directory / "checkpoints", keep=1)
    if primary and config_json is not None:
      (self.directory / "config.json").write_text(config_json)

  def better(self, value: float) -> bool:
    if self.best is None or self.best.get("metric") != self.metric:
      return True
    return value < self.best["value"] if self.mode == "min" else value > self.best["value"]

  def update(self, step: int, scores: Mapping[str, float], save: Callable[[Any], bool]) -> bool:
    """Saves (`save(checkpointer)`) when `scores["eval/<metric>"]` beats the best so far; returns whether it did."""
    value = scores.get(f"eval/{self.metric}")
    if value is None or not np.isfinite(value) or not self.better(float(value)):
      return False
    if not save(self._ckpt):
      return False
    self._ckpt.wait()
    self.best = {"metric": self.metric, "value": float(value), "step": int(step)}
    if self.primary:
      tmp = self.directory / ".best.json.tmp"
      tmp.write_text(json.dumps(self.best))
      tmp.replace(self.record)
    log.info("best %s so far: %.5g at step %d (saved in %s)", self.metric, value, step, self.directory)
    return True

  def close(self) -> None:
    self._ckpt.close()
