"""The EDM recipe on the digits (Karras et al. 2022): one command trains and samples it.

  python -m experiments.main --config=configs/images/digits_edm.py --workdir=/tmp/digits_edm

Same UNet, data, optimiser and budget as configs/images/digits_ddpm.py (the VP model it is
compared with), but EDM's design choices throughout:
  * process: sigma(t) = t, s(t) = 1 (diffusion.sde="edm": x_t = x_0 + t noise on
    [0.002, 80]), the network fed c_noise = ln(sigma) / 4;
  * preconditioning and loss: c_in, c_skip, c_out, lambda(sigma) of EDM Table 1 with
    sigma_data = 0.5, training sigmas ln(sigma) ~ N(-1.2, 1.2^2) (diffusion.loss="edm");
  * sampler: EDM's 2nd-order Heun on the sigma^(1/rho) grid, rho = 7, 18 steps (EDM's
    CIFAR-10 setting, deterministic: S_churn = 0);
  * extra: dpm_solver++ at 20 NFE on the same checkpoint.
fd_digits against NFE, deterministic Heun and Heun with EDM's stochastic churn at its
published ImageNet-64 settings (EDM_CHURN), next to the VP model:
configs/sweeps/digits_edm_nfe.py.

Variants: tiny (seconds; tests), conditional (class labels with label dropout).
"""
from configs.common import parse_arg, use_edm
from configs.images import digits_ddpm

# EDM's stochastic sampler settings (Karras et al. 2022, Table 5, ImageNet-64).
EDM_CHURN = "S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003"


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, conditional=False)
  c = digits_ddpm.get_config(",".join(k for k, v in (("tiny", arg.tiny),
                                                      ("conditional", arg.conditional)) if v)
                             or None)
  use_edm(c, sigma_data=0.5)
  c.sample.extra = ("dpm_solver++:19",)
  c.sweep.samplers = ("heun", "dpm_solver++")
  c.sweep.grid = "heun: S_churn=0.0|40.0, S_min=0.05, S_max=50.0, S_noise=1.003"
  if arg.tiny:
    c.sample.steps = 3
    c.sample.extra = ()
  return c
