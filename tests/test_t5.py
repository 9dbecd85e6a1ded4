"""T5 v1.1 encoder, tokenizer and loader vs transformers (fp32 CPU, tiny random configs)."""
import fnmatch
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from safetensors.numpy import save_file
from transformers import AutoTokenizer
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

from pixart_jax.convert.strict import WeightLoadError
from pixart_jax.convert.t5_keys import abstract_t5, load_t5
from pixart_jax.models.t5 import T5Config
from pixart_jax.models.text_encoder import TextEncoder, caption_bucket, encode_prompts
from pixart_jax.models.tokenizer import build_t5_tokenizer, load_tokenizer
from pixart_jax.parallel.sharding import state_shardings

CAPTIONS = [
    "a photo of a cat sitting on a red mat", "a dog running through the park at noon",
    "two birds flying over the ocean at sunset", "a blue car parked next to an old building",
    "a bowl of fruit on a wooden table", "snow covered mountains under a clear sky",
    "a small boat on a calm lake", "an astronaut riding a horse on the moon",
]
PROMPTS = ["", "a cat", "a dog running through the park at noon while two birds fly over the ocean",
           "an astronaut on a boat"]
L = 300
# Two architectures: T5 v1.1 style (gated-gelu) and original T5 style (relu, inner_dim != d_model).
HF_CONFIGS = {
    "gated-gelu": dict(d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=20,
                       feed_forward_proj="gated-gelu"),
    "relu": dict(d_model=24, d_kv=5, d_ff=40, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=16, relative_attention_max_distance=64,
                 feed_forward_proj="relu", layer_norm_epsilon=1e-5),
}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  build_t5_tokenizer(CAPTIONS * 4, d, vocab_size=64)
  return d


def _torch_model(name: str, vocab: int, seed: int = 0) -> T5EncoderModel:
  cfg = HFT5Config(vocab_size=vocab, dropout_rate=0.0, attn_implementation="eager",
                   **HF_CONFIGS[name])
  torch.manual_seed(seed)
  model = T5EncoderModel(cfg).eval()
  with torch.no_grad():  # layer norms init to 1: randomize them so their mapping is tested
    for key, p in model.named_parameters():
      if "layer_norm" in key:
        p.mul_(1.0 + 0.2 * torch.randn_like(p))
  return model


