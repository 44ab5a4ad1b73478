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
from configs.common import parse_arg
from configs.images.common import image_diffusion


def get_config(arg=None):
  arg = parse_arg(arg, conditional=False)
  c = image_diffusion("cifar10", conditional=arg.conditional, ch=128, ch_mult=(1, 2, 2, 2),
                      attn_resolutions=(16,), warmup_steps=5000, steps=400_000,
                      log_every=1000, ckpt_every=10_000)
  c.data.random_flip = True
  c.optim.grad_clip = 1.0
  c.sweep.samplers = ("ddim", "dpm_solver++")
  c.sweep.steps = (10, 20, 50)
  return c
