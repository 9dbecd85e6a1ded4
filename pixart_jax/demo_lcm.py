"""Few-step sampling on the embedded demo: latent consistency distillation of the demo's trained model.

The demo's trained PixArt (`pixart_jax.demo`) is the teacher; the real trainer distils it (`config.distill`, full
LCM with an EMA target, guidance baked in) on the demo's own prepared dataset, and the student is sampled with the
LCM sampler in 1, 2 and 4 steps without guidance. Prompt adherence is the demo's (an SVM trained on the real digits
classifies the samples), next to the teacher with 20-step DPM-Solver++ and guidance, from the same initial noise.

  python scripts/demo_lcm.py --demo workdir_demo --workdir workdir_lcm   (table + docs/lcm_demo_contact_sheet.png)
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any

GUIDANCE = 4.5  # the demo teacher's guidance scale (demo --guidance), baked into the student
STEPS = 400  # distillation steps (batch 32): ~3 min on a 2-core CPU, compile included
BATCH = 32
LR = 2e-4


def distill_config(demo, *, steps: int = STEPS, batch: int = BATCH, lr: float = LR, guidance: float = GUIDANCE,
                   seed: int = 0):
  """The demo's recipe (same model, same data) turned into LCM distillation of its trained run: the teacher is
  the run's workdir (`init_from`), the target the EMA at 0.95 (PixArt-LCM), pseudo-Huber loss, AdamW without
  warm-up, no caption dropout."""
  from pixart_jax.demo import train_config

  c = train_config(str(demo.workdir / "data"), steps=steps, batch=batch, seed=seed)
  c.init_from = str(demo.workdir / "train")
  c.distill.enabled = True
  c.distill.guidance = guidance
  c.ema.rate = 0.95
  c.class_dropout_prob = 0.0
  c.optimizer.lr, c.optimizer.warmup = lr, 0
  c.log_every, c.ckpt_every, c.keep = 50, steps, 1
  return c


@dataclasses.dataclass
class Distilled:
  graphdef: Any
  params: Any  # the EMA (target) network's Params: what LCM keeps
  seconds: float
  final_loss: float


def distill(demo, workdir: str | pathlib.Path, **kw) -> Distilled:
  """Runs the distillation into `workdir` (resumes there if it has checkpoints); returns the EMA student."""
  from pixart_jax.train.loop import train_and_evaluate

  config = distill_config(demo, **kw)
  t0 = time.perf_counter()
  result = train_and_evaluate(config, str(workdir))
  graphdef, _ = demo.spec.split()
  params = result.state.ema if result.state.ema is not None else result.state.params
  return Distilled(graphdef, params, time.perf_counter() - t0,
                   float(result.last_metrics.get("loss", float("nan"))))


def teacher_params(demo):
  """The demo teacher's Params (the EMA weights of its run)."""
  from flax import nnx

  return nnx.split(demo.model, nnx.Param)[1]


