"""SDEs: coefficients consistent with marginals, inverse maps, priors, DDPM schedules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import schedules
from research.diffusion import sde as sde_lib

SDES = {
    "vp": sde_lib.get_sde("vp"),
    "vp_cosine": sde_lib.get_sde("vp", schedule="cosine"),
    "vp_scaled_linear": sde_lib.get_sde("vp", schedule="scaled_linear"),
    "subvp": sde_lib.get_sde("subvp"),
    "subvp_cosine": sde_lib.get_sde("subvp", schedule="cosine"),
    "ve": sde_lib.get_sde("ve"),
    "edm": sde_lib.get_sde("edm"),
}
TS = jnp.linspace(1e-3, 1.0, 37)


@pytest.mark.parametrize("name", sorted(SDES))
def test_coefficients_match_marginals(name):
  """f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2 (linear-SDE identity)."""
  sde = SDES[name]
  la = jax.vmap(jax.grad(lambda t: 0.5 * sde.log_alpha2(t)))(TS)
  dsig2 = jax.vmap(jax.grad(lambda t: jnp.exp(sde.log_sigma2(t))))(TS)
  _, sigma = sde.marginal(TS)
  np.testing.assert_allclose(sde.f(TS), la, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sde.g2(TS), dsig2 - 2 * la * sigma**2, rtol=2e-3, atol=1e-5)
  drift, diffusion = sde.sde(jnp.ones((TS.shape[0], 3)), TS)
  np.testing.assert_allclose(drift[:, 0], sde.f(TS), rtol=1e-6)
  np.testing.assert_allclose(diffusion**2, sde.g2(TS), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SDES))
def test_inverse_time_maps(name):
  sde = SDES[name]
  np.testing.assert_allclose(sde.t_from_logsnr(sde.logsnr(TS)), TS, rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(sde.t_from_edm_sigma(sde.edm_sigma(TS)), TS, rtol=2e-3, atol=2e-5)
  # lambda is strictly decreasing in t; the EDM sigma is sigma / alpha.
  assert np.all(np.diff(np.asarray(sde.logsnr(TS))) < 0)
  alpha, sigma = sde.marginal(TS)
  np.testing.assert_allclose(sde.edm_sigma(TS), sigma / alpha, rtol=1e-5)


def test_known_marginals():
  t64 = np.array([1e-3, 0.3, 1.0])
  t = jnp.asarray(t64, jnp.float32)
  a, s = SDES["vp"].marginal(t)
  la = -0.25 * t64**2 * 19.9 - 0.5 * t64 * 0.1  # float64 reference
  np.testing.assert_allclose(a, np.exp(la), rtol=1e-6)
  np.testing.assert_allclose(s, np.sqrt(-np.expm1(2 * la)), rtol=1e-5)
  a, s = SDES["subvp"].marginal(t)
  np.testing.assert_allclose(s, -np.expm1(2 * la), rtol=1e-5)
  a, s = SDES["ve"].marginal(t)
  np.testing.assert_allclose(a, 1.0)
  np.testing.assert_allclose(s, 0.01 * 5000.0**t64, rtol=1e-5)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_transition_composes(name):
  """alpha_{t|s} alpha_s = alpha_t and sigma_{t|s}^2 + alpha_{t|s}^2 sigma_s^2 = sigma_t^2."""
  sde = SDES[name]
  s, t = jnp.array([0.01, 0.2, 0.5]), jnp.array([0.02, 0.7, 1.0])
  a_ts, s_ts = sde.transition(s, t)
  (a_s, sig_s), (a_t, sig_t) = sde.marginal(s), sde.marginal(t)
  np.testing.assert_allclose(a_ts * a_s, a_t, rtol=1e-5)
  np.testing.assert_allclose(s_ts**2 + a_ts**2 * sig_s**2, sig_t**2, rtol=1e-4)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_forward_sde_simulation_matches_marginal(name):
  """Euler-Maruyama of the forward SDE from a fixed x0 reproduces alpha x0 and sigma^2."""
  sde = SDES[name]
  n, steps, t_end = 4000, 400, 0.6
  x0, h = 1.5, t_end / steps

  @jax.jit
  def simulate(rng):
    def body(i, carry):
      x, key = carry
      key, sub = jax.random.split(key)
      drift, g = sde.sde(x, jnp.full((n,), i * h))
      return x + drift * h + g[:, None] * math.sqrt(h) * jax.random.normal(sub, x.shape), key
    return jax.lax.fori_loop(0, steps, body, (jnp.full((n, 1), x0), rng))[0]

  x = simulate(jax.random.PRNGKey(0))
  a, s = sde.marginal(jnp.array(t_end))
  if name == "ve":  # the VE marginal includes the sigma_min floor at t = 0
    s = jnp.sqrt(s**2 - 0.01**2)
  mean, std = float(jnp.mean(x)), float(jnp.std(x))
  assert abs(mean - float(a) * x0) < 4 * float(s) / math.sqrt(n) + 0.01 * float(s)
  assert abs(std / float(s) - 1) < 4 / math.sqrt(2 * n) + 0.01


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_prior(name):
  sde = SDES[name]
  z = sde.prior_sample(jax.random.PRNGKey(1), (20000, 3))
  assert z.shape == (20000, 3)
  assert abs(float(jnp.std(z)) / sde.prior_std - 1) < 0.02
  zz = jnp.array([[0.3, -1.0, 2.0]])
  expected = np.sum(-0.5 * np.log(2 * np.pi * sde.prior_std**2)
                    - 0.5 * np.asarray(zz)**2 / sde.prior_std**2)
  np.testing.assert_allclose(sde.prior_logp(zz), [expected], rtol=1e-6)


def test_drifts():
  sde = SDES["vp"]
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 3))
  score = jax.random.normal(jax.random.PRNGKey(1), (5, 2, 3))
  t = jnp.linspace(0.1, 0.9, 5)
  f, g2 = sde.f(t)[:, None, None], sde.g2(t)[:, None, None]
  np.testing.assert_allclose(sde.probability_flow_drift(x, t, score), f * x - 0.5 * g2 * score,
                             rtol=1e-6)
  np.testing.assert_allclose(sde.reverse_drift(x, t, score), f * x - g2 * score, rtol=1e-6)
  drift, diff = sde.reverse_sde(lambda x, t: score, probability_flow=True)(x, t)
  np.testing.assert_allclose(drift, f * x - 0.5 * g2 * score, rtol=1e-6)
  assert float(jnp.max(jnp.abs(diff))) == 0.0


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_discrete_ddpm_schedule_sits_on_the_continuous_axis(name):
  """DDPM step i sits at t = i / N: its alpha_bar_i is the continuous one at a time t* = i/N + O(1/N).

  For the linear schedule, log(1 - beta) vs -beta accumulates to 3.4 / N at the end.
  """
  sched = schedules.get_schedule(name)
  n = 1000
  abar = schedules.discrete_alphas_cumprod(sched, n)
  t = schedules.discrete_timesteps(n)
  t_star = np.asarray(sched.t_from_log_alpha2(jnp.asarray(np.log(abar), jnp.float32)))
  assert np.max(np.abs(t_star - t)) <= 4.0 / n, np.max(np.abs(t_star - t))
  # The DDPM linear schedule is beta_i = 1e-4 .. 0.02.
  if name == "linear":
    np.testing.assert_allclose(sched.discrete_betas(n)[[0, -1]], [1e-4, 0.02])


def test_cosine_reaches_its_logsnr_floor():
  sde = SDES["vp_cosine"]
  np.testing.assert_allclose(sde.logsnr(1.0), -10.0, atol=1e-3)
  assert np.isfinite(sde.g2(1.0))


def test_get_sde_errors_and_hashable():
  with pytest.raises(ValueError, match="vp, subvp, ve"):
    sde_lib.get_sde("vpp")
  with pytest.raises(ValueError, match="beta_max"):
    sde_lib.get_sde("vp", beta_mx=3.0)
  with pytest.raises(ValueError, match="linear, cosine, scaled_linear"):
    sde_lib.get_sde("vp", schedule="sigmoid")
  with pytest.raises(ValueError, match="eps"):
    sde_lib.get_sde("ve", eps=0.0)
  assert hash(sde_lib.get_sde("vp", schedule="cosine")) == hash(SDES["vp_cosine"])
  assert sde_lib.VPSDE() == SDES["vp"] and sde_lib.VESDE().T == 1.0
