r"""PixArt-Sigma LCM at 1024 px: latent consistency distillation of the released 1024-MS weights
(`train.trainables.distill`; the recipe of PixArt-LCM, official `configs/pixart_config/PixArt_xl2_img1024_lcm.py`).

Teacher and student start from `PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`; the teacher is frozen and sharded like the
student (FSDP), the target is the student's EMA (rate 0.95). Teacher step: DDIM over a 50-step skipping grid under
classifier-free guidance at a FIXED scale 5.5 (PixArt-LCM's w = 4.5 in the LCM form c + w (c - u)), baked into the
student (no w-embedding: the DiT and its checkpoint layout stay PixArt's). Pseudo-Huber loss (c = 0.001), AdamW lr 2e-5
(eps 1e-10, no weight decay, clip 0.01, 100 warm-up steps), no caption dropout, ASPECT_RATIO_1024 buckets.
`data.batch_size` is the GLOBAL batch (official: 16 per GPU; lr is not rescaled with the batch, as officially).

Arguments (after `:`): lora (LCM-LoRA: rank 64 adapters on the official target modules, no EMA: the target is the
adapted student under stop-gradient; exported to WORKDIR/lora and, in the PEFT / diffusers layout, WORKDIR/lora_peft),
smoke (tiny fp32 model on synthetic data for a CPU check; needs a teacher: --config.init_from=DIR of a smoke run).

Distil (every host of the slice):
  python -m pixart_jax.train --config configs/distill/lcm_1024.py \
      --workdir gs://BUCKET/runs/lcm1024 --config.data.dir gs://BUCKET/data/sigma1024
LCM-LoRA:
  python -m pixart_jax.train --config configs/distill/lcm_1024.py:lora \
      --workdir gs://BUCKET/runs/lcm_lora1024 --config.data.dir gs://BUCKET/data/sigma1024
Memory verdict (the planner compiles the distillation step: student + optimizer + EMA target + frozen teacher):
  python -m pixart_jax.plan --config configs/distill/lcm_1024.py --mesh fsdp=4 --res 1024x1024 --what train \
      --topology v5p:2x2x1
Sample the distilled model in 4 steps without guidance:
  python -m pixart_jax.sample --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --transformer WORKDIR \
      --sampler lcm --steps 4 --guidance 1 --prompt "..."
"""
from pixart_jax.train import config_defaults as common

# The official LCM-LoRA target modules (to_q/k/v, to_out.0, ff.net.0.proj / ff.net.2, proj_out, linear, linear_1/2;
# `proj` there is also the patch embedding's conv, which our LoRA does not adapt) as our parameter paths.
LORA_TARGETS = (r".*attn\.(q|k|v|out)\.kernel", r".*mlp\.fc[12]\.kernel", r"final\.linear\.kernel",
                r"t_embedder\.linear_[12]\.kernel", r"t_block\.kernel")


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, lora=False)
  c = common.base_config(preset="sigma-xl2-1024-ms", table="1024", batch_size=64, warmup=100, lr=2e-5)
  c.init_from = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
  c.distill.enabled = True
  c.distill.guidance = 5.5
  c.distill.num_ddim_timesteps = 50
  c.distill.loss = "huber"
  c.distill.huber_c = 0.001
  c.ema.rate = 0.95
  c.class_dropout_prob = 0.0
  c.optimizer.name, c.optimizer.betas, c.optimizer.eps = "adamw", (0.9, 0.999), (1e-10,)
  c.optimizer.weight_decay, c.optimizer.clip, c.optimizer.auto_lr = 0.0, 0.01, "none"
  c.steps = 5_000
  c.ckpt_every = 200  # official save_model_steps
  c.sample.sampler, c.sample.num_steps, c.sample.guidance = "lcm", 4, 1.0
  if arg.lora:
    c.lora.rank, c.lora.alpha, c.lora.targets = 64, 64.0, LORA_TARGETS
    c.ema.rate = None
  if arg.smoke:
    common.smoke(c)
    c.init_from = None
    c.ckpt_every = 3
  return c
