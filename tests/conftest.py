"""Test setup: 8 fake CPU devices, fp32 everywhere, deterministic XLA.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it at import time.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Start the backend now, with these 8 devices: code under test that sets XLA_FLAGS before jax starts (the `plan`
# CLI called in-process) would otherwise fix the device count of a pytest-xdist worker for all its later tests.
jax.devices()


import fcntl  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from train_testlib import fast_compiles, run_demo  # noqa: E402


@pytest.fixture(scope="session")
def trained_demo_dir(tmp_path_factory) -> pathlib.Path:
  """The full default demo (4,000 steps, ~5 min on 2 cores), trained ONCE per test run and shared read-only
  by every test that builds on a trained model (adherence, metrics, ControlNet, distillation).

  PIXART_TEST_DEMO_DIR names a finished demo workdir to reuse across sessions instead (for development);
  tests must never write into it.
  """
  reuse = os.environ.get("PIXART_TEST_DEMO_DIR")
  if reuse:
    work = pathlib.Path(reuse)
    assert (work / "demo_report.json").is_file(), f"PIXART_TEST_DEMO_DIR={reuse}: not a finished demo workdir"
    return work
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    work = tmp_path_factory.mktemp("trained_demo") / "demo"
    run_demo(work)
    return work
  # Under pytest-xdist every worker has its own session: the first to get here trains into a folder shared by
  # the workers of this run (the parent of their base temps), the others wait on the lock and reuse it.
  root = tmp_path_factory.getbasetemp().parent
  work = root / "trained_demo" / "demo"
  with open(root / "trained_demo.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not (work / "demo_report.json").is_file():
        if work.exists():  # a worker that died while training left it half-written
          shutil.rmtree(work)
        work.parent.mkdir(parents=True, exist_ok=True)
        run_demo(work)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return work


@pytest.fixture(scope="session")
def trained_demo(trained_demo_dir):
  """The shared demo run, reloaded (pixart_jax.demo.TrainedDemo: config, spec, EMA model, encoders, report)."""
  from pixart_jax.demo import load_trained

  return load_trained(trained_demo_dir)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """The session's persistent XLA compilation cache folder (`train_testlib.fast_compiles`, `subprocess_env`)."""
  return tmp_path_factory.getbasetemp() / "xla_cache"


@pytest.fixture(scope="module")
def compile_cache(cache_dir):
  """`fast_compiles(cache_dir)` for a whole test module: `pytestmark = pytest.mark.usefixtures("compile_cache")`."""
  with fast_compiles(cache_dir):
    yield
