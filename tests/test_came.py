"""CAME (pixart_jax.train.came) against came_pytorch.CAME, 20 steps, fp32, relative error <= 1e-6."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from came_pytorch import CAME
from flax import nnx

from pixart_jax.parallel import sharding
from pixart_jax.train.came import CameLeafState, FactorSpec, came, torch_layout_factored_dims

STEPS = 20
TOL = 1e-6
LR = 3e-2


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _grad_seq(shapes: dict, seed: int, steps: int = STEPS, layer_scaled: tuple = ()):
  """Random gradients with a random global scale per step (and per layer for `layer_scaled` keys)."""
  rng = np.random.default_rng(seed)
  seq = []
  for _ in range(steps):
    g = {}
    for k, s in shapes.items():
      x = rng.standard_normal(s) * np.exp(rng.uniform(-3, 3))
      if k in layer_scaled:  # independent scale per leading (layer) index
        x = x * np.exp(rng.uniform(-3, 3, size=(s[0],) + (1,) * (len(s) - 1)))
      g[k] = x.astype(np.float32)
    seq.append(g)
  return seq


def _torch_run(p0: dict, grads: list, weight_decay: float, lr_fn=None):
  """came_pytorch over the dict of numpy params; returns final params and per-param state."""
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
  opt = CAME(list(tp.values()), lr=LR, weight_decay=weight_decay)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn) if lr_fn is not None else None
  for g in grads:
    for k, p in tp.items():
      p.grad = torch.tensor(g[k])
    opt.step()
    if sched is not None:
      sched.step()
  params = {k: p.detach().numpy().copy() for k, p in tp.items()}
  state = {k: {n: v.numpy().copy() for n, v in opt.state[p].items() if torch.is_tensor(v)}
           for k, p in tp.items()}
  return params, state


def _jax_run(tx, params, grads: list, to_grads=lambda g: g):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    upd, state = step(to_grads(jax.tree.map(jnp.asarray, g)), state, params)
    params = optax.apply_updates(params, upd)
  return params, state


def _check_leaf_state(ls: CameLeafState, ts: dict, mu, transpose=False):
  """Compares one leaf's JAX state with came_pytorch's (rows/cols swap roles when transposed)."""
  assert _rel(mu.T if transpose else mu, ts["exp_avg"]) <= TOL
  if ls.row_axis is None:
    assert _rel(ls.v, ts["exp_avg_sq"]) <= TOL
    return
  pairs = [("v_row", "exp_avg_sq_row"), ("v_col", "exp_avg_sq_col"),
           ("r_row", "exp_avg_res_row"), ("r_col", "exp_avg_res_col")]
  swap = {"row": "col", "col": "row"}
  for ours, theirs in pairs:
    if transpose:
      theirs = theirs[:-3] + swap[theirs[-3:]]
    err = _rel(getattr(ls, ours), ts[theirs])
    assert err <= TOL, (ours, theirs, err)


# Same tensor layout on both sides: 1-D, 2-D of several shapes, an unstacked 3-D and a 4-D tensor.
SAME_LAYOUT = {"bias": (7,), "w53": (5, 3), "w38": (3, 8), "w66": (6, 6), "t3": (2, 3, 4),
               "conv": (4, 3, 2, 2)}


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_matches_came_pytorch_same_layout(weight_decay):
  rng = np.random.default_rng(0)
  p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SAME_LAYOUT.items()}
  grads = _grad_seq(SAME_LAYOUT, seed=1)
  tparams, tstate = _torch_run(p0, grads, weight_decay)
  jparams, jstate = _jax_run(came(LR, weight_decay=weight_decay), jax.tree.map(jnp.asarray, p0), grads)
  assert int(jstate.count) == STEPS
  for k in SAME_LAYOUT:
    assert _rel(jparams[k], tparams[k]) <= TOL, k
    assert _rel(jparams[k] - p0[k], tparams[k] - p0[k]) <= 1e-5, k  # the change itself
    _check_leaf_state(jstate.nu[k], tstate[k], jstate.mu[k])


def test_with_schedule_and_weight_decay():
  """An optax schedule (linear warmup from 0) = torch LambdaLR; the lr also scales weight decay."""
  shapes = {"b": (9,), "w": (6, 4)}
  sched = optax.linear_schedule(0.0, LR, transition_steps=8)
  rng = np.random.default_rng(2)
  p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = _grad_seq(shapes, seed=3)
  tparams, tstate = _torch_run(p0, grads, 0.3, lr_fn=lambda k: min(k / 8, 1.0))
  jparams, jstate = _jax_run(came(sched, weight_decay=0.3), jax.tree.map(jnp.asarray, p0), grads)
  for k in shapes:
    assert _rel(jparams[k], tparams[k]) <= TOL, k
    _check_leaf_state(jstate.nu[k], tstate[k], jstate.mu[k])
  # A constant lr gives a clearly different trajectory (the schedule is really used).
  cparams, _ = _jax_run(came(LR, weight_decay=0.3), jax.tree.map(jnp.asarray, p0), grads)
  assert _rel(cparams["w"], tparams["w"]) > 1e-3


def test_flax_kernel_is_transposed_torch_linear():
  """Flax (in, out) kernel, default factoring == came_pytorch on the torch (out, in) weight, transposed."""
  shapes = {"k": (5, 9), "sq": (8, 8)}
  rng = np.random.default_rng(4)
  p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = _grad_seq(shapes, seed=5)
  tp0 = {k: v.T.copy() for k, v in p0.items()}
  tgrads = [{k: v.T.copy() for k, v in g.items()} for g in grads]
  tparams, tstate = _torch_run(tp0, tgrads, 0.05)
  jparams, jstate = _jax_run(came(LR, weight_decay=0.05), jax.tree.map(jnp.asarray, p0), grads)
  for k in shapes:
    assert _rel(jparams[k], tparams[k].T) <= TOL, k
    _check_leaf_state(jstate.nu[k], tstate[k], jstate.mu[k], transpose=True)


def test_flax_conv_kernel_torch_layout():
  """Flax (kh, kw, I, O) with torch_layout_factored_dims == came_pytorch on torch (O, I, kh, kw)."""
  shapes = {"conv": (2, 3, 5, 4), "k": (5, 4), "b": (4,)}
  rng = np.random.default_rng(6)
  p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = _grad_seq(shapes, seed=7)
  to_torch = {"conv": lambda x: x.transpose(3, 2, 0, 1).copy(), "k": lambda x: x.T.copy(),
              "b": lambda x: x}
  tparams, _ = _torch_run({k: to_torch[k](v) for k, v in p0.items()},
                          [{k: to_torch[k](v) for k, v in g.items()} for g in grads], 0.0)
  specs = torch_layout_factored_dims(p0)
  assert specs == {"conv": FactorSpec((0, 1), 0), "k": FactorSpec((0, 1), 0), "b": FactorSpec(None, 0)}
  jparams, jstate = _jax_run(came(LR, factored_dims=torch_layout_factored_dims),
                             jax.tree.map(jnp.asarray, p0), grads)
  for k in shapes:
    assert _rel(to_torch[k](np.asarray(jparams[k])), tparams[k]) <= TOL, k
  assert jstate.nu["conv"].v_row.shape == (2, 5, 4)  # factored over (kh, kw): stats keep (I, O)
  # The default (factor over the Flax last two dims, I and O) is numerically different.
  dparams, _ = _jax_run(came(LR), jax.tree.map(jnp.asarray, p0), grads)
  assert _rel(to_torch["conv"](np.asarray(dparams["conv"])), tparams["conv"]) > 1e-4


class _Stacked(nnx.Module):
  """Scanned-style parameters: a leading `layers` axis on every leaf."""

  def __init__(self, L, rngs):
    init = nnx.initializers.normal(1.0)
    names = ("layers", "embed", "mlp")
    self.kernel = nnx.Param(sharding.param_init(init, names)(rngs.params(), (L, 6, 4)))
    self.bias = nnx.Param(sharding.param_init(init, ("layers", "mlp"))(rngs.params(), (L, 4)))
    self.conv = nnx.Param(sharding.param_init(init, ("layers", None, None, "conv_in", "conv_out"))(
        rngs.params(), (L, 2, 2, 3, 5)))


def test_stacked_params_match_per_layer_torch():
  """(L, in, out) + (L, D) + (L, kh, kw, I, O) stacked leaves == L separate torch params per kind."""
  L = 3
  model = _Stacked(L, nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  p0 = {k: np.asarray(v) for k, v in nnx.to_pure_dict(params).items()}
  shapes = {k: v.shape for k, v in p0.items()}
  grads = _grad_seq(shapes, seed=8, layer_scaled=tuple(shapes))
  to_torch = {"kernel": lambda x: x.T.copy(), "bias": lambda x: x.copy(),
              "conv": lambda x: x.transpose(3, 2, 0, 1).copy()}
  split = lambda d: {f"{k}{i}": to_torch[k](v[i]) for k, v in d.items() for i in range(L)}
  tparams, _ = _torch_run(split(p0), [split(g) for g in grads], 0.05)

  specs = torch_layout_factored_dims(params)
  assert specs["kernel"] == FactorSpec((1, 2), 1)
  assert specs["bias"] == FactorSpec(None, 1)
  assert specs["conv"] == FactorSpec((1, 2), 1)
  tx = came(LR, weight_decay=0.05, factored_dims=torch_layout_factored_dims)
  pure = jax.tree.map(jnp.asarray, p0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    upd, state = step(jax.tree.map(jnp.asarray, g), state, pure)
    pure = optax.apply_updates(pure, upd)
  for k in p0:
    for i in range(L):
      assert _rel(to_torch[k](np.asarray(pure[k][i])), tparams[f"{k}{i}"]) <= TOL, (k, i)
  # Ignoring the layer axis (one RMS for the whole stack, bias factored over (L, D)) is different.
  flat, _ = _jax_run(came(LR, weight_decay=0.05, factored_dims=lambda p: {
      "kernel": (1, 2), "bias": (0, 1), "conv": (1, 2)}), jax.tree.map(jnp.asarray, p0), grads)
  assert _rel(flat["kernel"][0].T, tparams["kernel0"]) > 1e-4
  assert _rel(flat["bias"][0], tparams["bias0"]) > 1e-4


def test_stacked_update_equals_per_layer_updates():
  """JAX only: one stacked (L, a, b) leaf == L independent (a, b) leaves, bit for bit in structure."""
  L, shapes = 4, {"w": (4, 5, 3)}
  rng = np.random.default_rng(9)
  p0 = {"w": rng.standard_normal(shapes["w"]).astype(np.float32)}
  grads = _grad_seq(shapes, seed=10, layer_scaled=("w",))
  stacked, sstate = _jax_run(came(LR, factored_dims=lambda p: {"w": FactorSpec((1, 2), 1)}),
                             jax.tree.map(jnp.asarray, p0), grads)
  per = {i: p0["w"][i] for i in range(L)}
  layers, lstate = _jax_run(came(LR), jax.tree.map(jnp.asarray, per),
                            [{i: g["w"][i] for i in range(L)} for g in grads])
  for i in range(L):
    np.testing.assert_allclose(stacked["w"][i], layers[i], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sstate.nu["w"].r_col[i], lstate.nu[i].r_col, rtol=1e-6)


def test_state_is_factored_and_fp32():
  tx = came(1e-3)
  params = {"k": jnp.zeros((64, 32), jnp.bfloat16), "b": jnp.zeros((32,), jnp.float32),
            "c": jnp.zeros((3, 3, 16, 8))}
  st = tx.init(params)
  k, b, c = st.nu["k"], st.nu["b"], st.nu["c"]
  assert k.v is None and (k.v_row.shape, k.v_col.shape, k.r_row.shape, k.r_col.shape) == (
      (64,), (32,), (64,), (32,))
  assert b.v.shape == (32,) and b.v_row is None and b.r_row is None
  assert (c.v_row.shape, c.v_col.shape) == ((3, 3, 16), (3, 3, 8))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.nu))
  assert st.mu["k"].dtype == jnp.float32
  n_state = sum(x.size for x in jax.tree.leaves(st.nu["k"]))
  assert n_state == 2 * (64 + 32)  # not 64 * 32
  st16 = came(1e-3, mu_dtype=jnp.bfloat16).init(params)
  assert st16.mu["k"].dtype == jnp.bfloat16
  g = jax.tree.map(lambda x: jnp.ones_like(x), params)
  upd, st16 = jax.jit(came(1e-3, mu_dtype=jnp.bfloat16).update)(g, st16)
  assert upd["k"].dtype == jnp.bfloat16 and upd["b"].dtype == jnp.float32
  assert st16.mu["k"].dtype == jnp.bfloat16 and st16.nu["k"].v_row.dtype == jnp.float32


def test_nnx_optimizer_and_state_shardings():
  """Works inside nnx.Optimizer under nnx.jit; row/col stats carry the reduced logical names."""
  L = 2
  model = _Stacked(L, nnx.Rngs(1))
  ref = jax.tree.map(jnp.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  tx = came(LR, weight_decay=0.05, factored_dims=torch_layout_factored_dims)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  names = opt.opt_state.nu["kernel"].v_row.get_metadata()["out_sharding"]
  assert names == ("layers", "embed")
  assert opt.opt_state.nu["kernel"].v_col.get_metadata()["out_sharding"] == ("layers", "mlp")
  assert opt.opt_state.mu["kernel"].get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))  # embed=6 divides fsdp=2
  shard = sharding.state_shardings(nnx.state(opt), mesh)
  assert shard["opt_state"]["nu"]["kernel"].v_row.spec == jax.sharding.PartitionSpec(None, "fsdp")

  grads = _grad_seq({k: v.shape for k, v in ref.items()}, seed=11, steps=3)

  @nnx.jit
  def train_step(model, opt, g):
    opt.update(model, g)

  for g in grads:
    gstate = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(gstate, jax.tree.map(jnp.asarray, g))
    train_step(model, opt, gstate)
  # The same optimizer on plain dicts (specs taken from the Variables, which carry the names).
  specs = torch_layout_factored_dims(nnx.state(model, nnx.Param))
  want, _ = _jax_run(came(LR, weight_decay=0.05, factored_dims=lambda p: nnx.to_pure_dict(specs)),
                     ref, grads)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for k in ref:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_errors():
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
  with pytest.raises(ValueError, match=r"\['w'\]"):
    came(1e-3, factored_dims=lambda p: {"w": (0, 0), "b": None}).init(params)
  with pytest.raises(ValueError, match=r"\['b'\]"):
    came(1e-3, factored_dims=lambda p: {"w": None, "b": "rows"}).init(params)
  with pytest.raises(ValueError, match="structure of params"):
    came(1e-3, factored_dims=lambda p: {"w": None}).init(params)
  with pytest.raises(ValueError, match="needs `params`"):
    tx = came(1e-3, weight_decay=0.1)
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="learning_rate"):
    came(0.0)
  with pytest.raises(ValueError, match="betas"):
    came(1e-3, betas=(0.9, 1.5, 0.9))
