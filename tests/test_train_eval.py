"""Metrics during training (`eval.every`): FID / CLIP score written to the metrics JSONL (and TensorBoard) at the
configured steps, the best checkpoint by the chosen metric, the config checks."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from pixart_jax.train.checkpoint import Checkpointer
from pixart_jax.train.config_defaults import check_config
from pixart_jax.train.loop import train_and_evaluate
from pixart_jax.train.metrics import read_jsonl
from train_testlib import fast_compiles, smoke_config


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  with fast_compiles(tmp_path_factory.getbasetemp() / "xla_cache"):
    yield


def _param_sum(params) -> float:
  return float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(params)))


def _eval_records(workdir):
  return [r for r in read_jsonl(workdir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


_PLACEHOLDERS = {"eval.pipeline": "unused", "eval.inception": "unused.pth", "eval.ref_stats": "unused.npz"}


def test_eval_hook_runs_at_the_configured_steps_and_keeps_the_best(tmp_path):
  """The loop calls the evaluation every `eval.every` steps with the weights being trained, logs what it returns
  and keeps the best state by `eval.best_metric` (an injected EvalFn: the wiring, without networks)."""
  calls, sums = [], {}

  def fake_eval(params, step):
    calls.append(step)
    sums[step] = _param_sum(params)
    return {"eval/fid": {2: 5.0, 4: 3.0, 6: 4.0}[step], "eval/clip_score": float(step)}

  wd = tmp_path / "run"
  train_and_evaluate(smoke_config(steps=6, **{"eval.every": 2, **_PLACEHOLDERS}), str(wd), eval_fn=fake_eval)
  assert calls == [2, 4, 6]
  got = {r["step"]: r["eval/fid"] for r in _eval_records(wd)}
  assert got == {2: 5.0, 4: 3.0, 6: 4.0}
  assert json.loads((wd / "best" / "best.json").read_text()) == {"metric": "fid", "value": 3.0, "step": 4}
  assert Checkpointer(wd / "best" / "checkpoints").all_steps() == [4]
  assert (wd / "tensorboard").is_dir()
  # the best directory reads like a workdir and holds the weights evaluated at step 4, not the last ones
  from pixart_jax.convert.ours import load_ours
  from pixart_jax.train.loop import model_spec

  best = _param_sum(nnx.state(load_ours(wd / "best", model_spec(smoke_config().model)), nnx.Param))
  assert best == pytest.approx(sums[4], rel=1e-9) and best != pytest.approx(sums[6], rel=1e-9)


def test_eval_config_is_checked():
  good = dict(_PLACEHOLDERS, **{"eval.every": 2})
  check_config(smoke_config(**good))
  for bad, message in (({"eval.inception": None}, "eval.inception"), ({"eval.ref_stats": None}, "eval.ref_stats"),
                       ({"eval.best_metric": "loss"}, "eval.best_metric"),
                       ({"eval.best_metric": "clip_score"}, "needs eval.clip"),
                       ({"eval.num": 0}, "eval.num"), ({"eval.every": -1}, "eval.every"),
                       ({"eval.prompts": ()}, "eval.prompts")):
    with pytest.raises(ValueError, match=message):
      check_config(smoke_config(**{**good, **bad}))


@pytest.mark.slow
def test_in_training_eval_writes_fid_and_clip_score(tmp_path):
  """Smoke: the real evaluation (tiny random pipeline T5 + VAE, pytorch-fid Inception .pth, CLIPModel dir, reference
  statistics from `evaluate stats`) at steps 2 and 4 of a 4-step run; the best checkpoint is the lower FID's."""
  from PIL import Image

  from pixart_jax.evaluate import main as evaluate_main
  from pixart_jax.testing import make_tiny_pipeline
  from test_evaluate import write_tiny_clip, write_tiny_inception

  pipe = make_tiny_pipeline(tmp_path / "pipe", t5_dim=32, sample_size=8)
  write_tiny_inception(tmp_path / "inception.pth")
  write_tiny_clip(tmp_path / "clip")
  (tmp_path / "ref").mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
  evaluate_main(["stats", "--images", str(tmp_path / "ref"), "--inception", str(tmp_path / "inception.pth"),
                 "--out", str(tmp_path / "ref.npz")])
  wd = tmp_path / "run"
  train_and_evaluate(smoke_config(steps=4, **{
      "eval.every": 2, "eval.pipeline": str(pipe), "eval.inception": str(tmp_path / "inception.pth"),
      "eval.ref_stats": str(tmp_path / "ref.npz"), "eval.clip": str(tmp_path / "clip"), "eval.num": 4,
      "eval.batch_size": 2, "eval.num_steps": 2, "eval.prompts": ("a cat", "the cat at the mat", "a red car")}),
      str(wd))
  records = _eval_records(wd)
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    assert set(r) == {"step", "time", "eval/fid", "eval/clip_score"}
    assert np.isfinite(r["eval/fid"]) and r["eval/fid"] > 0 and np.isfinite(r["eval/clip_score"])
  best = json.loads((wd / "best" / "best.json").read_text())
  want = min(records, key=lambda r: r["eval/fid"])
  assert best == {"metric": "fid", "value": want["eval/fid"], "step": want["step"]}
  assert Checkpointer(wd / "best" / "checkpoints").all_steps() == [want["step"]]
