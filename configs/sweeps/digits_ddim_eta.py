"""DDIM's Table 1 in miniature: eta x steps on the digits UNet, fd_digits with 95% intervals.

Song, Meng & Ermon (2021), Table 1 (CIFAR-10): eta in {0, 0.2, 0.5, 1} x S in {10, 20, 50, 100,
1000} steps; eta = 0 (deterministic DDIM) is best at few steps and the rows meet at 1000. Here
on the digits checkpoint of configs/images/digits_ddpm.py (train it first, same workdir):

  python -m experiments.main --config=configs/images/digits_ddpm.py --workdir=/tmp/digits
  python -m experiments.main --config=configs/sweeps/digits_ddim_eta.py --workdir=/tmp/digits --mode=sweep

Sizes, chosen so the sweep takes <= ~20 min on a 2-core CPU: 359 samples per cell (= the test
split, as the digits job; fd_digits is compared with the train-vs-test 0.589), 3 seeds per
cell (a 95% t-interval from 3 values is wide, t = 4.30; at 359 samples fd_digits moves about
+-0.16 between seeds), 4 x 5 x 3 = 60 cells, 4,720 steps per seed, i.e. ~14,000 UNet calls
on 359 images. Our "quadratic" grid (dense near the data) stands in for the paper's quadratic
CIFAR-10 schedule; the final Tweedie denoise (sample.denoise) adds one NFE to every cell.
Measured (README "Digits sweeps"): 40 min wall, 13.4 min CPU on the shared, loaded 2-core CPU
(over the 20-min aim because of the load); the per-seed spread of fd_digits at 359 samples is
larger than the eta effect, so more seeds (--config.sweep.seeds) or samples are what to buy next.
`:tiny` is the same on the tiny digits model for tests and smoke checks.
"""
from configs.common import parse_arg
from configs.images import digits_ddpm


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = digits_ddpm.get_config("tiny" if arg.tiny else None)
  c.sweep.score = "model"
  c.sweep.samplers = ("ddim",)
  c.sweep.grid = "ddim: eta=0.0|0.2|0.5|1.0, grid=quadratic"
  c.sweep.steps = (10, 20, 50, 100, 1000)
  c.sweep.nfe = ()
  c.sweep.seeds = (0, 1, 2)
  c.sweep.num_samples = 359
  c.sample.batch_size = 359
  if arg.tiny:
    c.sweep.steps = (3, 6)
    c.sweep.seeds = (0, 1)
    c.sweep.num_samples = 16
    c.sample.batch_size = 16
  return c
