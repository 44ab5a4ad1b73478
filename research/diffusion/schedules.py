"""Noise schedules of the variance-preserving family, on one continuous time axis.

A schedule fixes the signal level of a VP (or sub-VP) process through

  log_alpha2(t) = log(alpha_bar(t)) = -integral_0^t beta(u) du,     t in [0, 1],

where alpha_bar is DDPM's cumulative product of (1 - beta_i). The discrete DDPM schedules
with N steps sit on the same axis: step i in {1, ..., N} is time t_i = i / N, and the
continuous beta(t) is N times the discrete beta_i, so that

  prod_{j <= i} (1 - beta_j)  ~=  exp(-integral_0^{t_i} beta(u) du):

the discrete alpha_bar_i equals the continuous alpha_bar at a time within O(1/N) of i / N
(for DDPM's linear schedule, N = 1000, within 3.4 / N; tests check it). This is what makes "a 1000-step DDPM model"
a discretised VP SDE: a network trained on discrete step i is a network of t = i / N.

Every schedule is a frozen (hashable) dataclass, so SDEs holding one can be static
arguments of jitted samplers.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine", "scaled_linear")


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


@dataclasses.dataclass(frozen=True)
class LinearSchedule:
  """beta(t) = beta_min + t (beta_max - beta_min): DDPM's linear schedule as N -> inf.

  The defaults are DDPM's betas 1e-4 .. 0.02 times N = 1000 (Song et al. 2021).
  """
  beta_min: float = 0.1
  beta_max: float = 20.0

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def log_alpha2(self, t):
    return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

  def t_from_log_alpha2(self, la2):
    # Root of 0.5 d t^2 + beta_min t + la2 = 0 in the cancellation-free form
    # (also right for d = 0, a constant beta).
    d = self.beta_max - self.beta_min
    return -2.0 * la2 / (self.beta_min + jnp.sqrt(self.beta_min**2 - 2.0 * d * la2))

  def discrete_betas(self, num_steps: int) -> np.ndarray:
    # DDPM: linspace(beta_min / N, beta_max / N, N).
    return np.linspace(self.beta_min / num_steps, self.beta_max / num_steps, num_steps)


@dataclasses.dataclass(frozen=True)
class ScaledLinearSchedule:
  """Stable Diffusion's "scaled_linear": sqrt(beta) linear in t.

  Discrete: betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2 with N = num_steps.
  Continuous: beta(t) = N (a + t d)^2 with a = sqrt(beta_start), d = sqrt(beta_end) - a.
  Note that this schedule does not reach the prior: alpha_bar(1) ~ 5e-3 with the defaults
  (a known property of the SD schedule), so prior samples start slightly off p_T.
  """
  beta_start: float = 0.00085
  beta_end: float = 0.012
  num_steps: int = 1000

  def _ad(self):
    a = math.sqrt(self.beta_start)
    return a, math.sqrt(self.beta_end) - a

  def beta(self, t):
    a, d = self._ad()
    return self.num_steps * (a + t * d)**2

  def log_alpha2(self, t):
    a, d = self._ad()
    return -self.num_steps * ((a + t * d)**3 - a**3) / (3.0 * d)

  def t_from_log_alpha2(self, la2):
    a, d = self._ad()
    return (jnp.cbrt(a**3 - 3.0 * d * la2 / self.num_steps) - a) / d

  def discrete_betas(self, num_steps: int) -> np.ndarray:
    return np.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), num_steps)**2


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
  """Nichol & Dhariwal's cosine schedule, alpha_bar(t) = f(t) / f(0), f(u) = cos^2(pi/2 (u+s)/(1+s)).

  The raw schedule reaches alpha_bar = 0 (infinite beta) at t = 1, which breaks samplers
  that step in t (Euler-Maruyama, probability-flow Euler). iDDPM clips the discrete betas
  at 0.999 for the same reason; here time is warped, u = t * tau, with tau < 1 chosen so
  that the log-SNR at t = 1 equals `logsnr_min` (default -10, about the linear VP
  schedule's end point). The discrete betas follow from alpha_bar at t_i = i / N.
  """
  s: float = 0.008
  logsnr_min: float = -10.0

  @property
  def tau(self) -> float:
    # Solve alpha_bar(tau) = sigmoid(logsnr_min) for tau.
    ab = _sigmoid(self.logsnr_min)
    c0 = math.cos(0.5 * math.pi * self.s / (1 + self.s))
    phi = math.acos(math.sqrt(ab) * c0)
    return (2.0 * phi / math.pi) * (1 + self.s) - self.s

  @property
  def _phi0(self) -> float:
    return 0.5 * math.pi * self.s / (1 + self.s)

  def _phi(self, t):
    return self._phi0 + 0.5 * jnp.pi * t * self.tau / (1 + self.s)

  def beta(self, t):
    return jnp.pi * self.tau / (1 + self.s) * jnp.tan(self._phi(t))

  def log_alpha2(self, t):
    # log(cos(phi0 + d) / cos(phi0))^2 with d = phi - phi0, written as
    # log1p(cos d - 1 - tan(phi0) sin d) so float32 keeps precision for small t.
    d = 0.5 * jnp.pi * jnp.asarray(t) * self.tau / (1 + self.s)
    return 2.0 * jnp.log1p(-2.0 * jnp.sin(0.5 * d)**2 - math.tan(self._phi0) * jnp.sin(d))

  def t_from_log_alpha2(self, la2):
    # cos(phi) = c0 e^{la2/2}; sin(phi)^2 = sin(phi0)^2 - c0^2 expm1(la2) without cancellation.
    c0 = math.cos(self._phi0)
    sin_phi = jnp.sqrt(jnp.maximum(math.sin(self._phi0)**2 - c0**2 * jnp.expm1(la2), 0.0))
    phi = jnp.arctan2(sin_phi, c0 * jnp.exp(0.5 * la2))
    return (phi - self._phi0) * (1 + self.s) / (0.5 * jnp.pi * self.tau)

  def discrete_betas(self, num_steps: int) -> np.ndarray:
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    la2 = np.asarray(self.log_alpha2(jnp.asarray(t, jnp.float32)), np.float64)
    return -np.expm1(la2[1:] - la2[:-1])


def get_schedule(name: str, **kwargs):
  """Returns the schedule called `name` ("linear", "cosine" or "scaled_linear")."""
  table = {"linear": LinearSchedule, "cosine": CosineSchedule,
           "scaled_linear": ScaledLinearSchedule}
  if name not in table:
    raise ValueError(f"Unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}.")
  return table[name](**kwargs)


def discrete_timesteps(num_steps: int) -> np.ndarray:
  """Continuous times t_i = i / N of DDPM steps i = 1..N (index 0 is the data)."""
  return np.arange(1, num_steps + 1, dtype=np.float64) / num_steps


def discrete_alphas_cumprod(schedule, num_steps: int) -> np.ndarray:
  """DDPM's alpha_bar_i = prod_{j<=i} (1 - beta_j), i = 1..N, in float64."""
  return np.cumprod(1.0 - schedule.discrete_betas(num_steps))