def _torch_ref(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def pipeline(request, tok_dir, tmp_path_factory):
  """A pipeline-layout dir (text_encoder/ + tokenizer/), the torch model and its output on PROMPTS."""
  root = tmp_path_factory.mktemp(f"pipe-{request.param}")
  shutil.copytree(tok_dir, root / "tokenizer")
  tok = load_tokenizer(root)
  model = _torch_model(request.param, vocab=-(-(tok.vocab_size + 5) // 8) * 8)  # padded, like 32128
  model.save_pretrained(root / "text_encoder")
  ids, mask = tok.tokenize(PROMPTS, max_length=L)
  return dict(root=root, name=request.param, model=model, ids=ids, mask=mask,
              ref=_torch_ref(model, ids, mask))


@jax.jit
def _apply(model, ids, mask):
  return model(ids, mask)


def test_tokenizer_real_t5_format(tok_dir):
  import sentencepiece as spm
  tok = load_tokenizer(tok_dir)
  sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert (tok.pad_id, tok.eos_id, tok.hf.unk_token_id) == (0, 1, 2)
  hf = AutoTokenizer.from_pretrained(tok_dir)  # loads like a released tokenizer dir
  ids, mask = tok.tokenize(PROMPTS, max_length=L)
  assert ids.shape == mask.shape == (len(PROMPTS), L) and ids.dtype == mask.dtype == np.int32
  for i, p in enumerate(PROMPTS):
    want = sp.encode(p) + [1]
    assert hf(p).input_ids == want
    n = int(mask[i].sum())
    assert n == len(want) and list(ids[i, :n]) == want and not ids[i, n:].any() and not mask[i, n:].any()
  assert mask[0].sum() == 1 and ids[0, 0] == 1  # "" -> [EOS] + pads


def test_truncation_warning(tok_dir, caplog):
  tok = load_tokenizer(tok_dir)
  long = " ".join(CAPTIONS)
  n_full = len(tok.hf(long).input_ids)
  max_length = 16
  assert n_full > max_length
  with caplog.at_level(logging.WARNING, logger="pixart_jax.models.tokenizer"):
    ids, mask = tok.tokenize(["a cat", long], max_length=max_length)
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  msg = warnings[0].getMessage()
  assert "prompt 1" in msg and f"dropped {n_full - max_length} tokens" in msg
  assert mask[1].all() and ids[1, -1] == tok.eos_id
  np.testing.assert_array_equal(ids[1, :-1], tok.hf(long).input_ids[:max_length - 1])


def test_parity_fp32(pipeline):
  model = load_t5(pipeline["root"])
  assert model.config == T5Config.from_hf_config(pipeline["model"].config.to_dict())
  out = _apply(model, jnp.asarray(pipeline["ids"]), jnp.asarray(pipeline["mask"]))
  assert out.shape == pipeline["ref"].shape and out.dtype == jnp.float32
  assert rel_err(out, pipeline["ref"]) <= 1e-5


def test_parity_sharded_safetensors(pipeline, tmp_path):
  pipeline["model"].save_pretrained(tmp_path, max_shard_size="4KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
  model = load_t5(tmp_path)
  out = _apply(model, jnp.asarray(pipeline["ids"]), jnp.asarray(pipeline["mask"]))
  assert rel_err(out, pipeline["ref"]) <= 1e-5


def _write_state(path, sd, config_dir):
  path.mkdir(parents=True, exist_ok=True)
  shutil.copy(config_dir / "config.json", path / "config.json")
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "model.safetensors"))
  return path


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_tied_embedding_either_key(pipeline, tmp_path):
  sd = _state_dict(pipeline["model"])
  cfg_dir = pipeline["root"] / "text_encoder"
  only_tied = {k: v for k, v in sd.items() if k != "shared.weight"}
  only_tied["encoder.embed_tokens.weight"] = sd["shared.weight"]
  tied = _write_state(tmp_path / "tied", only_tied, cfg_dir)
  both_sd = dict(sd, **{"encoder.embed_tokens.weight": np.zeros_like(sd["shared.weight"])})
  both = _write_state(tmp_path / "both", both_sd, cfg_dir)  # shared.weight read, embed_tokens dropped
  for d in (both, tied):
    out = _apply(load_t5(d), jnp.asarray(pipeline["ids"]), jnp.asarray(pipeline["mask"]))
    assert rel_err(out, pipeline["ref"]) <= 1e-5, d


def test_bf16_compute_bound(pipeline):
  """bf16 matmuls (fp32 norms/softmax/residual): rel. error vs fp32 torch within 3e-2 (measured 4e-3 .. 1.1e-2)."""
  ids, mask = jnp.asarray(pipeline["ids"]), jnp.asarray(pipeline["mask"])
  for param_dtype in (jnp.bfloat16, jnp.float32):
    model = load_t5(pipeline["root"], dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert model.blocks.ffn.wo.kernel[...].dtype == param_dtype
    out = _apply(model, ids, mask)
    assert out.dtype == jnp.float32
    err = rel_err(out, pipeline["ref"])
    assert 1e-4 < err < 3e-2, (param_dtype, err)  # > 1e-4: the matmuls really ran in bf16


def test_text_encoder_api(pipeline):
  enc = TextEncoder.from_pretrained(pipeline["root"])
  embeds, mask = enc.encode_prompts(PROMPTS)
  assert embeds.shape == (len(PROMPTS), L, enc.hidden_size) and embeds.dtype == jnp.float32
  assert mask.dtype == jnp.int32
  np.testing.assert_array_equal(mask, pipeline["mask"])
  assert rel_err(embeds, pipeline["ref"]) <= 1e-5
  again, _ = encode_prompts(enc, PROMPTS[::-1])
  np.testing.assert_allclose(again[::-1], embeds, rtol=0, atol=1e-6)
  assert enc._jitted._cache_size() == 1  # same batch size: no recompilation
  enc.encode_prompts(PROMPTS[:2])
  assert enc._jitted._cache_size() == 2


def test_offloaded_encoder_keeps_weights_on_the_host(pipeline):
  """offload=True: the weights stay host numpy arrays (brought to the device per call), same embeddings; a sharded
  encoder or a multi-device mesh is refused with one line."""
  enc = TextEncoder.from_pretrained(pipeline["root"], offload=True)
  leaves = jax.tree.leaves(nnx.state(enc.encoder))
  assert leaves and all(isinstance(a, np.ndarray) for a in leaves)
  embeds, _ = enc.encode_prompts(PROMPTS)
  assert rel_err(embeds, pipeline["ref"]) <= 1e-5
  assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(nnx.state(enc.encoder)))  # still on the host
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("fsdp",))
  with pytest.raises(ValueError, match="the mesh has 2 devices: use one device"):
    TextEncoder.from_pretrained(pipeline["root"], offload=True, mesh=mesh)
  sharded = load_t5(pipeline["root"], mesh=mesh)
  with pytest.raises(ValueError, match="sharded over several devices"):
    TextEncoder(enc.tokenizer, sharded, offload=True)


def test_caption_bucket():
  assert [caption_bucket(n) for n in (1, 16, 17, 33, 64, 65, 129, 256, 257, 300)] == \
      [16, 16, 32, 64, 64, 128, 256, 256, 300, 300]
  assert caption_bucket(20, max_length=24) == 24 and caption_bucket(5, max_length=8) == 8
  with pytest.raises(ValueError, match="tokens and max_length must be >= 1, got 0"):
    caption_bucket(0)


def test_trimmed_encoding_equals_the_full_one(pipeline):
  """Pad keys are masked, so every position before the cut (pad positions included, which the official guidance
  mode reads) is the same at the trimmed length, to float rounding."""
  enc = TextEncoder.from_pretrained(pipeline["root"])
  full, full_mask = enc.encode_prompts(PROMPTS)
  longest = int(full_mask.sum(axis=1).max())
  trimmed, mask = enc.encode_prompts(PROMPTS, trim=True)
  n = caption_bucket(longest)
  assert longest < n < L and trimmed.shape == (len(PROMPTS), n, enc.hidden_size)
  np.testing.assert_array_equal(mask, full_mask[:, :n])
  np.testing.assert_allclose(trimmed, full[:, :n], rtol=0, atol=2e-6 * float(jnp.abs(full).max()))
  short, _ = enc.encode_prompts(PROMPTS[:2], trim=True)  # "" and "a cat": the smallest bucket
  assert short.shape[1] == 16
  np.testing.assert_allclose(short, full[:2, :16], rtol=0, atol=2e-6 * float(jnp.abs(full).max()))


@pytest.mark.slow  # two backward compiles (~5 s CPU; 15 s wall on the loaded 2-core dev VM)
def test_remat_same_gradients(tmp_path):
  _torch_model("gated-gelu", vocab=64).save_pretrained(tmp_path)
  ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)
  mask = (jnp.arange(24)[None] < jnp.array([[24], [7]])).astype(jnp.int32)

  def grads(remat):
    model = load_t5(tmp_path, remat=remat)
    assert model.remat.value == remat
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(ids, mask)))
    assert ("remat" in str(jax.make_jaxpr(loss)(params))) == (remat != "none")
    return jax.jit(jax.grad(loss))(params)

  g0, g1 = grads("none"), grads("full")
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sharded_matches_unsharded(pipeline):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
  ids, mask = jnp.asarray(pipeline["ids"]), jnp.asarray(pipeline["mask"])
  plain = load_t5(pipeline["root"])
  want = _apply(plain, ids, mask)
  # (a) state_shardings + device_put of a loaded model, (b) load_t5 placing tensors directly.
  graphdef, state = nnx.split(plain)
  moved = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
  direct = load_t5(pipeline["root"], mesh=mesh)
  for model in (moved, direct):
    cfg, ffn, attn = model.config, model.blocks.ffn, model.blocks.attn
    wi = (ffn.wi_0 if cfg.is_gated_act else ffn.wi).kernel[...]
    assert wi.sharding.spec == P(None, "fsdp", "tensor")
    assert ffn.wo.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
    assert attn.q.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    assert attn.o.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
    assert model.embed.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert wi.addressable_shards[0].data.shape == (cfg.num_layers, cfg.d_model // 4, cfg.d_ff // 2)
    with jax.set_mesh(mesh):
      got = _apply(model, ids, mask)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, pipeline["ref"]) <= 1e-5


