"""fd_digits against NFE for the EDM recipe and the VP model it is compared with.

Train both (same UNet, data and 1500 steps), then sweep each checkpoint:

  python -m experiments.main --config=configs/images/digits_edm.py --workdir=/tmp/digits_edm
  python -m experiments.main --config=configs/images/digits_ddpm.py --workdir=/tmp/digits
  python -m experiments.main --config=configs/sweeps/digits_edm_nfe.py --workdir=/tmp/digits_edm --mode=sweep
  python -m experiments.main --config=configs/sweeps/digits_edm_nfe.py:model=vp --workdir=/tmp/digits --mode=sweep

Cells: EDM's Heun deterministic (S_churn = 0) and with EDM's published stochastic churn
(S_churn = 40, S_min = 0.05, S_max = 50, S_noise = 1.003), both on EDM's sigma^(1/7) grid,
and dpm_solver++ (order 2, log-SNR grid), at NFE 10, 20, 35 (EDM's 18-step CIFAR-10
setting) and 100; 2 seeds of 359 samples each (the test split's size, as
fd_digits_train_vs_test). EDM's 256-step stochastic setting is one more budget:
--config.sweep.nfe="(512,)" (stored cells are reused, so only the new ones run).
"""
from configs.common import parse_arg
from configs.images import digits_ddpm, digits_edm


def get_config(arg=None):
  arg = parse_arg(arg, model="edm", tiny=False)
  if arg.model not in ("edm", "vp"):
    raise ValueError(f"config arg model={arg.model!r}; allowed: 'edm', 'vp'.")
  module = digits_edm if arg.model == "edm" else digits_ddpm
  c = module.get_config("tiny" if arg.tiny else None)
  c.sweep.score = "model"
  c.sweep.samplers = ("heun", "dpm_solver++")
  c.sweep.grid = ("heun: S_churn=0.0|40.0, S_min=0.05, S_max=50.0, S_noise=1.003, grid=edm; "
                  "dpm_solver++: order=2")
  c.sweep.nfe = (10, 20, 35, 100)
  c.sweep.seeds = (0, 1)
  c.sweep.num_samples = 359
  c.sample.batch_size = 359
  if arg.tiny:
    c.sweep.nfe = (5, 9)
    c.sweep.num_samples = 16
    c.sample.batch_size = 16
  return c
