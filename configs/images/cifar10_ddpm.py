"""DDPM++-style diffusion on CIFAR-10 (Song et al. 2021 widths, shortened): a GPU job.

Needs CIFAR-10 prepared as TFDS ArrayRecord files in data.data_dir; this code never downloads.
On a machine with internet access:
  pip install tensorflow tensorflow-datasets array_record
  tfds build cifar10 --data_dir=DIR --file_format=array_record
then copy DIR/cifar10 into the data dir and run
  python -m experiments.main --config=configs/images/cifar10_ddpm.py --workdir=/tmp/cifar \
      --config.data.data_dir=DIR
fd_cifar10 uses a small CIFAR-10 classifier's features (not Inception: not FID).
"""
from configs import base
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, conditional=False)
  c = base.get_config()
  c.data.name = "cifar10"
  c.data.batch_size = 128
  c.data.random_flip = True
  c.data.conditional = arg.conditional
  c.model.name = "unet"
  c.model.ch = 128
  c.model.ch_mult = (1, 2, 2, 2)        # 32 -> 16 -> 8 -> 4 px
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.num_heads = 4
  c.model.dropout = 0.1
  c.diffusion.p_uncond = 0.1 if arg.conditional else 0.0
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.train.steps = 400_000
  c.train.log_every = 1000
  c.train.ckpt_every = 10_000
  c.sample.sampler = "dpm_solver++"
  c.sample.steps = 20
  c.sample.num_samples = 10_000         # = test split size
  c.sample.batch_size = 1000
  c.sweep.samplers = ("ddim", "dpm_solver++")
  c.sweep.steps = (10, 20, 50)
  return c
