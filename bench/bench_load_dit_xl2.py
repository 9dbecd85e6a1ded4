"""Peak host RAM of `load_transformer` on a full-size XL/2 checkpoint (diffusers safetensors layout).

    python bench/bench_load_dit_xl2.py [--dir /tmp/xl2]

Writes a random XL/2 transformer once (every diffusers key, streamed through our sharded writer), then loads it
in a fresh process and reports (peak RSS - baseline) / fp32 weight bytes (the loaded arrays count as 1.0).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_load_memory import measure_peak_load  # noqa: E402
from common import machine_description  # noqa: E402

WEIGHT_BYTES = 610_856_096 * 4


def write_checkpoints(out: pathlib.Path) -> None:
  import numpy as np

  if (out / "transformer" / "config.json").exists():
    return
  from pixart_jax.convert.dit import config_to_diffusers
  from pixart_jax.convert.dit_keys import diffusers_table
  from pixart_jax.convert.writers import save_safetensors_sharded
  from pixart_jax.models.config import PRESETS
  import json

  cfg = PRESETS["sigma-xl2-1024-ms"]
  rng = np.random.default_rng(0)
  from pixart_jax.models.spec import abstract
  from flax import nnx

  shapes = {tuple(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract(cfg)))}

  def tensors():
    for e in diffusers_table(cfg):
      shape = shapes[e.path][1:] if e.index is not None else shapes[e.path]
      if e.layout == "linear":
        shape = shape[::-1]
      elif e.layout == "conv":
        shape = (shape[3], shape[2], shape[0], shape[1])
      yield e.key, rng.standard_normal(shape, dtype=np.float32)

  (out / "transformer").mkdir(parents=True, exist_ok=True)
  save_safetensors_sharded(tensors(), out / "transformer", max_shard_bytes=10 * 2**30)
  (out / "transformer" / "config.json").write_text(json.dumps(config_to_diffusers(cfg)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dir", default="/tmp/pixart_xl2_bench")
  args = ap.parse_args()
  out = pathlib.Path(args.dir)
  write_checkpoints(out)
  r = measure_peak_load(f"result = load_transformer({str(out / 'transformer')!r})", weight_bytes=WEIGHT_BYTES,
                        setup_source="from pixart_jax.convert.dit import load_transformer")
  print(f"machine: {machine_description()}")
  print(f"diffusers safetensors XL/2: peak RSS increase {r['ratio']:.2f}x the fp32 weights "
        f"({r['peak_bytes'] / 2**30:.2f} GiB peak, {r['seconds']:.1f} s)")


if __name__ == "__main__":
  main()
