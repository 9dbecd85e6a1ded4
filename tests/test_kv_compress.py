"""KV token compression against a PyTorch reference of the official AttentionKVCompress (docs/ARCHITECTURE.md §3)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from pixart_jax.models.attention import KVCompress, SelfAttention


class OfficialKVAttention(torch.nn.Module):
  """The official algorithm, written from the spec: fused qkv, optional qk-norm, shared sr conv + LN for K and V."""

  def __init__(self, dim, heads, ratio, sampling, qk_norm=False):
    super().__init__()
    self.heads, self.ratio, self.sampling = heads, ratio, sampling
    self.qkv = torch.nn.Linear(dim, 3 * dim)
    self.proj = torch.nn.Linear(dim, dim)
    if sampling == "conv":
      self.sr = torch.nn.Conv2d(dim, dim, groups=dim, kernel_size=ratio, stride=ratio)
      self.norm = torch.nn.LayerNorm(dim)
    self.q_norm = torch.nn.LayerNorm(dim) if qk_norm else torch.nn.Identity()
    self.k_norm = torch.nn.LayerNorm(dim) if qk_norm else torch.nn.Identity()

  def down(self, t, h, w):
    b, n, c = t.shape
    t = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
    if self.sampling == "ave":
      t = F.interpolate(t, scale_factor=1 / self.ratio, mode="nearest").permute(0, 2, 3, 1)
    elif self.sampling == "uniform":  # official would fail to reshape on odd grids; ours keeps ceil cells
      t = t[:, :, :: self.ratio, :: self.ratio].permute(0, 2, 3, 1)
    else:
      t = self.norm(self.sr(t).reshape(b, c, -1).permute(0, 2, 1))
    return t.reshape(b, -1, c)

  def forward(self, x, hw):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
    q, k = self.q_norm(q), self.k_norm(k)
    k, v = self.down(k, *hw), self.down(v, *hw)
    sh = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(sh(q), sh(k), sh(v))
    return self.proj(o.transpose(1, 2).reshape(b, n, c))


def _ours_from(ref, dim, heads, ratio, mode, qk_norm):
  ours = SelfAttention(dim, heads, kv_ratio=ratio, kv_mode=mode, qk_norm=qk_norm, dtype=np.float32,
                       param_dtype=np.float32, rngs=nnx.Rngs(0))
  w, bvec = ref.qkv.weight.detach().numpy(), ref.qkv.bias.detach().numpy()
  for i, name in enumerate("qkv"):
    lin = getattr(ours, name)
    lin.kernel[...] = w[i * dim:(i + 1) * dim].T
    lin.bias[...] = bvec[i * dim:(i + 1) * dim]
  ours.out.kernel[...] = ref.proj.weight.detach().numpy().T
  ours.out.bias[...] = ref.proj.bias.detach().numpy()
  if mode == "conv":
    ours.compress.kernel[...] = ref.sr.weight.detach().numpy().transpose(2, 3, 1, 0)
    ours.compress.bias[...] = ref.sr.bias.detach().numpy()
    ours.compress.norm_scale[...] = ref.norm.weight.detach().numpy()
    ours.compress.norm_bias[...] = ref.norm.bias.detach().numpy()
  if qk_norm:
    for n in "qk":
      ln = getattr(ref, f"{n}_norm")
      getattr(ours, f"{n}_norm_scale")[...] = ln.weight.detach().numpy()
      getattr(ours, f"{n}_norm_bias")[...] = ln.bias.detach().numpy()
  return ours


@pytest.mark.parametrize("mode", ["conv", "ave", "uniform"])
@pytest.mark.parametrize("hw", [(6, 8), (5, 7)], ids=["even", "odd"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_matches_official_algorithm(mode, hw, qk_norm):
  dim, heads, ratio = 24, 3, 2
  torch.manual_seed(0)
  ref = OfficialKVAttention(dim, heads, ratio, mode, qk_norm)
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  ours = _ours_from(ref, dim, heads, ratio, mode, qk_norm)
  x = np.random.default_rng(1).standard_normal((2, hw[0] * hw[1], dim)).astype(np.float32)
  want = ref(torch.from_numpy(x), hw).detach().numpy()
  got = np.asarray(ours(x, hw))
  assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5


@pytest.mark.parametrize("hw,expect", [((6, 8), {"conv": 12, "ave": 12, "uniform": 12}),
                                        ((5, 7), {"conv": 6, "ave": 6, "uniform": 12})])
def test_odd_grid_rule(hw, expect):
  """conv/ave: floor(h/R) x floor(w/R) (drop the trailing row/col); uniform: ceil x ceil."""
  x = np.random.default_rng(0).standard_normal((1, hw[0] * hw[1], 8)).astype(np.float32)
  for mode, m in expect.items():
    comp = KVCompress(8, 2, mode, dtype=np.float32, param_dtype=np.float32, rngs=nnx.Rngs(0))
    assert comp(x, hw).shape == (1, m, 8)
    assert KVCompress.out_grid(*hw, 2, mode)[0] * KVCompress.out_grid(*hw, 2, mode)[1] == m


def test_conv_average_init():
  """At init the conv is the exact R x R average pool (then LayerNorm), for R = 2 and 3."""
  for r in (2, 3):
    comp = KVCompress(16, r, "conv", dtype=np.float32, param_dtype=np.float32, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(comp.kernel[...]), np.full((r, r, 1, 16), 1 / r**2, np.float32))
    np.testing.assert_array_equal(np.asarray(comp.bias[...]), 0)
    h, w = 2 * r, 3 * r
    x = np.random.default_rng(r).standard_normal((2, h * w, 16)).astype(np.float32)
    pooled = x.reshape(2, h // r, r, w // r, r, 16).mean(axis=(2, 4)).reshape(2, -1, 16)
    mu, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(comp(x, (h, w))), (pooled - mu) / np.sqrt(var + 1e-5), atol=2e-6)
