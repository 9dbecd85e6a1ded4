"""Self-attention layer with KV compression (R=2) vs without, JAX vs PyTorch SDPA, same process (issue 7).

    python bench/bench_attention.py                                 # 1K 2K 4K 16K 64K tokens, 1 head x 72, fp32
    python bench/bench_attention.py --tokens 4096,16384 --heads 2 --runs 3
    python bench/bench_attention.py --tokens 1024 --no-torch        # quick check
    python bench/bench_attention.py --tokens 4096,16384,65536 --core --memory \
        --out bench/results/blockwise_attention.md                  # blockwise vs SDPA (issue 14)

The layer is `pixart_jax.models.attention.SelfAttention` (q/k/v/out projections, 'conv' KV compression: depthwise
2x2 stride-2 conv + LayerNorm shared by K and V, softmax in fp32), jitted, fp32, batch 1, on a square (or 1:2)
token grid. The PyTorch reference is the official AttentionKVCompress algorithm (fused qkv Linear, sr Conv2d +
LayerNorm, F.scaled_dot_product_attention, proj) with the SAME weights, under torch.inference_mode with as many
threads as cores; its output is checked against ours at the first size.

CPU-size reduction (stated in the output): the width is heads x head_dim (default 1 x 72 = 72, XL/2 has 16 x 72);
the attention core cost is the same per head, so the measured KV speedup at a reduced head count is what the full
layer gets where attention dominates (analytic columns give the full-width XL/2 ratio too).
Attention backend: --attention (default auto = blockwise on the CPU; `xla` = the materialised reference). With
xla, above --max-logits-gb the JAX layer runs the same module's projections and compression with queries in
chunks (lax.map over blocks of --chunk queries through the same `dot_product_attention`), which does the same FLOPs
with bounded memory; blockwise never needs it. --block-q / --block-kv set the blockwise tiles.
--core: also times the attention core alone (`attend` vs F.scaled_dot_product_attention on the same q/k/v, heads
x head-dim as above), the kernel-to-kernel ratio. --memory: `memory_analysis()` temporaries of one XL/2-width
(16 heads x 72) self-attention core at 64K tokens, forward + backward (jax.vjp), compiled for this CPU, for
blockwise and the xla reference. --out FILE: also writes the report (command, machine, load, tables) as markdown.
Timing: AOT compile (reported), then `--warmup` untimed and `--runs` timed calls, median; sizes >= 16K tokens
skip the warm-up and take `--runs-large` calls (each call takes seconds).
FLOPs: `pixart_jax.models.flops.self_attention_flops`.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def grid_for(tokens: int) -> tuple[int, int]:
  """A square grid, or h x 2h when `tokens` is twice a square (2K -> 32 x 64)."""
  s = math.isqrt(tokens)
  if s * s == tokens and s % 2 == 0:
    return s, s
  s = math.isqrt(tokens // 2)
  if 2 * s * s == tokens and s % 2 == 0:
    return s, 2 * s
  raise ValueError(f"--tokens {tokens}: need an even square or twice an even square (1024, 2048, 4096, ...)")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokens", default="1024,2048,4096,16384,65536", help="comma list of image token counts")
  ap.add_argument("--heads", type=int, default=1, help="attention heads (XL/2: 16)")
  ap.add_argument("--head-dim", type=int, default=72, help="head width (XL/2: 72)")
  ap.add_argument("--ratio", type=int, default=2, help="KV compression ratio R (M = L / R^2)")
  ap.add_argument("--runs", type=int, default=5, help="timed calls per measurement below 16K tokens (median)")
  ap.add_argument("--runs-large", type=int, default=1, help="timed calls per measurement at >= 16K tokens")
  ap.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (skipped at >= 16K tokens)")
  ap.add_argument("--max-logits-gb", type=float, default=1.5, help="chunk queries above this logits size")
  ap.add_argument("--chunk", type=int, default=4096, help="queries per chunk when chunking")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all cores)")
  ap.add_argument("--attention", default="auto", help="JAX attention backend: auto | xla | blockwise")
  ap.add_argument("--block-q", type=int, default=None, help="blockwise query tile (default: AttentionOptions)")
  ap.add_argument("--block-kv", type=int, default=None, help="blockwise key/value tile (default: AttentionOptions)")
  ap.add_argument("--core", action="store_true", help="also time the attention core alone vs torch SDPA")
  ap.add_argument("--memory", action="store_true", help="report fwd+bwd temporaries of an XL/2-width core at 64K")
  ap.add_argument("--out", default=None, help="write the report as markdown to this file")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from common import fmt_table, gflops, loadavg, machine_description, set_torch_threads, time_fn
  from pixart_jax.models import attention as attn_lib
  from pixart_jax.models import attention_backends as backends
  from pixart_jax.models.flops import self_attention_flops

  blocks = {k: v for k, v in (("blockwise_block_q", args.block_q), ("blockwise_block_kv", args.block_kv)) if v}
  opts = backends.AttentionOptions(backend=args.attention, **blocks)
  resolved = backends.resolve(opts, jnp.float32)
  materialises = backends.select_backend(resolved, 1 << 20) is backends.AttentionBackend.XLA
  report = ["# Attention: blockwise vs torch SDPA, and memory (issue 14) — `bench/bench_attention.py`", "",
            f"Command: `python {' '.join(sys.argv)}`", "", f"Machine: {machine_description()}", "",
            f"JAX attention: {args.attention!r} -> {resolved.backend.value!r}"
            + (f" (tiles {resolved.blockwise_block_q} x {resolved.blockwise_block_kv})"
               if resolved.backend is backends.AttentionBackend.BLOCKWISE else ""), ""]

  dim = args.heads * args.head_dim
  r = args.ratio
  tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
  grids = [grid_for(t) for t in tokens]
  if not args.no_torch:
    import torch
    import torch.nn.functional as F
    set_torch_threads(args.torch_threads)
  print(machine_description())
  print(f"self-attention layer, fp32, batch 1, width {dim} = {args.heads} heads x {args.head_dim} "
        f"(XL/2: 16 x 72 = 1152), KV compression R={r} ('conv') vs none\n")

  def make_ours(ratio: int, seed: int = 0):
    return attn_lib.SelfAttention(dim, args.heads, kv_ratio=ratio, kv_mode="conv", dtype=jnp.float32,
                                  param_dtype=jnp.float32, rngs=nnx.Rngs(seed), opts=opts)

  def chunked_call(layer, x, hw):
    """The module's projections / compression, attention over query chunks (same math, bounded memory)."""
    q, k, v = layer.q(x), layer.k(x), layer.v(x)
    if layer.compress is not None:
      k, v = layer.compress(k, hw), layer.compress(v, hw)
    n, c = args.heads, args.chunk
    split = lambda t: t.reshape(t.shape[0], t.shape[1], n, -1)
    kh, vh = split(k), split(v)
    qc = split(q).reshape(1, -1, c, n, args.head_dim).swapaxes(0, 1)  # (chunks, 1, c, N, K)
    o = jax.lax.map(lambda qq: attn_lib.dot_product_attention(qq, kh, vh), qc)
    o = o.swapaxes(0, 1).reshape(1, -1, dim)
    return layer.out(o)

  def torch_ref(ours, ratio: int):
    """The official AttentionKVCompress computation with our weights."""
    t = lambda a: torch.from_numpy(np.array(a))
    wq, wk, wv = (t(getattr(ours, n).kernel[...]).T for n in "qkv")
    w_qkv = torch.cat([wq, wk, wv], 0).contiguous()
    b_qkv = torch.cat([t(getattr(ours, n).bias[...]) for n in "qkv"])
    w_out, b_out = t(ours.out.kernel[...]).T.contiguous(), t(ours.out.bias[...])
    if ratio > 1:
      sr_w = t(ours.compress.kernel[...]).permute(3, 2, 0, 1).contiguous()  # (D, 1, R, R)
      sr_b, ln_w, ln_b = (t(getattr(ours.compress, n)[...]) for n in ("bias", "norm_scale", "norm_bias"))

    def fwd(x, hw):
      b, l, c = x.shape
      q, k, v = F.linear(x, w_qkv, b_qkv).reshape(b, l, 3, c).unbind(2)
      if ratio > 1:
        def down(z):
          z = z.reshape(b, *hw, c).permute(0, 3, 1, 2)
          z = F.conv2d(z, sr_w, sr_b, stride=ratio, groups=c).reshape(b, c, -1).permute(0, 2, 1)
          return F.layer_norm(z, (c,), ln_w, ln_b, 1e-5)
        k, v = down(k), down(v)
      sh = lambda z: z.reshape(b, z.shape[1], args.heads, args.head_dim).transpose(1, 2)
      o = F.scaled_dot_product_attention(sh(q), sh(k), sh(v))
      return F.linear(o.transpose(1, 2).reshape(b, l, c), w_out, b_out)

    return fwd

  def core_row(n_tok: int, warm: int, runs: int) -> list:
    """attend(q, k, v) (this backend) vs F.scaled_dot_product_attention, same fp32 q/k/v, no projections."""
    rng_c = np.random.default_rng(1)
    qkv_np = [rng_c.standard_normal((1, n_tok, args.heads, args.head_dim), dtype=np.float32) for _ in range(3)]
    fn = jax.jit(lambda q, k, v: backends.attend(q, k, v, opts=opts)).lower(*qkv_np).compile()
    qkv = [jnp.asarray(a) for a in qkv_np]
    tj = time_fn(lambda: fn(*qkv).block_until_ready(), warmup=warm, runs=runs)
    flops = 4 * n_tok * n_tok * dim
    row = [n_tok, f"{tj.median * 1e3:.1f}", f"{gflops(flops, tj.median):.0f}"]
    if not args.no_torch:
      qt, kt, vt = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in qkv_np)  # B N L K
      with torch.inference_mode():
        err = float(np.max(np.abs(F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).numpy()
                                  - np.asarray(fn(*qkv)))))
        tt = time_fn(lambda: F.scaled_dot_product_attention(qt, kt, vt), warmup=warm, runs=runs)
      row += [f"{tt.median * 1e3:.1f}", f"{gflops(flops, tt.median):.0f}", f"**{tt.median / tj.median:.2f}x**",
              f"{err:.1e}"]
    print(f"  core {n_tok:6d} tokens: JAX {tj.fmt()}" + ("" if args.no_torch else f", torch {row[3]} ms"),
          flush=True)
    return row

  rows, core_rows, checked = [], [], False
  rng = np.random.default_rng(0)
  for n_tok, (h, w) in zip(tokens, grids):
    x_np = rng.standard_normal((1, n_tok, dim), dtype=np.float32)
    x = jnp.asarray(x_np)
    warm = args.warmup if n_tok < 16384 else 0
    runs = args.runs if n_tok < 16384 else args.runs_large
    res = {}
    for ratio in (1, r):
      layer = make_ours(ratio)
      graphdef, state = nnx.split(layer)
      m = attn_lib.KVCompress.out_grid(h, w, ratio, "conv") if ratio > 1 else (h, w)
      chunk = materialises and args.heads * n_tok * m[0] * m[1] * 4 / 1e9 > args.max_logits_gb
      if chunk and n_tok % args.chunk:
        raise SystemExit(f"{n_tok} tokens are not a multiple of --chunk {args.chunk}")
      call = chunked_call if chunk else (lambda lay, xx, hw: lay(xx, hw))
      fn = jax.jit(lambda st, xx: call(nnx.merge(graphdef, st), xx, (h, w)))
      t0 = time.perf_counter()
      compiled = fn.lower(state, x).compile()
      compile_s = time.perf_counter() - t0
      tj = time_fn(lambda: compiled(state, x).block_until_ready(), warmup=warm, runs=runs)
      entry = dict(jax=tj, compile=compile_s, path=f"q-chunk {args.chunk}" if chunk else "module",
                   flops=self_attention_flops(h, w, dim, ratio=ratio))
      if not args.no_torch:
        ref = torch_ref(layer, ratio)
        xt = torch.from_numpy(x_np)
        with torch.inference_mode():
          if not checked:
            err = float(np.max(np.abs(ref(xt, (h, w)).numpy() - np.asarray(compiled(state, x)))))
            print(f"check at {n_tok} tokens, R={ratio}: max |JAX - torch| = {err:.2e}")
          entry["torch"] = time_fn(lambda: ref(xt, (h, w)), warmup=warm, runs=runs)
      res[ratio] = entry
      print(f"  {n_tok:6d} tokens R={ratio}: JAX {tj.fmt()} [{entry['path']}, compile {compile_s:.1f} s]"
            + ("" if args.no_torch else f", torch {entry['torch'].fmt()}"), flush=True)
    checked = True
    if args.core:
      core_rows.append(core_row(n_tok, warm, runs))
    a, b = res[1], res[r]
    full = lambda rr: self_attention_flops(h, w, 1152, ratio=rr)  # XL/2 width
    row = [n_tok, f"{h}x{w}", f"{a['jax'].median * 1e3:.1f}", f"{b['jax'].median * 1e3:.1f}",
           f"**{a['jax'].median / b['jax'].median:.2f}x**",
           f"{a['flops'] / b['flops']:.2f}x", f"{full(1) / full(r):.2f}x",
           f"{gflops(a['flops'], a['jax'].median):.1f} / {gflops(b['flops'], b['jax'].median):.1f}"]
    if not args.no_torch:
      row += [f"{a['torch'].median * 1e3:.1f}", f"{b['torch'].median * 1e3:.1f}",
              f"{a['torch'].median / a['jax'].median:.2f}x / {b['torch'].median / b['jax'].median:.2f}x"]
    rows.append(row)

  header = ["tokens", "grid", "JAX R=1 ms", f"JAX R={r} ms", "KV speedup (measured)", "KV speedup (FLOPs, this width)",
            "KV speedup (FLOPs, XL/2 width)", "JAX GFLOP/s R=1 / R=2"]
  if not args.no_torch:
    header += ["torch R=1 ms", f"torch R={r} ms", "torch/JAX time R=1 / R=2 (>1: JAX faster)"]
  print()
  print(fmt_table(header, rows))
  report += [f"Self-attention layer (q/k/v/out projections, KV compression R={r} vs none), fp32, batch 1, width {dim} "
             f"= {args.heads} heads x {args.head_dim}; median of {args.runs} calls below 16K tokens, "
             f"{args.runs_large} at 16K and above:", "", fmt_table(header, rows), ""]
  if core_rows:
    core_header = ["tokens", "JAX ms", "JAX GFLOP/s"]
    if not args.no_torch:
      core_header += ["torch SDPA ms", "torch GFLOP/s", "torch/JAX time (>1: JAX faster)", "max |JAX - torch|"]
    print("\nattention core alone (no projections):")
    print(fmt_table(core_header, core_rows))
    report += [f"Attention core alone (`attend` vs `F.scaled_dot_product_attention`, same q/k/v, {args.heads} x "
               f"{args.head_dim}, fp32; GFLOP/s counts 4 L^2 D):", "", fmt_table(core_header, core_rows), ""]
  if args.memory:
    mem_rows = []
    spec = jax.ShapeDtypeStruct((1, 65536, 16, 72), jnp.float32)
    for name, o in (("blockwise", resolved if not materialises else backends.AttentionOptions("blockwise")),
                    ("xla (materialised)", backends.XLA_OPTIONS)):
      core = lambda q, k, v, o=o: backends.attend(q, k, v, opts=o)
      vjp = jax.jit(lambda q, k, v, d, core=core: jax.vjp(core, q, k, v)[1](d))
      mem = vjp.lower(spec, spec, spec, spec).compile().memory_analysis()
      mem_rows.append([name, f"{mem.temp_size_in_bytes / 2 ** 30:.3f}", f"{mem.argument_size_in_bytes / 2 ** 30:.3f}",
                       f"{mem.output_size_in_bytes / 2 ** 30:.3f}"])
    mem_header = ["backend", "temporaries GiB", "arguments GiB (q k v dO)", "outputs GiB (dq dk dv)"]
    print("\nXL/2-width self-attention core (16 heads x 72) at 65536 tokens, fwd + bwd, compiled for the CPU:")
    print(fmt_table(mem_header, mem_rows))
    report += ["Memory: one XL/2-width self-attention core (16 heads x 72, batch 1) at 65536 tokens, forward + "
               "backward (`jax.vjp`), `compiled.memory_analysis()` on the CPU:", "", fmt_table(mem_header, mem_rows), ""]
  report += [f"Load average at the end: {loadavg()}", ""]
  if args.out:
    pathlib.Path(args.out).write_text("\n".join(report))
    print(f"\nwrote {args.out}")

  from pixart_jax.models.config import get_preset
  from pixart_jax.models.flops import dit_forward_flops
  print("\nwhole-model forward FLOPs (XL/2, 300 caption tokens, batch 1), KV compression R=2 in layers 14-27:")
  frows = []
  for name, px in (("sigma-xl2-1024-ms", 1024), ("sigma-xl2-2k-ms", 2048), ("sigma-xl2-4k", 4096)):
    cfg = get_preset(name)
    lat = px // 8
    no_kv = dit_forward_flops(cfg.replace(kv_compress_layers=()), lat, lat)
    kv = dit_forward_flops(cfg.replace(kv_compress_layers=tuple(range(14, 28))), lat, lat)
    frows.append([f"{px}x{px}", (lat // 2) ** 2, f"{no_kv / 1e12:.2f}", f"{kv / 1e12:.2f}",
                  f"{100 * (1 - kv / no_kv):.1f} %"])
  print(fmt_table(["image", "tokens", "TFLOP no KV", "TFLOP with KV", "reduction"], frows))


if __name__ == "__main__":
  main()
