"""Every sampler family on the exact score of the 8-Gaussian ring (no training): sampler error
alone, NFE 5-1000, three seeds.

  python -m experiments.main --config=configs/sweeps/ring_exact.py --workdir=/tmp/ring_exact --mode=sweep
  python -m experiments.main --config=configs/sweeps/ring_exact.py:tiny --workdir=/tmp/re --mode=sweep
"""
from configs import quickstart
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = quickstart.get_config("tiny" if arg.tiny else None)
  c.sweep.score = "exact"
  c.sweep.samplers = ("ddpm", "ddim", "euler_maruyama", "pc", "ode_euler", "heun", "dpm_solver++")
  c.sweep.grid = "ddim: eta=0.0|1.0; dpm_solver++: order=2|3"
  c.sweep.nfe = (5, 10, 20, 50, 100, 1000)
  c.sweep.seeds = (0, 1, 2)
  c.sweep.num_samples = 2000
  c.sample.batch_size = 2000
  c.eval.num_reference = 5000
  if arg.tiny:
    c.sweep.nfe = (5, 10)
    c.sweep.seeds = (0, 1)
    c.sweep.num_samples = 128
    c.sample.batch_size = 128
    c.eval.num_reference = 256
  return c
