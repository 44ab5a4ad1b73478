"""The exact-score harness: densities, scores of p_t for every SDE, quality metrics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from research.diffusion import analytic
from research.diffusion import sde as sde_lib

GMM = analytic.GaussianMixture(means=[[0.0, 1.0], [2.0, -1.0], [-1.5, 0.5]],
                               stds=[0.3, 0.5, 0.8], weights=[0.5, 0.3, 0.2])


def test_log_prob_matches_scipy():
  x = np.random.default_rng(0).normal(size=(7, 2)) * 2
  expected = np.log(sum(
      w * stats.multivariate_normal(m, s**2 * np.eye(2)).pdf(x)
      for m, s, w in zip([[0, 1], [2, -1], [-1.5, 0.5]], [0.3, 0.5, 0.8], [0.5, 0.3, 0.2])))
  np.testing.assert_allclose(GMM.log_prob(jnp.asarray(x, jnp.float32)), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_score_is_gradient_of_log_p_t(name):
  """score_fn(sde) = grad_x log p_t with p_t the mixture N(alpha mu_k, alpha^2 s_k^2 + sigma^2)."""
  sde = sde_lib.get_sde(name)
  t = jnp.array([1e-3, 0.05, 0.3, 0.7, 1.0])
  alpha, sigma = sde.marginal(t)
  x = (alpha[:, None] * jnp.array([[0.1, 0.9], [1.0, 0.0], [2.0, -1.0], [0.0, 0.0], [3.0, 1.0]])
       + sigma[:, None] * jax.random.normal(jax.random.PRNGKey(0), (5, 2)))

  @jax.jit
  def both(x, t):
    grad = jax.grad(lambda x: jnp.sum(GMM.log_prob_t(x, t, sde)))(x)
    return grad, GMM.score_fn(sde)(x, t), GMM.denoiser_fn(sde)(x, t)

  grad, score, den = both(x, t)
  np.testing.assert_allclose(score * sigma[:, None], grad * sigma[:, None], rtol=1e-4, atol=1e-5)
  # Tweedie: E[x0 | x_t] = (x + sigma^2 score) / alpha.
  np.testing.assert_allclose(den, (x + sigma[:, None]**2 * score) / alpha[:, None],
                             rtol=1e-4, atol=1e-4)
  # At tiny t, p_t is p_0 (up to the sigma(eps) ~ 0.01 blur).
  np.testing.assert_allclose(GMM.log_prob_t(x[:1], t[:1], sde), GMM.log_prob(x[:1]), atol=2e-3)


def test_diffused_samples_have_density_log_prob_t():
  """Fresh x_t = alpha x0 + sigma z: E[log p_t(x_t)] matches the entropy estimate from a
  second independent draw, and x0 sampling hits the weights."""
  sde = sde_lib.get_sde("vp")
  n = 20000
  x0 = GMM.sample(jax.random.PRNGKey(1), n)
  freq = np.bincount(np.asarray(GMM.assign(x0)), minlength=3) / n
  # Mode assignment by max posterior is imperfect where components overlap; the overlap is
  # small for these means (< 2%), so frequencies are within 0.03 of the weights.
  assert np.max(np.abs(freq - np.asarray(GMM.weights))) < 0.03
  t = jnp.full((n,), 0.4)
  alpha, sigma = sde.marginal(t)
  z = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
  xt = alpha[:, None] * x0 + sigma[:, None] * z
  # Exact marginal density check by a mixture-of-Gaussians moment: E[x_t] = alpha E[x0].
  np.testing.assert_allclose(jnp.mean(xt, 0), float(alpha[0]) * jnp.mean(x0, 0), atol=0.03)
  # And the mean score of p_t under p_t is zero (integration by parts).
  s = GMM.score_fn(sde)(xt, t)
  se = float(jnp.std(s)) / math.sqrt(n)
  assert np.all(np.abs(np.asarray(jnp.mean(s, 0))) < 5 * se)
  # E[|score|^2] = -E[laplacian log p_t] (Hyvarinen's identity), estimated two ways.
  lap = jax.jit(jax.vmap(lambda x, t: jnp.trace(jax.hessian(
      lambda y: GMM.log_prob_t(y[None], t[None], sde)[0])(x))))(xt[:4000], t[:4000])
  lhs, rhs = float(jnp.mean(jnp.sum(s[:4000]**2, -1))), float(-jnp.mean(lap))
  assert abs(lhs - rhs) < 0.05 * rhs


def test_ring_and_quality_metrics():
  gmm = analytic.GaussianMixture.ring(num_modes=8, radius=4.0, std=0.1, dim=16)
  assert gmm.means.shape == (8, 16)
  np.testing.assert_allclose(jnp.linalg.norm(gmm.means, axis=-1), 4.0, rtol=1e-6)
  n = 4000
  ref = gmm.sample(jax.random.PRNGKey(0), n)
  fresh = gmm.sample(jax.random.PRNGKey(1), n)
  q = analytic.sample_quality(gmm, fresh, ref)
  # Std of log p in 16-D is sqrt(16/2) = 2.83 nats; difference of two means of n.
  assert abs(q["gap"]) < 4 * 2.83 * math.sqrt(2 / n)
  assert abs(q["std_ratio"] - 1) < 4 / math.sqrt(2 * n * 16)
  assert q["mode_tv"] < 0.05 and q["nonfinite"] == 0.0
  # Inflate the within-mode noise by 10%: std ratio 1.1, gap -d/2 (1.1^2 - 1) = -1.68 nats.
  k = gmm.assign(fresh)
  wide = gmm.means[k] + 1.1 * (fresh - gmm.means[k])
  q = analytic.sample_quality(gmm, wide, ref)
  assert abs(q["std_ratio"] - 1.1) < 0.01
  assert abs(q["gap"] + 8 * (1.1**2 - 1)) < 0.15
  bad = fresh.at[0, 0].set(jnp.nan)
  assert analytic.sample_quality(gmm, bad, ref)["nonfinite"] == 1 / n


def test_bad_arguments():
  with pytest.raises(ValueError, match="means"):
    analytic.GaussianMixture(means=[0.0, 1.0], stds=[1.0, 1.0])
  with pytest.raises(ValueError, match="stds"):
    analytic.GaussianMixture(means=[[0.0], [1.0]], stds=[1.0, 0.0])
  with pytest.raises(ValueError, match="weights"):
    analytic.GaussianMixture(means=[[0.0], [1.0]], stds=1.0, weights=[1.0])
