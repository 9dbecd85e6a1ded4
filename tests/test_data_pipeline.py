"""Grain pipeline: one bucket per batch, epoch coverage, decoding, exact resume (Orbax, new process)."""
import os
import subprocess
import sys

import grain
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from jax.sharding import PartitionSpec as P

from pixart_jax.data import pipeline, synthetic
from pixart_jax.data.records import deserialize_record
from pixart_jax.parallel.mesh import make_mesh

TABLE = {"0.5": (32, 64), "1.0": (48, 48), "2.0": (64, 32)}
COUNTS = {"0.5": 18, "1.0": 24, "2.0": 8}   # 0.5 leaves 2 records over at global batch 8
WORKER = os.path.join(os.path.dirname(__file__), "multihost_data_worker.py")
ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("synthetic")
  synthetic.write_synthetic_dataset(d, COUNTS, table=TABLE, text_dim=16, latent_channels=4,
                                    scaling_factor=0.5, caption_tokens=(2, 20),
                                    long_caption_tokens=(30, 60), shard_size=16, seed=3)
  return str(d)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((("data", 2), ("fsdp", -1)))


def _records(data_dir):
  index = pipeline.load_index(data_dir)
  recs = []
  for path in index.record_paths:
    r = ArrayRecordReader(path)
    recs += [deserialize_record(b) for b in r.read_all()]
    r.close()
  return recs


def test_one_bucket_per_batch_and_epoch_coverage(data_dir, mesh):
  recs = _records(data_dir)
  it = pipeline.make_train_iterator(data_dir, global_batch_size=8, mesh=mesh, seed=0, num_epochs=2)
  assert it.steps_per_epoch == 2 + 3 + 1
  seen, epochs = [], []
  for batch in it:
    key = batch["bucket"]
    h, w = TABLE[key]
    assert batch["latents"].shape == (8, h // 8, w // 8, 4)
    assert batch["latents"].sharding.spec == P(("data", "fsdp"))
    assert batch["caption"].shape == (8, 300, 16) and batch["caption"].dtype == ml_dtypes.bfloat16
    ids = np.asarray(batch["index"])
    assert {recs[i].bucket for i in ids} == {key}   # every example of the batch is in its bucket
    seen.append(ids)
    if len(seen) == it.steps_per_epoch:
      epochs.append(np.concatenate(seen))
      seen = []
  assert len(epochs) == 2
  for ep in epochs:
    assert len(ep) == len(set(ep.tolist())) == 48        # each example at most once per epoch
    assert sum(recs[i].bucket == "0.5" for i in ep) == 16  # the 2 left over in 0.5 are dropped
    assert {i for i in range(50) if recs[i].bucket != "0.5"} <= set(ep.tolist())
  assert not np.array_equal(epochs[0], epochs[1])        # epochs reshuffle


def test_decode_captions_and_latents(data_dir):
  recs = _records(data_dir)
  def epoch(seed, ratio):
    it = pipeline.make_train_iterator(data_dir, global_batch_size=2, mesh=None, seed=seed,
                                      caption_ratio=ratio, num_epochs=1)
    return list(it)
  batches = epoch(0, 0.5)
  kinds, z = [], []
  for b in batches:
    for row, i in enumerate(b["index"]):
      rec = recs[i]
      n = int(b["mask"][row].sum())
      assert np.array_equal(b["mask"][row], np.arange(300) < n)   # a prefix of ones
      cap = b["caption"][row]
      assert not cap[n:].view(np.uint16).any()                      # zero padding
      if rec.long_caption_emb is not None and n == rec.long_caption_len:
        np.testing.assert_array_equal(cap[:n].view(np.uint16), rec.long_caption_emb.view(np.uint16))
        kinds.append("long")
      else:
        np.testing.assert_array_equal(cap[:n].view(np.uint16), rec.caption_emb.view(np.uint16))
        kinds.append("short" if rec.long_caption_emb is not None else "only")
      mean, std = rec.mean.astype(np.float32), rec.std.astype(np.float32)
      z.append(((b["latents"][row] / 0.5 - mean) / std).ravel())
  assert {"long", "short"} <= set(kinds)
  z = np.concatenate(z)
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05   # latent = (mean + std N(0,1)) * 0.5
  again = epoch(0, 0.5)
  for a, b in zip(batches, again):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])                 # deterministic
  other = epoch(1, 0.5)
  assert not all(np.array_equal(a["latents"], b["latents"]) for a, b in zip(batches, other))
  for ratio, want in ((1.0, lambda r: r.caption_len), (0.0, lambda r: r.long_caption_len or r.caption_len)):
    for b in epoch(0, ratio):
      assert [int(m.sum()) for m in b["mask"]] == [want(recs[i]) for i in b["index"]]


