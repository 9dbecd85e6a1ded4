"""ControlNet on the embedded demo: a control branch trained on the finished demo model (`demo.load_trained`) with
the digit's blurred 8x8 image as the control and the empty caption, then measured with the demo's SVM.

  trained = demo.load_trained("workdir_demo")
  train_idx, eval_idx = split()
  data = prepare_control_data(trained, "work/cn_data", train_idx)           # prepare --control blur
  branch_file = train_control(trained, data, "work/cn_train", steps=800)    # the real trainer, config.controlnet
  report = measure(trained, branch_file, eval_idx)  # {"controlnet_adherence", "base_adherence", ...}

Training uses caption dropout 1.0, i.e. every caption is the null (empty) caption: the control alone must carry the
digit. Sampling: DPM-Solver++ 20 steps with the empty caption and no guidance, one sample per held-out control;
the SVM (`demo.classifier`) must recognise the control's digit. The base model under the same noise and empty
caption draws random digits (~10 %).
"""
from __future__ import annotations

import functools
import pathlib

import numpy as np

BLUR_SIGMA = 1.0  # pixels of the 8x8 image: the control keeps the digit's coarse shape, not its strokes
BLOCKS = 2  # copied blocks of the 4-block demo model
DEMO_STEPS = 500  # training steps of the measured run (batch 64): 400 -> 95.6 %, 600 -> 97.1 % held out


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices) of the digits: the classifier's own 75/25 split (`demo.classifier`)."""
  from sklearn.model_selection import train_test_split

  from pixart_jax.data.demo import load_digits

  _, y = load_digits()
  return train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)


def prepare_control_data(trained, out: str | pathlib.Path, indices, *, sigma: float = BLUR_SIGMA):
  """`prepare` of the digits at `indices` with control="blur" into `out` (the demo's encoders); returns out."""
  from pixart_jax.data import demo as demo_data
  from pixart_jax.data.prepare_lib import PrepareOptions, prepare
  from pixart_jax.data.sources import Subset

  prepare(Subset(demo_data.DigitsSource(), [int(i) for i in indices]), trained.encoders, str(out),
          options=PrepareOptions(table={"1.00": (demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE)}, shard_size=600,
                                 batch_size=300, min_side=8, resample="nearest", num_threads=2, control="blur",
                                 control_sigma=sigma),
          source_id=f"demo:digits[{len(indices)}] control=blur({sigma})", progress=False)
  return pathlib.Path(out)


def train_config(trained, data_dir, *, steps: int, batch: int = 64, lr: float = 1e-3, blocks: int = BLOCKS):
  """The demo's training config turned into ControlNet training on its finished run (the real trainer)."""
  from pixart_jax.demo import train_config as demo_config

  c = demo_config(str(data_dir), steps=steps, batch=batch, seed=trained.report.get("seed", 0))
  c.init_from = str(trained.workdir / "train")
  c.controlnet.blocks = blocks
  c.class_dropout_prob = 1.0  # every caption is the empty one
  c.optimizer.lr, c.optimizer.warmup = lr, min(50, steps // 10)
  c.ema.rate = None
  c.log_every, c.ckpt_every = max(1, steps // 4), steps
  return c


def train_control(trained, data_dir, workdir, *, steps: int, **kw) -> pathlib.Path:
  """Trains the branch with `train.loop.train_and_evaluate`; returns the exported branch file."""
  from pixart_jax.train.loop import train_and_evaluate
  from pixart_jax.train.trainables.controlnet import EXPORT

  train_and_evaluate(train_config(trained, data_dir, steps=steps, **kw), str(workdir))
  return pathlib.Path(workdir) / EXPORT


def control_latents(trained, indices, *, sigma: float = BLUR_SIGMA) -> np.ndarray:
  """(N 4 4 12) control latents of the digits at `indices` (blurred, pixel-encoded, as `prepare` stores them)."""
  from pixart_jax.data import control as control_lib
  from pixart_jax.data import demo as demo_data
  from pixart_jax.data.image_io import to_model_input
  from pixart_jax.data.prepare_lib import _mean_std_bf16

  src = demo_data.DigitsSource()
  x = np.stack([to_model_input(control_lib.blur(src.images[int(i)], sigma)) for i in indices])
  mean = np.asarray(_mean_std_bf16(np.asarray(trained.encoders.encode_images(x)))[0], np.float32)
  return mean * trained.encoders.scaling_factor


def measure(trained, branch_file, indices, *, seed: int = 1, steps: int = 20, control_scale: float = 1.0) -> dict:
  """SVM adherence to the control's digit of one sample per control in `indices` (empty caption, no guidance),
  with the ControlNet and with the base model alone (same noise)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from pixart_jax.convert.controlnet_keys import load_controlnet
  from pixart_jax.data import demo as demo_data
  from pixart_jax.demo import classifier
  from pixart_jax.diffusion.denoise import STATIC_ARGNAMES, denoise

  _, labels = demo_data.load_digits()
  labels = labels[np.asarray(indices)]
  model = load_controlnet(branch_file, base=trained.model)
  c = jnp.asarray(control_latents(trained, indices))
  cond = trained.encoders.text.encode_prompts([""] * len(labels))
  x_T = jax.random.normal(jax.random.key(seed), c.shape, jnp.float32)
  kw = dict(sampler="dpm-solver", steps=steps)
  graph, state = nnx.split(model)
  run = jax.jit(functools.partial(denoise, graph), static_argnames=STATIC_ARGNAMES)
  with_control = run(state, x_T, cond, None, jnp.float32(1.0), None, control=(c, jnp.float32(control_scale)), **kw)
  base_graph, base_state = nnx.split(trained.model)
  plain = jax.jit(functools.partial(denoise, base_graph), static_argnames=STATIC_ARGNAMES)(
      base_state, x_T, cond, None, jnp.float32(1.0), None, **kw)
  clf, _ = classifier()
  pred_c = clf.predict(demo_data.from_rgb(trained.encoders.decode(np.asarray(with_control))))
  pred_b = clf.predict(demo_data.from_rgb(trained.encoders.decode(np.asarray(plain))))
  return {"controlnet_adherence": float(np.mean(pred_c == labels)), "base_adherence": float(np.mean(pred_b == labels)),
          "samples": len(labels), "blur_sigma": BLUR_SIGMA, "control_scale": control_scale,
          "images": trained.encoders.decode(np.asarray(with_control)), "labels": labels}
