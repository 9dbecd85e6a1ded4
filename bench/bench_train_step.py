"""PixArt-Sigma XL/2 train step at 256 px: our jitted train step vs a PyTorch step on diffusers'
PixArtTransformer2DModel, same weights, same loss, AdamW, in the same run.

    PYTHONPATH=. python bench/bench_train_step.py                      # batch 1, fp32, CPU
    PYTHONPATH=. python bench/bench_train_step.py --batch 2 --runs 3
    PYTHONPATH=. python bench/bench_train_step.py --depth 4            # a quick check with 4 blocks

One step on both sides = sample t ~ U{0..999} and noise, q_sample, forward, IDDPM loss (mse + vb, the variational
bound computed with the eps prediction detached, docs/ARCHITECTURE.md §4.2; `--loss mse` for plain eps-MSE on both), backward,
global-norm clipping (1.0), AdamW (lr 1e-4, wd 0.03, eps 1e-10: the official base config), EMA off, no caption
dropout. JAX: `pixart_jax.train.step` (the function the trainer runs), jitted with the state donated, AOT
compiled (compile time reported). torch: the same arithmetic written with torch ops (the IDDPM loss is ported
below), `torch.optim.AdamW`, `clip_grad_norm_`. Both start from the same random weights (diffusers init ->
`save_pretrained` -> `load_transformer`); before timing, the loss of one fixed (t, noise) is computed by both and
compared. FLOPs: `pixart_jax.train.flops.train_step_flops` (matmuls, 3 x forward); GFLOP/s is compared with the
measured fp32 matmul peak of this CPU (best of JAX and torch on 2048^3). The two sides run in alternating rounds
(JAX, torch, JAX, torch, ...: on a shared machine both then see the same load), each round reloading the weights
and starting a fresh optimizer (both states together would need ~20 GB at depth 28); medians over rounds.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def torch_iddpm_loss(torch, out, x0, x_t, t, noise, acp, betas, mse_only: bool):
  """IDDPM training loss (LEARNED_RANGE variance, eps prediction, MSE type) in torch, NCHW, float32 per sample."""
  c = x0.shape[1]
  eps, v = out[:, :c], out[:, c:]
  mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
  if mse_only:
    return mse
  bc = lambda a: a[t].view(-1, 1, 1, 1)  # noqa: E731
  acp_prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
  post_var = betas * (1 - acp_prev) / (1 - acp)
  post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
  coef1 = betas * acp_prev.sqrt() / (1 - acp)
  coef2 = (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp)
  f = lambda a: bc(a.float())  # noqa: E731
  true_mean = f(coef1) * x0 + f(coef2) * x_t
  true_logvar = f(post_logvar)
  frac = (v + 1) / 2
  model_logvar = frac * f(torch.log(betas)) + (1 - frac) * true_logvar
  pred_x0 = f((1 / acp).sqrt()) * x_t - f((1 / acp - 1).sqrt()) * eps.detach()
  model_mean = f(coef1) * pred_x0 + f(coef2) * x_t
  kl = 0.5 * (-1.0 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
              + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
  kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
  cdf = lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
  centered, inv_std = x0 - model_mean, torch.exp(-0.5 * model_logvar)
  cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
  log_plus = torch.log(cdf_plus.clamp(min=1e-12))
  log_one_minus = torch.log((1 - cdf_min).clamp(min=1e-12))
  log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
  ll = torch.where(x0 < -0.999, log_plus, torch.where(x0 > 0.999, log_one_minus, log_delta))
  nll = -ll.mean(dim=(1, 2, 3)) / math.log(2.0)
  return mse + torch.where(t == 0, nll, kl)


def optimizer_config():
  """AdamW as the official base config (lr 1e-4, wd 0.03, eps 1e-10), clipping 1.0, no warmup."""
  from pixart_jax.train import optimizers as opt
  return opt.OptimizerConfig.from_dict(dict(name="adamw", lr=1e-4, betas=(0.9, 0.999), eps=1e-10,
                                            weight_decay=0.03, clip=1.0, warmup=0, auto_lr="none"))


class JaxTrainStep:
  """The trainer's jitted step (`pixart_jax.train.step`) on one device for fixed arrays: AdamW
  (`optimizer_config`), EMA off, no caption dropout, the state donated; AOT compiled once (`compile_s`),
  `start(params)` makes a fresh optimizer state, `__call__()` runs one step and blocks on its metrics.

  arrays: latents (B h w C), caption (B S Dc), mask (B S) numpy; learn_sigma: the IDDPM loss (mse + vb) or eps-MSE.
  """

  def __init__(self, graphdef, arrays: dict, *, learn_sigma: bool, device=None):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pixart_jax.parallel.mesh import make_mesh
    from pixart_jax.train import optimizers as opt, step as stp

    b = arrays["latents"].shape[0]
    s, dc = arrays["caption"].shape[1:]
    self.tx, lr_fn = opt.make_optimizer(optimizer_config(), b)
    self.mesh = make_mesh([("data", -1)], devices=[device or jax.local_devices()[0]])
    self.rep = NamedSharding(self.mesh, P())
    self.batch = jax.device_put(arrays, self.rep)
    self.null = jax.device_put(np.zeros((s, dc), np.float32), self.rep)
    step_cfg = stp.StepConfig(class_dropout_prob=0.0, ema_rate=None, learn_sigma=learn_sigma)
    self.fn = stp.make_train_step(graphdef=graphdef, tx=self.tx, lr_schedule=lr_fn, cfg=step_cfg)
    self.compiled, self.compile_s, self.state = None, 0.0, None

  def start(self, params) -> None:
    """A fresh train state from `params` (an nnx Param state), placed on the device; compiles on first use."""
    import time

    import jax
    import jax.numpy as jnp

    from pixart_jax.train import state as st
    from pixart_jax.train import step as stp

    state = st.state_from_params(params, jnp.asarray(jax.random.PRNGKey(0)), tx=self.tx, ema=False)
    shardings = st.shardings_of(jax.eval_shape(lambda: state), self.mesh)
    self.state = jax.device_put(state, shardings)
    del state
    if self.compiled is None:
      with jax.set_mesh(self.mesh):
        c0 = time.perf_counter()
        self.compiled = stp.jit_train_step(self.fn, shardings, {k: self.rep for k in self.batch}, self.mesh).lower(
            self.state, self.batch, self.null, ()).compile()
        self.compile_s = time.perf_counter() - c0

  def __call__(self) -> dict:
    import jax

    with jax.set_mesh(self.mesh):
      self.state, m = self.compiled(self.state, self.batch, self.null, ())
      return jax.block_until_ready(m)

  def stop(self) -> None:
    self.state = None


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", type=int, default=256, help="square image size in pixels (latent = size / 8)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--runs", type=int, default=3, help="timed steps (median)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (per round)")
  ap.add_argument("--rounds", type=int, default=2, help="alternating JAX / torch rounds (the load changes)")
  ap.add_argument("--depth", type=int, default=28, help="DiT blocks (28 = XL/2)")
  ap.add_argument("--loss", default="iddpm", choices=["iddpm", "mse"], help="mse + vb (default) or eps-MSE only")
  ap.add_argument("--remat", default="none", help="JAX remat policy (none | full | dots | dots_no_batch)")
  ap.add_argument("--precision", default="highest", choices=["highest", "high", "default"],
                  help="jax_default_matmul_precision")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch step")
  ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all cores)")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from diffusers import PixArtTransformer2DModel
  from flax import nnx

  from common import fmt_table, gflops, machine_description, measured_matmul_peak, set_torch_threads, time_fn
  from pixart_jax.convert.dit import load_transformer
  from pixart_jax.diffusion.losses import iddpm_loss
  from pixart_jax.diffusion.schedule import DiffusionSchedule
  from pixart_jax.train.flops import train_step_flops

  jax.config.update("jax_default_matmul_precision", args.precision)
  set_torch_threads(args.torch_threads)
  print(machine_description())
  peak = measured_matmul_peak(reps=5)
  print(f"measured fp32 matmul peak (2048^3): JAX {peak['jax']:.1f} GFLOP/s, torch {peak['torch']:.1f} GFLOP/s")

  torch.manual_seed(0)
  tmodel = PixArtTransformer2DModel(
      num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=args.depth,
      cross_attention_dim=1152, attention_bias=True, sample_size=args.size // 8, patch_size=2,
      activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
      norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=max(args.size / 512, 0.5),
      use_additional_conditions=False, caption_channels=4096)
  with torch.no_grad():  # non-zero everywhere (the zero-initialised projections too)
    for p in tmodel.parameters():
      p.normal_(0.0, 0.02)
  weights = tempfile.TemporaryDirectory()
  tmodel.save_pretrained(weights.name)  # both sides load these weights in every round
  model = load_transformer(weights.name, dtype=jnp.float32, remat=args.remat)
  cfg = model.cfg
  b, lat, s, mse_only = args.batch, args.size // 8, 300, args.loss == "mse"
  rng = np.random.default_rng(0)
  latents = (rng.standard_normal((b, lat, lat, 4), dtype=np.float32) * 0.5).astype(np.float32)
  caption = (rng.standard_normal((b, s, 4096), dtype=np.float32) * 0.1).astype(np.float32)
  mask = np.zeros((b, s), np.int32)
  mask[:, :120] = 1
  sched = DiffusionSchedule.linear()
  flops = train_step_flops(cfg, b, lat, lat, s)
  print(f"XL/2 depth {args.depth}, {args.size}px, batch {b}, {(lat // 2) ** 2} tokens, loss {args.loss}, "
        f"{flops / 1e9:.0f} GFLOP per step (3 x forward)\n")

  # ---- same loss on a fixed (t, noise) ----------------------------------------------------------------------
  t_fix = np.array([999, 500, 0, 250][:b] + [10] * max(0, b - 4), np.int32)
  noise = rng.standard_normal(latents.shape, dtype=np.float32)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def jax_loss(params, x0, t, noise, y, m):
    x_t = sched.q_sample(x0, t, noise)
    out = nnx.merge(graphdef, params)(x_t, t, y, m)
    return jnp.mean(iddpm_loss(out, x0, x_t, t, noise, schedule=sched, learn_sigma=not mse_only)["loss"])

  lj = float(jax_loss(params, latents, t_fix, noise, caption, mask))
  del model, params
  acp = torch.from_numpy(sched.alphas_cumprod)
  betas = torch.from_numpy(sched.betas)
  to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  targs = dict(encoder_hidden_states=torch.from_numpy(caption), encoder_attention_mask=torch.from_numpy(mask),
               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)

  def torch_loss(net, x0, t, eps):
    a = acp[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = net(x_t, timestep=t.float(), **targs)[0]
    return torch_iddpm_loss(torch, out, x0, x_t, t, eps, acp, betas, mse_only).mean()

  with torch.no_grad():
    lt = float(torch_loss(tmodel, to_nchw(latents), torch.from_numpy(t_fix).long(), to_nchw(noise)))
  print(f"check: loss on a fixed (t, noise): JAX {lj:.6f}, torch {lt:.6f}, rel diff {abs(lj - lt) / abs(lt):.1e}")
  del tmodel
  gc.collect()

  # ---- the two steps, alternating rounds (both see the same machine load) --------------------------------
  step = JaxTrainStep(graphdef, {"latents": latents, "caption": caption, "mask": mask}, learn_sigma=not mse_only)
  x0 = to_nchw(latents)
  times = {"jax": [], "torch": []}

  for r in range(args.rounds):
    _, params = nnx.split(load_transformer(weights.name, dtype=jnp.float32, remat=args.remat), nnx.Param)
    step.start(params)
    del params
    tj = time_fn(step, warmup=args.warmup, runs=args.runs)
    compile_s = step.compile_s
    step.stop()
    times["jax"].append(tj)
    gc.collect()
    print(f"round {r + 1}: JAX step {tj.fmt()}" + (f" (compile {compile_s:.1f} s)" if r == 0 else ""), flush=True)
    if args.no_torch:
      continue
    net = PixArtTransformer2DModel.from_pretrained(weights.name).train()
    topt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-10, weight_decay=0.03)
    gen = torch.Generator().manual_seed(r)

    def torch_step():
      t = torch.randint(0, 1000, (b,), generator=gen)
      eps = torch.randn(x0.shape, generator=gen)
      loss = torch_loss(net, x0, t, eps)
      topt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
      topt.step()

    tt = time_fn(torch_step, warmup=args.warmup, runs=args.runs)
    times["torch"].append(tt)
    del net, topt
    gc.collect()
    print(f"round {r + 1}: torch step {tt.fmt()}", flush=True)
  weights.cleanup()

  rows = []
  for name, label in (("jax", "JAX (jit, donated state)"), ("torch", "torch (eager, AdamW)")):
    if not times[name]:
      continue
    med = statistics.median(t.median for t in times[name])
    best = min(t.min for t in times[name])
    rows.append([label, f"{med:.2f}", f"{best:.2f}", f"{compile_s:.0f}" if name == "jax" else "-",
                 f"{gflops(flops, med):.1f}", f"{100 * gflops(flops, med) / peak['best']:.0f} %",
                 f"{gflops(flops, best):.1f}"])
  print()
  print(fmt_table(["step", "median s", "min s", "compile s", "GFLOP/s (median)", "of measured peak",
                   "GFLOP/s (min)"], rows))
  if times["torch"]:
    ratio = statistics.median(t.median for t in times["torch"]) / statistics.median(t.median for t in times["jax"])
    ratio_min = min(t.min for t in times["torch"]) / min(t.min for t in times["jax"])
    print(f"\ntorch / JAX step time (>1: JAX faster): median {ratio:.2f}x, min {ratio_min:.2f}x")
  print(f"peak = {peak['best']:.1f} GFLOP/s (measured fp32 matmul, best of JAX {peak['jax']:.1f} / torch "
        f"{peak['torch']:.1f}); {flops / 1e9:.0f} GFLOP per step; {args.rounds} rounds x {args.runs} timed steps")


if __name__ == "__main__":
  main()
