"""The train step on its own: what one update computes, gradient accumulation, caption dropout, precision,
the optimizer settings and the sharding of the whole train state."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pixart_jax.diffusion.losses import iddpm_loss
from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.models.config import get_preset
from pixart_jax.models.spec import ModelSpec
from pixart_jax.parallel.mesh import make_mesh
from pixart_jax.train import optimizers as opt
from pixart_jax.train import state as st
from pixart_jax.train import step as stp

from train_testlib import fast_compiles

B, S, DC = 4, 16, 32


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  with fast_compiles(tmp_path_factory.getbasetemp() / "xla_cache"):
    yield


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"latents": rng.standard_normal((B, 8, 8, 4)).astype(np.float32) * 0.5,
          "caption": rng.standard_normal((B, S, DC)).astype(np.float32),
          "mask": (np.arange(S)[None] < np.array([[3], [16], [7], [1]])).astype(np.int32)}


class Programs:
  """Compiled train steps of the tiny model (1 device), keyed by their settings; one shared initial state.

  Defaults: CAME (lr 1e-3, no warmup), EMA 0.9, caption dropout 0.1, no accumulation, fp32 compute."""

  def __init__(self):
    self.mesh = make_mesh([("data", -1)], devices=jax.devices()[:1])
    self._cache = {}
    tx, _ = self._tx()
    init_key, rng = st.split_key(0)
    spec = ModelSpec(get_preset("tiny"))
    self.graphdef, _ = spec.split()
    init = functools.partial(st.init_state, spec=spec, tx=tx, ema=True)
    self.shardings = st.shardings_of(jax.eval_shape(init, init_key, rng), self.mesh)
    state = jax.jit(init, out_shardings=self.shardings)(init_key, rng)
    self.initial = jax.tree.map(np.array, state)  # host copy

  @staticmethod
  def _tx():
    cfg = opt.OptimizerConfig.from_dict(dict(name="came", lr=1e-3, warmup=0, auto_lr="none"))
    return opt.make_optimizer(cfg, B)

  def state(self):
    return jax.device_put(self.initial, self.shardings)

  def get(self, *, dtype=jnp.float32, accum=1, dropout=0.1):
    key = (jnp.dtype(dtype).name, accum, dropout)
    if key not in self._cache:
      tx, lr_fn = self._tx()
      graphdef, _ = ModelSpec(get_preset("tiny"), dtype=dtype).split()
      step_cfg = stp.StepConfig(class_dropout_prob=dropout, grad_accum=accum, ema_rate=0.9)
      fn = stp.make_train_step(graphdef=graphdef, tx=tx, lr_schedule=lr_fn, cfg=step_cfg)
      bsh = NamedSharding(self.mesh, P("data"))
      self._cache[key] = stp.jit_train_step(fn, self.shardings, {k: bsh for k in ("latents", "caption", "mask")},
                                            self.mesh)
    return self._cache[key]

  def run(self, batches, null, state=None, **kw):
    """Steps over `batches` from the initial state -> (final state, [metrics as floats])."""
    jitted, state = self.get(**kw), state if state is not None else self.state()
    out = []
    with jax.set_mesh(self.mesh):
      for b in batches:
        state, m = jitted(state, b, null, ())
        out.append({k: float(v) for k, v in m.items()})
    return state, out


@pytest.fixture(scope="module")
def programs():
  return Programs()


def _leaves(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]  # copies: a zero-copy view would block donation


NULL = np.linspace(-1, 1, S * DC, dtype=np.float32).reshape(S, DC)


def test_one_step_computes_the_iddpm_update(programs):
  batch = _batch()
  state = programs.state()
  params0, ema0 = _leaves(state.params), _leaves(state.ema)
  start = jax.tree.map(np.array, state.params)
  old_leaf = jax.tree.leaves(state.params)[0]
  new, (m,) = programs.run([batch], NULL, state=state)
  assert old_leaf.is_deleted(), "the state must be donated"
  assert set(m) == set(stp.METRICS) and all(np.isfinite(list(m.values())))
  assert int(new.step) == 1 and m["lr"] == pytest.approx(1e-3)
  assert m["loss"] == pytest.approx(m["loss_mse"] + m["loss_vb"], rel=1e-6)
  # adaLN-zero: the final layer starts at zero, so only it receives a gradient on the first step.
  changed = [".".join(map(str, p)) for (p, _), a, b in zip(nnx.to_flat_state(new.params), params0,
                                                          _leaves(new.params)) if not np.array_equal(a, b)]
  assert changed == ["final.linear.bias", "final.linear.kernel"]
  ema1, params1 = _leaves(new.ema), _leaves(new.params)
  for e0, p1, e1 in zip(ema0, params1, ema1):   # ema = 0.9 ema + 0.1 params
    np.testing.assert_allclose(e1, 0.9 * e0 + 0.1 * p1, rtol=1e-6, atol=1e-7)
  newer, (m2,) = programs.run([_batch(9)], NULL, state=new)
  params2 = _leaves(newer.params)
  assert int(newer.step) == 2 and np.isfinite(m2["loss"])
  assert sum(not np.array_equal(a, b) for a, b in zip(params1, params2)) > len(params1) // 2
  for e1, p2, e2 in zip(ema1, params2, _leaves(newer.ema)):
    np.testing.assert_allclose(e2, 0.9 * e1 + 0.1 * p2, rtol=1e-6, atol=1e-7)
  assert m2["param_norm"] == pytest.approx(float(st.global_norm(newer.params)), rel=1e-5)

  # The same loss from first principles: the step's draws come from fold_in(rng, step) split three ways.
  @jax.jit
  def reference(params, latents, caption, mask):
    sched = DiffusionSchedule.linear()
    k_t, k_n, k_d = jax.random.split(jax.random.fold_in(st.split_key(0)[1], 0), 3)
    t = jax.random.randint(k_t, (B,), 0, 1000, dtype=jnp.int32)
    noise = jax.random.normal(k_n, latents.shape, jnp.float32)
    drop = jax.random.bernoulli(k_d, 0.1, (B,))
    x_t = sched.q_sample(latents, t, noise)
    caption = jnp.where(drop[:, None, None], jnp.asarray(NULL)[None], caption)
    out = nnx.merge(programs.graphdef, params)(x_t, t, caption, mask)
    return jax.tree.map(jnp.mean, iddpm_loss(out, latents, x_t, t, noise, schedule=sched))

  want = reference(start, batch["latents"], batch["caption"], batch["mask"])
  assert m["loss"] == pytest.approx(float(want["loss"]), rel=1e-5)
  assert m["loss_vb"] == pytest.approx(float(want["vb"]), rel=1e-4)


def test_grad_accumulation_equals_one_big_batch(programs):
  """K micro-batches only change the summation order: same losses and gradients (fp32 tolerance).

  Parameters are compared after the first update (only the final layer moves, with O(1) gradients); later CAME
  updates of parameters whose gradients are ~0 are sign-like (m / sqrt(instability)), so rounding-level
  gradient differences legitimately flip them — the second step's loss and gradient norm are compared instead.
  """
  b1, b2 = _batch(1), _batch(2)
  s1, m1 = programs.run([b1], NULL)
  s2, m2 = programs.run([b1], NULL, accum=2)
  for a, b in zip(_leaves(s1.params), _leaves(s2.params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  _, n1 = programs.run([b2], NULL, state=s1)
  _, n2 = programs.run([b2], NULL, state=s2, accum=2)
  for a, b in zip(m1 + n1, m2 + n2):
    for n in ("loss", "loss_mse", "loss_vb", "grad_norm"):
      assert b[n] == pytest.approx(a[n], rel=1e-5, abs=1e-7), n


def test_caption_dropout_swaps_in_the_null_caption(programs):
  """p = 1 trains on the null embedding (mask unchanged): identical to feeding null captions; the real captions
  give another loss. Compared on the third step: at init the final layer and the cross-attention output
  projections are zero (official init), so the caption reaches the output only after two updates."""
  batches = [_batch(3), _batch(4), _batch(5)]
  nulled = [dict(b, caption=np.broadcast_to(NULL, b["caption"].shape).copy()) for b in batches]
  _, dropped = programs.run(batches, NULL, dropout=1.0)
  _, fed = programs.run(nulled, NULL, dropout=1.0)
  _, fed_p01 = programs.run(nulled, NULL)    # p = 0.1 on null captions: dropping changes nothing
  _, real = programs.run(batches, NULL)
  assert dropped[2]["loss"] == pytest.approx(fed[2]["loss"], rel=1e-6)
  assert dropped[2]["loss"] == pytest.approx(fed_p01[2]["loss"], rel=1e-6)
  assert abs(real[2]["loss"] - fed_p01[2]["loss"]) > 1e-5


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights(programs):
  batches = [_batch(5), _batch(6)]
  s32, m32 = programs.run(batches, NULL)
  s16, m16 = programs.run(batches, NULL, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.opt_state) if x.ndim)
  assert np.isfinite(m16[1]["loss"]) and m16[1]["loss"] != m32[1]["loss"]
  assert m16[1]["loss"] == pytest.approx(m32[1]["loss"], rel=2e-2)


def test_learning_rate_rules_and_schedule():
  came = opt.OptimizerConfig()  # the Sigma recipe: CAME 2e-5 at batch 256, sqrt rule
  assert opt.scaled_lr(came, 64) == pytest.approx(1e-5)
  assert opt.scaled_lr(came, 1024) == pytest.approx(4e-5)
  lin = dataclasses.replace(came, auto_lr=opt.LrRule.LINEAR)
  assert opt.scaled_lr(lin, 64) == pytest.approx(5e-6)
  assert opt.scaled_lr(dataclasses.replace(came, auto_lr=opt.LrRule.NONE), 64) == pytest.approx(2e-5)
  sched = opt.constant_with_warmup(1.0, 10)  # diffusers get_constant_schedule_with_warmup
  assert [float(sched(k)) for k in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
  assert float(opt.constant_with_warmup(3.0, 0)(0)) == 3.0


def test_optimizer_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
    opt.OptimizerConfig.from_dict({"name": "sgd"})
  with pytest.raises(ValueError, match="came needs 3 betas"):
    opt.OptimizerConfig.from_dict({"name": "came", "betas": (0.9, 0.999)})
  with pytest.raises(ValueError, match=r"unknown optimizer settings \['momentum'\]"):
    opt.OptimizerConfig.from_dict({"name": "adamw", "betas": (0.9, 0.99), "eps": 1e-8, "momentum": 0.9})
  with pytest.raises(ValueError, match="unknown auto_lr rule"):
    opt.OptimizerConfig.from_dict({"auto_lr": "cubic"})
  with pytest.raises(ValueError, match="grad_accum"):
    stp.StepConfig(grad_accum=0)


def test_train_state_shardings_follow_the_parameters():
  """FSDP on 8 devices: optimizer moments, CAME's factored statistics and the EMA take their parameter's axes."""
  spec = ModelSpec(get_preset("tiny", hidden_size=64, num_heads=4))
  tx, _ = opt.make_optimizer(opt.OptimizerConfig(), 8)
  init = functools.partial(st.init_state, spec=spec, tx=tx, ema=True)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  abstract = jax.eval_shape(init, key, key)
  sh = st.shardings_of(abstract, make_mesh([("fsdp", -1)]))
  spec_of = lambda tree, *path: _get(tree, path).spec  # noqa: E731
  # fc1 kernel of the scanned MLP: (layers, embed, mlp) -> (None, fsdp, None)
  k = ("stages", 0, "mlp", "fc1", "kernel")
  assert spec_of(sh.params, *k) == P(None, "fsdp", None)
  assert spec_of(sh.ema, *k) == P(None, "fsdp", None)
  came_state = sh.opt_state[-1]
  assert spec_of(came_state.mu, *k) == P(None, "fsdp", None)
  nu = _get(came_state.nu, k)
  assert (nu.row_axis, nu.col_axis, nu.stacked) == (1, 2, 1)   # per-layer factoring, as came_pytorch
  assert nu.v_row.spec == P(None, "fsdp") and nu.v_col.spec == P(None, None)
  assert sh.step.spec == P() and sh.rng.spec == P()


def _get(tree, path):
  node = tree
  for p in path:
    node = node[p]
  return node.get_value() if isinstance(node, nnx.Variable) else node
