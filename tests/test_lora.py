"""LoRA: merged == base + adapter outputs, adapters-only gradients, save/load, and PEFT/diffusers files."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import pixart_jax.convert.dit as dit_convert
from dit_reference import diffusers_forward, rel_err, tiny_diffusers_transformer
from pixart_jax import lora
from pixart_jax.models.config import get_preset
from pixart_jax.models.dit import PixArtSigma


def _inputs(b=2, hw=(8, 8), s=6, c=32, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, *hw, 4)).astype(np.float32), np.array([5.0, 700.0][:b], np.float32),
          rng.standard_normal((b, s, c)).astype(np.float32), (np.arange(s)[None] < np.array([[3], [s]])[:b]))


def _model():
  m = PixArtSigma(get_preset("tiny", depth=3), rngs=nnx.Rngs(0))
  for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    v.set_value(v.get_value() + 0.05 * jax.random.normal(jax.random.key(v.get_value().size), v.get_value().shape))
  return m


def _unflat(flat, graphdef, rest):
  from pixart_jax.convert.strict import unflatten_into

  abstract = nnx.eval_shape(lambda: nnx.merge(graphdef, rest))
  _, st = nnx.split(abstract)
  unflatten_into(st, dict(flat))
  return st


def test_merged_equals_base_plus_adapter_outputs():
  model = _model()
  cfg = lora.LoraConfig(rank=4, alpha=8.0)
  params = lora.flat_params(model)
  adapters = lora.init_lora(params, cfg, jax.random.key(1))
  assert adapters and all(p[-1] == "kernel" for p in adapters)
  adapters = {p: {"a": a["a"], "b": 0.1 * jax.random.normal(jax.random.key(i), a["b"].shape)}
              for i, (p, a) in enumerate(adapters.items())}
  x, t, y, mask = _inputs()
  base = np.asarray(model(x, t, y, mask))
  # "base + adapter outputs": every adapted linear computes x W + b + scale * (x A) B, written out explicitly.
  cross = _model().stages[0].cross_attn.q  # base weights (the model is deterministic)
  a, bm = adapters[("stages", 0, "cross_attn", "q", "kernel")]["a"], adapters[("stages", 0, "cross_attn", "q", "kernel")]["b"]
  merged = lora.merge_lora(_model(), adapters, cfg)
  got = np.asarray(merged(x, t, y, mask))
  assert rel_err(got, base) > 1e-3  # the adapters do something
  # layer-level identity: (x W') == x W + scale (x A) B on a random input, for a stacked kernel
  xin = np.random.default_rng(3).standard_normal((5, cross.kernel.shape[1])).astype(np.float32)
  w = np.asarray(cross.kernel[...])
  w_merged = np.asarray(merged.stages[0].cross_attn.q.kernel[...])
  for j in range(w.shape[0]):
    want = xin @ w[j] + cfg.scale * (xin @ np.asarray(a[j])) @ np.asarray(bm[j])
    np.testing.assert_allclose(xin @ w_merged[j], want, rtol=1e-5, atol=1e-5)
  # and the merged model equals applying the adapters on the fly
  graphdef, state = nnx.split(_model())
  on_the_fly = nnx.merge(graphdef, _unflat(lora.apply_lora(lora.flat_params(state), adapters, cfg), graphdef, state))
  np.testing.assert_allclose(np.asarray(on_the_fly(x, t, y, mask)), got, rtol=1e-6, atol=1e-6)


def test_zero_init_and_adapter_only_gradients():
  model = _model()
  cfg = lora.LoraConfig(rank=2, alpha=2.0, targets=(r".*attn\.(q|v)\.kernel",))
  graphdef, state = nnx.split(model)
  params = lora.flat_params(state)
  adapters = lora.init_lora(params, cfg, jax.random.key(0))
  x, t, y, mask = _inputs()
  base = model(x, t, y, mask)

  def loss(ad):
    m = nnx.merge(graphdef, _unflat(lora.apply_lora(params, ad, cfg), graphdef, state))
    return jnp.mean(m(x, t, y, mask) ** 2)

  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, _unflat(lora.apply_lora(params, adapters, cfg), graphdef,
                                                                    state))(x, t, y, mask)), np.asarray(base))
  g = jax.grad(loss)(adapters)
  assert set(g) == set(adapters)
  assert all(float(jnp.abs(v["b"]).max()) > 0 for v in g.values())  # B gets gradient (A does not at B = 0)


def test_save_load_roundtrip(tmp_path):
  model = _model()
  cfg = lora.LoraConfig(rank=3, alpha=6.0)
  adapters = lora.init_lora(lora.flat_params(model), cfg, jax.random.key(2))
  lora.save_lora(adapters, cfg, tmp_path / "lora")
  back, cfg2 = lora.load_lora(tmp_path / "lora")
  assert cfg2 == cfg and set(back) == set(adapters)
  for p in adapters:
    np.testing.assert_array_equal(np.asarray(back[p]["a"]), np.asarray(adapters[p]["a"]))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_file_matches_diffusers(tmp_path, rslora):
  """A LoRA written by PEFT for a tiny diffusers PixArt loads and gives the same outputs as PEFT in PyTorch."""
  from peft import LoraConfig, get_peft_model

  ref = tiny_diffusers_transformer(layers=2, heads=2, head_dim=8)
  ref.save_pretrained(tmp_path / "base")
  peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_v", "ff.net.2"],
                                              use_rslora=rslora, init_lora_weights=False))
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "lora_B" in n:
        p.normal_(0, 0.2)
  peft_model.save_pretrained(tmp_path / "adapter")
  x, t, y, mask = _inputs(c=24)
  want = diffusers_forward(peft_model.base_model.model, x, t, y, mask.astype(np.int64))
  base = dit_convert.load_transformer(tmp_path / "base")
  adapters, cfg = lora.load_peft_lora(tmp_path / "adapter", base.cfg)
  assert cfg.rank == 4 and cfg.alpha == 12 and cfg.rslora == rslora
  got = np.asarray(lora.merge_lora(base, adapters, cfg)(x, t, y, mask))
  assert rel_err(got, want) <= 1e-5
  with pytest.raises(ValueError, match="unusable LoRA keys"):
    from safetensors.numpy import save_file

    save_file({"transformer_blocks.0.attn9.to_q.lora_A.weight": np.zeros((4, 16), np.float32)},
              str(tmp_path / "bad.safetensors"))
    lora.load_peft_lora(tmp_path / "bad.safetensors", base.cfg)
