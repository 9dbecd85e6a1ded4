"""Text -> image: tokenizer + T5 + PixArt-Sigma DiT + SDXL VAE, with jitted samplers and resolution binning.

    pipe = Pipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", dtype=jnp.bfloat16)
    images = pipe(["a cat"], height=1024, width=768, steps=20, guidance_scale=4.5, seed=0)  # uint8 (B, H, W, 3)

What diffusers' PixArtSigmaPipeline does, step by step, and what we do the same way:
  * prompts are lower-cased and stripped (diffusers without bs4/ftfy; `text_preprocessing="none"` keeps them);
  * the negative prompt ("" by default) gets its own mask (`guidance_mode="diffusers"`); the official sampler
    gives it the prompt's mask (`guidance_mode="official"`, docs/ARCHITECTURE.md §6.6); guidance_scale <= 1 runs no
    unconditional branch;
  * both are encoded only up to the caption bucket of the longest one (`trim_captions`, default on; diffusers keeps
    all 300 pad positions, the official sampler drops them): the same images to float rounding, less work;
  * the request is binned to the closest aspect-ratio bucket of the checkpoint's table, sampled there, decoded,
    then bilinearly resized to cover the request and center-cropped (`use_resolution_binning`);
  * images are (x / 2 + 0.5) clipped to [0, 1], times 255, rounded.
Image-to-image (`image=`, `strength=`) and inpainting (`image=`, `mask=`) steer the same loop (`diffusion.denoise`
keywords) for every sampler; the image is VAE-encoded at the sample size. The whole denoising loop is one jitted
program (`diffusion.denoise`, the same the planner compiles) per (batch, latent shape, sampler, steps, guidance
on/off, strength, with/without image and mask); the guidance scale is a traced argument, so changing it does not
recompile. Initial noise of image i is drawn from `fold_in(key(seed), i)`, so an image does not change with the
batch it is generated in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax import checks
from pixart_jax.data import buckets
from pixart_jax.diffusion import samplers
from pixart_jax.diffusion.denoise import STATIC_ARGNAMES, denoise
from pixart_jax.images import to_uint8
from pixart_jax.models.attention import SelfAttention
from pixart_jax.models.attention_backends import AttentionOptions
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.text_encoder import TextEncoder
from pixart_jax.models.vae import AutoencoderKL
from pixart_jax.parallel import chips, sampling_layout
from pixart_jax.parallel.sharding import LOGICAL_RULES, batch_sharding, shard_model, state_shardings

log = logging.getLogger(__name__)

MAX_LENGTH = 300


def enable_compilation_cache(path: str | os.PathLike) -> None:
  """Persistent XLA compilation cache (survives restarts; e.g. on Drive / GCS). Call once, before compiling."""
  jax.config.update("jax_compilation_cache_dir", os.fspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def initial_noise(seed: int, batch: int, shape: tuple[int, int, int]) -> jax.Array:
  """(batch, h, w, C) float32 N(0, 1) noise; image i uses fold_in(key(seed), i)."""
  key = jax.random.key(seed)
  return jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) for i in range(batch)])


def resize_cover_crop(images: jax.Array, height: int, width: int) -> jax.Array:
  """(B, H, W, C) float -> (B, height, width, C): bilinear cover resize (no antialias, half-pixel centres, as
  torch F.interpolate(align_corners=False)) then center crop, as diffusers' `resize_and_crop_tensor`."""
  b, h, w, c = images.shape
  if (h, w) == (height, width):
    return images
  ratio = max(height / h, width / w)
  rh, rw = int(h * ratio), int(w * ratio)
  out = jax.image.resize(images, (b, rh, rw, c), method="bilinear", antialias=False)
  y0, x0 = (rh - height) // 2, (rw - width) // 2
  return out[:, y0:y0 + height, x0:x0 + width]


def latent_mask(pixel_mask: jax.Array, factor: int) -> jax.Array:
  """(B H W 1) 0 / 1 pixel mask (1 = repaint) -> (B H/f W/f 1): a latent cell is regenerated when any of its f x f
  pixels is to be repainted (the kept region never overwrites a pixel to repaint)."""
  return einops.reduce(pixel_mask, "b (h p) (w q) c -> b h w c", "max", p=factor, q=factor)


