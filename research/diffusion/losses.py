"""Training objectives for diffusion models: per-example losses on one SDE time axis.

`get_loss_fn(name, sde, prediction=..., **options)` returns
`loss_fn(model_fn, x0 [B, *dims], rng) -> [B]`; the trainer takes the mean. Every loss draws
t and noise, forms x_t = alpha(t) x0 + sigma(t) eps, calls the network on the
parameterisation's input (parameterization.model_input), maps its raw output to
(x0_hat, eps_hat) and compares in the loss's own space:

  "ddpm"  ||eps_hat - eps||^2 (Ho et al.'s simple loss). Options: time_sampling="discrete"
          (default: step i ~ U{1..num_steps}, t = i / num_steps, i.e. the DDPM schedule
          as a discretised VP SDE, see schedules.py) or "continuous" (t ~ U[eps, T]);
          num_steps=1000.
  "dsm"   denoising score matching, lambda(t) ||score_hat - grad log p(x_t | x0)||^2 with
          t ~ U[eps, T]. weighting="uniform" (lambda = sigma^2, Song et al.'s default, the
          same as eps matching) or "likelihood" (lambda = g(t)^2, which makes the time
          integral a bound on the negative log-likelihood, Song et al. 2021b).
  "v"     ||v_hat - v||^2 with v = alpha eps - sigma x0; time_sampling as "ddpm" but
          "continuous" by default.
  "edm"   Karras et al.'s preconditioned loss: ln sigma ~ N(p_mean, p_std^2) in the EDM view
          (sigma = sde.edm_sigma(t), clipped to the SDE's range [eps, T]), loss
          lambda(sigma) ||D - x0||^2 with lambda = 1 / c_out^2, i.e. ||F - F_target||^2.
          The network is the "edm" parameterisation: to sample, use
          parameterization.score_fn_from_model(model_fn, sde, "edm", sigma_data=...),
          which is what `sampling_prediction("edm", ...)` returns.

`prediction` is what the network outputs ("eps", "x0", "v", "score"); any prediction works
with "ddpm", "dsm" and "v" (the output is converted, which reweights the loss). "edm" trains
the "edm" parameterisation only. All losses take `reduce="mean"` (over non-batch dims, the
default) or "sum".
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp

from research.diffusion import parameterization as param
from research.diffusion.sde import bcast

Array = jax.Array
LOSSES = ("ddpm", "dsm", "v", "edm")

_DEFAULTS: Dict[str, Dict] = {
    "ddpm": {"time_sampling": "discrete", "num_steps": 1000, "reduce": "mean"},
    "dsm": {"weighting": "uniform", "reduce": "mean"},
    "v": {"time_sampling": "continuous", "num_steps": 1000, "reduce": "mean"},
    "edm": {"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2, "reduce": "mean"},
}
WEIGHTINGS = ("uniform", "likelihood")  # dsm: lambda(t) = 1 or g(t)^2 (Song et al. 2021)
_CHOICES = {
    "time_sampling": ("discrete", "continuous"),
    "weighting": WEIGHTINGS,
    "reduce": ("mean", "sum"),
}


def sampling_prediction(name: str, prediction: str = "eps") -> str:
  """The parameterisation to sample a network trained with loss `name` and `prediction`."""
  return "edm" if name == "edm" else prediction


def _resolve(name: str, prediction: str, options: Dict) -> Dict:
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; allowed: {', '.join(LOSSES)}.")
  allowed = _DEFAULTS[name]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(
        f"Unknown option(s) {unknown} for loss {name!r}; allowed: {sorted(allowed)}.")
  opts = {**allowed, **options}
  for key, choices in _CHOICES.items():
    if key in opts and opts[key] not in choices:
      raise ValueError(f"loss {name!r}: {key}={opts[key]!r}; allowed: {', '.join(choices)}.")
  if "num_steps" in opts and (int(opts["num_steps"]) != opts["num_steps"]
                              or opts["num_steps"] < 1):
    raise ValueError(f"loss {name!r}: num_steps must be a positive int, got {opts['num_steps']}.")
  if name == "edm":
    if prediction not in ("eps", "edm"):
      raise ValueError(
          f"loss 'edm' trains the 'edm' parameterisation; got prediction={prediction!r} "
          "(leave it out or pass 'edm').")
    if opts["sigma_data"] <= 0 or opts["p_std"] <= 0:
      raise ValueError("loss 'edm': sigma_data and p_std must be > 0.")
  else:
    param.check_prediction(prediction)
    if prediction == "edm":
      raise ValueError(f"prediction 'edm' goes with loss 'edm' only, not {name!r}.")
  return opts


def _sample_t(rng, batch, sde, opts):
  if opts.get("time_sampling") == "discrete":
    n = int(opts["num_steps"])
    i = jax.random.randint(rng, (batch,), 1, n + 1)
    return jnp.maximum(i.astype(jnp.float32) / n, sde.eps)
  return jax.random.uniform(rng, (batch,), jnp.float32, sde.eps, sde.T)


def get_loss_fn(name: str, sde, *, prediction: str = "eps", **options
                ) -> Callable[[Callable, Array, Array], Array]:
  """Builds loss_fn(model_fn, x0 [B, *dims], rng) -> per-example loss [B].

  Args:
    name: one of LOSSES (see the module docstring).
    sde: the SDE (sde.get_sde); its eps, T and marginals define the time axis.
    prediction: the network's output type (parameterization.PREDICTIONS).
    **options: per-loss options (module docstring); unknown ones raise ValueError.
  """
  opts = _resolve(name, prediction, options)
  net_prediction = "edm" if name == "edm" else prediction
  space = {"ddpm": "eps", "dsm": "score", "v": "v", "edm": "edm"}[name]
  sigma_data = opts.get("sigma_data", 0.5)
  reduce = jnp.mean if opts["reduce"] == "mean" else jnp.sum

  def loss_fn(model_fn, x0, rng):
    x0 = jnp.asarray(x0, jnp.float32)
    batch = x0.shape[0]
    rng_t, rng_n = jax.random.split(rng)
    if name == "edm":
      lo, hi = sde.edm_sigma(sde.eps), sde.edm_sigma(sde.T)
      log_sigma = opts["p_mean"] + opts["p_std"] * jax.random.normal(rng_t, (batch,))
      sigma_e = jnp.clip(jnp.exp(log_sigma), lo, hi)
      t = jnp.clip(sde.t_from_edm_sigma(sigma_e), sde.eps, sde.T)
    else:
      t = _sample_t(rng_t, batch, sde, opts)
    eps = jax.random.normal(rng_n, x0.shape, jnp.float32)
    alpha, sigma = sde.marginal(t)
    xt = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
    out = model_fn(param.model_input(xt, t, sde, net_prediction, sigma_data), t)
    if net_prediction == space:
      pred = out  # no round trip through (x0, eps) when the spaces agree
    else:
      x0_hat, eps_hat = param.to_x0_eps(out, xt, t, sde, net_prediction, sigma_data)
      pred = param.from_x0_eps(x0_hat, eps_hat, xt, t, sde, space, sigma_data)
    target = param.from_x0_eps(x0, eps, xt, t, sde, space, sigma_data)
    err = (pred - target)**2
    if name == "dsm":
      weight = sigma**2 if opts["weighting"] == "uniform" else sde.g2(t)
      err = bcast(weight, err) * err
    return reduce(err.reshape(batch, -1), axis=-1)

  return loss_fn
