"""The Pipeline's automatic layout (parallel.sampling_layout): the rule itself, sequence-parallel sampling on 8
fake devices against one device, a 4096 x 4096 request end to end in bounded memory, and the `sample` CLI on a
mesh (8 fake devices in one process, and two processes x 4 devices splitting the batches)."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import pixart_jax as pj
from pixart_jax.parallel import sampling_layout as sl
from pixart_jax.parallel.mesh import make_mesh, parse_mesh
from pixart_jax.testing import make_tiny_pipeline

from train_testlib import ROOT, free_port

KV = [1, 2]  # an uncompressed and a 2x2-compressed stage


@pytest.mark.parametrize("shape,batch,grid,want", [
    ({"data": 8}, 1, (256, 256), 8),    # 4K, one image: all 8 devices shard it
    ({"data": 8}, 2, (256, 256), 4),    # two images: data 2 x sequence 4
    ({"data": 8}, 3, (256, 256), 8),    # 3 does not split over 2 or 4: one image on all 8 at a time
    ({"data": 8}, 8, (256, 256), 1),    # the batch uses every device
    ({"data": 8}, 16, (64, 64), 1),
    ({"data": 8}, 1, (32, 32), 1),      # 1,024 tokens (512 px): not worth the all-gathers
    ({"data": 8}, 1, (64, 64), 8),      # 1024 px: 4,096 tokens
    ({"data": 8}, 1, (68, 64), 8),      # 68 rows: padded to 80 (whole 2x2 windows per shard), still 1/8 the work
    ({"data": 8}, 1, (66, 66), 8),      # likewise (80 rows)
    ({"data": 8}, 4, (256, 256), 2),    # data 4 x sequence 2 (as little communication as the batch allows)
    ({"data": 1}, 1, (256, 256), 1),    # one device
    ({"data": 2, "fsdp": 4}, 1, (256, 256), 2),  # fsdp is never re-cut
    ({"data": 4, "sequence": 2}, 4, (256, 256), 2),  # a given sequence axis is used as is
])
def test_sequence_rule(shape, batch, grid, want):
  assert sl.sequence_shards(shape, batch, grid, KV) == want


def test_vae_tiling_rule_and_overrides():
  assert sl.vae_tiling(4096, 4096) == (128, 32)
  assert sl.vae_tiling(2160, 3840) == (128, 32)
  assert sl.vae_tiling(2048, 2048) == (None, 0)
  assert sl.vae_tiling(1024, 1024, tile_latent=64) == (64, 16)
  mesh = make_mesh([("data", 8)])
  assert sl.choose(mesh, 1, (256, 256), KV, 4096, 4096) == sl.SamplingLayout(8, 128, 32)
  assert sl.choose(mesh, 1, (256, 256), KV, 4096, 4096, sequence=1).sequence == 1
  assert sl.choose(None, 1, (256, 256), KV, 4096, 4096).sequence == 1
  given = make_mesh([("data", 4), ("sequence", 2)])  # a given sequence axis: used, padded where the grid needs it
  assert sl.choose(given, 1, (256, 256), KV, 4096, 4096) == sl.SamplingLayout(2, 128, 32, True)
  assert sl.choose(given, 1, (66, 66), KV, 528, 528) == sl.SamplingLayout(2, None, 0, True)
  other = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))  # not make_mesh's axes: used as given
  assert sl.choose(other, 1, (256, 256), KV, 4096, 4096).sequence == 1
  with pytest.raises(ValueError, match="sequence_shards=3 does not fit the mesh"):
    sl.choose(mesh, 1, (256, 256), KV, 4096, 4096, sequence=3)
  assert sl.choose(mesh, 1, (68, 64), KV, 544, 512, sequence=4) == sl.SamplingLayout(4, None, 0, True)


def test_sequence_mesh_recuts_data_only():
  mesh = make_mesh([("data", 4), ("tensor", 2)])
  sp = sl.sequence_mesh(mesh, 2)
  assert dict(sp.shape) == {"data": 2, "fsdp": 1, "tensor": 2, "sequence": 2}
  assert set(sp.devices.flat) == set(mesh.devices.flat)
  assert sl.sequence_mesh(sp, 2) is sp
  with pytest.raises(ValueError, match="cannot move 8 sequence shards"):
    sl.sequence_mesh(mesh, 8)


def test_parse_mesh():
  assert parse_mesh("data=-1") == [("data", -1)]
  assert parse_mesh(" data=4, sequence=2 ") == [("data", 4), ("sequence", 2)]
  for bad, msg in [("data", "bad entry 'data'"), ("", "is empty"), ("rows=2", "unknown mesh axes"),
                   ("data=-1,fsdp=-1", "at most one"), ("data=0", "positive or -1")]:
    with pytest.raises(ValueError, match=msg):
      parse_mesh(bad)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
  return make_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def pipes(tiny_path):
  one = pj.Pipeline.from_pretrained(tiny_path, dtype=np.float32)
  eight = pj.Pipeline.from_pretrained(tiny_path, dtype=np.float32, mesh=make_mesh([("data", 8)]))
  return one, eight


@pytest.mark.slow
def test_sequence_parallel_sampling_matches_one_device(pipes, monkeypatch):
  """Forced (two images on data 2 x sequence 4) and automatic (one image on 8 devices; the token threshold
  lowered to this 256 px image's 256 tokens) sequence parallelism give the single-device images; the DiT state
  really sits on the re-cut mesh."""
  one, eight = pipes
  kw = dict(height=256, width=256, steps=2, guidance_scale=3.0, seed=3, output="float")
  want = one(["a cat", "a dog"], **kw)
  got = eight(["a cat", "a dog"], sequence_shards=4, **kw)
  assert dict(eight._placed[1].shape)["sequence"] == 4
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)

  assert eight.layout(1, 256, 256).sequence == 1  # 256 tokens < SP_MIN_TOKENS
  monkeypatch.setattr(sl, "SP_MIN_TOKENS", 256)
  assert eight.layout(1, 256, 256) == sl.SamplingLayout(8, None, 0)
  want = one(["a red car"], **kw)
  got = eight(["a red car"], **kw)
  assert dict(eight._placed[1].shape) == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 8}
  leaf = jax.tree.leaves(eight._placed[2])[0]
  assert leaf.sharding.mesh.shape["sequence"] == 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


PEAK_RSS_MIB = 3072


@pytest.mark.slow
def test_4k_request_end_to_end_in_bounded_memory(tiny_path):
  """A 4096 x 4096 request (512 x 512 latent, 65,536 tokens, CFG) through auto attention (blockwise on the CPU),
  KV compression and the tiled VAE decode (25 tiles of 1024 px), in a fresh process whose peak RSS is asserted.

  Measured: ~1.6 GiB peak RSS. The materialised attention alone would need 65,536^2 fp32 logits = 16 GiB per
  head, and the untiled decode of this VAE > 2 GiB of activations."""
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": ""}
  r = subprocess.run([sys.executable, str(ROOT / "tests" / "pipeline_4k_worker.py"), str(tiny_path)],
                     capture_output=True, text=True, env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["shape"] == [1, 4096, 4096, 3] and out["dtype"] == "uint8" and out["std"] > 1
  assert out["sequence"] == 1 and out["vae_tile_latent"] == 128
  assert out["peak_rss_mib"] < PEAK_RSS_MIB, out


def _sample_cli(path, out, devices, *extra, procs=1, timeout=900):
  """Runs `python -m pixart_jax.sample` on `devices` fake CPU devices per process, `procs` processes."""
  prompts = ["a cat", "a dog on a beach", "a red car", "a tree", "a ship at sea"]
  args = [sys.executable, "-m", "pixart_jax.sample", "--model", str(path), "--size", "256x256", "--steps", "2",
          "--guidance", "3", "--seed", "5", "--dtype", "float32", "--batch_size", "2", "--out", str(out), *extra]
  for p in prompts:
    args += ["--prompt", p]
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  if procs == 1:
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return [r.stderr]
  port = free_port()
  ps = [subprocess.Popen(args + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={procs}",
                                 f"--process_id={i}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True) for i in range(procs)]
  logs = []
  try:
    for p in ps:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in ps:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in ps), "\n".join(lg[-3000:] for lg in logs)
  return logs


def _pngs(out: pathlib.Path) -> dict:
  from PIL import Image

  return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sample_cli_mesh_one_and_two_processes(tiny_path, tmp_path):
  """Default --mesh (data parallel over every device): 8 fake devices in one process, then two processes x 4
  devices that split the 3 batches (host 0: batches 0 and 2, host 1: batch 1); the same five files, names
  unique and ordered by the image's index, the same images."""
  names = ["0000_a_cat.png", "0001_a_dog_on_a_beach.png", "0002_a_red_car.png", "0003_a_tree.png",
           "0004_a_ship_at_sea.png"]
  (log,) = _sample_cli(tiny_path, tmp_path / "one", 8)
  assert "host 0 of 1: 3 of 3 batches of 2 on mesh {'data': 8, 'fsdp': 1, 'tensor': 1, 'sequence': 1}" in log
  one = _pngs(tmp_path / "one")
  assert list(one) == names and (tmp_path / "one" / "contact_sheet.png").exists()

  logs = _sample_cli(tiny_path, tmp_path / "two", 4, procs=2)
  assert "host 0 of 2: 2 of 3 batches of 2 on mesh {'data': 4" in logs[0]
  assert "host 1 of 2: 1 of 3 batches of 2 on mesh {'data': 4" in logs[1]
  assert "wrote 3 images" in logs[0] and "wrote 2 images" in logs[1]
  two = _pngs(tmp_path / "two")
  assert list(two) == names and not (tmp_path / "two" / "contact_sheet.png").exists()
  for name in names:
    assert np.abs(one[name].astype(int) - two[name].astype(int)).max() <= 1, name