def sample(graphdef, params, text, per_digit: int, *, sampler: str, steps: int, guidance: float | None,
           seed: int):
  """(latents (10 per_digit, 4, 4, 12), labels) for the prompts `caption(d, 0)`; the initial noise is
  `demo.sample_digits`' for the same seed. guidance None: no unconditional branch (a distilled student)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pixart_jax.data import demo as demo_data
  from pixart_jax.demo import DOWNSAMPLE, latent_size
  from pixart_jax.diffusion.denoise import STATIC_ARGNAMES, denoise

  labels = np.repeat(np.arange(10), per_digit)
  cond = text.encode_prompts([demo_data.caption(int(d), 0) for d in labels])
  uncond = None if guidance is None else text.encode_prompts([""] * len(labels))
  n = latent_size()
  x_T = jax.random.normal(jax.random.key(seed), (len(labels), n, n, 3 * DOWNSAMPLE**2), jnp.float32)
  run = jax.jit(functools.partial(denoise, graphdef), static_argnames=STATIC_ARGNAMES)
  out = run(params, x_T, cond, uncond, jnp.float32(1.0 if guidance is None else guidance),
            jax.random.key(seed + 1), sampler=sampler, steps=steps)
  return np.asarray(out), labels


def adherence_table(demo, student: Distilled, *, per_digit: int = 10, seed: int = 1,
                    lcm_steps=(1, 2, 4)) -> tuple[list[dict], dict]:
  """Rows {model, sampler, steps, guidance, adherence} for the teacher (DPM-Solver++ 20 steps, guided) and the
  student (LCM, each of `lcm_steps`, no guidance), and the decoded images per row (name -> (N 8 8 3) in [-1, 1])."""
  import numpy as np
  from flax import nnx

  from pixart_jax.data import demo as demo_data
  from pixart_jax.demo import classifier

  clf, _ = classifier()
  runs = [("teacher", nnx.split(demo.model, nnx.Param)[0], teacher_params(demo), "dpm-solver", 20, GUIDANCE)]
  runs += [("LCM student", student.graphdef, student.params, "lcm", s, None) for s in lcm_steps]
  rows, images = [], {}
  for name, gd, params, sampler, steps, guidance in runs:
    t0 = time.perf_counter()
    lat, labels = sample(gd, params, demo.encoders.text, per_digit, sampler=sampler, steps=steps, guidance=guidance,
                         seed=seed)
    img = demo.encoders.decode(lat)
    acc = float(np.mean(clf.predict(demo_data.from_rgb(img)) == labels))
    key = f"{sampler}-{steps}"
    images[key] = np.asarray(img)
    rows.append({"model": name, "sampler": sampler, "steps": steps,
                 "guidance": guidance if guidance is not None else f"baked ({GUIDANCE})",
                 "forward_passes": steps * (2 if guidance is not None else 1), "adherence": acc,
                 "sample_s": round(time.perf_counter() - t0, 2)})
  return rows, images


def held_out_consistency(demo, params, target, *, n: int = 256, seed: int = 0, guidance: float = GUIDANCE) -> float:
  """The distillation loss (`train.trainables.distill.LcmObjective`, the demo's settings) of `params` with target
  network `target`, on `n` real digits with fixed draws (grid index, noise): the teacher's own value (params =
  target = teacher) is what distillation starts from."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pixart_jax.data import demo as demo_data
  from pixart_jax.data.pipeline import null_caption
  from pixart_jax.train.trainables.distill import LcmObjective, distill_config as lcm_config

  images, labels = demo_data.load_digits()
  pick = np.random.default_rng(seed).choice(len(images), n, replace=False)
  rgb = demo_data.to_rgb(images[pick]).astype(np.float32) / 127.5 - 1.0
  c = demo.spec.cfg.in_channels
  x0 = jnp.asarray(demo.encoders.encode_images(rgb)[..., :c])
  cap, mask = demo.encoders.text.encode_prompts([demo_data.caption(int(d), 0) for d in labels[pick]])
  null = jnp.asarray(null_caption(demo.workdir / "data")[: cap.shape[1]], jnp.float32)
  objective = LcmObjective.build(lcm_config(distill_config(demo, guidance=guidance)))
  graphdef, _ = demo.spec.split()
  batch = {"latents": x0, "caption": jnp.asarray(cap), "mask": jnp.asarray(mask)}

  @jax.jit
  def loss(params, target):
    mb = objective.draw(jax.random.key(seed), x0, batch)
    return objective.loss(params, mb, null, graphdef=graphdef, frozen=teacher_params(demo), target=target)[0]

  return float(loss(params, target))


def contact_sheet(images: dict, keys, per_digit: int, show: int = 4):
  """One row per digit: `show` samples of each run in `keys`, runs side by side with a wider gap."""
  import numpy as np
  from PIL import Image

  from pixart_jax.images import contact_sheet as grid
  from pixart_jax.images import to_uint8

  blocks = []
  for k in keys:
    u8 = to_uint8(images[k])
    big = np.stack([np.asarray(Image.fromarray(i).resize((40, 40), Image.NEAREST)) for i in u8])
    sel = big.reshape(10, per_digit, 40, 40, 3)[:, :show].reshape(10 * show, 40, 40, 3)
    blocks.append(np.asarray(grid(sel, cols=show, gap=2)))
  sep = np.full((blocks[0].shape[0], 16, 3), 255, np.uint8)
  parts = []
  for b in blocks:
    parts += [b, sep]
  return Image.fromarray(np.concatenate(parts[:-1], axis=1))
