"""Classifier-free guidance scale x sampler on the conditional digits UNet.

On the checkpoint of configs/images/digits_ddpm.py:conditional (label dropout 0.1; train it
first, same workdir):

  python -m experiments.main --config=configs/images/digits_ddpm.py:conditional --workdir=/tmp/digits_cond
  python -m experiments.main --config=configs/sweeps/digits_cfg.py --workdir=/tmp/digits_cond --mode=sweep

Cells: w in {0, 1, 2, 4} (0 = the null-label model, 1 = conditional) x ddpm, ddim (eta = 0) and
dpm_solver++ x NFE budgets {10, 20, 50} (the final denoise counts one) x 3 seeds = 108 cells;
every class in equal shares (36 of each of the 10 classes, 360 samples per cell). Metrics:
fd_digits against the train split and the fd feature classifier's accuracy on the requested
class. Sizes chosen so the sweep takes <= ~20 min on a 2-core CPU (a guided call runs the UNet
on the doubled batch).
Measured (README "Digits sweeps"): 27 min wall, 6.7 min CPU on the shared, loaded 2-core CPU.
`:tiny` is the same on the tiny conditional digits model for tests and smoke checks.
"""
from configs.common import parse_arg
from configs.images import digits_ddpm


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = digits_ddpm.get_config("conditional,tiny" if arg.tiny else "conditional")
  c.sweep.score = "model"
  c.sweep.samplers = ("ddpm", "ddim", "dpm_solver++")
  c.sweep.grid = ""
  c.sweep.nfe = (10, 20, 50)
  c.sweep.guidance_scales = (0.0, 1.0, 2.0, 4.0)
  c.sweep.seeds = (0, 1, 2)
  c.sweep.num_samples = 360
  c.sample.batch_size = 360
  if arg.tiny:
    c.sweep.nfe = (5,)
    c.sweep.guidance_scales = (0.0, 2.0)
    c.sweep.seeds = (0, 1)
    c.sweep.num_samples = 20
    c.sample.batch_size = 20
  return c
