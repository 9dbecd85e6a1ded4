"""Encode throughput: our jitted NNX T5 encoder vs transformers `T5EncoderModel`, same process, same weights.

    python bench/bench_t5.py                       # d_model 512, 8 layers, batch 8, 300 tokens, fp32, CPU
    python bench/bench_t5.py --d_model 1024 --layers 4 --runs 7

The transformers model gets random weights, is saved with `save_pretrained` and loaded with
`pixart_jax.convert.t5_keys.load_t5`, so both sides compute the same function (checked before
timing). Each side is warmed up (our first call compiles), then timed over `--runs` calls, the two sides
alternating; the table reports the median. Results are recorded in bench/results/t5.md (merged into bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_description  # noqa: E402
from pixart_jax.convert.t5_keys import load_t5  # noqa: E402


def _time_interleaved(fns, warmup: int, runs: int) -> list[list[float]]:
  """Calls the functions alternately (fair under a fluctuating machine load); seconds per call."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  out = [[] for _ in fns]
  for _ in range(runs):
    for times, fn in zip(out, fns):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--d_model", type=int, default=512, help="model width")
  p.add_argument("--d_kv", type=int, default=64, help="per-head width")
  p.add_argument("--heads", type=int, default=8, help="attention heads")
  p.add_argument("--d_ff", type=int, default=1024, help="gated-gelu hidden width")
  p.add_argument("--layers", type=int, default=8, help="encoder blocks")
  p.add_argument("--vocab", type=int, default=32128, help="vocabulary size")
  p.add_argument("--batch", type=int, default=8, help="prompts per call")
  p.add_argument("--length", type=int, default=300, help="tokens per prompt (padded)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per side")
  p.add_argument("--runs", type=int, default=5, help="timed calls per side (median reported)")
  p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
  p.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
  args = p.parse_args()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  cfg = HFT5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_kv, num_heads=args.heads,
                   d_ff=args.d_ff, num_layers=args.layers, feed_forward_proj="gated-gelu",
                   dropout_rate=0.0, attn_implementation=args.attn)
  torch.manual_seed(0)
  ref = T5EncoderModel(cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    ours = load_t5(d, dtype=jnp.float32)
  n_params = sum(p.numel() for p in ref.parameters())

  rng = np.random.default_rng(0)
  lengths = rng.integers(1, args.length + 1, size=args.batch)
  mask = (np.arange(args.length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(3, args.vocab, size=mask.shape), 0).astype(np.int32)
  ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
  ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)

  encode = jax.jit(lambda m, i, a: m(i, a))
  t0 = time.perf_counter()
  out = encode(ours, ids_j, mask_j).block_until_ready()
  compile_s = time.perf_counter() - t0
  with torch.inference_mode():
    want = ref(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.numpy()
  err = float(np.abs(np.asarray(out) - want).max() / np.abs(want).max())

  def run_ours():
    encode(ours, ids_j, mask_j).block_until_ready()

  def run_torch():
    with torch.inference_mode():
      ref(input_ids=ids_t, attention_mask=mask_t)

  times_ours, times_torch = _time_interleaved([run_ours, run_torch], args.warmup, args.runs)
  t_ours, t_torch = statistics.median(times_ours), statistics.median(times_torch)

  print(f"machine: {machine_description()}")
  print(f"config: d_model {args.d_model}, d_kv {args.d_kv}, heads {args.heads}, d_ff {args.d_ff}, "
        f"layers {args.layers}, vocab {args.vocab} ({n_params / 1e6:.1f} M params), batch {args.batch}, "
        f"length {args.length}, fp32; warmup {args.warmup}, median of {args.runs}")
  print(f"max rel. error ours vs transformers: {err:.2e}; our first call (trace + compile + run): "
        f"{compile_s:.2f} s\n")
  print("| implementation | median s / batch | prompts / s | speed vs transformers |")
  print("|---|---|---|---|")
  print(f"| transformers T5EncoderModel ({args.attn}) | {t_torch:.4f} | {args.batch / t_torch:.1f} | 1.00x |")
  print(f"| pixart_jax T5Encoder (jax.jit, scan) | {t_ours:.4f} | {args.batch / t_ours:.1f} | "
        f"{t_torch / t_ours:.2f}x |")


if __name__ == "__main__":
  main()