def check_call_args(*, steps: int | None = None, guidance_scale: float = 4.5, seed: int = 0,
                    height: int | None = None, width: int | None = None, sampler: str = "dpm-solver") -> None:
  """Refuses what `Pipeline.__call__` cannot sample, before any work (the `sample` CLI calls it before loading):
  ValueError naming the argument, its value and what is valid."""
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(samplers.SAMPLERS)}")
  checks.positive("steps", steps, allow_none=True)
  checks.finite("guidance_scale", guidance_scale)
  checks.seed("seed", seed)
  checks.positive("height (pixels)", height, allow_none=True)
  checks.positive("width (pixels)", width, allow_none=True)


def with_sequence_parallel(graphdef: nnx.GraphDef, state) -> nnx.GraphDef:
  """The DiT's graphdef with every self-attention set to shard tokens over the mesh's `sequence` axis
  (`AttentionOptions.sequence_parallel`; parameters unchanged)."""
  model = nnx.merge(graphdef, state)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, SelfAttention):
      node.opts = dataclasses.replace(node.opts, sequence_parallel=True)
  model.attention = dataclasses.replace(model.attention, sequence_parallel=True)
  return nnx.split(model)[0]


class Pipeline:
  """PixArt-Sigma text-to-image on one device or a mesh.

  On a mesh, each call picks its layout from the mesh and the request (`parallel.sampling_layout`): the prompts
  are split over the `data` axis as far as they divide, and the `data` devices the batch leaves idle become
  sequence-parallel shards of each image (token grid rows, padded to whole KV-compression windows; >= 4096
  tokens, i.e. 1024 px) instead of repeating the same work. A mesh with its own `sequence` axis is used as given;
  `fsdp`/`tensor` never change. Samples larger than 2048 px on a side (1024 px on a chip under 24 GiB, e.g. a
  16 GiB v5e) are decoded in overlapping 128-latent (1024 px) VAE tiles. `__call__(sequence_shards=..., vae_tile_latent=...)` overrides either choice.
  """

  def __init__(self, text_encoder: TextEncoder, transformer: PixArtSigma, vae: AutoencoderKL, *,
               mesh: jax.sharding.Mesh | None = None, rules=LOGICAL_RULES, controlnet=None):
    """controlnet: a `models.controlnet.ControlBranch` on `transformer` (enables `control_image=`), or None."""
    cfg = transformer.cfg
    width = getattr(text_encoder, "hidden_size", None)
    if width is not None and width != cfg.caption_channels:
      raise ValueError(f"the transformer takes {cfg.caption_channels}-wide caption features (caption_channels) but "
                       f"the text encoder gives {width}-wide ones: pair the transformer with its own T5")
    latent = getattr(getattr(vae, "config", None), "latent_channels", None)
    if latent is not None and latent != cfg.in_channels:
      raise ValueError(f"the transformer takes {cfg.in_channels}-channel latents (in_channels) but the VAE gives "
                       f"{latent}-channel ones: pair the transformer with its own VAE")
    self.text_encoder, self.transformer, self.vae = text_encoder, transformer, vae
    self.mesh, self.rules = mesh, rules
    if mesh is not None:
      shard_model(transformer, mesh, rules)
    self.num_traces = 0  # how many times the denoising program was traced (compile-cache checks)
    self._dit_graph, self._dit_state = nnx.split(transformer)
    self._vae_graph, self._vae_state = nnx.split(vae)
    self._sp_graph = None  # the sequence-parallel graphdef, built on first use
    self._placed: tuple | None = None  # (sequence shards, mesh, DiT state on it) of the last SP layout
    self._denoise = jax.jit(self._denoise_traced, static_argnames=STATIC_ARGNAMES + ("sequence_parallel",))
    self._decode = jax.jit(self._decode_impl, static_argnames=("height", "width"))
    self._encode = jax.jit(self._encode_impl, static_argnames=("height", "width"))
    self.controlnet = None
    if controlnet is not None:
      from pixart_jax.models.controlnet import ControlPixArtSigma

      if mesh is not None:
        shard_model(controlnet, mesh, rules)
      self.controlnet = ControlPixArtSigma(transformer, controlnet)
      self._ctrl_graph, self._ctrl_state = nnx.split(self.controlnet)

  # -----------------------------------------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, src: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=jnp.float32, text_dtype=None,
                      vae_dtype=jnp.float32,
                      transformer: str | os.PathLike | None = None, transformer_config=None,
                      attention: AttentionOptions | str | None = None, mesh: jax.sharding.Mesh | None = None,
                      rules=LOGICAL_RULES, progress: bool = False, controlnet: str | os.PathLike | None = None,
                      offload_text_encoder: bool = False) -> "Pipeline":
    """src: a diffusers PixArt-Sigma pipeline directory or Hub id (transformer/, text_encoder/, tokenizer/, vae/).

    transformer: another source for the DiT (a .pth, an Orbax dir from `convert`, a transformer/ dir, a Hub id),
      e.g. a fine-tune combined with `PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers`.
    dtype: compute dtype of the DiT (bf16 on accelerators); param_dtype: its storage dtype (bf16 halves HBM).
    text_dtype: compute dtype of T5 (default: `dtype`). vae_dtype: compute dtype of the VAE (float32 default).
    attention: how the DiT's attention runs (`AttentionOptions`, a backend name such as "splash", None: auto,
      i.e. splash on TPU, cuDNN on GPU for bf16/fp16, blockwise otherwise).
    controlnet: official-layout ControlNet weights (`convert.controlnet_keys`): a branch file (`controlnet.*` keys,
      as training exports it) attached to the DiT, or a whole ControlPixArtHalf checkpoint (its base replaces the DiT).
    offload_text_encoder: keep T5's weights in host memory, brought to the device for each encode only
      (`TextEncoder` offload; single device, mesh=None): 4K sampling then fits one 16 GiB v5e chip.
    """
    from pixart_jax.convert.dit import load_transformer
    from pixart_jax.convert.hub import resolve_local
    from pixart_jax.convert.vae_keys import load_vae

    local = resolve_local(src, allow_patterns=None)
    dit = load_transformer(transformer or local, config=transformer_config, dtype=dtype, param_dtype=param_dtype,
                           attention=attention, mesh=mesh, rules=rules, progress=progress)
    text = TextEncoder.from_pretrained(local, dtype=text_dtype or dtype, mesh=mesh, rules=rules, progress=progress,
                                       offload=offload_text_encoder)
    vae = load_vae(local, dtype=vae_dtype)
    branch = None
    if controlnet is not None:
      from pixart_jax.convert.controlnet_keys import attach_controlnet

      wrapped = attach_controlnet(controlnet, dit, mesh=mesh, rules=rules)
      dit, branch = wrapped.base_model, wrapped.controlnet
    return cls(text, dit, vae, mesh=mesh, rules=rules, controlnet=branch)

  # -----------------------------------------------------------------------------------------------------------
  def _denoise_traced(self, state, latents, cond, uncond, scale, key, control=None, *, sequence_parallel=False,
                      **static):
    self.num_traces += 1
    if control is not None:
      graph = self._ctrl_graph
    else:
      graph = self._sp_graph if sequence_parallel else self._dit_graph
    return denoise(graph, state, latents, cond, uncond, scale, key, control=control, **static)

  def layout(self, batch: int, sample_height: int, sample_width: int, *, sequence_shards: int | None = None,
             vae_tile_latent: int | None = None) -> sampling_layout.SamplingLayout:
    """How a request of `batch` images sampled at `sample_height` x `sample_width` px runs on this Pipeline's
    mesh (the rule in the class docstring; `parallel.sampling_layout`)."""
    cfg = self.transformer.cfg
    unit = self.vae.config.downsample_factor * cfg.patch_size
    ratios = [cfg.kv_ratio(i) for i in range(cfg.depth)]
    devices = self.mesh.devices.flat if self.mesh is not None else jax.devices()[:1]
    return sampling_layout.choose(self.mesh, batch, (sample_height // unit, sample_width // unit), ratios,
                                  sample_height, sample_width, sequence=sequence_shards,
                                  vae_tile_latent=vae_tile_latent,
                                  device_bytes=chips.device_memory(list(devices)))

  def _placement(self, shards: int) -> tuple[jax.sharding.Mesh | None, object]:
    """(mesh, DiT state) for `shards` sequence shards: the Pipeline's own, or its mesh re-cut with the DiT state
    moved onto it (kept for the next call with the same layout)."""
    if self.mesh is None or shards == 1 or int(self.mesh.shape.get("sequence", 1)) == shards:
      return self.mesh, self._dit_state
    if self._placed is None or self._placed[0] != shards:
      self._placed = None  # drop the previous copy first
      mesh = sampling_layout.sequence_mesh(self.mesh, shards)
      state = jax.device_put(self._dit_state, state_shardings(self._dit_state, mesh, self.rules))
      self._placed = (shards, mesh, state)
    return self._placed[1], self._placed[2]

  def control_latents(self, control_image, batch: int, height: int, width: int) -> jax.Array:
    """Control image(s) -> (batch, height/f, width/f, C) diffusion-space latents (the VAE posterior mean).

    control_image: one image or `batch` images as `checks.image` takes them (uint8 / float in [-1, 1] (H W 3) /
    (B H W 3), a PIL image), resized to cover height x width and center-cropped (as the official ControlNet
    inference script does), VAE-encoded as `image`."""
    x = jnp.asarray(checks.image("control_image", control_image, batch=batch))
    lat = self._encode(self._vae_state, x, height=height, width=width)
    return jnp.broadcast_to(lat, (batch, *lat.shape[1:])).astype(jnp.float32)

  def _decode_impl(self, state, z, *, height, width):
    vae = nnx.merge(self._vae_graph, state)
    img = vae.decode(vae.unscale_latent(z)).astype(jnp.float32)
    return resize_cover_crop(img, height, width)

  def _encode_impl(self, state, images, *, height, width):
    vae = nnx.merge(self._vae_graph, state)
    return vae.encode_scaled(resize_cover_crop(images, height, width)).astype(jnp.float32)

  def encode(self, prompts: Sequence[str], text_preprocessing: str = "lower", *, trim_captions: bool = False
             ) -> tuple[jax.Array, jax.Array]:
    """Prompts -> (embeds (B, S, D) f32, mask (B, S) int32), with diffusers' light preprocessing. S = 300, or with
    `trim_captions` the caption bucket of the longest prompt (`text_encoder.caption_bucket`)."""
    if text_preprocessing == "lower":
      prompts = [p.lower().strip() for p in prompts]
    elif text_preprocessing != "none":
      raise ValueError(f"text_preprocessing must be 'lower' or 'none', got {text_preprocessing!r}")
    return self.text_encoder.encode_prompts(list(prompts), max_length=MAX_LENGTH, trim=trim_captions)

  def resolve_size(self, height: int | None, width: int | None, use_resolution_binning: bool
                   ) -> tuple[int, int, int, int]:
    """-> (sample height, sample width, output height, output width) in pixels."""
    cfg = self.transformer.cfg
    f = self.vae.config.downsample_factor
    height = cfg.sample_size * f if height is None else height
    width = cfg.sample_size * f if width is None else width
    checks.positive("height (pixels)", height)
    checks.positive("width (pixels)", width)
    if use_resolution_binning:
      return (*buckets.binned_size(height, width, cfg.sample_size), height, width)
    unit = f * cfg.patch_size
    if height % unit or width % unit:
      raise ValueError(f"height and width must be multiples of {unit} without resolution binning; got "
                       f"{height}x{width}")
    return height, width, height, width

  def __call__(self, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
               height: int | None = None, width: int | None = None, steps: int | None = None,
               guidance_scale: float = 4.5, sampler: str = "dpm-solver", seed: int = 0,
               latents: np.ndarray | jax.Array | None = None, use_resolution_binning: bool = True,
               guidance_mode: str = "diffusers", text_preprocessing: str = "lower",
               vae_tile_latent: int | None = None, output: str = "uint8", timings: dict | None = None,
               image=None, strength: float = 1.0, mask=None, paste_back: bool = False,
               sequence_shards: int | None = None, control_image=None, control_scale: float = 1.0,
               trim_captions: bool = True):
    """Generates images; with `image`, image-to-image (`strength`) and inpainting (`mask`).

    prompts: one string or B strings; negative_prompt: one string or B strings.
    latents: explicit initial noise (B, h, w, C) NHWC at the SAMPLE (binned) latent size; else from `seed`.
    vae_tile_latent: decode in overlapping tiles of this latent size (auto: tiles of 128 above 2048 px, above
      1024 px on chips under 24 GiB).
    sequence_shards: sequence-parallel shards per image (None: auto, see the class docstring; 1: off).
    output: "uint8" -> numpy (B, H, W, 3) uint8; "float" -> jax (B, H, W, 3) in [-1, 1].
    timings: if a dict is given, it receives seconds for encode / denoise / decode.
    image: (H W 3) / (B H W 3) uint8 or [-1, 1] float, or a PIL image: the image to edit (one for all prompts or
      one per prompt). It sets the output size (height / width, if given, must equal it); it is resized to the
      sample (binned) size and VAE-encoded (posterior mean).
    strength: image-to-image (SDEdit) in (0, 1]: the share of the sampler's steps that run, from the image noised
      to the first of them (diffusers' img2img timestep selection; LCM: diffusers' LCM img2img grid). 1: the image
      is not used as a start (text-to-image, bit for bit, unless a mask is given).
    mask: inpainting mask in pixels at the image's size, (H W), (H W 1), (B H W) or (B H W 1), 1 = repaint,
      0 = keep (binarised at 0.5). After every step the latent cells without a pixel to repaint are reset to the
      image noised to that step's level; an all-ones mask is text-to-image.
    paste_back: with a mask, paste the kept pixels of `image` over the decoded result (exact kept region).
    control_image: the ControlNet's control image(s) (`control_latents`; needs `controlnet=`), control_scale: the
      weight of the branch's outputs (1 = the official ControlNet; a traced value: changing it does not recompile).
    trim_captions: encode and attend to the captions (prompts and negative prompts together) only up to the caption
      bucket of the longest one (16, 32, 64, 128, 256 or 300 tokens, `text_encoder.caption_bucket`) instead of
      all 300 positions. The dropped positions are padding, masked out of every attention, so the images are the
      same to float rounding (the official sampler drops them too); T5 and the cross-attention do a fraction of
      the work. One denoising program per bucket; False: always 300 tokens, diffusers' shapes.
    """
    t_start = time.perf_counter()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    b = len(prompts)
    negs = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
    if not b:
      raise ValueError("prompts is empty: give at least one prompt")
    bad = [p for p in prompts + negs if not isinstance(p, str)]
    if bad:
      raise ValueError(f"prompts must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    if len(negs) != b:
      raise ValueError(f"{len(negs)} negative prompts for {b} prompts")
    check_call_args(steps=steps, guidance_scale=guidance_scale, seed=seed, height=height, width=width,
                    sampler=sampler)
    strength = checks.strength("strength", strength)
    pixels = pixel_mask = None
    if image is None:
      if strength < 1.0 or mask is not None:
        raise ValueError(f"{'strength < 1' if mask is None else 'a mask'} needs an image: pass image=... (the image "
                         f"to edit)")
    else:
      pixels = checks.image("image", image, batch=b)
      ih, iw = pixels.shape[1:3]
      if (height is not None and height != ih) or (width is not None and width != iw):
        raise ValueError(f"image is {iw}x{ih} pixels (WIDTHxHEIGHT) but height={height}, width={width} were asked: "
                         f"leave height / width unset with an image, or resize the image")
      height, width = ih, iw
      pixels = np.broadcast_to(pixels, (b,) + pixels.shape[1:])
      if mask is not None:
        pixel_mask = np.broadcast_to(checks.mask("mask", mask, b, ih, iw), (b, ih, iw, 1))
    steps = samplers.DEFAULT_STEPS[sampler] if steps is None else steps
    sh, sw, oh, ow = self.resolve_size(height, width, use_resolution_binning)
    f = self.vae.config.downsample_factor
    lat_shape = (sh // f, sw // f, self.transformer.cfg.in_channels)
    if latents is None:
      latents = initial_noise(seed, b, lat_shape)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape != (b, *lat_shape):
      raise ValueError(f"latents must have shape {(b, *lat_shape)} (NHWC at the {sh}x{sw} sample size), "
                       f"got {latents.shape}")
    control = None
    if control_image is not None:
      if self.controlnet is None:
        raise ValueError("control_image needs a ControlNet: Pipeline(..., controlnet=BRANCH) or "
                         "Pipeline.from_pretrained(..., controlnet=PATH)")
      checks.finite("control_scale", control_scale)
      control = (self.control_latents(control_image, b, sh, sw), jnp.float32(control_scale))
    # a ControlNet call runs its wrapped model unsharded by sequence (the branch has no sequence-parallel path)
    layout = self.layout(b, sh, sw, sequence_shards=1 if control is not None else sequence_shards,
                         vae_tile_latent=vae_tile_latent)
    use_cfg = guidance_scale > 1.0
    # one T5 call for prompts and negative prompts: both halves of the guidance batch share one caption length
    emb, emb_mask = self.encode(prompts + (negs if use_cfg else []), text_preprocessing, trim_captions=trim_captions)
    cond_emb, cond_mask = emb[:b], emb_mask[:b]
    if use_cfg:
      un_emb, un_mask = emb[b:], emb_mask[b:]
    edit = {}
    if pixels is not None:
      edit["image_latents"] = self._encode(self._vae_state, jnp.asarray(pixels), height=sh, width=sw)
      if pixel_mask is not None:
        sample_mask = resize_cover_crop(jnp.asarray(pixel_mask), sh, sw)
        edit["mask"] = latent_mask((sample_mask >= 0.5).astype(jnp.float32), f)
    t_enc = time.perf_counter()

    sp = layout.sequence_parallel
    if sp and self._sp_graph is None:
      self._sp_graph = with_sequence_parallel(self._dit_graph, self._dit_state)
    mesh, dit_state = self._placement(layout.sequence)
    args = (latents, (cond_emb, cond_mask), (un_emb, un_mask) if use_cfg else None, edit)
    if control is not None:
      dit_state = self._ctrl_state
    if mesh is not None:  # every batch array over the batch axes (replicated where the batch does not split)
      args = jax.device_put(args, batch_sharding(mesh, self.rules, (b,)))
      if control is not None:
        control = (jax.device_put(control[0], batch_sharding(mesh, self.rules, (b,))), control[1])
    extra = {} if control is None else {"control": control}
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
      x0 = self._denoise(dit_state, *args[:3], jnp.float32(guidance_scale), jax.random.key(seed),
                         sampler=sampler, steps=steps, mode=guidance_mode, strength=strength, sequence_parallel=sp,
                         **args[3], **extra)
      x0 = jax.block_until_ready(x0)
      t_den = time.perf_counter()
      if layout.vae_tile_latent is None:
        images = self._decode(self._vae_state, x0, height=oh, width=ow)
      else:
        from pixart_jax.models.vae_tiling import decode_tiled

        img = decode_tiled(self.vae, self.vae.unscale_latent(x0), tile_latent=layout.vae_tile_latent,
                           overlap_latent=layout.overlap_latent)
        images = resize_cover_crop(img.astype(jnp.float32), oh, ow)
      if paste_back and pixel_mask is not None:
        images = jnp.where(jnp.asarray(pixel_mask) >= 0.5, images, jnp.asarray(pixels))
      images = jax.block_until_ready(images)
    if timings is not None:
      timings.update(encode=t_enc - t_start, denoise=t_den - t_enc, decode=time.perf_counter() - t_den)
    return to_uint8(images) if output == "uint8" else images

