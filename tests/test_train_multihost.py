"""Two local processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo collectives) train like one process
x 8 devices: the same FSDP mesh, the same global batches (each process feeds its own rows), the same losses."""
import pathlib
import subprocess

import numpy as np
import pytest

from pixart_jax.train.checkpoint import Checkpointer
from pixart_jax.train.loop import train_and_evaluate
from pixart_jax.train.metrics import read_jsonl

from train_testlib import ROOT, cli_args, fast_compiles, free_port, smoke_config, subprocess_env


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path_factory):
  cache = tmp_path_factory.getbasetemp() / "xla_cache"
  base = tmp_path_factory.mktemp("multihost")
  with fast_compiles(cache):
    train_and_evaluate(smoke_config(steps=4), str(base / "one"))
  want = {r["step"]: r["loss"] for r in read_jsonl(base / "one" / "metrics.jsonl")}

  wd, port = base / "two", free_port()
  env = subprocess_env(cache, 4)
  procs = [subprocess.Popen(
      cli_args(wd, "--config.steps=4", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, "\n".join(f"process {j}:\n{lg[-3000:]}" for j, lg in enumerate(logs))
  assert "process 1/2, 8 devices (4 local)" in logs[1]
  assert (wd / "checkpoints" / "4" / "data" / "process_1-of-2.json").exists()
  assert Checkpointer(wd / "checkpoints").latest_step() == 4
  got = {r["step"]: r["loss"] for r in read_jsonl(wd / "metrics.jsonl")}
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-5)
  assert not pathlib.Path(wd / "metrics.jsonl.1").exists()
