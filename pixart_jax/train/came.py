"""CAME (Confidence-guided Adaptive Memory Efficient optimizer) as an optax GradientTransformation.

A port of `came_pytorch.CAME` (the optimizer PixArt-Sigma trains with), step for step:

  u      = g**2 + eps1
  factored (rows r, cols c):  v_row = b2 v_row + (1-b2) mean_c(u);  v_col = b2 v_col + (1-b2) mean_r(u)
                              s = rsqrt(v_row / mean_r(v_row)) * rsqrt(v_col);      upd = s * g
  unfactored:                 v = b2 v + (1-b2) u;                                  upd = rsqrt(v) * g
  upd   /= max(1, RMS(upd) / clip_threshold)
  m      = b1 m + (1-b1) upd
  factored:   res = (upd - m)**2 + eps2; r_row, r_col = EMAs (b3) of its row/col means
              step = rsqrt(r_row / mean_r(r_row)) * rsqrt(r_col) * m
  unfactored: step = m
  p     <- p - wd * lr * p - lr * step          (decoupled weight decay, as came_pytorch)

There is no bias correction (as in came_pytorch). All statistics live in float32 (the first moment `m`
in `mu_dtype`, float32 by default) and the arithmetic runs in float32; updates come back in the
gradient's dtype.

Which axes are factored (the layout rule)
-----------------------------------------
came_pytorch factors every tensor with >= 2 dims over its LAST TWO dims and clips by the RMS of the
whole tensor. Here each parameter gets a `FactorSpec(axes, stacked)`:

* `axes = (row_axis, col_axis)` or `None` (unfactored: a full-size second moment, no instability
  statistics). Row statistics have the parameter's shape without `col_axis`, column statistics
  without `row_axis` (that is the memory saving: e.g. (in,) + (out,) for an (in, out) kernel).
* `stacked = k`: the first k axes index independent parameters (a `scan`ned layer axis). The clip
  RMS is taken per slice, so a stacked (L, in, out) kernel gets exactly the per-layer updates that
  L separate (out, in) PyTorch weights get. Factored axes must lie after the stacked axes.

`factored_dims(params)` returns a pytree with one spec per parameter (a `FactorSpec`, a plain
`(row_axis, col_axis)` tuple, or `None`); it is called once, in `init`, and the specs are stored as
static metadata in the state (so `update` works on plain arrays, e.g. under `nnx.Optimizer`).
Default (`factored_dims=None`): every parameter with >= 2 dims is factored over its last two dims,
nothing is stacked -- exactly came_pytorch applied to a tensor of that shape.

PyTorch vs Flax layouts:
* Linear: torch (out, in) is a Flax kernel (in, out). Factoring is symmetric under transposition
  (s_ij**-2 = row_i * col_j / mean(u)), so the default gives came_pytorch's result transposed, equal up
  to float rounding.
* Conv: came_pytorch factors a torch (O, I, kh, kw) kernel over (kh, kw); the Flax kernel is
  (kh, kw, I, O), whose last two dims are (I, O) -- numerically different.
  `torch_layout_factored_dims` factors 4-D (per layer) kernels over axes (0, 1) = torch (kh, kw), so
  the result equals came_pytorch on the converted weights.
* Scanned parameters: `torch_layout_factored_dims` reads the logical axis names of nnx Variables and
  treats leading `layers` axes as stacked (per-layer factoring and clipping).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["FactorSpec", "CameLeafState", "CameState", "came", "torch_layout_factored_dims"]


class FactorSpec(NamedTuple):
  """How one parameter is treated: `axes=(row_axis, col_axis)` or None; `stacked` leading axes."""
  axes: tuple[int, int] | None
  stacked: int = 0


@dataclasses.dataclass(frozen=True)
class CameLeafState:
  """Second-moment and instability statistics of one parameter (float32).

  Factored: `v_row`/`r_row` have the parameter's shape without `col_axis`, `v_col`/`r_col` without
  `row_axis`; `v` is None. Unfactored: `v` has the parameter's shape; the others are None.
  `row_axis`, `col_axis` (None when unfactored) and `stacked` are static pytree metadata.
  """
  v: Any
  v_row: Any
  v_col: Any
  r_row: Any
  r_col: Any
  row_axis: int | None
  col_axis: int | None
  stacked: int


jax.tree_util.register_dataclass(
    CameLeafState,
    data_fields=["v", "v_row", "v_col", "r_row", "r_col"],
    meta_fields=["row_axis", "col_axis", "stacked"],
)


class CameState(NamedTuple):
  """count: int32 scalar (steps taken; drives schedules). mu: first moment, like params.
  nu: a CameLeafState per parameter."""
  count: jax.Array
  mu: Any
  nu: Any


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _val(x):
  return x.get_value() if _is_var(x) else x


def _rewrap(like, value, names=None):
  """`value` wrapped like `like` (a Variable keeps its metadata; logical `names` replaced if given)."""
  if not _is_var(like):
    return value
  meta = like.get_metadata()
  kwargs = {}
  if names is not None:
    for key in ("out_sharding", "sharding_names"):
      if meta.get(key) is not None:
        kwargs[key] = names
  return like.replace(value, **kwargs)


def _names(x):
  if not _is_var(x):
    return None
  meta = x.get_metadata()
  return meta.get("out_sharding") or meta.get("sharding_names")


def _normalize_spec(spec, shape: tuple[int, ...], where: str) -> FactorSpec:
  if _is_var(spec):
    spec = spec.get_value()
  if spec is None:
    return FactorSpec(None, 0)
  if not isinstance(spec, FactorSpec):
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(a, int) for a in spec):
      spec = FactorSpec(tuple(spec), 0)
    else:
      raise ValueError(
          f"came: factored_dims gave {spec!r} for parameter {where}; expected None, a "
          "(row_axis, col_axis) tuple of ints or a FactorSpec")
  ndim = len(shape)
  stacked = int(spec.stacked)
  if not 0 <= stacked <= ndim:
    raise ValueError(f"came: stacked={stacked} is invalid for parameter {where} of shape {shape}")
  if spec.axes is None:
    return FactorSpec(None, stacked)
  if len(spec.axes) != 2:
    raise ValueError(f"came: factored axes {spec.axes} for parameter {where} must be two axes")
  r, c = (a + ndim if a < 0 else a for a in spec.axes)
  if not (stacked <= r < ndim and stacked <= c < ndim and r != c):
    raise ValueError(
        f"came: factored axes {spec.axes} for parameter {where} of shape {shape} must be two "
        f"distinct axes in [{stacked}, {ndim}) (after the {stacked} stacked axes)")
  return FactorSpec((r, c), stacked)


def _default_spec(shape) -> FactorSpec:
  nd = len(shape)
  return FactorSpec((nd - 2, nd - 1), 0) if nd >= 2 else FactorSpec(None, 0)


def torch_layout_factored_dims(params: Any, *, layer_axis: str = "layers") -> Any:
  """Per-parameter `FactorSpec`s that reproduce came_pytorch on the PyTorch weights.

  Rule, per parameter (leaves may be arrays or nnx Variables carrying logical axis names):
    * leading axes named `layer_axis` (only visible on nnx Variables, e.g. `nnx.state(model,
      nnx.Param)`) are stacked: each layer is factored and clipped on its own;
    * per-layer rank 4 -> a Flax conv kernel (kh, kw, in, out): factor over (kh, kw), as came_pytorch
      does for the torch (out, in, kh, kw) kernel;
    * per-layer rank >= 2 otherwise -> last two dims (a Flax (in, out) kernel is the transposed torch
      Linear weight; factoring is transpose-symmetric);
    * per-layer rank < 2 -> unfactored.
  Plain-array leaves carry no names, so nothing is treated as stacked for them.
  Returns a pytree like `params` (Variables replaced by their FactorSpec).
  """

  def one(x):
    shape = tuple(_val(x).shape)
    names = _names(x) or ()
    stacked = 0
    while stacked < min(len(names), len(shape)) and names[stacked] == layer_axis:
      stacked += 1
    per_layer = len(shape) - stacked
    if per_layer == 4:
      return FactorSpec((stacked, stacked + 1), stacked)
    if per_layer >= 2:
      return FactorSpec((len(shape) - 2, len(shape) - 1), stacked)
    return FactorSpec(None, stacked)

  return jax.tree.map(one, params, is_leaf=_is_var)


def _approx_rsqrt(row, col, r: int, c: int):
  """rsqrt(row / mean_r(row)) * rsqrt(col), broadcast back to the full parameter shape."""
  row = jnp.expand_dims(row, c)
  col = jnp.expand_dims(col, r)
  return jax.lax.rsqrt(row / jnp.mean(row, axis=r, keepdims=True)) * jax.lax.rsqrt(col)


def came(
    learning_rate: float | optax.Schedule,
    *,
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    factored_dims: Callable[[Any], Any] | None = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  """CAME, matching `came_pytorch.CAME(lr, eps, clip_threshold, betas, weight_decay)`.

  Args:
    learning_rate: a float > 0, or an optax schedule evaluated at the step count (0 on the first
      update, like a torch LambdaLR stepped after each optimizer step). Weight decay uses it too.
    betas: (b1 first moment, b2 squared gradient, b3 instability).
    eps: (eps1 added to g**2, eps2 added to the instability).
    clip_threshold: the update is divided by max(1, RMS(update) / clip_threshold).
    weight_decay: decoupled: p <- p - weight_decay * lr * p (needs `params` in `update`).
    factored_dims: `params -> pytree of FactorSpec | (row_axis, col_axis) | None` (see module doc);
      None = last two dims of every >= 2-D parameter. `torch_layout_factored_dims` matches PyTorch.
    mu_dtype: storage dtype of the first moment (default float32).
  """
  if not callable(learning_rate) and not float(learning_rate) > 0.0:
    raise ValueError(f"came: learning_rate must be > 0, got {learning_rate}")
  if len(betas) != 3 or not all(0.0 <= b <= 1.0 for b in betas):
    raise ValueError(f"came: betas must be three numbers in [0, 1], got {betas}")
  if len(eps) != 2 or not all(e >= 0.0 for e in eps):
    raise ValueError(f"came: eps must be two numbers >= 0, got {eps}")
  if not clip_threshold > 0.0:
    raise ValueError(f"came: clip_threshold must be > 0, got {clip_threshold}")
  if weight_decay < 0.0:
    raise ValueError(f"came: weight_decay must be >= 0, got {weight_decay}")
  b1, b2, b3 = (float(b) for b in betas)
  eps1, eps2 = (float(e) for e in eps)
  mu_dtype = jnp.dtype(mu_dtype) if mu_dtype is not None else jnp.dtype(jnp.float32)
  f32 = jnp.float32

  def init_fn(params):
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)
    if factored_dims is None:
      raw_specs = [None] * len(with_paths)
    else:
      try:
        raw_specs = treedef.flatten_up_to(factored_dims(params))
      except (ValueError, TypeError) as e:
        raise ValueError(
            f"came: factored_dims(params) must return a pytree with the structure of params: {e}"
        ) from e
    mus, nus = [], []
    for (path, leaf), raw in zip(with_paths, raw_specs):
      shape = tuple(_val(leaf).shape)
      where = jax.tree_util.keystr(path) or "<root>"
      spec = _default_spec(shape) if factored_dims is None else _normalize_spec(raw, shape, where)
      names = _names(leaf)
      mus.append(_rewrap(leaf, jnp.zeros(shape, mu_dtype)))
      if spec.axes is None:
        nus.append(CameLeafState(_rewrap(leaf, jnp.zeros(shape, f32)), None, None, None, None,
                                 None, None, spec.stacked))
        continue
      r, c = spec.axes

      def stat(drop):
        s = tuple(n for i, n in enumerate(shape) if i != drop)
        n = None if names is None else tuple(x for i, x in enumerate(names) if i != drop)
        return _rewrap(leaf, jnp.zeros(s, f32), n)

      nus.append(CameLeafState(None, stat(c), stat(r), stat(c), stat(r), r, c, spec.stacked))
    return CameState(jnp.zeros([], jnp.int32), treedef.unflatten(mus), treedef.unflatten(nus))

  def update_fn(updates, state, params=None):
    grads, gdef = jax.tree.flatten(updates)
    mu_leaves, mu_def = jax.tree.flatten(state.mu, is_leaf=_is_var)
    nu_leaves, nu_def = jax.tree.flatten(state.nu, is_leaf=lambda x: isinstance(x, CameLeafState))
    if not len(grads) == len(mu_leaves) == len(nu_leaves):
      raise ValueError(
          f"came: the gradients have {len(grads)} leaves but the optimizer state was built for "
          f"{len(mu_leaves)} parameters")
    if weight_decay != 0.0:
      if params is None:
        raise ValueError("came: weight_decay != 0 needs `params` in update(grads, state, params)")
      p_leaves = [_val(p) for p in jax.tree.flatten(params, is_leaf=_is_var)[0]]
    else:
      p_leaves = [None] * len(grads)
    count = state.count
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    lr = jnp.asarray(lr, f32)

    out, new_mu, new_nu = [], [], []
    for g, m_old, ls, p in zip(grads, mu_leaves, nu_leaves, p_leaves):
      dtype = g.dtype
      g = g.astype(f32)
      m = _val(m_old).astype(f32)
      per_slice = tuple(range(ls.stacked, g.ndim))
      u = g * g + eps1
      if ls.row_axis is None:
        v = b2 * _val(ls.v) + (1.0 - b2) * u
        upd = jax.lax.rsqrt(v) * g
      else:
        r, c = ls.row_axis, ls.col_axis
        v_row = b2 * _val(ls.v_row) + (1.0 - b2) * jnp.mean(u, axis=c)
        v_col = b2 * _val(ls.v_col) + (1.0 - b2) * jnp.mean(u, axis=r)
        upd = _approx_rsqrt(v_row, v_col, r, c) * g
      rms = jnp.sqrt(jnp.mean(upd * upd, axis=per_slice, keepdims=True))
      upd = upd / jnp.maximum(rms / clip_threshold, 1.0)
      m = b1 * m + (1.0 - b1) * upd
      if ls.row_axis is None:
        step = m
        new_ls = dataclasses.replace(ls, v=_rewrap(ls.v, v))
      else:
        res = (upd - m) ** 2 + eps2
        r_row = b3 * _val(ls.r_row) + (1.0 - b3) * jnp.mean(res, axis=c)
        r_col = b3 * _val(ls.r_col) + (1.0 - b3) * jnp.mean(res, axis=r)
        step = _approx_rsqrt(r_row, r_col, r, c) * m
        new_ls = dataclasses.replace(
            ls, v_row=_rewrap(ls.v_row, v_row), v_col=_rewrap(ls.v_col, v_col),
            r_row=_rewrap(ls.r_row, r_row), r_col=_rewrap(ls.r_col, r_col))
      delta = -lr * step
      if p is not None:
        delta = delta - (weight_decay * lr) * p.astype(f32)
      out.append(delta.astype(dtype))
      new_mu.append(_rewrap(m_old, m.astype(mu_dtype)))
      new_nu.append(new_ls)
    new_state = CameState(optax.safe_int32_increment(count), mu_def.unflatten(new_mu),
                          nu_def.unflatten(new_nu))
    return gdef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)
