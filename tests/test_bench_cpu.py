"""The CPU bench scripts at toy sizes: their reports carry the numbers they claim (bench/RESULTS.md quotes them)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert r.stdout.startswith("CPU "), r.stdout[:300]  # the machine line comes first
  return r.stdout


@pytest.mark.slow
def test_bench_sampling_trims_captions_and_matches_diffusers():
  out = _run("bench_sampling.py", "--layers", "1", "--heads", "2", "--head-dim", "16", "--t5-dim", "16",
             "--steps", "3", "--runs", "1")
  tokens = int(re.search(r"captions trimmed to (\d+) tokens", out).group(1))
  assert tokens < 300
  assert "| JAX Pipeline, trim_captions=False |" in out and "all 300 caption positions: diffusers / JAX = " in out
  assert re.search(r"after compile: diffusers / JAX = \*\*\d+\.\d\dx\*\*", out)
  assert int(re.search(r"max \|uint8 JAX - diffusers\| = (\d+)", out).group(1)) <= 2


@pytest.mark.slow
def test_profile_cpu_categories_add_up():
  out = _run("profile_cpu.py", "--part", "profile", "--depth", "1", "--what", "fwd")
  rows = dict(re.findall(r"^\| ([^|]+?) \| [\d.]+ \| (\d+) % \|$", out, re.M))
  assert "YNNPACK dot" in rows and int(rows["YNNPACK dot"]) >= 20, out
  assert 97 <= sum(int(v) for v in rows.values()) <= 103, out
