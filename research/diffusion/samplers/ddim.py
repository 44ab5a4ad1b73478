"""The DDPM / DDIM family: steps through the Gaussian posterior q(x_s | x_t, x0_hat).

For any linear SDE, x_t | x_s ~ N(alpha_{t|s} x_s, sigma_{t|s}^2) (sde.transition), so the
DDPM posterior has variance sigma_{t|s}^2 sigma_s^2 / sigma_t^2 and mean
(x_t + sigma_{t|s}^2 score) / alpha_{t|s} (Tweedie on the transition; algebraically the same
as DDPM's mu_tilde(x_t, x0_hat)). Both samplers therefore work for VP, sub-VP and VE.
With 1000 uniform steps on the VP SDE this is DDPM's sampler (Ho et al. 2020), its
steps t_i = i / N up to the end point eps instead of 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.diffusion.samplers import base
from research.diffusion.samplers.base import full_t


def _posterior_terms(sde, t, s):
  a_ts, s_ts = sde.transition(s, t)
  _, sig_s = sde.marginal(s)
  _, sig_t = sde.marginal(t)
  return a_ts, s_ts, s_ts**2 * sig_s**2 / sig_t**2


def _check_grid(name, opts, sde, steps):
  base.check_positive(name, opts, "rho")


@base.register("ddpm", defaults={"grid": "uniform", "rho": 7.0, "variance": "posterior",
                                 "denoise": False},
               choices={"grid": base.GRIDS, "variance": ("posterior", "forward"),
                        "denoise": (False, True)},
               check=lambda o, sde, n: _check_grid("ddpm", o, sde, n))
def ddpm(score_fn, sde, shape, rng, steps, *, grid, rho, variance, denoise):
  """Ancestral sampling (DDPM). variance: "posterior" (beta_tilde) or "forward" (beta)."""
  batch = shape[0]

  def step(carry, t_cur, t_next, key):
    x, nfe = carry
    t = full_t(t_cur, batch)
    score = score_fn(x, t)
    a_ts, s_ts, var_post = _posterior_terms(sde, t_cur, t_next)
    var = var_post if variance == "posterior" else s_ts**2
    mean = (x + s_ts**2 * score) / a_ts
    x = mean + jnp.sqrt(var) * jax.random.normal(key, x.shape, x.dtype)
    return x, nfe + 1

  return base.run_fixed_grid(step, score_fn, sde, shape, rng, steps, grid=grid, rho=rho,
                             denoise=denoise)


@base.register("ddim", defaults={"eta": 0.0, "grid": "uniform", "rho": 7.0, "denoise": False},
               choices={"grid": base.GRIDS, "denoise": (False, True)},
               check=lambda o, sde, n: (_check_grid("ddim", o, sde, n),
                                        base.check_positive("ddim", o, "eta", strict=False)))
def ddim(score_fn, sde, shape, rng, steps, *, eta, grid, rho, denoise):
  """DDIM (Song, Meng & Ermon 2021): eta = 0 deterministic, eta = 1 ancestral (= ddpm).

  x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with c = eta * posterior std.
  With eta = 0 this is the exponential-integrator Euler step of the probability-flow ODE.
  """
  batch = shape[0]

  def step(carry, t_cur, t_next, key):
    x, nfe = carry
    t = full_t(t_cur, batch)
    score = score_fn(x, t)
    alpha_t, sigma_t = sde.marginal(t_cur)
    alpha_s, sigma_s = sde.marginal(t_next)
    eps_hat = -sigma_t * score
    x0_hat = (x - sigma_t * eps_hat) / alpha_t
    _, _, var_post = _posterior_terms(sde, t_cur, t_next)
    c2 = jnp.minimum(eta**2 * var_post, sigma_s**2)
    x = alpha_s * x0_hat + jnp.sqrt(sigma_s**2 - c2) * eps_hat
    if eta > 0:
      x = x + jnp.sqrt(c2) * jax.random.normal(key, x.shape, x.dtype)
    return x, nfe + 1

  return base.run_fixed_grid(step, score_fn, sde, shape, rng, steps, grid=grid, rho=rho,
                             denoise=denoise)

