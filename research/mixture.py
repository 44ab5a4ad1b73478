"""Isotropic Gaussian-mixture maths, the one home for it.

p(x) = sum_k w_k N(x; mu_k, s_k^2 I) in R^D. Diffusing it with x_t = alpha x_0 + sigma noise
gives another mixture, sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), so its density,
score, denoiser and posterior over components are closed-form for every SDE.

  component_logpdf(x, means, variances) -> [B, K]    log N(x; mu_k, v_k I)
  log_prob(x, means, stds, log_weights) -> [B]       log p(x)
  diffused(means, stds, t, sde) -> (alpha, sigma, means_t [B, K, D], variances_t [B, K])
  posterior_logits(x, means, stds, log_weights, t, sde) -> [B, K]   log p(k | x_t) + const
  assign(x, means, stds, log_weights) -> [B]         the most likely component

Used by the toy datasets (research/data/toy.py), the exact score and denoiser
(research/diffusion/analytic.py) and the exact classifier and conditional model of guidance
(research/diffusion/guidance.py). Arrays only: pure and jit-able.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def component_logpdf(x: Array, means: Array, variances: Array) -> Array:
  """log N(x; mu_k, v_k I) -> [B, K]; x [B, D], means [K, D] or [B|1, K, D], variances
  [K] or [B|1, K]."""
  if means.ndim == 2:
    means, variances = means[None], jnp.asarray(variances)[None]
  d = x.shape[-1]
  sq = jnp.sum((x[:, None, :] - means)**2, axis=-1)
  return -0.5 * d * jnp.log(2 * math.pi * variances) - 0.5 * sq / variances


def log_prob(x: Array, means: Array, stds: Array, log_weights: Array) -> Array:
  """log sum_k w_k N(x; mu_k, s_k^2 I) -> [B]; x [B, D]."""
  return jax.nn.logsumexp(log_weights[None] + component_logpdf(x, means, stds**2), axis=-1)


def assign(x: Array, means: Array, stds: Array, log_weights: Array) -> Array:
  """argmax_k of w_k N(x; mu_k, s_k^2 I) -> [B] int."""
  return jnp.argmax(log_weights[None] + component_logpdf(x, means, stds**2), axis=-1)


def diffused(means: Array, stds: Array, t: Array, sde):
  """(alpha [B], sigma [B], alpha mu_k [B, K, D], alpha^2 s_k^2 + sigma^2 [B, K]) at t [B]."""
  alpha, sigma = sde.marginal(t)
  m = alpha[:, None, None] * means[None]
  v = (alpha[:, None] * stds[None])**2 + sigma[:, None]**2
  return alpha, sigma, m, v


def posterior_logits(x: Array, means: Array, stds: Array, log_weights: Array, t: Array,
                     sde) -> Array:
  """log w_k + log N(x_t; alpha mu_k, v_k I) -> [B, K]: log p(k | x_t) up to a per-example
  constant. x [B, *dims] is flattened to [B, D]."""
  _, _, m, v = diffused(means, stds, t, sde)
  return log_weights[None] + component_logpdf(x.reshape(x.shape[0], -1), m, v)
