"""Fixed-step probability-flow ODE solvers: Euler in t, and EDM's Heun in sigma.

The probability-flow ODE dx/dt = f x - g^2 score / 2 is the same ODE for every linear SDE
as the DDIM ODE d(x / alpha) = eps_hat d(sigma / alpha); `heun` integrates it in the EDM
view (state x / alpha, time sigma = sde.edm_sigma(t)), where it reads
dx~/dsigma = (x~ - D(x~; sigma)) / sigma with D the denoiser, so any of VP, sub-VP and VE.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from research.diffusion import parameterization as param
from research.diffusion.samplers import base
from research.diffusion.samplers.base import full_t


@base.register("ode_euler",
               defaults={"grid": "uniform", "rho": 7.0, "denoise": False},
               choices={"grid": base.GRIDS, "denoise": (False, True)},
               check=lambda o, sde, n: base.check_positive("ode_euler", o, "rho"))
def ode_euler(score_fn, sde, shape, rng, steps, *, grid, rho, denoise):
  """Euler's method on the probability-flow ODE in t (first order; 1 NFE per step)."""
  batch = shape[0]

  def step(carry, t_cur, t_next, key):
    x, nfe = carry
    t = full_t(t_cur, batch)
    x = x + (t_next - t_cur) * sde.probability_flow_drift(x, t, score_fn(x, t))
    return x, nfe + 1

  return base.run_fixed_grid(step, score_fn, sde, shape, rng, steps, grid=grid, rho=rho,
                             denoise=denoise)


def _check_heun(opts, sde, steps):
  base.check_positive("heun", opts, "rho")
  base.check_positive("heun", opts, "S_churn", "S_min", "S_noise", strict=False)
  if not opts["S_max"] >= opts["S_min"]:
    raise ValueError(f"sampler 'heun': need S_max >= S_min, got {opts['S_max']} < {opts['S_min']}.")


@base.register("heun",
               defaults={"S_churn": 0.0, "S_min": 0.0, "S_max": math.inf, "S_noise": 1.0,
                         "grid": "edm", "rho": 7.0, "denoise": False},
               choices={"grid": base.GRIDS, "denoise": (False, True)},
               check=_check_heun)
def heun(score_fn, sde, shape, rng, steps, *, S_churn, S_min, S_max, S_noise, grid, rho,
         denoise):
  """EDM's 2nd-order Heun sampler (Karras et al. 2022, Alg. 2), 2 NFE per step.

  With S_churn > 0, each step first raises the noise level of steps with
  S_min <= sigma <= S_max to sigma_hat = sigma (1 + gamma), gamma = min(S_churn / steps,
  sqrt(2) - 1), by adding fresh noise (scaled by S_noise); sigma_hat is capped at
  edm_sigma(T) so the network is never queried beyond T. S_churn = 0 is deterministic.
  Unlike EDM the grid ends at eps (not sigma = 0), so every step is a Heun step; use
  denoise=True for EDM's final jump to sigma = 0.
  """
  batch = shape[0]
  sigma_top = sde.edm_sigma(sde.T)
  gamma_max = min(S_churn / steps, math.sqrt(2.0) - 1.0)

  def d_dsigma(xs, t, sigma):
    # x~ = x / alpha; D(x~) = E[x0 | x]; dx~/dsigma = (x~ - D) / sigma.
    alpha, _ = sde.marginal(t)
    xt = alpha * xs
    x0 = param.score_to_x0(score_fn(xt, full_t(t, batch)), full_t(t, batch), sde, xt)
    return (xs - x0) / sigma

  def step(carry, t_cur, t_next, key):
    xs, nfe = carry
    s_cur, s_next = sde.edm_sigma(t_cur), sde.edm_sigma(t_next)
    if gamma_max > 0:
      gamma = jnp.where((s_cur >= S_min) & (s_cur <= S_max), gamma_max, 0.0)
      s_hat = jnp.minimum(s_cur * (1.0 + gamma), sigma_top)
      t_hat = jnp.where(s_hat > s_cur, sde.t_from_edm_sigma(s_hat), t_cur)
      noise = jax.random.normal(key, xs.shape, xs.dtype)
      # Guarded like t_hat: with gamma = 0, s_hat**2 - s_cur**2 is a rounding error under jit
      # (1e-3 at sigma = 152), whose square root would churn a step that must not be.
      amp = jnp.where(s_hat > s_cur, jnp.sqrt(jnp.maximum(s_hat**2 - s_cur**2, 0.0)), 0.0)
      xs = xs + amp * S_noise * noise
    else:
      s_hat, t_hat = s_cur, t_cur
    d = d_dsigma(xs, t_hat, s_hat)
    x_eul = xs + (s_next - s_hat) * d
    d2 = d_dsigma(x_eul, t_next, s_next)
    xs = xs + (s_next - s_hat) * 0.5 * (d + d2)
    return xs, nfe + 2

  def init(x, grid_t):  # the EDM state x / alpha
    return x / sde.marginal(grid_t[0])[0], jnp.int32(0)

  def unpack(carry, grid_t):
    return sde.marginal(grid_t[-1])[0] * carry[0], carry[1]

  return base.run_fixed_grid(step, score_fn, sde, shape, rng, steps, grid=grid, rho=rho,
                             denoise=denoise, init=init, unpack=unpack)
