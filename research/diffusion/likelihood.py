"""Exact log-likelihood of a score model through the probability-flow ODE, solved on device.

The probability-flow ODE dx/dt = F(x, t) = f(t) x - g(t)^2 score(x, t) / 2 carries the
marginal p_t to p_s exactly (for the exact score), and along a trajectory the log-density
obeys the instantaneous change of variables (Chen et al. 2018; Song et al. 2021, App. D.2):

    d log p_t(x(t)) / dt = -div_x F(x(t), t)

so, integrating x and the divergence together from t_min (data side) to T (prior side),

    log p_{t_min}(x) = log p_T(x(T)) + int_{t_min}^{T} div_x F(x(t), t) dt,

with log p_T replaced by the prior `sde.prior_logp`. The result is in nats per example.

The divergence is either
  * "exact": the trace of the full Jacobian, one Jacobian-vector product per dimension
    (D per evaluation), for small D; or
  * "hutchinson": E_v[v^T (dF/dx) v] with Rademacher or Gaussian probes v (Skilling 1989;
    Hutchinson 1990; FFJORD). A probe is drawn once per example and solve and held fixed
    along the trajectory, so the trajectory x(t) is the exact one and only the accumulated
    trace is random: the estimate of log p is unbiased (up to solver error). `num_probes`
    probes per example are averaged (variance / num_probes).
Both use forward-mode Jacobian-vector products by default (3-10x cheaper per evaluation
than vjp for the GMM score on CPU) and fall back to reverse mode for functions that forward
mode cannot differentiate (jax.custom_vjp ops such as our attention kernel); `ad_mode`.

Unlike score_sde, which calls scipy's RK45 on the host and syncs at every function
evaluation, the whole solve is one `diffrax.diffeqsolve` (a while loop on device): no host
round trips. The batch is one ODE state, as in score_sde, so the step size is shared by
the batch and error control is diffrax's RMS norm over all entries (x and the running
divergence); NFE counts the vector-field evaluations for the whole batch.

Why t_min defaults to 1e-5 and not the sampling eps of 1e-3: p_{t_min} is the data
convolved with N(0, sigma(t_min)^2); at t = 1e-3 (VP, beta_min = 0.1) sigma^2 ~ 1e-4,
which biases the log-density of sharp data (std 0.1 => variance 1e-2) by ~D/2 * 1e-2 nats.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Tuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from research.diffusion.sde import is_sde

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

ESTIMATORS = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
AD_MODES = ("auto", "forward", "reverse")
# name -> (solver class, vector-field evaluations per attempted step). Both are FSAL
# 7-stage Runge-Kutta methods: 6 new evaluations per step, accepted or rejected.
SOLVERS = {"tsit5": (diffrax.Tsit5, 6), "dopri5": (diffrax.Dopri5, 6)}
# Evaluations outside the steps: the first stage f(t0, y0) of the first step. Measured with
# an ordered host-callback counter (diffrax 0.7, dt0=None): a solve of n attempted steps
# runs the vector field exactly 6 n + 1 times, with or without rejected steps;
# tests/diffusion/test_likelihood.py checks this against the counter.
_INIT_EVALS = 1
# Exact traces of at most this many dimensions unroll their D products (see _exact_trace);
# larger ones vectorise `exact_chunk` at a time.
UNROLL_MAX_D = 32


@dataclasses.dataclass(frozen=True)
class SolveSettings:
  """The solver settings of one likelihood solve, checked once and passed down as one value
  (a static argument of the jitted solve). Fields as `log_likelihood`'s arguments."""
  estimator: str = "exact"
  num_probes: int = 1
  rtol: float = 1e-5
  atol: float = 1e-5
  probe: str = "rademacher"
  solver: str = "dopri5"
  max_steps: int = 4096
  exact_chunk: int = 64
  ad_mode: str = "auto"

  def __post_init__(self):
    for name, allowed in (("estimator", ESTIMATORS), ("probe", PROBES), ("solver", SOLVERS),
                          ("ad_mode", AD_MODES)):
      v = getattr(self, name)
      if v not in allowed:
        raise ValueError(f"{name}={v!r} is not allowed; allowed: {', '.join(allowed)}.")
    for name in ("num_probes", "max_steps", "exact_chunk"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r} is not allowed; it must be an integer >= 1.")
    for name in ("rtol", "atol"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
        raise ValueError(f"{name}={v!r} is not allowed; it must be a finite number > 0.")
      object.__setattr__(self, name, float(v))


def _check_x(x):
  if getattr(x, "ndim", 0) < 2:
    raise ValueError(f"x must be a batch [B, *dims] with at least 2 axes, got shape "
                     f"{getattr(x, 'shape', None)}.")


def _exact_trace(apply, b: int, d: int, exact_chunk: int, dtype) -> Array:
  """sum_i (apply(e_i))_{b, i}: the Jacobian trace from D basis products, [B].

  apply maps basis vectors [B, D] (e_i for every example) to J e_i or e_i^T J, [B, D].
  Chunks of `exact_chunk` basis vectors are vectorised; the diagonal entries are picked with
  a one-hot product (no gathers). Padded basis vectors (index >= D) are zero.
  """
  if d <= UNROLL_MAX_D:
    # One Jacobian-vector product per basis vector, written out: XLA fuses each small
    # product on its own, which on CPU was 2.3x faster than the same products vmapped
    # (d = 16, batch 256, GMM score: 0.26 vs 0.61 ms per evaluation; the vmapped batch
    # axis in front of every intermediate defeats fusion and vectorisation there).
    eye = jnp.eye(d, dtype=dtype)
    total = jnp.zeros((b,), dtype)
    for i in range(d):
      total = total + apply(jnp.broadcast_to(eye[i], (b, d)))[:, i]
    return total
  chunk = min(d, exact_chunk)
  num_chunks = -(-d // chunk)
  eye = jnp.eye(num_chunks * chunk, d, dtype=dtype).reshape(num_chunks, chunk, d)

  def one_chunk(basis):  # [chunk, D]
    out = jax.vmap(lambda e: apply(jnp.broadcast_to(e, (b, d))))(basis)  # [chunk, B, D]
    return jnp.einsum("cbd,cd->b", out, basis)

  if num_chunks == 1:
    return one_chunk(eye[0])
  return jnp.sum(jax.lax.map(one_chunk, eye), axis=0)


def _divergence_reverse(fn, x, probes, exact_chunk):
  b, d = x.shape[0], math.prod(x.shape[1:])
  f, pullback = jax.vjp(fn, x)
  if probes is not None:
    vjps = jax.vmap(lambda v: pullback(v)[0])(probes)  # [P, B, *dims]
    quad = jnp.sum((vjps * probes).reshape(probes.shape[0], b, d), axis=-1)  # [P, B]
    return f, jnp.mean(quad, axis=0)
  # Row i of each example's Jacobian (e_i^T J); its i-th entry is dfn_i / dx_i.
  apply = lambda e: pullback(e.reshape(x.shape))[0].reshape(b, d)
  return f, _exact_trace(apply, b, d, exact_chunk, x.dtype)


def _divergence_forward(fn, x, probes, exact_chunk):
  b, d = x.shape[0], math.prod(x.shape[1:])
  # linearize: fn(x) once (the score network's one forward pass), then J v per vector.
  f, jvp = jax.linearize(fn, x)
  if probes is not None:
    jvps = jax.vmap(jvp)(probes)  # [P, B, *dims]
    quad = jnp.sum((jvps * probes).reshape(probes.shape[0], b, d), axis=-1)  # [P, B]
    return f, jnp.mean(quad, axis=0)
  # Column i of each example's Jacobian (J e_i); its i-th entry is dfn_i / dx_i.
  apply = lambda e: jvp(e.reshape(x.shape)).reshape(b, d)
  return f, _exact_trace(apply, b, d, exact_chunk, x.dtype)


def divergence(fn: Callable[[Array], Array], x: Array, probes=None, *, exact_chunk: int = 64,
               ad_mode: str = "auto") -> Tuple[Array, Array]:
  """fn(x) and the divergence of fn at x, per example.

  Args:
    fn: batched map [B, *dims] -> [B, *dims] whose examples do not interact (the
      divergence of example b is read off the batched Jacobian).
    x: [B, *dims].
    probes: None for the exact trace, else [P, B, *dims] Hutchinson probes.
    exact_chunk: exact trace with D > UNROLL_MAX_D only (smaller D unrolls its D products):
      Jacobian-vector products vectorised at once (memory
      ~ chunk * B * D).
    ad_mode: "forward" (jax.jvp: J v), "reverse" (jax.vjp: v^T J) or "auto": forward,
      falling back to reverse for functions that forward mode cannot differentiate
      (jax.custom_vjp ops such as our attention kernel). Forward mode was 3-10x cheaper
      per evaluation for the GMM score on CPU (experiments/benchmarks/likelihood.py).

  Returns:
    (fn(x) [B, *dims], divergence [B]); with probes, the mean over the P probes of
    v^T (dfn/dx) v.
  """
  if ad_mode not in AD_MODES:
    raise ValueError(f"ad_mode={ad_mode!r} is not allowed; allowed: {', '.join(AD_MODES)}.")
  if ad_mode == "reverse":
    return _divergence_reverse(fn, x, probes, exact_chunk)
  if ad_mode == "forward":
    return _divergence_forward(fn, x, probes, exact_chunk)
  try:
    # A shape-only trace of one batched JVP: forward mode through a custom_vjp function
    # raises here (a plain jvp of one would only fail later, when lowering).
    jax.eval_shape(lambda v: jax.vmap(lambda u: jax.jvp(fn, (x,), (u,))[1])(v[None]), x)
  except TypeError as e:
    if "custom_vjp" not in str(e):
      raise
    return _divergence_reverse(fn, x, probes, exact_chunk)
  return _divergence_forward(fn, x, probes, exact_chunk)


class ProbabilityFlow(eqx.Module):
  """The probability-flow drift of a score model as a velocity field (x [B, *dims], t [B]).

  An equinox Module, so that under jit the array leaves of `score_fn` (a tree_util.Partial's
  parameters) are traced and the SDE is static: rebuilding it for new parameters reuses
  the compiled solve.
  """
  score_fn: Any
  sde: Any = eqx.field(static=True)

  def __call__(self, x: Array, t: Array) -> Array:
    return self.sde.probability_flow_drift(x, t, self.score_fn(x, t))


def drift_and_divergence(score_fn: ScoreFn, sde, x: Array, t: Array, probes=None, *,
                         exact_chunk: int = 64, ad_mode: str = "auto") -> Tuple[Array, Array]:
  """Probability-flow drift F(x, t) [B, *dims] and its divergence [B] at a scalar time t.

  This is the function both solvers integrate (the scipy baseline in
  experiments/benchmarks/likelihood.py jits it); see `divergence` for `probes`.
  """
  tb = jnp.full((x.shape[0],), t, jnp.float32)
  flow = ProbabilityFlow(score_fn, sde)
  return divergence(lambda y: flow(y, tb), x, probes, exact_chunk=exact_chunk, ad_mode=ad_mode)


def draw_probes(rng: Array, shape, num_probes: int, probe: str = "rademacher") -> Array:
  """Hutchinson probes [num_probes, *shape]: Rademacher (+-1) or standard Gaussian entries."""
  if probe not in PROBES:
    raise ValueError(f"probe={probe!r} is not allowed; allowed: {', '.join(PROBES)}.")
  shape = (num_probes, *shape)
  if probe == "rademacher":
    return jax.random.rademacher(rng, shape, jnp.float32)
  return jax.random.normal(rng, shape, jnp.float32)


@eqx.filter_jit
def _solve(velocity_fn, prior_logp_fn, x, rng, *, t0: float, t1: float, s: SolveSettings):
  """The jitted solve. Array leaves of velocity_fn / prior_logp_fn are traced; anything else
  in them (and the settings) is static (hashed), so reuse the same function objects to hit
  the cache."""
  x = jnp.asarray(x, jnp.float32)
  b = x.shape[0]
  probes = None
  if s.estimator == "hutchinson":
    probes = draw_probes(rng, x.shape, s.num_probes, s.probe)

  def vector_field(t, y, args):
    tb = jnp.full((b,), t, jnp.float32)
    return divergence(lambda xt: velocity_fn(xt, tb), y[0], args, exact_chunk=s.exact_chunk,
                      ad_mode=s.ad_mode)

  cls, evals_per_step = SOLVERS[s.solver]
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), cls(), t0=t0, t1=t1, dt0=None,
      y0=(x, jnp.zeros((b,), jnp.float32)), args=probes, saveat=diffrax.SaveAt(t1=True),
      stepsize_controller=diffrax.PIDController(rtol=s.rtol, atol=s.atol),
      max_steps=s.max_steps, throw=False)
  z, delta = sol.ys[0][-1], sol.ys[1][-1]
  prior = prior_logp_fn(z)
  num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
  info = {
      "nfe": evals_per_step * num_steps + _INIT_EVALS,
      "num_steps": num_steps,
      "num_accepted_steps": jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
      "num_rejected_steps": jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
      "failed": sol.result != diffrax.RESULTS.successful,
      "prior_logp": prior,
      "delta_logp": delta,
  }
  return prior + delta, info


