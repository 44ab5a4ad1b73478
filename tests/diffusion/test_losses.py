"""Losses: zero for an oracle network, the right time distributions, clear errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import losses
from research.diffusion import parameterization as param
from research.diffusion import sde as sde_lib

VP = sde_lib.get_sde("vp")
VE = sde_lib.get_sde("ve")
X0 = jax.random.normal(jax.random.PRNGKey(0), (64, 2, 3)) * 0.7 + 0.2

CASES = [("ddpm", "eps", {}), ("ddpm", "x0", {"time_sampling": "continuous"}),
         ("dsm", "eps", {}), ("dsm", "score", {"weighting": "likelihood"}),
         ("dsm", "v", {"reduce": "sum"}), ("v", "v", {}), ("v", "eps", {}), ("edm", "edm", {})]


def _oracle(sde, pred, x0, sigma_data=0.5):
  """A network that knows the batch's x0 exactly: its output is the target of every loss."""
  def model_fn(x_in, t):
    alpha, sigma = sde.marginal(t)
    x = x_in
    if pred == "edm":
      c_in, _, _ = param.edm_preconditioning(sde.edm_sigma(t), sigma_data)
      x = x_in * (alpha / c_in)[:, None, None]
    eps = (x - alpha[:, None, None] * x0) / sigma[:, None, None]
    return param.from_x0_eps(x0, eps, x, t, sde, pred, sigma_data)
  return model_fn


@pytest.mark.parametrize("sde", [VP, VE], ids=["vp", "ve"])
def test_oracle_has_zero_loss_and_zero_model_does_not(sde):
  @jax.jit
  def run(x0, rng):
    out = {}
    for name, pred, opts in CASES:
      fn = losses.get_loss_fn(name, sde, prediction=pred, **opts)
      out[(name, pred)] = (fn(_oracle(sde, pred, x0), x0, rng),
                           fn(lambda x, t: jnp.zeros_like(x), x0, rng))
    return out

  res = run(X0, jax.random.PRNGKey(1))
  for (name, pred), (oracle, zero) in res.items():
    assert oracle.shape == (X0.shape[0],), name
    scale = float(jnp.mean(zero))
    assert np.all(np.isfinite(zero)) and scale > 0, (name, pred)
    assert float(jnp.max(oracle)) <= 1e-4 * max(scale, 1.0), (name, pred, float(jnp.max(oracle)))


def test_ddpm_loss_of_zero_eps_model_is_chi_square():
  """Predicting eps = 0 costs E||eps||^2 / D = 1 per example (mean reduction)."""
  fn = jax.jit(lambda x0, rng: losses.get_loss_fn("ddpm", VP)(
      lambda x, t: jnp.zeros_like(x), x0, rng))
  x0 = jnp.zeros((4096, 6))
  vals = fn(x0, jax.random.PRNGKey(3))
  # std of chi2_6 / 6 is sqrt(2/6); 5 standard errors.
  assert abs(float(jnp.mean(vals)) - 1.0) < 5 * math.sqrt(2 / 6) / math.sqrt(4096)


def _recorded_times(name, n=4096, **opts):
  """The times a loss feeds the network (returned out of the jitted loss)."""
  @jax.jit
  def run(rng):
    seen = []

    def model_fn(x, t):
      seen.append(t)
      return jnp.zeros_like(x)
    losses.get_loss_fn(name, VP, **opts)(model_fn, jnp.zeros((n, 1)), rng)
    return seen[0]
  return np.asarray(run(jax.random.PRNGKey(5)))


def test_time_sampling():
  t = _recorded_times("ddpm")  # discrete: t = i / 1000, i in 1..1000
  np.testing.assert_allclose(t * 1000, np.round(t * 1000), atol=1e-3)
  assert t.min() >= 1e-3 - 1e-7 and t.max() <= 1.0
  assert len(np.unique(np.round(t * 1000))) > 900
  t = _recorded_times("dsm")  # continuous U[eps, T]: mean (1 + eps) / 2
  assert t.min() >= VP.eps and abs(t.mean() - 0.5005) < 5 * 0.29 / math.sqrt(len(t))
  t = _recorded_times("edm")  # ln sigma ~ N(-1.2, 1.2^2), well inside the VP range
  log_sigma = np.log(np.asarray(VP.edm_sigma(jnp.asarray(t))))
  assert abs(log_sigma.mean() + 1.2) < 0.1 and abs(log_sigma.std() - 1.2) < 0.1


def test_likelihood_weighting_is_g2_over_sigma2_times_uniform():
  """Same rng, eps model = 0: the per-example ratio of the two DSM weightings is g^2 / sigma^2."""
  @jax.jit
  def run(x0, rng):
    seen = []

    def model_fn(x, t):
      seen.append(t)
      return jnp.zeros_like(x)
    uni = losses.get_loss_fn("dsm", VP)(model_fn, x0, rng)
    lik = losses.get_loss_fn("dsm", VP, weighting="likelihood")(model_fn, x0, rng)
    return uni, lik, seen[0]

  uni, lik, t = run(jnp.zeros((256, 3)), jax.random.PRNGKey(7))
  _, sigma = VP.marginal(t)
  np.testing.assert_allclose(lik / uni, VP.g2(t) / sigma**2, rtol=1e-4)


def test_bad_names_and_options():
  with pytest.raises(ValueError, match="ddpm, dsm, v, edm"):
    losses.get_loss_fn("l2", VP)
  with pytest.raises(ValueError, match="weighting"):
    losses.get_loss_fn("dsm", VP, weighting="snr")
  with pytest.raises(ValueError, match="Unknown option"):
    losses.get_loss_fn("ddpm", VP, weighting="uniform")
  with pytest.raises(ValueError, match="eps, x0, v, score, edm"):
    losses.get_loss_fn("ddpm", VP, prediction="noise")
  with pytest.raises(ValueError, match="edm"):
    losses.get_loss_fn("edm", VP, prediction="x0")
  with pytest.raises(ValueError, match="num_steps"):
    losses.get_loss_fn("ddpm", VP, num_steps=0)
  assert losses.sampling_prediction("edm") == "edm"
  assert losses.sampling_prediction("v", "v") == "v"
