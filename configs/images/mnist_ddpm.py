"""Diffusion on MNIST resized to 32x32 (or native 28 with ch_mult=(1, 2, 2)): a GPU job.

Needs MNIST prepared as TFDS ArrayRecord files in data.data_dir; this code never downloads.
On a machine with internet access:
  pip install tensorflow tensorflow-datasets array_record
  tfds build mnist --data_dir=DIR --file_format=array_record
then copy DIR/mnist into the data dir and run
  python -m experiments.main --config=configs/images/mnist_ddpm.py --workdir=/tmp/mnist \
      --config.data.data_dir=DIR
"""
from configs.common import parse_arg
from configs.images.common import image_diffusion


def get_config(arg=None):
  arg = parse_arg(arg, conditional=False)
  c = image_diffusion("mnist", conditional=arg.conditional, ch_mult=(1, 2, 2), steps=50_000)
  c.data.image_size = 32                # resized (bicubic) so three downsamplings divide it
  return c
