"""`train_and_evaluate` end to end on 8 fake CPU devices (FSDP), with the real Grain pipeline over a synthetic
dataset: determinism, exact resume (also after a truncated checkpoint and after SIGTERM), a run that learns,
non-finite losses, the locked config, and a topology change on resume."""
import dataclasses
import json
import logging
import pathlib
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

from pixart_jax.train import state as st
from pixart_jax.train.checkpoint import Checkpointer
from pixart_jax.train.loop import NonFiniteLossError, train_and_evaluate
from pixart_jax.train.metrics import read_jsonl

from train_testlib import cli_args, run_cli, smoke_config, subprocess_env


pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py: fast compiles, one cache


def _train(workdir, **overrides):
  return train_and_evaluate(smoke_config(**overrides), str(workdir))


def _host(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")}


def _assert_bitwise(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 4-step run (checkpoints at 3 and 4) and a 2-step run of the same config."""
  base = tmp_path_factory.mktemp("reference")
  full = _train(base / "full", steps=4)
  half = _train(base / "half", steps=2)
  return {"full": base / "full", "half": base / "half", "params": _host(full.state.params),
          "opt": _host(full.state.opt_state), "result": full, "half_result": half}


def test_run_writes_checkpoints_metrics_and_config(reference):
  wd, res = reference["full"], reference["result"]
  assert res.step == 4 and not res.preempted
  assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]
  records = read_jsonl(wd / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for key in ("loss", "loss_mse", "loss_vb", "grad_norm", "param_norm", "update_norm", "lr", "step_time",
              "examples_per_sec", "tflops_per_device", "mfu"):
    assert np.isfinite(records[-1][key]), key
  assert records[-1]["tflops_per_device"] > 0 and 0 < records[-1]["mfu"] < 1
  assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((wd / "config.json").read_text())["model"]["preset"] == "tiny"


def test_same_seed_gives_bitwise_identical_parameters(reference, tmp_path):
  again = _train(tmp_path / "again", steps=4)
  _assert_bitwise(_host(again.state.params), reference["params"])
  assert _losses(tmp_path / "again") == _losses(reference["full"])


def test_stop_and_resume_is_bitwise_identical(reference, tmp_path, caplog):
  """2 steps + stop + resume + 2 steps == 4 steps: parameters, optimizer state, losses (hence data order)."""
  wd = tmp_path / "resumed"
  shutil.copytree(reference["half"], wd)
  with caplog.at_level(logging.INFO, logger="pixart_jax.train.loop"):
    res = _train(wd, steps=4)
  assert "train state from checkpoint 2" in caplog.text
  _assert_bitwise(_host(res.state.params), reference["params"])
  _assert_bitwise(_host(res.state.opt_state), reference["opt"])
  assert _losses(wd) == _losses(reference["full"])


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(reference, tmp_path, caplog):
  wd = tmp_path / "truncated"
  shutil.copytree(reference["full"], wd)
  for p in (wd / "checkpoints" / "4" / "state").rglob("*"):
    if p.is_file():
      p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  with caplog.at_level(logging.INFO):
    res = _train(wd, steps=4)
  assert "checkpoint step 4" in caplog.text and "cannot be restored" in caplog.text
  assert "train state from checkpoint 3" in caplog.text
  _assert_bitwise(_host(res.state.params), reference["params"])
  assert (wd / "checkpoints" / "4.corrupt").is_dir() and (wd / "checkpoints" / "4").is_dir()


def test_convert_reads_the_newest_verified_checkpoint_and_never_moves_any(reference, tmp_path, caplog):
  """`convert --source WORKDIR` (convert.ours.open_workdir) checks the step's checksums.json: a newest step whose
  arrays differ from its checksums is skipped for the previous one (warning), none usable -> one
  CheckpointCorruptError naming the workdir; the workdir is never modified."""
  from pixart_jax.convert import ours
  from pixart_jax.train.checkpoint import CheckpointCorruptError

  wd = tmp_path / "wd"
  shutil.copytree(reference["full"], wd)
  intact = ours.open_workdir(wd)
  assert "step 4" in intact.name

  def spoil(step):
    path = wd / "checkpoints" / str(step) / "checksums.json"
    doc = json.loads(path.read_text())
    for sums in doc["items"].values():
      leaf = sorted(sums)[0]
      sums[leaf] = f"{int(sums[leaf], 16) ^ 1:016x}"
    path.write_text(json.dumps(doc))

  spoil(4)
  before = sorted(p.name for p in (wd / "checkpoints").iterdir())
  with caplog.at_level(logging.WARNING):
    fallback = ours.open_workdir(wd)
  assert "step 3" in fallback.name and "differ from the checksums" in caplog.text
  assert any(not np.array_equal(fallback.get(k), intact.get(k)) for k in intact.keys())  # really step 3's weights
  spoil(3)
  with pytest.raises(CheckpointCorruptError, match=r"no checkpoint of .*wd can be read: all 2 steps \[3, 4\]"):
    ours.open_workdir(wd)
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before


def test_loss_decreases_on_a_small_dataset(reference, tmp_path):
  """30 steps over 64 synthetic examples: the loss falls well below its start (mean of the last 5 steps)."""
  _train(tmp_path / "overfit", steps=30)
  losses = [v for _, v in sorted(_losses(tmp_path / "overfit").items())]
  assert len(losses) == 30 and losses[0] > 0.9
  assert np.mean(losses[-5:]) < 0.7 * losses[0], losses


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path):
  """From step 3 on the data is NaN: the run stops naming step 3, checkpoint 2 stays, no checkpoint 3."""
  wd = tmp_path / "nan"
  shutil.copytree(reference["half"], wd)
  manifest = wd / "synthetic_data" / "manifest.json"
  m = json.loads(manifest.read_text())
  m["encoders"]["scaling_factor"] = float("nan")
  manifest.write_text(json.dumps(m))
  with pytest.raises(NonFiniteLossError, match=r"at step 3: stopping without saving.*newest checkpoint is step 2"):
    _train(wd, steps=6, ckpt_every=1)
  assert Checkpointer(wd / "checkpoints").all_steps() == [2]
  assert max(_losses(wd)) == 2


def test_locked_config_rejects_a_typo(tmp_path, cache_dir):
  res = run_cli(cli_args(tmp_path / "typo", "--config.optimzer.lr=1"), subprocess_env(cache_dir, 8), timeout=120)
  assert res.returncode != 0
  assert "optimzer" in res.stderr and 'Did you mean "optimizer"' in res.stderr
  assert not (tmp_path / "typo").exists()


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_exact(tmp_path, cache_dir):
  """SIGTERM mid-run: the CLI saves a complete checkpoint at the step it reached and exits 0; resuming it in a
  new process and training 2 more steps equals an uninterrupted run, bitwise."""
  wd = tmp_path / "sigterm"
  env = subprocess_env(cache_dir, 8)
  proc = subprocess.Popen(cli_args(wd, "--config.steps=100000", "--config.ckpt_every=100000"), env=env,
                          cwd=pathlib.Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if "step 3:" in line:
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  log = "".join(lines) + out
  assert proc.returncode == 0, log[-3000:]
  steps = Checkpointer(wd / "checkpoints").all_steps()
  assert len(steps) == 1 and steps[0] >= 3, log[-3000:]
  stop = steps[0]
  assert f"stopping at step {stop}" in log
  assert (wd / "checkpoints" / str(stop) / "commit_success.txt").exists()

  res = run_cli(cli_args(wd, f"--config.steps={stop + 2}"), env)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"train state from checkpoint {stop}" in res.stderr
  ref = _train(tmp_path / "uninterrupted", steps=stop + 2)
  assert _losses(wd) == _losses(tmp_path / "uninterrupted")
  target = st.with_shardings(jax.eval_shape(lambda s: s, ref.state), jax.tree.map(lambda a: a.sharding, ref.state))
  restored = Checkpointer(wd / "checkpoints").restore(stop + 2, dataclasses.replace(target, ema=None))
  _assert_bitwise(_host(restored.state.params), _host(ref.state.params))


@pytest.mark.slow
def test_resume_on_a_smaller_mesh(reference, tmp_path, cache_dir):
  """Saved with FSDP over 8 devices, resumed by a process with 4 devices: training continues, same losses."""
  wd = tmp_path / "topology"
  shutil.copytree(reference["half"], wd)
  res = run_cli(cli_args(wd, "--config.steps=4"), subprocess_env(cache_dir, 4))
  assert res.returncode == 0, res.stderr[-3000:]
  assert "train state from checkpoint 2" in res.stderr and "'fsdp': 4" in res.stderr
  got, want = _losses(wd), _losses(reference["full"])
  assert sorted(got) == [1, 2, 3, 4] and Checkpointer(wd / "checkpoints").latest_step() == 4
  assert got[3] == pytest.approx(want[3], rel=1e-5)
  assert got[4] == pytest.approx(want[4], rel=1e-3)


@pytest.mark.slow
def test_sampling_grid_hook_writes_images(reference, tmp_path):
  """sample.every: prompts encoded once with a (tiny, random) pipeline's T5, DPM-Solver++ with CFG over the
  weights being trained, decoded by its VAE, written as PNG (and to TensorBoard) on process 0."""
  pytest.importorskip("diffusers")
  from PIL import Image

  from pixart_jax.testing import make_tiny_pipeline

  pipe = make_tiny_pipeline(tmp_path / "pipe", t5_dim=32, sample_size=8)
  _train(tmp_path / "sampled", steps=2, **{"sample.every": 2, "sample.pipeline": str(pipe), "sample.num_steps": 2,
                                           "sample.prompts": ("a cat", "a dog")})
  pngs = sorted((tmp_path / "sampled" / "samples").glob("*.png"))
  assert [p.name for p in pngs] == ["samples_00000002.png"]
  img = np.asarray(Image.open(pngs[0]))
  assert img.shape == (64, 128, 3) and img.dtype == np.uint8 and img.std() > 1


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A tiny model exported in the diffusers layout (the stand-in for released weights) and its parameters."""
  from pixart_jax.convert.dit import export_transformer
  from pixart_jax.models.config import get_preset
  from pixart_jax.models.dit import PixArtSigma

  model = PixArtSigma(get_preset("tiny"), rngs=nnx.Rngs(7))
  out = export_transformer(model, tmp_path_factory.mktemp("released") / "transformer")
  return out, {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_init_from_released_weights_then_the_checkpoint_wins(released, tmp_path, caplog):
  src, want = released
  wd = tmp_path / "finetune"
  with caplog.at_level(logging.INFO, logger="pixart_jax.train.loop"):
    res = _train(wd, steps=0, init_from=str(src))
  assert f"train state from init_from {src}" in caplog.text and res.step == 0
  got = {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(res.state.params)}
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="pixart_jax.train.loop"):
    _train(wd, steps=1, init_from=str(src))
    _train(wd, steps=2, init_from=str(src))
  assert "train state from checkpoint 1" in caplog.text  # resume order: workdir checkpoint before init_from


def test_init_from_into_kv_compression_uses_the_average_init(released, tmp_path):
  """Weak-to-strong: an uncompressed checkpoint into a KV-compressed model (layer 1): the new conv starts as a
  2x2 average (1/4, bias 0) with a fresh LayerNorm (1, 0); every other parameter is the checkpoint's."""
  src, want = released
  res = _train(tmp_path / "kv", steps=0, init_from=str(src), **{"model.overrides.kv_compress_layers": (1,)})
  got = {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(res.state.params)}
  expected_init = {"kernel": 0.25, "bias": 0.0, "norm_scale": 1.0, "norm_bias": 0.0}
  compress = [p for p in got if "compress" in p]
  assert sorted(p[-1] for p in compress) == sorted(expected_init)
  for p in compress:
    np.testing.assert_array_equal(got[p], np.full_like(got[p], expected_init[p[-1]]))
  for p, v in got.items():
    if "compress" in p:
      continue
    if p[0] == "stages":  # stage i of the compressed model holds layer i of the uncompressed stack
      np.testing.assert_array_equal(v, want[("stages", 0) + p[2:]][p[1]:p[1] + 1], err_msg=str(p))
    else:
      np.testing.assert_array_equal(v, want[p], err_msg=str(p))


@pytest.mark.slow
def test_two_buckets_compile_once_each(tmp_path, caplog):
  """Two aspect-ratio buckets: one AOT executable per bucket, compiled before step 1; the AOT executables
  accept only their own shape, so finishing the run means every batch went to its bucket's program."""
  with caplog.at_level(logging.INFO, logger="pixart_jax.train.loop"):
    res = _train(tmp_path / "buckets", steps=4, **{"data.synthetic_buckets": ((64, 64), (48, 96)),
                                                    "data.synthetic_examples": 16})
  compiled = [line for line in caplog.text.splitlines() if "compiled bucket" in line]
  assert len(compiled) == 2 and "latent 8x8" in compiled[0] + compiled[1] and "latent 6x12" in "".join(compiled)
  assert res.step == 4 and all(np.isfinite(v) for v in _losses(tmp_path / "buckets").values())


def test_recipes_are_runnable_documents():
  """Every recipe: its docstring holds its run command, the full and smoke configs cross the typed boundary."""
  import importlib.util

  from pixart_jax.parallel.mesh import resolve_axis_sizes
  from pixart_jax.train.loop import merged_rules, model_spec
  from pixart_jax.train.optimizers import OptimizerConfig, scaled_lr

  recipes = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("pixart_sigma_*.py"))
  assert [r.stem for r in recipes] == ["pixart_sigma_1024_ms", "pixart_sigma_1024_ms_kv", "pixart_sigma_256",
                                      "pixart_sigma_2k_ms", "pixart_sigma_2k_ms_kv", "pixart_sigma_512_ms"]
  for path in recipes:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert f"python -m pixart_jax.train --config configs/{path.name}" in module.__doc__
    assert f"configs/{path.name}:smoke" in module.__doc__
    for arg in (None, "smoke"):
      c = module.get_config(arg)
      dit = model_spec(c.model).cfg
      o = OptimizerConfig.from_dict(c.optimizer)
      resolve_axis_sizes(c.mesh, 8)
      assert c.data.batch_size % c.grad_accum == 0
      if arg is None:
        assert o.name.value == "came" and o.clip == 0.01 and c.class_dropout_prob == 0.1
        assert scaled_lr(o, 256) == pytest.approx(2e-5)  # the official lr is the lr at batch 256
        assert dit.kv_compress_layers == (tuple(range(14, 28)) if path.stem.endswith("_kv") else ())
      else:
        assert dit.depth == 2 and c.data.synthetic and c.init_from is None
  common = module.common  # pixart_jax.train.config_defaults, as the recipes import it
  with pytest.raises(ValueError, match="unknown config argument 'smok'"):
    common.parse_arg("smok", smoke=False)
  assert common.parse_arg("smoke,steps=5", smoke=False, steps=1).to_dict() == {"smoke": True, "steps": 5}
  with pytest.raises(ValueError, match="is not a int"):
    common.parse_arg("steps=five", steps=1)
  rules = dict(merged_rules((("embed", None), ("heads", ("tensor", "sequence")))))
  assert rules["embed"] is None and rules["heads"] == ("tensor", "sequence") and rules["mlp"] == "tensor"
