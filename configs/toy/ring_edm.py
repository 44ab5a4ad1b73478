"""The EDM recipe (Karras et al. 2022) on the 8-Gaussian ring: the quickstart's data, network
and budget with EDM's process, preconditioning, loss and sampler.

  python -m experiments.main --config=configs/toy/ring_edm.py --workdir=/tmp/ring_edm

diffusion.sde="edm" (x_t = x_0 + t noise, t in [0.002, 80]), diffusion.loss="edm" (EDM
Table 1 preconditioning, ln(sigma) ~ N(-1.2, 1.2^2)) with sigma_data = 2.83, the ring's
per-coordinate std (radius 4 / sqrt(2), plus the 0.1 mode std); sampled with EDM's Heun,
18 steps on the sigma^(1/7) grid. Compare with configs/quickstart.py (VP, ddpm-1000).
"""
from configs import quickstart
from configs.common import parse_arg, use_edm


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = quickstart.get_config("tiny" if arg.tiny else None)
  use_edm(c, sigma_data=2.83)
  c.sample.extra = ("dpm_solver++:19",)
  if arg.tiny:
    c.sample.steps = 3
    c.sample.extra = ()
  return c
