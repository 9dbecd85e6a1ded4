"""CLIP towers, loader, image preprocessing, tokenizer and score against transformers (tiny random CLIPModel)."""
import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.clip.tokenization_clip import CLIPTokenizer

from pixart_jax.convert.clip_keys import load_clip, read_clip_config
from pixart_jax.convert.strict import WeightLoadError
from pixart_jax.metrics.clip import CLIPConfig
from pixart_jax.metrics.clip_preprocess import CLIPImageConfig, clip_preprocess
from pixart_jax.metrics.clip_score import CLIPScoreAccumulator, CLIPScorer, clip_scores

IMAGE = 30  # vision tower input (patch 6 -> 25 patches)


def _bytes_to_unicode():
  """GPT-2/CLIP byte-level alphabet (openai/CLIP simple_tokenizer.py)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def _tiny_tokenizer(out_dir) -> CLIPTokenizer:
  """A real CLIP BPE tokenizer with a byte-level vocabulary and a few merges (EOS has the largest id)."""
  chars = _bytes_to_unicode()
  merged = ["th", "the</w>", "at</w>", "ca", "cat</w>"]
  tokens = chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"]
  tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)},
                      merges=[("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "a"), ("ca", "t</w>")])
  tok.save_pretrained(out_dir)
  return tok


def _hf_config(vocab, eos, act="quick_gelu"):
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, hidden_act=act, eos_token_id=eos,
                       bos_token_id=vocab - 2, pad_token_id=vocab - 1),
      vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=5,
                         image_size=IMAGE, patch_size=6, hidden_act=act),
      projection_dim=24)


def _random_clip(cfg, seed) -> transformers.CLIPModel:
  torch.manual_seed(seed)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():  # move every weight off its init (LayerNorms 1/0, zero biases) so each one matters
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A transformers CLIPModel directory: model.safetensors, config.json, tokenizer, preprocessor config."""
  d = tmp_path_factory.mktemp("clip")
  tok = _tiny_tokenizer(d)
  model = _random_clip(_hf_config(len(tok), tok.eos_token_id), seed=0)
  model.save_pretrained(d)
  CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(d)
  return d, model, tok


def _rel(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _torch_embeds(model, pixels_nchw, ids, mask):
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.as_tensor(pixels_nchw)).pooler_output.numpy()
    txt = model.get_text_features(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
  return img, txt.pooler_output.numpy()


@pytest.mark.parametrize("act,legacy_eos", [("quick_gelu", True), ("gelu", False), ("gelu_pytorch_tanh", False)])
def test_towers_match_transformers(tmp_path, act, legacy_eos):
  """Image and text embeddings <= 1e-5; EOS pooling by argmax (eos_token_id 2, old configs) or first EOS."""
  vocab, eos = 99, (2 if legacy_eos else 97)
  model = _random_clip(_hf_config(vocab, eos, act), seed=1)
  model.save_pretrained(tmp_path)
  ours = load_clip(tmp_path)
  rng = np.random.default_rng(2)
  pixels = rng.standard_normal((3, 3, IMAGE, IMAGE)).astype(np.float32)
  ids = rng.integers(3, vocab, (3, 12))
  ids[0, 5], ids[1, 11], ids[2, 3] = eos, eos, eos  # (the legacy path pools at the largest id instead)
  ids[2, 7] = eos  # a second EOS: the first one is pooled
  mask = np.ones((3, 12), np.int64)
  mask[0, 6:] = 0  # right padding after the EOS
  want_img, want_txt = _torch_embeds(model, pixels, ids, mask)
  got_img = ours.image_features(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  got_txt = ours.text_features(jnp.asarray(ids), jnp.asarray(mask))
  assert got_img.shape == (3, 24) and got_img.dtype == jnp.float32
  assert _rel(got_img, want_img) <= 1e-5, _rel(got_img, want_img)
  assert _rel(got_txt, want_txt) <= 1e-5, _rel(got_txt, want_txt)
  np.testing.assert_allclose(np.asarray(ours.text_features(jnp.asarray(ids))),  # no mask: causal only
                             _torch_embeds(model, pixels, ids, np.ones_like(mask))[1], rtol=0, atol=1e-5)


def test_config_json_reads_like_transformers(tmp_path):
  raw = {"model_type": "clip", "projection_dim": 24,
         "text_config": {"hidden_size": 32, "num_attention_heads": 4, "eos_token_id": 2, "hidden_act": "gelu"},
         "vision_config": {"image_size": 30, "patch_size": 6},
         "vision_config_dict": {"patch_size": 5, "num_hidden_layers": 2}}  # older files: wins over vision_config
  (tmp_path / "config.json").write_text(json.dumps(raw))
  ours, hf = read_clip_config(tmp_path), transformers.CLIPConfig.from_pretrained(tmp_path)
  for tower, theirs in ((ours.text, hf.text_config), (ours.vision, hf.vision_config)):
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                  "layer_norm_eps"):
      assert getattr(tower, field) == getattr(theirs, field), field
  assert (ours.vision.patch_size, ours.vision.image_size) == (hf.vision_config.patch_size, 30) == (5, 30)
  assert (ours.text.vocab_size, ours.text.max_position_embeddings, ours.text.eos_token_id) == (49408, 77, 2)
  assert ours.projection_dim == hf.projection_dim == 24
  raw["text_config"]["hidden_act"] = "swish"
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=r"config\.json: hidden_act='swish' is not supported"):
    read_clip_config(tmp_path)
  with pytest.raises(ValueError, match="model_type='siglip' is not supported"):
    CLIPConfig.from_hf_config({"model_type": "siglip"})


