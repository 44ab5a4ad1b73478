"""Reverse-time SDE solvers: Euler-Maruyama and predictor-corrector (Song et al. 2021).

Both use only the SDE's f(t), g(t) and transition (alpha_{t|s}, sigma_{t|s}), so they work
with VP, sub-VP and VE alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.diffusion.samplers import base
from research.diffusion.samplers.base import full_t


def _check(name):
  def check(opts, sde, steps):
    base.check_positive(name, opts, "rho")
    if name == "pc":
      base.check_positive(name, opts, "snr")
      n = opts["corrector_steps"]
      if not isinstance(n, int) or n < 0:
        raise ValueError(f"sampler 'pc': corrector_steps must be an int >= 0, got {n!r}.")
  return check


@base.register("euler_maruyama",
               defaults={"grid": "uniform", "rho": 7.0, "denoise": False},
               choices={"grid": base.GRIDS, "denoise": (False, True)},
               check=_check("euler_maruyama"))
def euler_maruyama(score_fn, sde, shape, rng, steps, *, grid, rho, denoise):
  """x_{t-h} = x - h [f x - g^2 score] + g sqrt(h) z on the reverse-time SDE."""
  batch = shape[0]

  def step(carry, t_cur, t_next, key):
    x, nfe = carry
    t = full_t(t_cur, batch)
    h = t_cur - t_next
    drift = sde.reverse_drift(x, t, score_fn(x, t))
    g = jnp.sqrt(sde.g2(t_cur))
    x = x - h * drift + g * jnp.sqrt(h) * jax.random.normal(key, x.shape, x.dtype)
    return x, nfe + 1

  return base.run_fixed_grid(step, score_fn, sde, shape, rng, steps, grid=grid, rho=rho,
                             denoise=denoise)


def _batch_norm(a):
  return jnp.mean(jnp.sqrt(jnp.sum(a.reshape(a.shape[0], -1)**2, axis=-1)))


@base.register("pc",
               defaults={"predictor": "reverse_diffusion", "corrector": "langevin",
                         "snr": 0.16, "corrector_steps": 1, "grid": "uniform", "rho": 7.0,
                         "denoise": False},
               choices={"predictor": ("reverse_diffusion", "euler_maruyama"),
                        "corrector": ("langevin", "none"), "grid": base.GRIDS,
                        "denoise": (False, True)},
               check=_check("pc"))
def pc(score_fn, sde, shape, rng, steps, *, predictor, corrector, snr, corrector_steps, grid,
       rho, denoise):
  """Predictor-corrector: at each t, `corrector_steps` Langevin steps, then one predictor step.

  Langevin step size (Song et al. 2021, Alg. 4/5): eps = 2 a (snr |z| / |score|)^2 with
  a = alpha_{t|s}^2 (1 - beta_i for VP, 1 for VE) and |.| the batch mean of per-example
  norms, as in the reference implementation (per-example norms are unstable in low
  dimension: a sample near a mode centre has a tiny score and takes a huge step).
  Predictors: "reverse_diffusion", x_s = (x + sigma_{t|s}^2 score) / alpha_{t|s} +
  sigma_{t|s} z (the discretised reverse SDE; ancestral with the forward variance), or
  "euler_maruyama". NFE per step: corrector_steps + 1.
  """
  batch = shape[0]
  n_corr = corrector_steps if corrector == "langevin" else 0

  def step(carry, t_cur, t_next, key):
    x, nfe = carry
    t = full_t(t_cur, batch)
    a_ts, s_ts = sde.transition(t_next, t_cur)
    keys = jax.random.split(key, n_corr + 1)
    for j in range(n_corr):  # static, small: unrolled inside the scanned step
      score = score_fn(x, t)
      z = jax.random.normal(keys[j], x.shape, x.dtype)
      ratio = snr * _batch_norm(z) / jnp.maximum(_batch_norm(score), 1e-20)
      step_size = 2.0 * a_ts**2 * ratio**2
      x = x + step_size * score + jnp.sqrt(2.0 * step_size) * z
      nfe = nfe + 1
    score = score_fn(x, t)
    nfe = nfe + 1
    z = jax.random.normal(keys[-1], x.shape, x.dtype)
    if predictor == "reverse_diffusion":
      x = (x + s_ts**2 * score) / a_ts + s_ts * z
    else:
      h = t_cur - t_next
      x = x - h * sde.reverse_drift(x, t, score) + jnp.sqrt(sde.g2(t_cur) * h) * z
    return x, nfe

  return base.run_fixed_grid(step, score_fn, sde, shape, rng, steps, grid=grid, rho=rho,
                             denoise=denoise)
