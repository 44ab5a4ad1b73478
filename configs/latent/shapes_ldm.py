"""Text-conditional latent diffusion on the procedural shapes (Stable Diffusion at toy scale).

  python -m experiments.main --config=configs/latent/shapes_ldm.py --workdir=/tmp/ldm
  python -m experiments.main --config=configs/latent/shapes_ldm.py --workdir=/tmp/ldm \
      --mode=sample --config.sample.prompts="('large red circle at centre', \
      'small blue triangle at top left')" --config.sample.per_prompt=8

Stage 1 trains the f=4 KL autoencoder in WORKDIR/autoencoder (32x32x3 -> 8x8x4); stage 2
trains a cross-attention UNet on its scaled latents with a text encoder over the captions
("small red circle at top left"), 10% caption dropout for CFG, v-prediction. Both stages take
9 min 12 s on 2 idle CPU cores (14.0 CPU-minutes; README, "Latent diffusion"). Samples use
the test split's captions unless sample.prompts are given; metrics add prompt adherence per
attribute.

Variants: label (shape labels instead of captions), tiny (tests).
"""
from configs.common import parse_arg
from configs.latent.common import latent_diffusion


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, label=False)
  c = latent_diffusion("shapes/small", conditioning="label" if arg.label else "text")
  c.data.random_flip = False            # captions name left/right positions
  if arg.tiny:
    c.data.name = "shapes/tiny"
    c.data.batch_size = 8
    c.latent.ch = 8
    c.latent.steps = 2
    c.latent.batch_size = 8
    c.latent.warmup_steps = 1
    c.latent.scale_images = 64
    c.latent.text_width = 16
    c.latent.text_depth = 1
    c.model.ch = 8
    c.model.ch_mult = (1,)              # one level (8x8 latents): compile time is what costs
    c.model.transformer_resolutions = (8,) if not arg.label else ()
    c.model.num_heads = 2
    c.optim.warmup_steps = 1
    c.train.steps = 2
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.train.progress = False
    c.sample.sampler = "ddim"
    c.sample.steps = 3
    c.sample.num_samples = 8
    c.sample.batch_size = 8
    c.sample.guidance_scale = 3.0
    c.guidance.scales = (3.0,)          # = the main run's: reused, not sampled again
  return c