def test_loader_reads_pytorch_model_bin_and_is_strict(tmp_path, clip_dir):
  d, model, _ = clip_dir
  sd = dict(model.state_dict())
  sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # saved by older transformers: dropped
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((d / "config.json").read_text())
  torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
  ours = load_clip(tmp_path / "bin")
  pixels = np.random.default_rng(3).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)
  want, _ = _torch_embeds(model, pixels.transpose(0, 3, 1, 2), np.zeros((1, 2), np.int64), np.ones((1, 2)))
  assert _rel(ours.image_features(jnp.asarray(pixels)), want) <= 1e-5
  del sd["vision_model.encoder.layers.1.mlp.fc2.bias"]
  sd["vision_model.encoder.layers.1.mlp.fc3.bias"] = torch.zeros(40)
  torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
  with pytest.raises(WeightLoadError) as e:
    load_clip(tmp_path / "bin")
  assert e.value.unexpected == ["vision_model.encoder.layers.1.mlp.fc3.bias (40,) float32"]
  assert e.value.missing == ["target vision_model/encoder/layers/mlp/fc2/bias (3, 40) float32: layer indices 1 of "
                             "3 not filled"]


@pytest.mark.parametrize("size,crop,shape", [(30, 30, (2, 64, 48)), (24, 20, (2, 17, 40)), (40, 36, (1, 300, 301))])
def test_preprocess_matches_clip_image_processor(size, crop, shape):
  """Resize (Pillow bicubic on uint8, both passes rounded), center crop, rescale, normalize: the measured
  difference to CLIPImageProcessorPil is <= 4.8e-7 (float32 rounding of the rescale/normalize only)."""
  proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
  cfg = CLIPImageConfig.from_hf_config(proc.to_dict())
  rng = np.random.default_rng(size)
  images = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  images[0, : shape[1] // 2] = (np.linspace(0, 255, shape[2])[None, :, None]).astype(np.uint8)  # smooth half
  want = proc(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = np.asarray(clip_preprocess(jnp.asarray(images), cfg))
  assert got.shape == want.shape == (shape[0], crop, crop, 3)
  assert np.abs(got - want).max() <= 1e-6, np.abs(got - want).max()
  floats = np.asarray(clip_preprocess(jnp.asarray(images / 255.0, jnp.float32), cfg))  # [0, 1] input
  np.testing.assert_array_equal(floats, got)


def test_clip_score_is_torchmetrics_formula():
  """torchmetrics: 100 * sum(normalized products), then max(mean, 0) (the mean is clipped, not each pair)."""
  rng = np.random.default_rng(4)
  img = rng.standard_normal((10, 24)).astype(np.float32)
  noise = rng.standard_normal((10, 24))
  for signs in ([1] * 10, [1] * 3 + [-1] * 7):  # similar pairs; then 3 similar and 7 opposite ones
    txt = (np.asarray(signs)[:, None] * img + 0.5 * noise).astype(np.float32)
    ti, tt = torch.from_numpy(img), torch.from_numpy(txt)
    ti, tt = ti / ti.norm(p=2, dim=-1, keepdim=True), tt / tt.norm(p=2, dim=-1, keepdim=True)
    per_pair = 100 * (ti * tt).sum(axis=-1)
    want = torch.max(per_pair.mean(0), torch.zeros_like(per_pair.mean(0))).item()
    acc = CLIPScoreAccumulator()
    acc.update(img[:3], txt[:3])
    acc.merge(CLIPScoreAccumulator()).update(img[3:], txt[3:])
    np.testing.assert_allclose(clip_scores(img, txt), per_pair.numpy(), rtol=1e-5, atol=1e-5)
    assert abs(acc.compute() - want) <= 1e-5
  assert acc.compute() == 0.0 and (per_pair.numpy() > 0).sum() == 3  # clipping each pair would give > 0


def test_scorer_matches_transformers_pipeline(clip_dir, caplog):
  """End to end as torchmetrics runs it: CLIPProcessor-style preprocessing + padded tokens -> CLIPModel
  features -> score; ours from the same directory."""
  d, model, tok = clip_dir
  scorer = CLIPScorer.from_pretrained(d)
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (3, 45, 37, 3), dtype=np.uint8)
  captions = ["the cat", "a cat at the mat", "that"]
  proc = CLIPImageProcessorPil.from_pretrained(d)
  pixels = proc(images=list(images), return_tensors="np")["pixel_values"]
  enc = tok(captions, padding=True, return_tensors="np")
  want_img, want_txt = _torch_embeds(model, pixels, enc["input_ids"], enc["attention_mask"])
  got_img, got_txt = scorer.image_embeds(images), scorer.text_embeds(captions)
  assert _rel(got_img, want_img) <= 1e-5 and _rel(got_txt, want_txt) <= 1e-5
  ti, tt = torch.from_numpy(want_img), torch.from_numpy(want_txt)
  want = 100 * ((ti / ti.norm(dim=-1, keepdim=True)) * (tt / tt.norm(dim=-1, keepdim=True))).sum(-1)
  np.testing.assert_allclose(scorer.scores(images, captions), want.numpy(), rtol=1e-5)  # measured 7e-7
  with caplog.at_level(logging.WARNING):  # 17 tokens > 16 positions: truncated, EOS kept, warned
    long = scorer.tokenizer.tokenize(["the cat " * 8], max_length=16)[0]
  assert long[0, -1] == tok.eos_token_id and "truncated to max_length=16" in caplog.text