def _finish(logp, info, max_steps):
  if isinstance(info["nfe"], jax.core.Tracer):
    return logp, info
  for k in ("nfe", "num_steps", "num_accepted_steps", "num_rejected_steps"):
    info[k] = int(info[k])
  if bool(info.pop("failed")):
    raise RuntimeError(
        f"log_likelihood: the ODE solve did not finish within max_steps={max_steps} "
        f"(info: nfe={info['nfe']}, num_steps={info['num_steps']}); raise max_steps or "
        "loosen rtol/atol.")
  return logp, info


def ode_log_likelihood(velocity_fn: Callable[[Array, Array], Array],
                       prior_logp_fn: Callable[[Array], Array], x: Array, rng: Array, *,
                       t0: float, t1: float, estimator: str = "exact", num_probes: int = 1,
                       rtol: float = 1e-5, atol: float = 1e-5, probe: str = "rademacher",
                       solver: str = "dopri5", max_steps: int = 4096,
                       exact_chunk: int = 64, ad_mode: str = "auto"
                       ) -> Tuple[Array, Dict[str, Any]]:
  """log p_{t0}(x) for any ODE dx/dt = v(x, t) that carries p_{t0} to a known p_{t1}.

  log p_{t0}(x) = prior_logp_fn(x(t1)) + int_{t0}^{t1} div v(x(t), t) dt, in either time
  direction (t1 < t0 integrates backwards; e.g. flow matching from data at t0 = 1 to noise
  at t1 = 0). `log_likelihood` is this with the probability-flow drift of a score model.

  Args:
    velocity_fn: (x [B, *dims], t [B]) -> [B, *dims], examples independent. Reuse the same
      object (or an equinox Module / tree_util.Partial with array leaves) to hit the jit cache.
    prior_logp_fn: z [B, *dims] -> log p_{t1}(z) [B].
    x: [B, *dims]; rng: PRNG key for the probes. t0, t1: start (data) and end (prior) times.
    The remaining arguments are those of `log_likelihood`.

  Returns:
    (logp [B] nats, info) as `log_likelihood`.
  """
  settings = SolveSettings(estimator, num_probes, rtol, atol, probe, solver, max_steps,
                           exact_chunk, ad_mode)
  _check_x(x)
  for name, v in (("t0", t0), ("t1", t1)):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise ValueError(f"{name}={v!r} is not allowed; it must be a finite number.")
  if t0 == t1:
    raise ValueError(f"t0={t0!r} and t1={t1!r} must differ.")
  logp, info = _solve(velocity_fn, prior_logp_fn, x, rng, t0=float(t0), t1=float(t1),
                      s=settings)
  return _finish(logp, info, settings.max_steps)


