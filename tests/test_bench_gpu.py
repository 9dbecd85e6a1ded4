"""bench/gpu/run.sh --dry: the GPU benchmark's whole script (wheel check, every part in its own process, the
report) at toy sizes on the CPU, so the prepared GPU run does not first fail on a GPU machine."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_sh_dry(tmp_path):
  out = tmp_path / "gpu.md"
  env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([str(ROOT / "bench" / "gpu" / "run.sh"), "--dry", "--out", str(out)], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  text = out.read_text()
  assert text.startswith("# GPU benchmark (DRY RUN")
  assert "failed" not in text, text
  for needle in ("| none |", "| dots |", "pixart_jax Pipeline", "| diffusers |", "diffusers / ours = **",
                 "| 512x512 | 2 |", "deep half, ave", "Command: `bench/gpu/run.sh --dry`"):
    assert needle in text, (needle, text)


def test_run_sh_refuses_without_gpu_or_wheels(tmp_path):
  """Not --dry on a machine without a GPU: one error line, exit 1, before any work."""
  env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([str(ROOT / "bench" / "gpu" / "run.sh"), "--out", str(tmp_path / "gpu.md")],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 1 and "error: no GPU visible to JAX (cpu)" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "gpu.md").exists()
