"""Coupling flows and flow matching on the 8-Gaussian ring (radius 4, std 0.3), by maximum likelihood.

  python -m experiments.main --config=configs/flows/ring.py --workdir=/tmp/ring_realnvp
  python -m experiments.main --config=configs/flows/ring.py:kind=glow --workdir=/tmp/ring_glow
  python -m experiments.main --config=configs/flows/ring.py:kind=spline --workdir=/tmp/ring_spline
  python -m experiments.main --config=configs/flows/ring.py:kind=maf --workdir=/tmp/ring_maf
  python -m experiments.main --config=configs/flows/ring.py:kind=fm --workdir=/tmp/ring_fm
  python -m experiments.main --config=configs/flows/ring.py:kind=nice,tiny --workdir=/tmp/t
  python -m experiments.main --config=configs/flows/ring.py:kind=cnf --workdir=/tmp/ring_cnf
  python -m experiments.main --config=configs/flows/ring.py:kind=fm,reflow=1 --workdir=/tmp/ring_rf

Variants (`:a,b=c`): kind=nice|realnvp|glow|spline|maf (objective "flow": coupling flows,
rational-quadratic spline couplings, masked autoregressive spline flow) or fm (flow matching
with the MLP velocity network, objective "flow_matching") or cnf (the MLP vector field trained
by maximum likelihood through the ODE, FFJORD with RNODE's regularisers, objective "cnf",
settings config.cnf); reflow=R (fm, cnf: R rectified-flow rounds after training,
flow.reflow_*, experiments/reflow.py); tiny (seconds; tests).
ActNorm is off in these vector flows by default (`--config.flow.actnorm=on` brings it back;
the README's ablation says why).
Test NLL against the true entropy: experiments/benchmarks/flows.py.
"""
from configs import base
from configs.common import parse_arg

KINDS = ("nice", "realnvp", "glow", "spline", "maf", "fm", "cnf")


def get_config(arg=None):
  arg = parse_arg(arg, kind="realnvp", tiny=False, reflow=0)
  if arg.kind not in KINDS:
    raise ValueError(f"config arg kind={arg.kind!r} is not allowed; allowed: {KINDS}.")
  c = base.get_config()
  c.data.name = "ring"
  c.data.num_modes = 8
  c.data.radius = 4.0
  c.data.std = 0.3
  c.data.batch_size = 1024
  c.optim.learning_rate = 1e-3
  c.optim.ema_decay = 0.999
  c.train.steps = 20000
  c.train.log_every = 500
  c.train.ckpt_every = 5000
  if arg.kind == "fm":
    c.objective = "flow_matching"
    c.model.name = "mlp"
    c.model.hidden = 256
    c.model.depth = 4
    c.sample.sampler = "ode_adaptive"   # steps = its step limit
    c.sample.steps = 1000
    c.sample.denoise = False
  elif arg.kind == "cnf":
    _cnf(c)
  else:
    c.objective = "flow"
    c.flow.kind = arg.kind
    c.flow.num_layers = 16
    c.flow.hidden = 256
    if arg.kind in ("spline", "maf"):
      c.flow.num_layers = 8             # each layer is a K-bin spline: half the affine depth
      c.flow.num_bins = 8
      c.flow.tail_bound = 5.0           # the ring lies within radius 4 + 4 std
  if arg.reflow:  # sized for a shared 2-core CPU: stage 1 and each round ~4k steps
    c.flow.reflow_rounds = int(arg.reflow)
    c.flow.reflow_pairs = 20000
    c.flow.reflow_steps = 4000
    c.train.steps = 4000
    c.train.ckpt_every = 1000
    c.data.batch_size = 512
    c.model.hidden = 128
    c.model.depth = 3
    c.sample.num_samples = 5000
    c.sample.batch_size = 5000
  if arg.tiny:
    c.flow.reflow_pairs = 256
    c.flow.reflow_steps = 4
    c.flow.reflow_sampler, c.flow.reflow_sampler_steps = "ode_euler", 8
    c.data.batch_size = 64
    c.flow.num_layers = 2
    c.flow.hidden = 16
    c.model.hidden = 16
    c.model.depth = 1
    c.train.steps = 4
    c.train.log_every = 2
    c.train.ckpt_every = 2
    c.optim.warmup_steps = 1
    c.sample.sampler = "ode_euler" if arg.kind in ("fm", "cnf") else c.sample.sampler
    c.cnf.solver, c.cnf.steps = "heun", 4  # fixed steps: seconds, whatever the untrained net does
    c.sample.steps = 8                  # fm: fixed Euler steps (an untrained net is stiff)
    c.sample.num_samples = 64
    c.sample.batch_size = 64
    c.eval.num_reference = 64
    c.train.progress = False
  return c


def _cnf(c):
  """FFJORD on the ring: a smaller field than flow matching's (every training step solves the
  ODE), adaptive dopri5 with the checkpointed (discretise-then-optimise) adjoint, RNODE's
  kinetic-energy and Jacobian-Frobenius regularisers."""
  c.objective = "cnf"
  c.model.name = "mlp"
  c.model.hidden = 64
  c.model.depth = 2
  c.model.time_embedding = "linear"   # smooth in t: fewer adaptive steps than the sinusoid
  c.data.batch_size = 512
  c.train.steps = 2000
  c.optim.ema_decay = 0.995           # 2000 steps: 0.999 would still hold 13% of the init
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.cnf.solver = "dopri5"
  c.cnf.steps = 0
  c.cnf.rtol = 1e-4
  c.cnf.atol = 1e-4
  c.cnf.kinetic_weight = 0.01
  c.cnf.jacobian_weight = 0.01
  c.sample.sampler = "ode_adaptive"
  c.sample.steps = 1000
  c.sample.denoise = False