def log_likelihood(score_fn: ScoreFn, sde, x: Array, rng: Array, *, estimator: str = "exact",
                   num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                   t_min: float = 1e-5, probe: str = "rademacher", solver: str = "dopri5",
                   max_steps: int = 4096, exact_chunk: int = 64, ad_mode: str = "auto"
                   ) -> Tuple[Array, Dict[str, Any]]:
  """log p(x) in nats under the probability-flow ODE of `score_fn`.

  Args:
    score_fn: (x [B, *dims], t [B]) -> score [B, *dims]. A trained network enters through
      parameterization.score_fn_from_model (DiffusionObjective.score_fn). A
      `jax.tree_util.Partial` has its array leaves traced, so new parameters reuse the
      compiled solve; a plain function is static (reuse the same object across batches).
    sde: the SDE (research.diffusion.sde) the score belongs to.
    x: data [B, *dims] (model space; dequantise 8-bit data first, see bpd.py).
    rng: PRNG key for the Hutchinson probes (unused by "exact").
    estimator: "exact" (Jacobian trace, D pullbacks per evaluation: small D only) or
      "hutchinson" (unbiased trace estimate).
    num_probes: Hutchinson probes per example, averaged.
    rtol, atol: tolerances of the adaptive step-size controller.
    t_min: start time of the solve (data side); log p_{t_min} approximates log p_0.
    probe: "rademacher" (lower variance) or "gaussian".
    solver: "dopri5" (the method behind scipy's RK45; the default because it took fewer
      steps than "tsit5" on every case of experiments/benchmarks/likelihood.py: 97 vs 133
      NFE on the GMM ring, 499 vs 943 on a trained toy model) or "tsit5".
    max_steps: solver step limit; hitting it raises.
    exact_chunk: exact estimator with D > UNROLL_MAX_D (= 32) only: Jacobian-vector products
      vectorised at once (trades
      memory for speed).
    ad_mode: "auto" (forward mode, reverse for custom_vjp functions), "forward" or "reverse";
      see `divergence`.

  Returns:
    (logp [B] float32 in nats, info) with info["nfe"] the number of evaluations of the
    drift-and-divergence function (each one score-network forward pass plus 1 (Hutchinson,
    per probe) or D (exact) backward passes), num_steps / num_accepted_steps /
    num_rejected_steps from diffrax's statistics, and prior_logp [B], delta_logp [B] (the
    two terms of logp). Called outside a trace, the counts are Python ints; inside one
    (under an outer jit) they stay arrays and info["failed"] is returned instead of raised.
  """
  if not callable(score_fn):
    raise ValueError(f"score_fn must be callable (x [B, *dims], t [B]) -> [B, *dims], "
                     f"got {type(score_fn).__name__}.")
  if not is_sde(sde):
    raise ValueError("sde must be an SDE from research.diffusion.sde (VPSDE, SubVPSDE, VESDE), "
                     f"got {type(sde).__name__}.")
  if isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not 0 < t_min < sde.T:
    raise ValueError(f"t_min={t_min!r} is not allowed; it must be a number in (0, sde.T="
                     f"{sde.T}).")
  settings = SolveSettings(estimator, num_probes, rtol, atol, probe, solver, max_steps,
                           exact_chunk, ad_mode)
  _check_x(x)
  logp, info = _solve(ProbabilityFlow(score_fn, sde), sde.prior_logp, x, rng,
                      t0=float(t_min), t1=float(sde.T), s=settings)
  return _finish(logp, info, settings.max_steps)
