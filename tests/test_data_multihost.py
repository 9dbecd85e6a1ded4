"""Two local JAX processes (jax.distributed on 127.0.0.1, 2 CPU devices each, gloo): both hosts
take the same bucket at every step, hold disjoint examples, and one epoch covers every example
exactly once; the per-example latents equal a single-process run's."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pixart_jax.data import pipeline, synthetic

from train_testlib import free_port

TABLE = {"0.5": (32, 64), "1.0": (48, 48), "2.0": (64, 32)}
COUNTS = {"0.5": 8, "1.0": 12, "2.0": 4}   # multiples of the global batch (4): nothing dropped
WORKER = os.path.join(os.path.dirname(__file__), "multihost_data_worker.py")
ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_hosts_same_buckets_disjoint_examples(tmp_path):
  data = tmp_path / "data"
  synthetic.write_synthetic_dataset(data, COUNTS, table=TABLE, text_dim=8, latent_channels=4,
                                    caption_tokens=(2, 10), long_caption_tokens=(12, 20),
                                    shard_size=7, seed=1)
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, WORKER, "epoch", str(data), str(tmp_path / f"h{i}.json"),
                             str(port), str(i), "2", "7"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  hosts = [json.loads((tmp_path / f"h{i}.json").read_text()) for i in range(2)]
  assert [h["process_index"] for h in hosts] == [0, 1]

  # Reference: the same pipeline in this single process (host-local numpy, whole global batch).
  ref = list(pipeline.make_train_iterator(data, global_batch_size=4, mesh=None, seed=7, num_epochs=1))
  assert len(ref) == hosts[0]["steps_per_epoch"] == 6
  assert len(hosts[0]["steps"]) == len(hosts[1]["steps"]) == 6
  covered = []
  for step, (a, b, r) in enumerate(zip(hosts[0]["steps"], hosts[1]["steps"], ref)):
    assert a["bucket"] == b["bucket"] == r["bucket"], f"step {step}: hosts took different buckets"
    assert len(a["index"]) == len(b["index"]) == 2
    assert not set(a["index"]) & set(b["index"]), f"step {step}: hosts share examples"
    assert sorted(a["index"] + b["index"]) == sorted(r["index"].tolist())
    sums = r["latents"].reshape(len(r["index"]), -1).sum(1, dtype=np.float64)   # as the workers
    ref_sums = {int(i): float(s) for i, s in zip(r["index"], sums)}
    for h in (a, b):
      for i, s in zip(h["index"], h["latent_sums"]):
        assert s == ref_sums[i]   # same example -> same noise and latent, whatever the host
    assert a["global_sum"] == b["global_sum"]   # a collective over the assembled global array
    np.testing.assert_allclose(a["global_sum"], sum(ref_sums.values()), rtol=1e-5)
    covered += a["index"] + b["index"]
  assert sorted(covered) == list(range(sum(COUNTS.values())))   # every example exactly once
