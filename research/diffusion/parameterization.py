"""Turn a network's raw output into a score function or a denoiser.

A network is `model_fn(x [B, *dims], t [B]) -> out [B, *dims]` with t the continuous SDE
time (sde.py). What `out` means is the "prediction":

  "eps"    the noise:           x_t = alpha x_0 + sigma eps
  "x0"     the clean data x_0
  "v"      v = alpha eps - sigma x_0 (Salimans & Ho 2022; for non-VP SDEs the same linear
           map, inverted with the factor 1 / (alpha^2 + sigma^2))
  "score"  grad_x log p_t(x) itself
  "edm"    Karras et al.'s F: the network sees the preconditioned input c_in * x / alpha,
           and D = c_skip * (x / alpha) + c_out * F is the denoised data, with
           sigma = sde.edm_sigma(t), c_in = 1 / sqrt(sigma^2 + sigma_data^2),
           c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
           c_out = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2).
           This is what losses.get_loss_fn("edm", ...) trains.

All of them pass through (x0_hat, eps_hat), tied by x = alpha x0_hat + sigma eps_hat, and
score = -eps_hat / sigma (Tweedie: E[x_0 | x_t] = (x_t + sigma^2 score) / alpha).
"""
from __future__ import annotations

from typing import Callable, Tuple

import jax

from research.diffusion.sde import bcast

Array = jax.Array
PREDICTIONS = ("eps", "x0", "v", "score", "edm")
# What a network can be trained to predict with the ddpm / dsm / v losses; "edm" is the
# preconditioned output of loss "edm" (losses.sampling_prediction), chosen by the loss.
NETWORK_PREDICTIONS = tuple(p for p in PREDICTIONS if p != "edm")


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}.")


def edm_preconditioning(sigma: Array, sigma_data: float):
  """(c_in, c_skip, c_out) of Karras et al. (2022), Table 1, for EDM sigma [B]."""
  s2 = sigma**2 + sigma_data**2
  return jax.lax.rsqrt(s2), sigma_data**2 / s2, sigma * sigma_data * jax.lax.rsqrt(s2)


def model_input(x: Array, t: Array, sde, prediction: str, sigma_data: float = 0.5) -> Array:
  """What the network sees: x itself, except for "edm", where it is c_in * x / alpha."""
  if prediction != "edm":
    return x
  alpha, _ = sde.marginal(t)
  c_in, _, _ = edm_preconditioning(sde.edm_sigma(t), sigma_data)
  return bcast(c_in / alpha, x) * x


def to_x0_eps(out: Array, x: Array, t: Array, sde, prediction: str,
              sigma_data: float = 0.5) -> Tuple[Array, Array]:
  """Maps raw output to (x0_hat, eps_hat), consistent with x = alpha x0_hat + sigma eps_hat."""
  check_prediction(prediction)
  alpha, sigma = sde.marginal(t)
  a, s = bcast(alpha, x), bcast(sigma, x)
  if prediction == "eps":
    eps = out
    x0 = (x - s * eps) / a
  elif prediction == "x0":
    x0 = out
    eps = (x - a * x0) / s
  elif prediction == "v":
    norm = a**2 + s**2
    x0 = (a * x - s * out) / norm
    eps = (s * x + a * out) / norm
  elif prediction == "score":
    eps = -s * out
    x0 = (x - s * eps) / a
  else:  # edm
    _, c_skip, c_out = edm_preconditioning(sde.edm_sigma(t), sigma_data)
    x0 = bcast(c_skip, x) * (x / a) + bcast(c_out, x) * out
    eps = (x - a * x0) / s
  return x0, eps


def from_x0_eps(x0: Array, eps: Array, x: Array, t: Array, sde, prediction: str,
                sigma_data: float = 0.5) -> Array:
  """Inverse of `to_x0_eps`: the output a perfect network of type `prediction` gives."""
  check_prediction(prediction)
  alpha, sigma = sde.marginal(t)
  a, s = bcast(alpha, x), bcast(sigma, x)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  if prediction == "v":
    return a * eps - s * x0
  if prediction == "score":
    return -eps / s
  _, c_skip, c_out = edm_preconditioning(sde.edm_sigma(t), sigma_data)
  return (x0 - bcast(c_skip, x) * (x / a)) / bcast(c_out, x)


def _wrap(model_fn, sde, prediction, sigma_data):
  check_prediction(prediction)

  def x0_eps(x, t):
    out = model_fn(model_input(x, t, sde, prediction, sigma_data), t)
    return to_x0_eps(out, x, t, sde, prediction, sigma_data)
  return x0_eps


def score_fn_from_model(model_fn: Callable[[Array, Array], Array], sde, prediction: str,
                        *, sigma_data: float = 0.5) -> Callable[[Array, Array], Array]:
  """Returns score_fn(x, t) = grad_x log p_t(x) as the network estimates it.

  Args:
    model_fn: network (x [B, *dims], t [B]) -> raw output [B, *dims].
    sde: an SDE from sde.py (fixes alpha(t), sigma(t)).
    prediction: one of PREDICTIONS, what the raw output means.
    sigma_data: only for "edm", the data std of the preconditioning.
  """
  x0_eps = _wrap(model_fn, sde, prediction, sigma_data)
  if prediction == "score":
    return lambda x, t: model_fn(x, t)

  def score_fn(x, t):
    _, eps = x0_eps(x, t)
    return eps_to_score(eps, t, sde, x)
  return score_fn


def denoiser_from_model(model_fn: Callable[[Array, Array], Array], sde, prediction: str,
                        *, sigma_data: float = 0.5) -> Callable[[Array, Array], Array]:
  """Returns D(x, t) -> x0_hat = E[x_0 | x_t = x] as the network estimates it."""
  x0_eps = _wrap(model_fn, sde, prediction, sigma_data)
  return lambda x, t: x0_eps(x, t)[0]


# ---- conversions between score, eps and x0 for a given (x, t) ---------------------------
def score_to_eps(score: Array, t: Array, sde, x: Array) -> Array:
  return -bcast(sde.marginal(t)[1], x) * score


def eps_to_score(eps: Array, t: Array, sde, x: Array) -> Array:
  return -eps / bcast(sde.marginal(t)[1], x)


def score_to_x0(score: Array, t: Array, sde, x: Array) -> Array:
  """Tweedie: E[x_0 | x_t = x] = (x + sigma^2 score) / alpha."""
  alpha, sigma = sde.marginal(t)
  return (x + bcast(sigma**2, x) * score) / bcast(alpha, x)


def x0_to_score(x0: Array, t: Array, sde, x: Array) -> Array:
  alpha, sigma = sde.marginal(t)
  return (bcast(alpha, x) * x0 - x) / bcast(sigma**2, x)


def denoiser_from_score(score_fn: Callable[[Array, Array], Array], sde):
  """D(x, t) from a score_fn (Tweedie); samplers that need x0_hat use this."""
  return lambda x, t: score_to_x0(score_fn(x, t), t, sde, x)
