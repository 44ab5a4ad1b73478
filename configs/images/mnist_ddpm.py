"""Diffusion on MNIST resized to 32x32 (or native 28 with ch_mult=(1, 2, 2)): a GPU job.

Needs MNIST prepared as TFDS ArrayRecord files in data.data_dir; this code never downloads.
On a machine with internet access:
  pip install tensorflow tensorflow-datasets array_record
  tfds build mnist --data_dir=DIR --file_format=array_record
then copy DIR/mnist into the data dir and run
  python -m experiments.main --config=configs/images/mnist_ddpm.py --workdir=/tmp/mnist \
      --config.data.data_dir=DIR
"""
from configs import base
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, conditional=False)
  c = base.get_config()
  c.data.name = "mnist"
  c.data.image_size = 32                # resized (bicubic) so three downsamplings divide it
  c.data.batch_size = 128
  c.data.conditional = arg.conditional
  c.model.name = "unet"
  c.model.ch = 64
  c.model.ch_mult = (1, 2, 2)           # 32 -> 16 -> 8 px
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (8,)
  c.model.num_heads = 4
  c.model.dropout = 0.1
  c.diffusion.p_uncond = 0.1 if arg.conditional else 0.0
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 1000
  c.optim.ema_decay = 0.9999
  c.train.steps = 50_000
  c.train.log_every = 500
  c.train.ckpt_every = 5000
  c.sample.sampler = "dpm_solver++"
  c.sample.steps = 20
  c.sample.num_samples = 10_000         # = test split size
  c.sample.batch_size = 1000
  return c
