"""A UNet diffusion model on the procedural 32x32 RGB shapes (offline; research.data.builders).

  python -m experiments.main --config=configs/images/shapes_ddpm.py --workdir=/tmp/shapes
  python -m experiments.main --config=configs/images/shapes_ddpm.py:small,conditional --workdir=/tmp/s

A GPU-sized job (the CPU can run `:small` for a look). The first run prepares the 60,000
images under data.data_dir (a few minutes of numpy + ArrayRecord writing) and trains the
fd_shapes feature classifier once.

Variants: small (shapes/small: 5,000 train images, a smaller UNet, fewer steps),
conditional (shape label with label dropout for CFG), tiny (tests).
"""
from configs.common import parse_arg
from configs.images.common import image_diffusion


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, small=False, conditional=False)
  c = image_diffusion("shapes", conditional=arg.conditional, steps=100_000)
  c.data.random_flip = False            # captions name left/right positions
  c.sweep.samplers = ("ddpm", "ddim", "dpm_solver++")
  c.sweep.steps = (20, 50, 1000)
  if arg.small:
    c.data.name = "shapes/small"
    c.model.ch = 32
    c.model.num_res_blocks = 1
    c.model.dropout = 0.0
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.train.steps = 5000
    c.train.ckpt_every = 1000
    c.sample.num_samples = 1000
  if arg.tiny:
    c.data.name = "shapes/tiny"
    c.data.batch_size = 8
    c.model.ch = 8
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (8,)
    c.model.dropout = 0.0
    c.train.steps = 2
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.optim.warmup_steps = 1
    c.sample.sampler = "ddim"
    c.sample.steps = 3
    c.sample.num_samples = 8
    c.sample.batch_size = 8
    c.train.progress = False
  return c
