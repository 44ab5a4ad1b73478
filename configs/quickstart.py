"""The main job: a diffusion model on the 8-Gaussian ring, trained and sampled on a CPU in minutes.

  python -m experiments.main --config=configs/quickstart.py --workdir=/tmp/quickstart
  python -m experiments.main --config=configs/quickstart.py:tiny --workdir=/tmp/qs_tiny   # seconds
"""
from configs import base
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = base.get_config()
  c.data.name = "ring"
  c.data.num_modes = 8
  c.data.radius = 4.0
  c.data.std = 0.1
  c.data.batch_size = 512
  c.model.hidden = 128
  c.model.depth = 3
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 200
  c.optim.ema_decay = 0.995
  c.train.steps = 4000
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.sample.sampler = "ddpm"
  c.sample.steps = 1000
  c.sample.num_samples = 5000     # enough for mode shares to +-0.005 (1 s.e.)
  c.eval.num_reference = 5000
  if arg.tiny:  # a seconds-long run for tests and smoke checks
    c.data.batch_size = 64
    c.model.hidden = 32
    c.model.depth = 1
    c.train.steps = 20
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.optim.warmup_steps = 5
    c.sample.steps = 20
    c.sample.num_samples = 256
    c.sample.batch_size = 256
    c.eval.num_reference = 256
    c.eval.num_projections = 16
    c.train.progress = False
  return c
