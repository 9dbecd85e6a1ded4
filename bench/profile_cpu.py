"""Where the CPU time goes: XL/2's matmul shapes, the forward / backward / optimizer split, and XLA's per-op
profile by category, JAX vs PyTorch in the same run (issue 18).

    python bench/profile_cpu.py                       # all three parts, depth 4 for the split and the profile
    python bench/profile_cpu.py --part matmul --xla-flags=--xla_cpu_experimental_ynn_fusion_type=
    python bench/profile_cpu.py --part split --depth 12
    python bench/profile_cpu.py --part profile --what fwd

matmul: GFLOP/s of every matmul shape of an XL/2 block at 256 px (256 image tokens, 300 caption tokens), forward
  (x W) and the two backward products (dY W^T, X^T dY), fp32 (precision highest) and bf16 operands with fp32
  accumulation, JAX (jit) vs torch (`@`), medians of 10.
split: an XL/2-width DiT of `--depth` blocks at 256 px, batch 1, eps-MSE: forward, forward+backward, the AdamW
  update alone and the whole step (optax / torch.optim.AdamW), JAX vs torch.
profile: `jax.profiler` trace (perfetto JSON, XLA's per-thunk events via --xla_cpu_enable_xprof_traceme) of the
  forward or forward+backward, summed per category: YNNPACK / Eigen dots, dynamic-slice (a layer's weights copied
  out of the stacked `layers` axis), dynamic-update-slice (gradients written back), broadcasts (zeroed gradient
  accumulators), copies / transposes, other fusions. Thunks run concurrently on the cores, so the sums can
  exceed the wall time; they rank the costs, they do not add up to it.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def _model(depth: int, dtype):
  """(torch diffusers model, our model) of XL/2 width and `depth` blocks with the same random weights."""
  import torch
  from diffusers import PixArtTransformer2DModel

  from pixart_jax.convert.dit import load_transformer

  torch.manual_seed(0)
  tm = PixArtTransformer2DModel(
      num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=depth,
      cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2, activation_fn="gelu-approximate",
      num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
      interpolation_scale=2.0, use_additional_conditions=False, caption_channels=4096)
  with torch.no_grad():
    for p in tm.parameters():
      p.normal_(0.0, 0.02)
  with tempfile.TemporaryDirectory() as d:
    tm.save_pretrained(d)
    return tm, load_transformer(d, dtype=dtype)


def _inputs(batch: int = 1, lat: int = 32):
  import numpy as np
  rng = np.random.default_rng(0)
  m = np.zeros((batch, 300), np.int32)
  m[:, :120] = 1
  return dict(x=rng.standard_normal((batch, lat, lat, 4), dtype=np.float32), t=np.full((batch,), 500.0, np.float32),
              y=(rng.standard_normal((batch, 300, 4096), dtype=np.float32) * 0.1).astype(np.float32), m=m,
              target=rng.standard_normal((batch, lat, lat, 8), dtype=np.float32))


def _loss_setup(depth: int):
  """(torch model, inputs (x t y m) as jax arrays, graphdef, params, rest, eps-MSE loss(params, *inputs)) of an
  XL/2-width DiT of `depth` blocks at 256 px, batch 1, fp32."""
  import jax.numpy as jnp
  from flax import nnx

  tm, model = _model(depth, jnp.float32)
  inp = _inputs()
  ja = tuple(jnp.asarray(inp[k]) for k in ("x", "t", "y", "m"))
  target = jnp.asarray(inp["target"])
  g, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, *a):
    return jnp.mean((nnx.merge(g, p, rest)(*a) - target) ** 2)

  return tm, inp, ja, g, params, rest, loss


def part_matmul(fmt_table, time_fn):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  d, f, tokens, caption = 1152, 4608, 256, 300
  shapes = [("q/k/v/out, cross q/out", tokens, d, d), ("cross k/v (caption)", caption, d, 2 * d),
            ("MLP fc1", tokens, d, f), ("MLP fc2", tokens, f, d), ("caption proj fc1", caption, 4096, d)]
  rows = []
  for dt in ("float32", "bfloat16"):
    jd, td = jnp.dtype(dt), getattr(torch, dt)
    for name, m, k, n in shapes:
      rng = np.random.default_rng(0)
      x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (m, n)))
      cases = {"fwd x W": ((x, w), (((1,), (0,)), ((), ()))), "bwd dY W^T": ((dy, w), (((1,), (1,)), ((), ()))),
               "bwd X^T dY": ((x, dy), (((0,), (0,)), ((), ())))}
      for case, ((a, b), dims) in cases.items():
        ja, jb = jnp.asarray(a, jd), jnp.asarray(b, jd)
        fn = jax.jit(lambda p, q, dims=dims: jax.lax.dot_general(p, q, dims, precision="highest",
                                                                  preferred_element_type=jnp.float32))
        tj = time_fn(lambda: fn(ja, jb).block_until_ready(), warmup=2, runs=10).median
        ta, tb = torch.from_numpy(a).to(td), torch.from_numpy(b).to(td)
        op = {"fwd x W": lambda: ta @ tb, "bwd dY W^T": lambda: ta @ tb.T, "bwd X^T dY": lambda: ta.T @ tb}[case]
        with torch.inference_mode():
          tt = time_fn(op, warmup=2, runs=10).median
        flops = 2.0 * m * k * n
        rows.append([dt, name, case, f"{m}x{k}x{n}", f"{flops / tj / 1e9:.0f}", f"{flops / tt / 1e9:.0f}",
                     f"**{tt / tj:.2f}x**"])
  print(fmt_table(["operands", "layer", "product", "M x K x N (fwd)", "JAX GFLOP/s", "torch GFLOP/s",
                   "torch/JAX time"], rows))


def part_split(depth: int, fmt_table, time_fn):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  from flax import nnx

  tm, inp, ja, g, params, rest, loss = _loss_setup(depth)
  tx = optax.adamw(1e-4, eps=1e-10, weight_decay=0.03)
  opt = tx.init(params)

  def step(p, o, *a):
    value, grads = jax.value_and_grad(loss)(p, *a)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  fwd = jax.jit(lambda p, *a: nnx.merge(g, p, rest)(*a)).lower(params, *ja).compile()
  vg = jax.jit(jax.value_and_grad(loss)).lower(params, *ja).compile()
  upd = jax.jit(tx.update).lower(params, opt, params).compile()
  st = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, *ja).compile()
  res = {"forward": [time_fn(lambda: fwd(params, *ja).block_until_ready(), runs=5).median],
         "forward + backward": [time_fn(lambda: jax.block_until_ready(vg(params, *ja)), runs=5).median],
         "AdamW update": [time_fn(lambda: jax.block_until_ready(upd(params, opt, params)), runs=5).median]}
  state = [jax.tree.map(jnp.copy, params), opt]

  def run_step():
    state[0], state[1], value = st(state[0], state[1], *ja)
    value.block_until_ready()

  res["whole step"] = [time_fn(run_step, runs=5).median]
  del state, opt
  tx_ = torch.from_numpy(np.ascontiguousarray(inp["x"].transpose(0, 3, 1, 2)))
  tgt = torch.from_numpy(np.ascontiguousarray(inp["target"].transpose(0, 3, 1, 2)))
  kw = dict(encoder_hidden_states=torch.from_numpy(inp["y"]), timestep=torch.from_numpy(inp["t"]),
            encoder_attention_mask=torch.from_numpy(inp["m"].astype(np.int64)),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
  with torch.no_grad():
    res["forward"].append(time_fn(lambda: tm(tx_, **kw), runs=5).median)

  def fwd_bwd():
    tm.zero_grad(set_to_none=True)
    ((tm(tx_, **kw)[0] - tgt) ** 2).mean().backward()

  res["forward + backward"].append(time_fn(fwd_bwd, runs=5).median)
  topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, eps=1e-10, weight_decay=0.03)
  res["AdamW update"].append(time_fn(topt.step, runs=5).median)
  res["whole step"].append(time_fn(lambda: (fwd_bwd(), topt.step()), runs=5).median)
  rows = [[k, f"{j * 1e3:.0f}", f"{t * 1e3:.0f}", f"**{t / j:.2f}x**"] for k, (j, t) in res.items()]
  j_b, t_b = res["forward + backward"][0] - res["forward"][0], res["forward + backward"][1] - res["forward"][1]
  rows.insert(2, ["backward (difference)", f"{j_b * 1e3:.0f}", f"{t_b * 1e3:.0f}", f"**{t_b / j_b:.2f}x**"])
  print(f"XL/2 width, depth {depth}, 256 px, batch 1, fp32, eps-MSE")
  print(fmt_table(["part", "JAX ms", "torch ms", "torch/JAX time"], rows))


_CATEGORIES = [("YNNPACK dot", r"^ynn_fusion"), ("Eigen dot", r"^dot"), ("dynamic-update-slice", r"dynamic-update-slice"),
               ("dynamic-slice / slice (weights out of the layer stack)", r"(dynamic-)?slice"),
               ("broadcast (zeroed accumulators)", r"^wrapped_broadcast"), ("copy / transpose", r"copy|transpose"),
               ("pad (gradient assembly)", r"^pad"), ("reduce", r"reduce")]
_NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "while", "end: ", "PjitFunction", "CommonPjRt", "Parse",
            "Handle", "Allocate")


def part_profile(depth: int, what: str, fmt_table):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  _, _, ja, g, params, rest, loss = _loss_setup(depth)

  if what == "fwd":
    compiled = jax.jit(lambda p, *a: nnx.merge(g, p, rest)(*a)).lower(params, *ja).compile()
  else:
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, *ja).compile()
  for _ in range(2):
    jax.block_until_ready(compiled(params, *ja))
  reps = 3
  out = tempfile.mkdtemp(prefix="pixart_profile_")
  try:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      for _ in range(reps):
        jax.block_until_ready(compiled(params, *ja))
    trace = json.load(gzip.open(next(pathlib.Path(out).rglob("*.json.gz"))))
  finally:
    shutil.rmtree(out, ignore_errors=True)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_cat, wall = collections.Counter(), 0.0
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e["name"]
    if name.startswith("ThunkExecutor::Execute (wait"):
      wall += e["dur"]
    if name.startswith(_NOT_OPS):
      continue
    cat = next((c for c, pat in _CATEGORIES if re.search(pat, name)), "other fusions")
    by_cat[cat] += e["dur"]
  total = sum(by_cat.values())
  rows = [[c, f"{us / reps / 1e3:.1f}", f"{100 * us / total:.0f} %"] for c, us in by_cat.most_common()]
  print(f"XLA CPU profile, XL/2 width, depth {depth}, 256 px, batch 1, fp32, {'forward' if what == 'fwd' else 'forward + backward'}; "
        f"wall {wall / reps / 1e3:.0f} ms per call (median of the thunk executor), summed op time {total / reps / 1e3:.0f} ms")
  print(fmt_table(["category", "ms per call (summed)", "share"], rows))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--part", default="all", choices=["all", "matmul", "split", "profile"])
  ap.add_argument("--depth", type=int, default=4, help="DiT blocks for split / profile (28 = XL/2)")
  ap.add_argument("--what", default="bwd", choices=["fwd", "bwd"], help="profile the forward or forward+backward")
  ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this run (set before jax starts)")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags = [os.environ.get("XLA_FLAGS", ""), args.xla_flags]
  if args.part in ("all", "profile"):
    flags.append("--xla_cpu_enable_xprof_traceme=true")
  os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f).strip()
  import jax

  from common import fmt_table, machine_description, set_torch_threads, time_fn
  jax.config.update("jax_default_matmul_precision", "highest")
  set_torch_threads()
  print(machine_description())
  if args.part in ("all", "matmul"):
    part_matmul(fmt_table, time_fn)
  if args.part in ("all", "split"):
    part_split(args.depth, fmt_table, time_fn)
  if args.part in ("all", "profile"):
    part_profile(args.depth, args.what, fmt_table)


if __name__ == "__main__":
  main()
