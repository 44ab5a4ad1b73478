"""Class-conditional latent diffusion on CIFAR-10: the same two stages, sized for a GPU.

Needs CIFAR-10 prepared as TFDS ArrayRecord files in data.data_dir (this code never
downloads; see configs/images/cifar10_ddpm.py for how), then
  python -m experiments.main --config=configs/latent/cifar10_ldm.py --workdir=/tmp/cifar_ldm \
      --config.data.data_dir=DIR
Stage 1: a wider f=4 autoencoder (32x32x3 -> 8x8x4) with the perceptual term in the fd
feature network; stage 2: a label-conditional UNet on the latents, CFG over the labels.
"""
from configs.latent.common import latent_diffusion


def get_config(arg=None):
  del arg  # no variants
  c = latent_diffusion("cifar10", conditioning="label")
  c.data.batch_size = 128
  c.data.random_flip = True
  c.latent.ch = 64
  c.latent.num_res_blocks = 2
  c.latent.steps = 50_000
  c.latent.batch_size = 64
  c.latent.learning_rate = 4.5e-4
  c.latent.ema_decay = 0.999            # 50k steps: long enough for the EMA to help
  c.latent.perceptual_weight = 0.1
  c.latent.scale_images = 10_000
  c.model.ch = 128
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (4,)
  c.model.dropout = 0.1
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.ema_decay = 0.9999
  c.train.steps = 200_000
  c.train.log_every = 1000
  c.train.ckpt_every = 10_000
  c.sample.num_samples = 10_000
  c.sample.batch_size = 1000
  c.guidance.scales = (1.0, 2.0, 4.0)
  return c
