"""Continuous normalizing flows trained by maximum likelihood (FFJORD, with RNODE regularisers).

A time-conditioned vector field v(x, t) carries data at t = eps to the prior at t = T. Along
a trajectory dx/dt = v the log-density obeys d log p_t(x(t)) / dt = -div v (Chen et al.
2018), so

    log p(x) = log p_T(x(T)) + int_eps^T div v(x(t), t) dt,

and the loss is -mean log p(x): the ODE is solved *during training* (Grathwohl et al. 2019),
unlike flow matching, which regresses v on a fixed path without solving anything.

Time axis and prior: the flow-matching straight path's (StraightPath: eps = 1e-3, T = 0.999,
prior N(0, T^2 I)), so the CNF is a FlowMatchingObjective in every respect but its loss:
the shared deterministic samplers (ode_euler, heun, ode_adaptive) integrate dx/dt = v
exactly (the path's score conversion and probability-flow drift cancel to v; see
flow_matching.py) and `reflow_pairs` works unchanged. The stochastic samplers are refused:
they read v as the score of the straight path's marginals, which a likelihood-trained field
does not have.

Divergence: training uses Hutchinson's estimator v^T (dv/dx) v with probes drawn once per
example and step and held fixed along the trajectory (FFJORD), from one forward-mode
linearisation per evaluation, whose products J v also give the RNODE Jacobian term.
Evaluation (`log_likelihood`, `log_prob`) uses the exact trace through the shared solver
research.diffusion.likelihood.ode_log_likelihood (dopri5, rtol = atol = 1e-5 by default).

Regularisation (RNODE, Finlay et al. 2020), both integrated along the same solve:
  kinetic energy      int ||v(x(t), t)||^2 dt
  Jacobian Frobenius  int ||dv/dx||_F^2 dt, estimated by ||J e||^2 with the same probes e.
They make the learned dynamics straighter and smoother, i.e. fewer adaptive solver steps.

Adjoint: diffrax's RecursiveCheckpointAdjoint by default ("discretise-then-optimise"). Its
gradients are the exact gradients of the solve actually computed (so the loss goes down
when the optimiser says it should), it never integrates the ODE backwards (the continuous
adjoint's backward solve reconstructs x(t) only to solver tolerance and can drift from the
forward trajectory), and with binomial (online) checkpointing its memory grows only with
the number of checkpoints, not with the number of steps. BacksolveAdjoint (FFJORD's
continuous adjoint, O(1) memory in the number of steps, gradients accurate to the solver
tolerance) is `adjoint="backsolve"`; "direct" (DirectAdjoint) backpropagates through the
unrolled solver and is the reference the tests compare both against. On the 2-D ring the
state is a few kilobytes, so memory never binds and the exact gradient wins.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import diffrax
import jax
import jax.numpy as jnp

from research.diffusion import likelihood as likelihood_lib
from research.flows.flow_matching import FlowMatchingObjective

Array = jnp.ndarray

# name -> (diffrax solver, vector-field evaluations per step, whether it can adapt its step).
# FSAL Runge-Kutta methods (dopri5, tsit5, bosh3) add one evaluation at the start of a solve.
TRAIN_SOLVERS = {
    "dopri5": (diffrax.Dopri5, 6, True),
    "tsit5": (diffrax.Tsit5, 6, True),
    "bosh3": (diffrax.Bosh3, 3, True),
    "heun": (diffrax.Heun, 2, True),
    "midpoint": (diffrax.Midpoint, 2, False),
    "euler": (diffrax.Euler, 1, False),
}
_FSAL = ("dopri5", "tsit5", "bosh3")
ADJOINTS = ("recursive_checkpoint", "backsolve", "direct")
# The deterministic samplers that integrate dx/dt = v itself (see the module docstring).
ODE_SAMPLERS = ("ode_euler", "heun", "ode_adaptive")


@dataclasses.dataclass(frozen=True)
class CNFSettings:
  """How the training solve runs (frozen: a static, hashable part of the objective).

  Attributes:
    solver: one of TRAIN_SOLVERS.
    steps: 0 = adaptive step size (PID controller with rtol / atol; dopri5, tsit5, bosh3,
      heun), else that many fixed steps.
    rtol, atol: adaptive tolerances.
    max_steps: step limit of the adaptive solve (a solve that hits it is not finished: the
      step's "solve_failed" metric is 1).
    adjoint: one of ADJOINTS (see the module docstring).
    probe: Hutchinson probes, "gaussian" (FFJORD) or "rademacher".
    num_probes: probes per example, averaged.
    kinetic_weight: RNODE weight of int ||v||^2 dt (0 = off).
    jacobian_weight: RNODE weight of int ||dv/dx||_F^2 dt (0 = off).
  """
  solver: str = "dopri5"
  steps: int = 0
  rtol: float = 1e-5
  atol: float = 1e-5
  max_steps: int = 512
  adjoint: str = "recursive_checkpoint"
  probe: str = "gaussian"
  num_probes: int = 1
  kinetic_weight: float = 0.0
  jacobian_weight: float = 0.0

  def __post_init__(self):
    def bad(name, allowed):
      raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: {allowed}.")

    if self.solver not in TRAIN_SOLVERS:
      bad("solver", "one of " + ", ".join(map(repr, TRAIN_SOLVERS)))
    if self.adjoint not in ADJOINTS:
      bad("adjoint", "one of " + ", ".join(map(repr, ADJOINTS)))
    if self.probe not in likelihood_lib.PROBES:
      bad("probe", "one of " + ", ".join(map(repr, likelihood_lib.PROBES)))
    for name in ("steps", "max_steps", "num_probes"):
      v = getattr(self, name)
      lo = 0 if name == "steps" else 1
      if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        bad(name, f"an integer >= {lo}")
    if self.steps == 0 and not TRAIN_SOLVERS[self.solver][2]:
      bad("steps", f"an integer >= 1 with solver={self.solver!r}, which has no error estimate "
          "to adapt its step (adaptive: " + ", ".join(
              n for n, s in TRAIN_SOLVERS.items() if s[2]) + ")")
    for name in ("rtol", "atol", "kinetic_weight", "jacobian_weight"):
      v = getattr(self, name)
      positive = name in ("rtol", "atol")
      if (isinstance(v, bool) or not isinstance(v, (int, float)) or not v == v
          or v < 0 or (positive and v == 0) or v == float("inf")):
        bad(name, "a finite number " + ("> 0" if positive else ">= 0"))
      object.__setattr__(self, name, float(v))


def _adjoint(name: str, max_steps: int):
  if name == "backsolve":
    return diffrax.BacksolveAdjoint()
  if name == "direct":
    return diffrax.DirectAdjoint()
  return diffrax.RecursiveCheckpointAdjoint()


def augmented_solve(velocity, x: Array, probes: Array, args: Any, *, t0: float, t1: float,
                    settings: CNFSettings) -> Tuple[Tuple[Array, Array, Array, Array], Dict]:
  """Solves x, int div v, int ||v||^2, int ||J e||^2 from t0 to t1 with settings' adjoint.

  Args:
    velocity: (x [B, D], t [B], args) -> [B, D], a static function (its parameters come in
      `args`, which BacksolveAdjoint differentiates).
    x: [B, D] at t0.
    probes: Hutchinson probes [P, B, D], fixed along the solve.
    args: the differentiable arguments of `velocity` (e.g. the network parameters).
    t0, t1: start and end times.
    settings: CNFSettings.

  Returns:
    ((x(t1) [B, D], int div [B], kinetic [B], jacobian_frobenius [B]), stats) with stats
    "nfe" (vector-field evaluations of the forward solve), "num_steps", "failed".
  """
  b = x.shape[0]

  def field(t, y, a):
    params, e = a
    tb = jnp.full((b,), t, jnp.float32)
    v, jvp = jax.linearize(lambda z: velocity(z, tb, params), y[0])
    je = jax.vmap(jvp)(e)                                      # [P, B, D]
    div = jnp.mean(jnp.sum(je * e, axis=-1), axis=0)           # Hutchinson e^T J e
    frob = jnp.mean(jnp.sum(je * je, axis=-1), axis=0)         # ||J e||^2 -> ||J||_F^2
    return v, div, jnp.sum(v * v, axis=-1), frob

  cls, evals, _ = TRAIN_SOLVERS[settings.solver]
  if settings.steps:
    controller = diffrax.ConstantStepSize()
    dt0, max_steps = (t1 - t0) / settings.steps, settings.steps
  else:
    controller = diffrax.PIDController(rtol=settings.rtol, atol=settings.atol)
    dt0, max_steps = None, settings.max_steps
  zeros = jnp.zeros((b,), jnp.float32)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(field), cls(), t0=t0, t1=t1, dt0=dt0, y0=(x, zeros, zeros, zeros),
      args=(args, probes), saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
      max_steps=max_steps, adjoint=_adjoint(settings.adjoint, max_steps), throw=False)
  num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
  stats = {"nfe": evals * num_steps + (1 if settings.solver in _FSAL else 0),
           "num_steps": num_steps, "failed": sol.result != diffrax.RESULTS.successful}
  return tuple(y[-1] for y in sol.ys), stats


@dataclasses.dataclass(frozen=True)
class CNFObjective(FlowMatchingObjective):
  """FFJORD: a time-conditioned vector field trained by exact maximum likelihood.

  The objective protocol (research/objective.py) as FlowMatchingObjective's, except:
    loss            -log p(x) through the training solve (+ RNODE terms), Hutchinson trace
    sampler_names   the deterministic ODE samplers only (ODE_SAMPLERS), no final denoising
    log_likelihood  exact trace through research.diffusion.likelihood.ode_log_likelihood,
                    from t = path.eps (where training starts) to path.T; the probability-flow
                    setting t_min does not apply and is ignored

  Attributes (besides FlowMatchingObjective's model, data_shape, num_classes, path):
    settings: CNFSettings of the training solve.
  """
  settings: CNFSettings = CNFSettings()

  def __post_init__(self):
    super().__post_init__()
    if self.dequantize or len(self.data_shape) != 1:
      raise ValueError(f"a CNF trained by maximum likelihood takes vector data [D] "
                       f"(got data_shape={self.data_shape}, dequantize={self.dequantize}).")

  @property
  def sampler_names(self) -> Tuple[str, ...]:
    return ODE_SAMPLERS

  def check_options(self, options, steps: int) -> None:
    name = options.get("sampler")
    if name not in ODE_SAMPLERS:
      raise ValueError(f"sampler={name!r} is not allowed for a CNF: one of "
                       + ", ".join(map(repr, ODE_SAMPLERS))
                       + " (the others read v as the straight path's score)")
    if options.get("denoise", False):
      raise ValueError("denoise=True is not allowed for a CNF (Tweedie's step needs a score).")
    if options.get("S_churn", 0.0):
      raise ValueError("S_churn > 0 is not allowed for a CNF (churn needs a score).")
    super().check_options(options, steps)

  # -- training ------------------------------------------------------------------------------
  def _field(self, x, t, args):
    params, labels = args
    return self.model.apply({"params": params}, x, t, labels, train=False)

  def solve(self, params, x: Array, rng, labels: Optional[Array] = None):
    """The training solve from data x [B, D]: ((z, int div, kinetic, frobenius), stats)."""
    s = self.settings
    probes = likelihood_lib.draw_probes(rng, x.shape, s.num_probes, s.probe)
    return augmented_solve(self._field, x, probes, (params, labels), t0=float(self.path.eps),
                           t1=float(self.path.T), settings=s)

  def loss(self, params, batch: Dict[str, Array], rng):
    """-mean log p(x) in nats (Hutchinson trace) + RNODE terms; metrics name each part.

    Metrics: "loss", "nll", "kinetic" and "jacobian_frobenius" (batch means of the integrals,
    computed whether weighted or not), "nfe" (forward evaluations of this step's solve),
    "solve_failed" (1 if the adaptive solve hit max_steps).
    """
    x = batch["x"]
    self._check_x(x, "batch['x']")
    (z, div, kinetic, frob), stats = self.solve(params, x, rng, self._labels(batch))
    nll = -jnp.mean(self.path.prior_logp(z) + div)
    loss = (nll + self.settings.kinetic_weight * jnp.mean(kinetic)
            + self.settings.jacobian_weight * jnp.mean(frob))
    return loss, {"loss": loss, "nll": nll, "kinetic": jnp.mean(kinetic),
                  "jacobian_frobenius": jnp.mean(frob),
                  "nfe": stats["nfe"].astype(jnp.float32),
                  "solve_failed": stats["failed"].astype(jnp.float32)}

  # -- likelihood ----------------------------------------------------------------------------
  def log_likelihood(self, params, x: Array, rng, *, labels: Optional[Array] = None,
                     estimator: str = "exact", num_probes: int = 1, probe: str = "rademacher",
                     rtol: float = 1e-5, atol: float = 1e-5, solver: str = "dopri5",
                     t_min: Optional[float] = None, **options):
    """(log p(x) [B] in nats, info): the CNF's ODE from path.eps to path.T (shared solver)."""
    del t_min  # the CNF's density lives at path.eps, where its training solve starts
    self._check_x(x)
    logp, info = likelihood_lib.ode_log_likelihood(
        self.velocity_fn(params, labels), self.path.prior_logp, x, rng,
        t0=float(self.path.eps), t1=float(self.path.T), estimator=estimator,
        num_probes=num_probes, probe=probe, rtol=rtol, atol=atol, solver=solver, **options)
    return logp, dict(info, method="cnf_ode", estimator=estimator)

  def log_prob(self, params, x: Array, labels: Optional[Array] = None, rng=None,
               **options) -> Array:
    """log p(x) [B] in nats (exact trace by default; options as `log_likelihood`)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return self.log_likelihood(params, x, rng, labels=labels, **options)[0]
