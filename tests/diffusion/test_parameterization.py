"""Parameterisations: a perfect network of every type yields the exact GMM score and denoiser."""
import jax
import numpy as np
import pytest

from research.diffusion import analytic
from research.diffusion import parameterization as param
from research.diffusion import sde as sde_lib

SDES = {n: sde_lib.get_sde(n) for n in ("vp", "subvp", "ve")}
GMM = analytic.GaussianMixture.ring(num_modes=4, radius=2.0, std=0.3, dim=3)


def _points(sde, n=64, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  t = jax.random.uniform(k1, (n,), minval=sde.eps, maxval=sde.T)
  x0 = GMM.sample(k2, n)
  eps = jax.random.normal(k3, x0.shape)
  alpha, sigma = sde.marginal(t)
  return x0, eps, alpha[:, None] * x0 + sigma[:, None] * eps, t


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_round_trip_through_x0_eps(sde_name):
  sde = SDES[sde_name]
  x0, eps, x, t = _points(sde)

  @jax.jit
  def round_trips(x0, eps, x, t):
    return {p: param.to_x0_eps(param.from_x0_eps(x0, eps, x, t, sde, p), x, t, sde, p)
            for p in param.PREDICTIONS}

  res = round_trips(x0, eps, x, t)
  for pred in param.PREDICTIONS:
    x0_hat, eps_hat = res[pred]
    # VE at large t: x0 = x - sigma eps loses digits (sigma ~ 50), hence the atol.
    np.testing.assert_allclose(x0_hat, x0, rtol=1e-3, atol=2e-3, err_msg=pred)
    np.testing.assert_allclose(eps_hat, eps, rtol=1e-3, atol=2e-3, err_msg=pred)


def _perfect_model(sde, pred, sigma_data=0.5):
  """A network of type `pred` that is exact for the GMM (it inverts the EDM input scaling)."""
  score, denoise = GMM.score_fn(sde), GMM.denoiser_fn(sde)

  def model_fn(x_in, t):
    if pred == "edm":
      alpha, _ = sde.marginal(t)
      c_in, _, _ = param.edm_preconditioning(sde.edm_sigma(t), sigma_data)
      x = x_in * (alpha / c_in)[:, None]
    else:
      x = x_in
    _, sigma = sde.marginal(t)
    eps_hat = -sigma[:, None] * score(x, t)
    return param.from_x0_eps(denoise(x, t), eps_hat, x, t, sde, pred, sigma_data)
  return model_fn


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_perfect_model_gives_exact_score_and_denoiser(sde_name):
  sde = SDES[sde_name]
  _, _, x, t = _points(sde, seed=1)

  @jax.jit
  def all_predictions(x, t):  # one compile for all parameterisations
    out = {"exact": (GMM.score_fn(sde)(x, t), GMM.denoiser_fn(sde)(x, t))}
    for pred in param.PREDICTIONS:
      model = _perfect_model(sde, pred)
      out[pred] = (param.score_fn_from_model(model, sde, pred)(x, t),
                   param.denoiser_from_model(model, sde, pred)(x, t))
    return out

  res = all_predictions(x, t)
  exact_score, exact_x0 = res["exact"]
  _, sigma = sde.marginal(t)
  for pred in param.PREDICTIONS:
    score, x0 = res[pred]
    # Compare scores scaled by sigma (= -eps), which are O(1) at every t.
    np.testing.assert_allclose(sigma[:, None] * score, sigma[:, None] * exact_score,
                               rtol=1e-3, atol=2e-3, err_msg=pred)
    np.testing.assert_allclose(x0, exact_x0, rtol=1e-3, atol=5e-3, err_msg=pred)


def test_conversions_and_tweedie():
  sde = SDES["vp"]
  _, _, x, t = _points(sde, seed=2)
  score = GMM.score_fn(sde)(x, t)
  x0 = param.score_to_x0(score, t, sde, x)
  np.testing.assert_allclose(param.x0_to_score(x0, t, sde, x), score, rtol=1e-3, atol=1e-3)
  eps = param.score_to_eps(score, t, sde, x)
  np.testing.assert_allclose(param.eps_to_score(eps, t, sde, x), score, rtol=1e-5)
  np.testing.assert_allclose(param.denoiser_from_score(GMM.score_fn(sde), sde)(x, t), x0,
                             rtol=1e-6)


def test_v_is_alpha_eps_minus_sigma_x0():
  sde = SDES["vp"]
  x0, eps, x, t = _points(sde, seed=3)
  alpha, sigma = sde.marginal(t)
  v = param.from_x0_eps(x0, eps, x, t, sde, "v")
  np.testing.assert_allclose(v, alpha[:, None] * eps - sigma[:, None] * x0, rtol=1e-6)


def test_unknown_prediction():
  with pytest.raises(ValueError, match="eps, x0, v, score, edm"):
    param.score_fn_from_model(lambda x, t: x, SDES["vp"], "noise")
