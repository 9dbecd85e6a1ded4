"""Checkpointer: exact round trip of the train state (Variables, CAME statistics, EMA, data state, config),
restore onto another mesh, keep-N, and a truncated newest checkpoint falling back to the previous one."""
import dataclasses
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pixart_jax.models.config import get_preset
from pixart_jax.models.spec import ModelSpec
from pixart_jax.parallel.mesh import make_mesh
from pixart_jax.train import optimizers as opt
from pixart_jax.train import state as st
from pixart_jax.train.checkpoint import CheckpointMismatchError, Checkpointer, EmaMissingError

DATA_STATE = {"grain": {"next_index": 7}, "pipeline": {"global_batch_size": 8, "seed": 43}}


def _abstract(ema=True):
  spec = ModelSpec(get_preset("tiny", hidden_size=64, num_heads=4))
  tx, _ = opt.make_optimizer(opt.OptimizerConfig(), 8)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(functools.partial(st.init_state, spec=spec, tx=tx, ema=ema), key, key)


def _random_state(mesh, seed=0, ema=True):
  """A train state with random values in every leaf, placed with the mesh's shardings (no compilation)."""
  abstract = _abstract(ema)
  shardings = st.shardings_of(abstract, mesh)
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(abstract)
  values = [rng.integers(0, 1000, x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.integer)
            else rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
  return jax.device_put(jax.tree.unflatten(treedef, values), shardings), abstract, shardings


def _save(ckpt, step, state, config=None):
  ckpt.save(step, dataclasses.replace(state, ema=None), ema=state.ema, data=DATA_STATE,
            config=config or {"step": step})


def _targets(abstract, shardings):
  target = st.with_shardings(abstract, shardings)
  return dataclasses.replace(target, ema=None), target.ema


def _assert_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_onto_a_smaller_mesh(tmp_path):
  """Saved from FSDP over 8 devices, restored onto FSDP over 4: bitwise equal, laid out on the new mesh."""
  mesh8 = make_mesh([("fsdp", -1)])
  state, abstract, _ = _random_state(mesh8)
  ckpt = Checkpointer(tmp_path / "ck")
  _save(ckpt, 5, state, {"model": {"preset": "tiny"}})
  ckpt.wait()
  mesh4 = make_mesh([("fsdp", -1)], devices=jax.devices()[:4])
  shardings4 = st.shardings_of(abstract, mesh4)
  restored = Checkpointer(tmp_path / "ck").restore_latest(*_targets(abstract, shardings4))
  assert restored.step == 5 and restored.data == DATA_STATE and restored.config == {"model": {"preset": "tiny"}}
  got = dataclasses.replace(restored.state, ema=restored.ema)
  _assert_equal(got, state)
  kernel = got.params["stages"][0]["mlp"]["fc1"]["kernel"].get_value()
  assert kernel.sharding.mesh.devices.size == 4 and kernel.sharding.spec == P(None, "fsdp", None)
  assert len(kernel.addressable_shards) == 4


def test_keep_n_and_bytes_data_state(tmp_path):
  mesh = make_mesh([("data", -1)])
  state, abstract, shardings = _random_state(mesh, ema=False)
  ckpt = Checkpointer(tmp_path / "ck", keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, data=b"\x00grain-bytes\xff", config={})
  assert not ckpt.save(3, state, config={}), "an existing step is not written twice"
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  restored = ckpt.restore(3, *_targets(abstract, shardings))
  assert restored.data == b"\x00grain-bytes\xff" and restored.ema is None
  _assert_equal(restored.state, state)


def _truncate(step_dir: pathlib.Path) -> int:
  """Cuts every file of the step's `state` item to half its size (an interrupted copy); returns the count."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 1]
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  return len(files)


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
  mesh = make_mesh([("data", -1)])
  s1, abstract, shardings = _random_state(mesh, seed=1)
  s2, _, _ = _random_state(mesh, seed=2)
  ckpt = Checkpointer(tmp_path / "ck", keep=3)
  _save(ckpt, 10, s1)
  _save(ckpt, 20, s2)
  ckpt.wait()
  assert _truncate(tmp_path / "ck" / "20") > 0
  ckpt = Checkpointer(tmp_path / "ck", keep=3)
  with caplog.at_level(logging.WARNING, logger="pixart_jax.train.checkpoint"):
    restored = ckpt.restore_latest(*_targets(abstract, shardings))
  assert restored.step == 10
  _assert_equal(dataclasses.replace(restored.state, ema=restored.ema), s1)
  text = caplog.text
  assert "checkpoint step 20" in text and "cannot be restored" in text and "resuming from checkpoint step 10" in text
  assert (tmp_path / "ck" / "20.corrupt").is_dir() and ckpt.all_steps() == [10]
  _save(ckpt, 20, s2)  # the step can be written again
  ckpt.wait()
  assert ckpt.all_steps() == [10, 20]


def test_a_checkpoint_of_another_model_is_an_error_not_corruption(tmp_path):
  """A readable checkpoint that does not fit the run (another model width) raises at once, naming the leaves;
  nothing is moved aside."""
  mesh = make_mesh([("data", -1)])
  state, _, _ = _random_state(mesh)
  ckpt = Checkpointer(tmp_path / "ck")
  _save(ckpt, 3, state)
  ckpt.wait()
  spec = ModelSpec(get_preset("tiny", hidden_size=32, num_heads=4))
  tx, _ = opt.make_optimizer(opt.OptimizerConfig(), 8)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  other = jax.eval_shape(functools.partial(st.init_state, spec=spec, tx=tx, ema=True), key, key)
  with pytest.raises(CheckpointMismatchError, match=r"step 3 \(state\) does not fit this run") as e:
    Checkpointer(tmp_path / "ck").restore_latest(*_targets(other, st.shardings_of(other, mesh)))
  assert "params.caption.mlp.fc1.kernel: saved (32, 64), this run (32, 32)" in str(e.value)
  assert (tmp_path / "ck" / "3").is_dir() and not list((tmp_path / "ck").glob("*.corrupt*"))


def test_ema_required_but_absent_is_a_clear_error(tmp_path):
  mesh = make_mesh([("data", -1)])
  state, abstract, shardings = _random_state(mesh, ema=False)
  ckpt = Checkpointer(tmp_path / "ck")
  ckpt.save(1, state, config={})
  ckpt.wait()
  with_ema = _abstract(ema=True)
  target, ema_target = _targets(with_ema, st.shardings_of(with_ema, mesh))
  with pytest.raises(EmaMissingError, match="has no EMA but this run keeps one"):
    ckpt.restore(1, target, ema_target)


def _flip_a_bit(step_dir: pathlib.Path) -> pathlib.Path:
  """Flips one bit in the middle of the largest data file of the step's `state` item (the file still parses)."""
  f = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0x10
  f.write_bytes(bytes(b))
  return f


def test_flipped_bits_are_detected_and_the_previous_step_restored(tmp_path, caplog):
  """A bit flip in the array data restores without error in Orbax; the checksums written at save time catch it:
  the step is moved aside like a truncated one and the previous step restores bitwise."""
  mesh = make_mesh([("data", -1)])
  s1, abstract, shardings = _random_state(mesh, seed=1)
  s2, _, _ = _random_state(mesh, seed=2)
  ckpt = Checkpointer(tmp_path / "ck", keep=3)
  _save(ckpt, 10, s1)
  _save(ckpt, 20, s2)
  ckpt.close()
  assert (tmp_path / "ck" / "10" / "checksums.json").is_file() and (tmp_path / "ck" / "20" / "checksums.json").is_file()
  _flip_a_bit(tmp_path / "ck" / "20")
  ckpt = Checkpointer(tmp_path / "ck", keep=3)
  with caplog.at_level(logging.WARNING, logger="pixart_jax.train.checkpoint"):
    restored = ckpt.restore_latest(*_targets(abstract, shardings))
  assert restored.step == 10
  _assert_equal(dataclasses.replace(restored.state, ema=restored.ema), s1)
  assert "checkpoint step 20" in caplog.text and "CheckpointCorruptError" in caplog.text
  assert "differ from the checksums written when it was saved" in caplog.text
  assert (tmp_path / "ck" / "20.corrupt").is_dir() and ckpt.all_steps() == [10]


def test_checksums_do_not_depend_on_the_mesh(tmp_path):
  """Saved from FSDP over 8 devices, verified after a restore onto 2 devices (no corruption reported)."""
  mesh8 = make_mesh([("fsdp", -1)])
  state, abstract, _ = _random_state(mesh8, seed=3)
  ckpt = Checkpointer(tmp_path / "ck")
  _save(ckpt, 4, state)
  ckpt.wait()
  mesh2 = make_mesh([("fsdp", -1)], devices=jax.devices()[:2])
  restored = Checkpointer(tmp_path / "ck").restore(4, *_targets(abstract, st.shardings_of(abstract, mesh2)))
  _assert_equal(dataclasses.replace(restored.state, ema=restored.ema), state)
  from pixart_jax.train.checkpoint import tree_digests
  assert tree_digests(restored.state) == tree_digests(dataclasses.replace(state, ema=None))


def test_every_checkpoint_corrupt_is_one_clear_error(tmp_path):
  """No step restores: CheckpointCorruptError (a ValueError: one line from the CLIs) naming the directory and the
  steps; nothing is moved aside."""
  from pixart_jax.train.checkpoint import CheckpointCorruptError
  mesh = make_mesh([("data", -1)])
  s1, abstract, shardings = _random_state(mesh, seed=1)
  ckpt = Checkpointer(tmp_path / "ck")
  _save(ckpt, 1, s1)
  _save(ckpt, 2, s1)
  ckpt.close()
  _flip_a_bit(tmp_path / "ck" / "2")
  _truncate(tmp_path / "ck" / "1")
  with pytest.raises(CheckpointCorruptError, match=rf"no checkpoint in {tmp_path / 'ck'} can be restored: all 2 "
                     r"\(steps \[1, 2\]\) are corrupt or unreadable; the newest, step 2, failed with "
                     r"CheckpointCorruptError"):
    Checkpointer(tmp_path / "ck").restore_latest(*_targets(abstract, shardings))
  assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "2"]
