"""Helper process for the data-pipeline tests (not a test module).

  python tests/multihost_data_worker.py epoch  DATA OUT.json PORT PROCESS_ID NUM_PROCESSES SEED
      one process of a multi-process CPU "cluster" (2 devices each, gloo collectives): iterates one
      epoch of global batches on a mesh over all processes' devices and dumps, per step, the bucket,
      the example ids this process holds, their latent sums and the global latent sum (a collective).
  python tests/multihost_data_worker.py resume DATA CKPT_DIR OUT.npz N GLOBAL_BATCH SEED
      restores the pipeline state from the latest Orbax checkpoint in CKPT_DIR and saves the next N
      batches (8 CPU devices, data x fsdp mesh).
"""
import json
import os
import sys

MODE = sys.argv[1]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           + ("2" if MODE == "epoch" else "8"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pixart_jax.data import pipeline  # noqa: E402
from pixart_jax.parallel.mesh import make_mesh  # noqa: E402


def local_rows(arr):
  """(global row ids, local data) of the rows this process holds, sorted by row."""
  shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, data, seen = [], [], set()
  for s in shards:
    start = s.index[0].start or 0
    if start in seen:
      continue
    seen.add(start)
    d = np.asarray(s.data)
    rows.extend(range(start, start + d.shape[0]))
    data.append(d)
  return rows, np.concatenate(data)


def epoch(data_dir, out, port, pid, n, seed):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(n),
                             process_id=int(pid))
  assert jax.process_count() == int(n) and len(jax.devices()) == 2 * int(n)
  mesh = make_mesh((("data", -1),))
  it = pipeline.make_train_iterator(data_dir, global_batch_size=2 * int(n), mesh=mesh,
                                    seed=int(seed), num_epochs=1)
  total = jax.jit(lambda x: x.sum())
  steps = []
  for batch in it:
    _, ids = local_rows(batch["index"])
    _, lat = local_rows(batch["latents"])
    steps.append({"bucket": batch["bucket"], "step": batch["step"], "index": ids.tolist(),
                  "latent_sums": lat.reshape(len(ids), -1).sum(1, dtype=np.float64).tolist(),
                  "global_sum": float(total(batch["latents"]))})
  with open(out, "w") as f:
    json.dump({"process_index": jax.process_index(), "steps": steps,
               "steps_per_epoch": it.steps_per_epoch}, f)


def resume(data_dir, ckpt_dir, out, n, global_batch, seed):
  import grain
  import orbax.checkpoint as ocp
  mesh = make_mesh((("data", 2), ("fsdp", -1)))
  it = pipeline.make_train_iterator(data_dir, global_batch_size=int(global_batch), mesh=mesh,
                                    seed=int(seed))
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("iter",))
  mngr.restore(mngr.latest_step(), args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(it)))
  arrays = {}
  for i in range(int(n)):
    b = next(it)
    for k in pipeline.BATCH_KEYS:
      arrays[f"{i}_{k}"] = np.asarray(b[k]).astype(np.float32) if k == "caption" else np.asarray(b[k])
    arrays[f"{i}_bucket"] = np.asarray(b["bucket"])
  np.savez(out, **arrays)


if __name__ == "__main__":
  {"epoch": epoch, "resume": resume}[MODE](*sys.argv[2:])
