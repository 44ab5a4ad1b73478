"""Linear diffusion SDEs (VP, sub-VP, VE, EDM) on one continuous time axis, and their EDM view.

Every process here is linear with a data-independent Gaussian marginal,

  x_t = alpha(t) x_0 + sigma(t) noise,        forward SDE  dx = f(t) x dt + g(t) dw,

with f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2 (tests check this identity
for every SDE by autodiff). Time runs from `eps` (data side) to `T` (prior side): T = 1 for
VP / sub-VP / VE; EDM's process (Karras et al. 2022) is x_t = x_0 + t noise, so its time IS
the noise level, t in [sigma_min, sigma_max] = [0.002, 80] by default.

Networks take `network_time(t)`: t itself on the [eps, 1] axes, EDM's c_noise = ln(sigma) / 4
for the EDM SDE (whose t spans 0.002..80, too wide for a time embedding made for [0, 1]).

Three views of the same process, used by different samplers:
  * time t (Song et al. 2021): `sde(x, t)`, `reverse_drift`, `probability_flow_drift`;
  * log-SNR lambda(t) = log(alpha^2 / sigma^2) (DDIM, DPM-Solver): `logsnr`, `t_from_logsnr`;
  * EDM sigma (Karras et al. 2022): the scaled state x / alpha(t) is data plus noise of
    std `edm_sigma(t)` = sigma / alpha, with inverse `t_from_edm_sigma`.

A DDPM model with N discrete steps is the VP SDE sampled at t_i = i / N (see schedules.py),
so networks always take this continuous t, in training and sampling alike.

SDE objects are frozen dataclasses: hashable, so they can be static jit arguments.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

from research.diffusion import schedules as schedules_lib

Array = jax.Array
SDES = ("vp", "subvp", "ve", "edm")


def bcast(a: Array, x: Array) -> Array:
  """Reshapes a per-example array [B] (or scalar) to broadcast against x [B, *dims]."""
  a = jnp.asarray(a)
  if a.ndim == 0:
    return a
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _log_expm1_neg(la2):
  """log(1 - exp(la2)) for la2 < 0, accurate near la2 = 0."""
  return jnp.log(-jnp.expm1(la2))


class _LinearSDE:
  """Shared logic; subclasses define log_alpha2, log_sigma2, f, g2, t_from_logsnr, prior_std."""

  eps: float
  T: float

  # ---- marginals -------------------------------------------------------------------------
  def marginal(self, t) -> Tuple[Array, Array]:
    """(alpha(t), sigma(t)) such that x_t = alpha x_0 + sigma noise; same shape as t."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.exp(0.5 * self.log_alpha2(t)), jnp.exp(0.5 * self.log_sigma2(t))

  def logsnr(self, t) -> Array:
    """lambda(t) = log(alpha^2 / sigma^2), decreasing in t."""
    t = jnp.asarray(t, jnp.float32)
    return self.log_alpha2(t) - self.log_sigma2(t)

  def edm_sigma(self, t) -> Array:
    """Noise level of the scaled state x / alpha(t): sigma(t) / alpha(t) = exp(-lambda / 2)."""
    return jnp.exp(-0.5 * self.logsnr(t))

  def t_from_edm_sigma(self, sigma) -> Array:
    return self.t_from_logsnr(-2.0 * jnp.log(jnp.asarray(sigma, jnp.float32)))

  def network_time(self, t) -> Array:
    """What a score network is given as its time input (t itself on a [eps, 1] axis)."""
    return jnp.asarray(t, jnp.float32)

  def transition(self, s, t) -> Tuple[Array, Array]:
    """(alpha_{t|s}, sigma_{t|s}) of x_t | x_s for s < t (exact for any linear SDE)."""
    a_s, s_s = self.marginal(s)
    a_t, s_t = self.marginal(t)
    a_ts = a_t / a_s
    return a_ts, jnp.sqrt(jnp.maximum(s_t**2 - (a_ts * s_s)**2, 0.0))

  # ---- SDE coefficients -----------------------------------------------------------------
  def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Forward SDE dx = drift dt + diffusion dw: returns (drift [B,*dims], diffusion [B])."""
    return bcast(self.f(t), x) * x, jnp.sqrt(self.g2(t))

  def reverse_drift(self, x: Array, t: Array, score: Array) -> Array:
    """Drift of the reverse-time SDE, dx = [f x - g^2 score] dt + g dw_bar (dt < 0)."""
    return bcast(self.f(t), x) * x - bcast(self.g2(t), x) * score

  def probability_flow_drift(self, x: Array, t: Array, score: Array) -> Array:
    """dx/dt of the probability-flow ODE: f(t) x - g(t)^2 score / 2.

    Args:
      x: state [B, *dims].
      t: times [B].
      score: the score value grad_x log p_t(x) at (x, t), [B, *dims].
    Returns:
      [B, *dims]. Integrating it from t to s carries p_t to p_s exactly (for the exact
      score), in either direction; the likelihood helper uses its divergence.
    """
    return bcast(self.f(t), x) * x - 0.5 * bcast(self.g2(t), x) * score

  def reverse_sde(self, score_fn: Callable[[Array, Array], Array], probability_flow=False):
    """Returns (x, t) -> (drift, diffusion) of the reverse SDE (or PF ODE, diffusion 0)."""
    def fn(x, t):
      s = score_fn(x, t)
      if probability_flow:
        return self.probability_flow_drift(x, t, s), jnp.zeros_like(jnp.asarray(t, x.dtype))
      return self.reverse_drift(x, t, s), jnp.sqrt(self.g2(t))
    return fn

  # ---- prior ----------------------------------------------------------------------------
  def prior_sample(self, rng: Array, shape) -> Array:
    return self.prior_std * jax.random.normal(rng, tuple(shape), jnp.float32)

  def prior_logp(self, z: Array) -> Array:
    """log N(z; 0, prior_std^2 I) summed over all but the batch axis -> [B]."""
    d = math.prod(z.shape[1:])
    sq = jnp.sum(z.reshape(z.shape[0], -1)**2, axis=-1)
    return (-0.5 * d * math.log(2 * math.pi * self.prior_std**2)
            - 0.5 * sq / self.prior_std**2)


@dataclasses.dataclass(frozen=True)
class VPSDE(_LinearSDE):
  """Variance preserving: alpha^2 + sigma^2 = 1, dx = -beta x / 2 dt + sqrt(beta) dw.

  With the default linear schedule this is DDPM's linear schedule with N = 1000 steps in
  the limit (beta_i = beta(i / N) / N). `schedule` (a schedules.* object, or a name) swaps
  in the cosine or scaled-linear schedule; beta_min / beta_max then go unused.
  """
  beta_min: float = 0.1
  beta_max: float = 20.0
  eps: float = 1e-3
  T: float = 1.0
  schedule: Any = None

  @property
  def sched(self):
    if self.schedule is None:
      return schedules_lib.LinearSchedule(self.beta_min, self.beta_max)
    if isinstance(self.schedule, str):
      return schedules_lib.get_schedule(self.schedule)
    return self.schedule

  @property
  def prior_std(self) -> float:
    return 1.0

  def beta(self, t):
    return self.sched.beta(jnp.asarray(t, jnp.float32))

  def log_alpha2(self, t):
    return self.sched.log_alpha2(jnp.asarray(t, jnp.float32))

  def log_sigma2(self, t):
    return _log_expm1_neg(self.log_alpha2(t))

  def f(self, t):
    return -0.5 * self.beta(t)

  def g2(self, t):
    return self.beta(t)

  def t_from_logsnr(self, lam):
    # alpha^2 = sigmoid(lambda).
    lam = jnp.asarray(lam, jnp.float32)
    return self.sched.t_from_log_alpha2(-jax.nn.softplus(-lam))


@dataclasses.dataclass(frozen=True)
class SubVPSDE(_LinearSDE):
  """Sub-VP (Song et al. 2021): alpha as VP, sigma = 1 - alpha^2 (below the VP sigma).

  dx = -beta x / 2 dt + sqrt(beta (1 - alpha^4)) dw.
  """
  beta_min: float = 0.1
  beta_max: float = 20.0
  eps: float = 1e-3
  T: float = 1.0
  schedule: Any = None

  sched = VPSDE.sched

  @property
  def prior_std(self) -> float:
    return 1.0

  beta = VPSDE.beta
  log_alpha2 = VPSDE.log_alpha2
  f = VPSDE.f

  def log_sigma2(self, t):
    return 2.0 * _log_expm1_neg(self.log_alpha2(t))

  def g2(self, t):
    return self.beta(t) * -jnp.expm1(2.0 * self.log_alpha2(t))

  def t_from_logsnr(self, lam):
    # u = alpha^2 solves e^lam (1 - u)^2 = u; the small root is
    # u = 2 e / (2 e + 1 + sqrt(4 e + 1)), so log u = -log1p((1 + sqrt(4 e + 1)) / (2 e)),
    # which stays accurate when u -> 1 (large lambda, small t).
    lam = jnp.asarray(lam, jnp.float32)
    e = jnp.exp(jnp.clip(lam, -75.0, 75.0))
    log_u = -jnp.log1p((1.0 + jnp.sqrt(4.0 * e + 1.0)) / (2.0 * e))
    return self.sched.t_from_log_alpha2(log_u)


@dataclasses.dataclass(frozen=True)
class VESDE(_LinearSDE):
  """Variance exploding: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t.

  dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw. As in Song et al., the marginal at
  t includes the sigma_min floor (p_t is data convolved with N(0, sigma(t)^2)).
  """
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  eps: float = 1e-3
  T: float = 1.0

  @property
  def prior_std(self) -> float:
    return float(self.sigma_max)

  @property
  def _log_ratio(self) -> float:
    return math.log(self.sigma_max / self.sigma_min)

  def log_alpha2(self, t):
    return jnp.zeros_like(jnp.asarray(t, jnp.float32))

  def log_sigma2(self, t):
    return 2.0 * (math.log(self.sigma_min) + jnp.asarray(t, jnp.float32) * self._log_ratio)

  def f(self, t):
    return jnp.zeros_like(jnp.asarray(t, jnp.float32))

  def g2(self, t):
    return 2.0 * self._log_ratio * jnp.exp(self.log_sigma2(t))

  def t_from_logsnr(self, lam):
    lam = jnp.asarray(lam, jnp.float32)
    return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio


@dataclasses.dataclass(frozen=True)
class EDMSDE(_LinearSDE):
  """EDM's process (Karras et al. 2022, "sigma(t) = t, s(t) = 1"): x_t = x_0 + t noise.

  alpha = 1, sigma(t) = t, so f = 0 and g^2 = d sigma^2 / dt = 2 t; the probability-flow ODE
  is EDM's dx/dsigma = -sigma score, and every sampler's EDM view (edm_sigma(t) = t) is the
  identity. Time runs over [sigma_min, sigma_max] (EDM: 0.002, 80), so `eps` and `T` are those
  two; the prior is N(0, sigma_max^2). The network sees c_noise = ln(t) / 4 (EDM Table 1).
  """
  sigma_min: float = 0.002
  sigma_max: float = 80.0

  @property
  def eps(self) -> float:
    return float(self.sigma_min)

  @property
  def T(self) -> float:  # pylint: disable=invalid-name
    return float(self.sigma_max)

  @property
  def prior_std(self) -> float:
    return float(self.sigma_max)

  def log_alpha2(self, t):
    return jnp.zeros_like(jnp.asarray(t, jnp.float32))

  def log_sigma2(self, t):
    return 2.0 * jnp.log(jnp.asarray(t, jnp.float32))

  def f(self, t):
    return jnp.zeros_like(jnp.asarray(t, jnp.float32))

  def g2(self, t):
    return 2.0 * jnp.asarray(t, jnp.float32)

  def t_from_logsnr(self, lam):
    return jnp.exp(-0.5 * jnp.asarray(lam, jnp.float32))

  def network_time(self, t) -> Array:
    return 0.25 * jnp.log(jnp.asarray(t, jnp.float32))


def get_sde(name: str, **kwargs):
  """Builds an SDE by name: "vp", "subvp", "ve" or "edm".

  kwargs go to the dataclass (e.g. beta_min, beta_max, eps, T; sigma_min, sigma_max for
  "ve" and "edm", whose eps and T are sigma_min and sigma_max); for "vp"/"subvp", `schedule` may be a name ("linear", "cosine", "scaled_linear")
  or a schedule object.
  """
  table = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "edm": EDMSDE}
  if name not in table:
    raise ValueError(f"Unknown SDE {name!r}; allowed: {', '.join(SDES)}.")
  cls = table[name]
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for SDE {name!r}; allowed: {fields}.")
  if isinstance(kwargs.get("schedule"), str):
    kwargs["schedule"] = schedules_lib.get_schedule(kwargs["schedule"])
  sde = cls(**kwargs)
  if not 0.0 < sde.eps < sde.T:
    raise ValueError(f"Need 0 < eps < T, got eps={sde.eps}, T={sde.T}.")
  return sde


def is_sde(obj) -> bool:
  return isinstance(obj, _LinearSDE)
