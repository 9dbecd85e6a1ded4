"""ControlNet training on the existing trainer (`config.controlnet.blocks`): only the branch is trained and
checkpointed, the base stays the init_from weights, the branch is exported in the official layout and loads back,
a run resumes from its branch checkpoint; and the measured target on the embedded demo."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from pixart_jax import demo, demo_controlnet
from pixart_jax.convert.controlnet_keys import load_controlnet
from pixart_jax.convert.orbax_io import save_transformer_orbax
from pixart_jax.train import trainables
from pixart_jax.train.loop import model_spec, train_and_evaluate
from pixart_jax.train.trainables.controlnet import EXPORT, ControlNetTrainable
from train_testlib import fast_compiles


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A random demo-sized base model (saved like a converted checkpoint), then 3 ControlNet steps on it with
  blurred-digit controls of 64 digits."""
  work = tmp_path_factory.mktemp("cn")
  enc = demo.build_encoders(work, 0)

  class Trained:  # the parts of demo.TrainedDemo that demo_controlnet uses
    workdir, encoders, report = work, enc, {"seed": 0}

  data = demo_controlnet.prepare_control_data(Trained, work / "data", np.arange(64))
  spec = model_spec(demo.train_config(str(data), steps=1, batch=16, seed=0).model)
  base = spec.build(nnx.Rngs(5))
  for _, v in nnx.to_flat_state(nnx.state(base, nnx.Param)):  # no zero-init layers (they would block gradients)
    x = v.get_value()
    v.set_value(x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype))
  base_dir = save_transformer_orbax(base, work / "base")
  cfg = demo_controlnet.train_config(Trained, data, steps=3, batch=16)
  cfg.init_from = str(base_dir)
  with fast_compiles(work / "xla_cache"):
    result = train_and_evaluate(cfg, str(work / "cn"))
  return work, Trained, data, cfg, result, base


@pytest.mark.slow  # a tiny training run and its resumption (compiles dominate)
def test_only_the_branch_trains_and_is_checkpointed(runs):
  work, _, _, cfg, result, base = runs
  params = nnx.to_flat_state(result.state.params)
  assert {p[0] for p, _ in params} == {"blocks", "before_proj", "after_proj"}  # no base weight in the state
  after = np.asarray(result.state.params["after_proj"][1]["kernel"][...])
  assert np.abs(after).max() > 0  # the zero-initialised projections moved
  saved = json.loads((work / "cn" / "config.json").read_text())
  assert saved["controlnet"]["blocks"] == 2 and saved["class_dropout_prob"] == 1.0
  # the exported branch loads strictly onto the (unchanged) base and equals the trained params
  model = load_controlnet(work / "cn" / EXPORT, base=base)
  for (p, v), (q, w) in zip(nnx.to_flat_state(nnx.state(model.controlnet, nnx.Param)), params):
    assert p == q
    np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(jax.device_get(w.get_value())))


@pytest.mark.slow
def test_resumes_from_the_branch_checkpoint_and_refuses_bad_setups(runs, caplog):
  work, trained, data, cfg, result, _ = runs
  cfg.steps = 4
  with caplog.at_level("INFO", logger="pixart_jax"), fast_compiles(work / "xla_cache"):
    again = train_and_evaluate(cfg, str(work / "cn"))
  assert again.step == 4 and "checkpoint 3 (ControlNet)" in caplog.text
  assert isinstance(trainables.select(cfg, model_spec(cfg.model)), ControlNetTrainable)
  bad = demo_controlnet.train_config(trained, data, steps=1)
  bad.controlnet.blocks = 4
  with pytest.raises(ValueError, match=r"controlnet.blocks must lie in \[1, 3\]"):
    trainables.select(bad, model_spec(bad.model))
  bad = demo_controlnet.train_config(trained, data, steps=1)
  bad.init_from = None
  with pytest.raises(ValueError, match="needs config.init_from"):
    trainables.select(bad, model_spec(bad.model))
  plain = demo.train_config(str(work / "plain"), steps=1, batch=16, seed=0)
  from pixart_jax.data.prepare_lib import PrepareOptions, prepare
  from pixart_jax.data import demo as demo_data
  from pixart_jax.data.sources import Subset
  prepare(Subset(demo_data.DigitsSource(), list(range(16))), trained.encoders, str(work / "plain"), progress=False,
          options=PrepareOptions(table={"1.00": (8, 8)}, min_side=8, resample="nearest", batch_size=16))
  plain.init_from, plain.controlnet.blocks = cfg.init_from, 2
  with pytest.raises(ValueError, match="has no control per example"):
    train_and_evaluate(plain, str(work / "cn_plain"))


@pytest.mark.slow  # ControlNet training on the shared trained demo: < 5 min of CPU training (asserted)
def test_demo_controlnet_follows_the_control(trained_demo, tmp_path):
  import time

  train_idx, eval_idx = demo_controlnet.split()
  data = demo_controlnet.prepare_control_data(trained_demo, tmp_path / "data", train_idx)
  t0 = time.perf_counter()
  branch = demo_controlnet.train_control(trained_demo, data, tmp_path / "cn", steps=demo_controlnet.DEMO_STEPS)
  train_s = time.perf_counter() - t0
  report = demo_controlnet.measure(trained_demo, branch, eval_idx)
  print({k: v for k, v in report.items() if k not in ("images", "labels")}, f"train {train_s:.0f}s")
  assert train_s < 300, train_s
  assert report["controlnet_adherence"] >= 0.9, report["controlnet_adherence"]
  assert report["base_adherence"] <= 0.3, report["base_adherence"]  # the empty caption alone: ~10 %


def test_config_refuses_a_bad_block_count():
  from pixart_jax.train.config_defaults import check_config

  c = demo.train_config("/nowhere", steps=1, batch=16, seed=0)
  c.controlnet.blocks = 0
  with pytest.raises(ValueError, match="controlnet.blocks must be a positive integer"):
    check_config(c)
  c.controlnet.blocks = None
  check_config(c)
  assert not ControlNetTrainable.wanted(c)