def test_xxl_param_count_and_memory():
  """Our abstract T5-XXL (no allocation) has exactly the parameters of transformers' encoder."""
  real = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
  hf_cfg = HFT5Config(**real)
  assert T5Config.from_hf_config(hf_cfg.to_dict()) == T5Config.v1_1_xxl()
  with torch.device("meta"):
    ref = T5EncoderModel(hf_cfg)
  want = sum(p.numel() for p in ref.parameters())  # tied shared/embed_tokens counted once
  abstract = abstract_t5(T5Config.v1_1_xxl(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  count = sum(int(np.prod(x.shape)) for x in leaves)
  assert count == want
  nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  assert nbytes == 2 * want and nbytes < 10e9  # bf16 T5-XXL fits one 16 GB chip with room to spare


def test_config_errors():
  ok = dict(vocab_size=99, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4)
  assert T5Config.from_hf_config(dict(ok, feed_forward_proj="gated-gelu")).dense_act_fn == "gelu_new"
  cfg = T5Config.from_hf_config(ok)  # transformers' default feed_forward_proj is relu
  assert (cfg.dense_act_fn, cfg.is_gated_act) == ("relu", False)
  with pytest.raises(ValueError, match="feed_forward_proj='gated-swish'"):
    T5Config.from_hf_config(dict(ok, feed_forward_proj="gated-swish"))
  with pytest.raises(ValueError, match="model_type='umt5'"):
    T5Config.from_hf_config(dict(ok, model_type="umt5"))
  with pytest.raises(ValueError, match="d_model"):
    T5Config.from_hf_config({k: v for k, v in ok.items() if k != "d_model"})


def test_loader_errors(pipeline, tmp_path):
  sd = _state_dict(pipeline["model"])
  cfg_dir = pipeline["root"] / "text_encoder"
  missing_key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  d = _write_state(tmp_path / "missing", {k: v for k, v in sd.items() if k != missing_key}, cfg_dir)
  with pytest.raises(WeightLoadError, match=r"blocks/ffn/wo/kernel .*layer indices 1 ") as e:
    load_t5(d)
  assert len(e.value.missing) == 1
  bad_key = "encoder.block.0.layer.0.SelfAttention.q.weight"
  d = _write_state(tmp_path / "shape", dict(sd, **{bad_key: sd[bad_key][:-1]}), cfg_dir)
  with pytest.raises(WeightLoadError, match=bad_key.replace(".", r"\.")) as e:
    load_t5(d)
  assert len(e.value.mismatched) == 1 and bad_key in e.value.mismatched[0]
  extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # UMT5-style
  d = _write_state(tmp_path / "extra", dict(sd, **{extra: np.zeros((3, 4), np.float32)}), cfg_dir)
  with pytest.raises(WeightLoadError, match=extra.replace(".", r"\.")):
    load_t5(d)


def test_hub_id_downloads_only_text_parts(pipeline, monkeypatch):
  import huggingface_hub
  calls = []

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
    calls.append((repo_id, list(allow_patterns)))
    return str(pipeline["root"])

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  enc = TextEncoder.from_pretrained("some-org/some-pixart-pipeline")
  assert [c[0] for c in calls] == ["some-org/some-pixart-pipeline"] * 2  # tokenizer, text encoder
  files = ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model-00001-of-00004.safetensors", "text_encoder/config.json",
           "tokenizer/spiece.model", "model_index.json"]
  fetched = {f for _, pats in calls for f in files if any(fnmatch.fnmatch(f, p) for p in pats)}
  assert fetched == {"text_encoder/model-00001-of-00004.safetensors", "text_encoder/config.json",
                     "tokenizer/spiece.model"}
  local = load_t5(pipeline["root"])
  for a, b in zip(jax.tree.leaves(nnx.state(enc.encoder)), jax.tree.leaves(nnx.state(local))):
    np.testing.assert_array_equal(a, b)
