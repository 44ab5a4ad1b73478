"""Multi-scale coupling flows (NICE, RealNVP, Glow) and flow matching on scikit-learn's 8x8 digits.

  python -m experiments.main --config=configs/flows/digits.py:kind=glow --workdir=/tmp/dg_glow
  python -m experiments.main --config=configs/flows/digits.py:kind=fm --workdir=/tmp/dg_fm
  python -m experiments.main --config=configs/flows/digits.py:kind=realnvp,tiny --workdir=/tmp/t

Pixels 0..255 arrive as x = k / 127.5 - 1; the flow objective dequantises them with uniform
noise and reports bits/dim (research/diffusion/bpd.py). Two scales: 8x8x1 -> squeeze 4x4x4 ->
steps -> factor out 2 channels -> squeeze 2x2x8 -> steps.

Variants (`:a,b=c`): kind=nice|realnvp|glow|fm, conditional (class-conditional), tiny.
Bits/dim for every kind in one table: experiments/benchmarks/flows.py.
"""
from configs import base
from configs.common import parse_arg

KINDS = ("nice", "realnvp", "glow", "fm")


def get_config(arg=None):
  arg = parse_arg(arg, kind="glow", tiny=False, conditional=False)
  if arg.kind not in KINDS:
    raise ValueError(f"config arg kind={arg.kind!r} is not allowed; allowed: {KINDS}.")
  c = base.get_config()
  c.data.name = "digits"
  c.data.batch_size = 256
  c.data.random_flip = False            # digits are not mirror-symmetric
  c.data.conditional = arg.conditional
  c.optim.learning_rate = 1e-3
  c.optim.ema_decay = 0.999
  c.train.steps = 10000
  c.train.log_every = 500
  c.train.ckpt_every = 2500
  c.sample.num_samples = 359            # = test split size
  c.sample.batch_size = 359
  if arg.kind == "fm":
    c.objective = "flow_matching"
    c.model.name = "unet"
    c.model.ch = 64
    c.model.ch_mult = (1, 2)            # 8 -> 4 px
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = ()
    c.sample.sampler = "ode_adaptive"   # steps = its step limit
    c.sample.steps = 1000
    c.sample.denoise = False
  else:
    c.objective = "flow"
    c.flow.kind = arg.kind
    c.flow.num_scales = 2
    c.flow.num_layers = 8               # per scale
    c.flow.hidden = 64                  # conditioner channels
  if arg.tiny:
    c.data.batch_size = 16
    c.flow.num_layers = 1
    c.flow.hidden = 8
    c.model.ch = 8
    c.model.ch_mult = (1,)
    c.model.num_res_blocks = 1
    c.train.steps = 4
    c.train.log_every = 2
    c.train.ckpt_every = 2
    c.optim.warmup_steps = 1
    c.sample.sampler = "ode_euler" if arg.kind == "fm" else c.sample.sampler
    c.sample.steps = 8                  # fm: fixed Euler steps (an untrained net is stiff)
    c.sample.num_samples = 16
    c.sample.batch_size = 16
    c.train.progress = False
  return c
