"""The recipe the full-size image diffusion configs share (shapes, MNIST, CIFAR-10).

A DDPM++-style UNet with dropout 0.1, AdamW at 2e-4 with warmup and EMA 0.9999, label
dropout for classifier-free guidance in the conditional variant, and DPM-Solver++ with 20
steps on as many samples as the test split has. Each config file sets its data and overrides
what differs (widths, schedule length, logging).
"""
from configs import base


def image_diffusion(name: str, *, conditional: bool = False, ch: int = 64,
                    ch_mult=(1, 2, 2), attn_resolutions=(8,), warmup_steps: int = 1000,
                    steps: int = 50_000, log_every: int = 500, ckpt_every: int = 5000):
  """base.get_config() with the shared image recipe for TFDS dataset `name`."""
  c = base.get_config()
  c.data.name = name
  c.data.batch_size = 128
  c.data.conditional = conditional
  c.model.name = "unet"
  c.model.ch = ch
  c.model.ch_mult = tuple(ch_mult)      # one entry per resolution, halving the size each time
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = tuple(attn_resolutions)
  c.model.num_heads = 4
  c.model.dropout = 0.1
  c.diffusion.p_uncond = 0.1 if conditional else 0.0
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = warmup_steps
  c.optim.ema_decay = 0.9999
  c.train.steps = steps
  c.train.log_every = log_every
  c.train.ckpt_every = ckpt_every
  c.sample.sampler = "dpm_solver++"
  c.sample.steps = 20
  c.sample.num_samples = 10_000         # = test split size
  c.sample.batch_size = 1000
  return c