def test_resume_in_new_process_via_orbax(data_dir, mesh, tmp_path):
  it = pipeline.make_train_iterator(data_dir, global_batch_size=8, mesh=mesh, seed=5)
  for _ in range(4):
    next(it)
  ckpt = tmp_path / "ckpt"
  mngr = ocp.CheckpointManager(ckpt, item_names=("iter",))
  mngr.save(4, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it) for _ in range(5)]   # crosses the epoch boundary (6 steps per epoch)
  out = tmp_path / "next.npz"
  proc = subprocess.run([sys.executable, WORKER, "resume", data_dir, str(ckpt), str(out), "5", "8", "5"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  for i, b in enumerate(want):
    assert str(got[f"{i}_bucket"]) == b["bucket"]
    for k in pipeline.BATCH_KEYS:
      w = np.asarray(b[k]).astype(np.float32) if k == "caption" else np.asarray(b[k])
      np.testing.assert_array_equal(got[f"{i}_{k}"], w)


def test_abstract_batches_match_real_batches(data_dir, mesh):
  abstract = pipeline.abstract_batches(data_dir, 8, mesh=mesh)
  assert sorted(abstract) == sorted(COUNTS)
  it = pipeline.make_train_iterator(data_dir, global_batch_size=8, mesh=mesh, seed=0, num_epochs=1)
  for batch in it:
    for k, sds in abstract[batch["bucket"]].items():
      assert (batch[k].shape, batch[k].dtype, batch[k].sharding) == (sds.shape, sds.dtype, sds.sharding)
  fake = synthetic.random_batch(abstract["2.0"])
  assert {k: v.shape for k, v in fake.items()} == {k: s.shape for k, s in abstract["2.0"].items()}
  null = pipeline.null_caption(data_dir)
  assert null.shape == (300, 16) and null.dtype == np.float32


@pytest.mark.slow
def test_multiprocess_workers_give_the_same_batches(data_dir):
  def first(workers):
    it = pipeline.make_train_iterator(data_dir, global_batch_size=4, mesh=None, seed=2,
                                      workers=workers)
    out = [next(it) for _ in range(4)]
    state = it.get_state()
    it.close()
    return out, state
  ref, _ = first(0)
  got, state = first(2)
  for a, b in zip(ref, got):
    assert a["bucket"] == b["bucket"]
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  assert state["pipeline"]["global_batch_size"] == 4


def test_bad_configurations_are_named(data_dir, mesh, tmp_path):
  with pytest.raises(ValueError, match="not divisible by the mesh's batch axes"):
    pipeline.make_train_iterator(data_dir, global_batch_size=6, mesh=mesh)
  with pytest.raises(ValueError, match="no bucket holds"):
    pipeline.make_train_iterator(data_dir, global_batch_size=32, mesh=None)
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    pipeline.make_train_iterator(tmp_path, global_batch_size=8, mesh=None)
  a = pipeline.make_train_iterator(data_dir, global_batch_size=8, mesh=None, seed=0)
  b = pipeline.make_train_iterator(data_dir, global_batch_size=8, mesh=None, seed=1)
  with pytest.raises(ValueError, match="different pipeline"):
    b.set_state(a.get_state())
