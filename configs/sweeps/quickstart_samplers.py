"""The samplers on the quickstart checkpoint (train it first), next to the same grid on the
exact score (configs/sweeps/ring_exact.py): training error on top of sampler error.

  python -m experiments.main --config=configs/quickstart.py --workdir=/tmp/quickstart
  python -m experiments.main --config=configs/sweeps/quickstart_samplers.py --workdir=/tmp/quickstart --mode=sweep
"""
from configs import quickstart
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = quickstart.get_config("tiny" if arg.tiny else None)
  c.sweep.score = "model"
  c.sweep.samplers = ("ddpm", "ddim", "heun", "dpm_solver++")
  c.sweep.grid = "ddim: eta=0.0|1.0"
  c.sweep.nfe = (10, 20, 50, 100, 1000)
  c.sweep.seeds = (0, 1, 2)
  c.sweep.num_samples = 2000
  c.sample.batch_size = 2000
  if arg.tiny:
    c.sweep.nfe = (5, 10)
    c.sweep.seeds = (0, 1)
    c.sweep.num_samples = 128
    c.sample.batch_size = 128
  return c
