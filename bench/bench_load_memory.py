"""Peak host memory of a weight load, as a multiple of the weight size.

    python bench/bench_load_memory.py --mb 300                 # 300 MB of fp32 in 28 "layers", stacked targets
    python bench/bench_load_memory.py --mb 300 --layout flat   # one target per tensor
    python bench/bench_load_memory.py --mb 300 --format pth    # the same as a torch.save .pth (safe reader)
    python bench/bench_load_memory.py --file W.safetensors     # an existing file, identity key map

Each measurement runs in a fresh Python process: `setup_source` (imports) runs first, then the current RSS
is the baseline, then `load_source` runs and must bind `result` (kept alive, `jax.block_until_ready`-ed);
the reported `ratio` is (peak RSS `ru_maxrss` - baseline) / weight bytes. The loaded arrays themselves live
in host RAM on the CPU backend, so a perfect streaming loader scores ~1.0 there.

Reuse it for any loader, e.g. the DiT at XL/2 size:

    from bench_load_memory import measure_peak_load
    r = measure_peak_load("result = load_transformer('PixArt-Sigma-XL-2-1024-MS.pth')",
                          setup_source="import jax; from pixart_jax.models import ...",
                          weight_bytes=2_443_492_488)
    print(r["ratio"])
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
_MARK = "@@LOAD_MEMORY@@"
_CHILD = r'''
import gc, json, resource, sys, time
def rss_bytes():
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ns = {"__name__": "__bench__"}
exec(compile(SETUP, "<setup>", "exec"), ns)
gc.collect()
base = rss_bytes()
t0 = time.perf_counter()
exec(compile(LOAD, "<load>", "exec"), ns)
if "jax" in sys.modules:
  sys.modules["jax"].block_until_ready(ns.get("result"))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(MARK + json.dumps({"baseline_bytes": base, "peak_bytes": peak, "seconds": seconds,
                         "final_rss_bytes": rss_bytes()}))
'''


def measure_peak_load(load_source: str, *, weight_bytes: int, setup_source: str = "", env: dict | None = None,
                      timeout: float = 1800) -> dict:
  """Runs `setup_source` then `load_source` (which binds `result`) in a fresh interpreter.

  Returns {"baseline_bytes", "peak_bytes", "final_rss_bytes", "seconds", "weight_bytes", "ratio"} with
  ratio = (peak - baseline) / weight_bytes. Put imports in `setup_source` so they count in the baseline.
  """
  script = f"SETUP = {setup_source!r}\nLOAD = {load_source!r}\nMARK = {_MARK!r}\n" + _CHILD
  child_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}" +
               os.environ.get("PYTHONPATH", ""), **(env or {})}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env,
                        timeout=timeout, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_MARK)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"load subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
  res = json.loads(lines[-1][len(_MARK):])
  res["weight_bytes"] = int(weight_bytes)
  res["ratio"] = (res["peak_bytes"] - res["baseline_bytes"]) / weight_bytes
  return res


def make_weights(path, total_mb: float, *, layers: int = 28, seed: int = 0) -> int:
  """Writes ~total_mb MB of fp32 tensors (per layer a wide and a square matrix and a bias, plus two
  unstacked tensors) as safetensors, or as a torch `.pth` if `path` ends otherwise. Returns the byte count."""
  sys.path.insert(0, str(REPO))
  from pixart_jax.convert.writers import write_safetensors

  rng = np.random.default_rng(seed)
  per_layer = total_mb * 2**20 / 4 / (layers + 2)        # fp32 elements
  d = max(8, int((per_layer / 8) ** 0.5))                # a layer: (4d, d) + (2d, 2d) + (2d,) ~ 8 d^2
  tensors = {"embed.weight": rng.random((d, 8 * d), np.float32),
             "head.weight": rng.random((8 * d, d), np.float32)}
  for i in range(layers):
    tensors[f"blocks.{i}.wide.weight"] = rng.random((4 * d, d), np.float32)
    tensors[f"blocks.{i}.sq.weight"] = rng.random((2 * d, 2 * d), np.float32)
    tensors[f"blocks.{i}.sq.bias"] = rng.random((2 * d,), np.float32)
  nbytes = sum(t.nbytes for t in tensors.values())
  if str(path).endswith(".safetensors"):
    write_safetensors(path, tensors)
  else:  # an official-style checkpoint: torch.save({"state_dict": ...}) (torch needed only here)
    import torch
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}, "epoch": 1}, path)
  return nbytes


_SETUP = """
import re, jax, numpy as np
from pixart_jax.convert.sources import open_tensors
from pixart_jax.convert.strict import Put, load_strict
"""
_LOAD = {
    "flat": """
src = open_tensors(PATH)
targets = {(k,): jax.ShapeDtypeStruct(src.shape(k), src.dtype(k)) for k in src.keys()}
result = load_strict(targets, src, lambda k: [Put((k,))])
""",
    "stacked": """
src = open_tensors(PATH)
def keymap(k):
  m = re.fullmatch(r"blocks\\.(\\d+)\\.(.+)", k)
  return [Put((k,))] if m is None else [Put(("blocks", m[2]), int(m[1]))]
n = 1 + max(int(k.split(".")[1]) for k in src.keys() if k.startswith("blocks."))
targets = {}
for k in src.keys():
  m = re.fullmatch(r"blocks\\.(\\d+)\\.(.+)", k)
  shape = src.shape(k) if m is None else (n, *src.shape(k))
  targets[(k,) if m is None else ("blocks", m[2])] = jax.ShapeDtypeStruct(shape, src.dtype(k))
result = load_strict(targets, src, keymap)
""",
}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--mb", type=float, default=300, help="size of the generated fp32 weights in MB")
  ap.add_argument("--layout", choices=sorted(_LOAD), default="stacked", help="target layout")
  ap.add_argument("--format", choices=("safetensors", "pth"), default="safetensors", help="generated file type")
  ap.add_argument("--file", default=None, help="measure this weight file instead (flat layout)")
  ap.add_argument("--json", action="store_true", help="print only the JSON result")
  args = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    path = args.file or os.path.join(tmp, f"weights.{args.format}")
    if args.file is None:
      nbytes = make_weights(path, args.mb)
    else:
      sys.path.insert(0, str(REPO))
      from pixart_jax.convert.sources import open_tensors
      with open_tensors(path) as s:
        nbytes = sum(s.nbytes(k) for k in s.keys())
    layout = "flat" if args.file else args.layout
    res = measure_peak_load(f"PATH = {path!r}\n" + _LOAD[layout], setup_source=_SETUP, weight_bytes=nbytes)
  res["layout"] = layout
  if args.json:
    print(json.dumps(res))
  else:
    print(f"{layout}: {nbytes / 2**20:.0f} MiB of weights, peak RSS above baseline "
          f"{(res['peak_bytes'] - res['baseline_bytes']) / 2**20:.0f} MiB = {res['ratio']:.2f}x, "
          f"{res['seconds']:.2f} s ({nbytes / 2**20 / res['seconds']:.0f} MiB/s)")
  return res


if __name__ == "__main__":
  main()
