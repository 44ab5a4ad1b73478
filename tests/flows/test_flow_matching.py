"""Flow matching: the straight path as an SDE, against a Gaussian whose velocity is exact."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.data import toy
from research.flows import flow_matching as fm

MU, S = jnp.array([1.0, -2.0]), 0.5


class ExactGaussianVelocity(nn.Module):
  """The exact flow-matching velocity of data N(MU, S^2 I) on the straight path.

  With m = (1 - t) MU and v2 = (1 - t)^2 S^2 + t^2:
  E[e | x_t] = t (x - m) / v2,  E[x_0 | x_t] = MU + (1 - t) S^2 (x - m) / v2.
  """

  @nn.compact
  def __call__(self, x, t, labels=None, train=False):
    t = t[:, None]
    m = (1 - t) * MU
    v2 = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) * (x - m) / v2 - MU


def _gauss_logp(x):
  return jnp.sum(-0.5 * ((x - MU) / S) ** 2 - math.log(S) - 0.5 * math.log(2 * math.pi), -1)


def test_straight_path_is_a_consistent_linear_sde():
  path = fm.StraightPath()
  t = jnp.linspace(0.01, 0.99, 7)
  alpha, sigma = path.marginal(t)
  np.testing.assert_allclose(np.asarray(alpha), 1 - np.asarray(t), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sigma), np.asarray(t), rtol=1e-5)
  # f = dlog(alpha)/dt and g^2 = dsigma^2/dt - 2 f sigma^2, by autodiff.
  dla = jax.vmap(jax.grad(lambda s: 0.5 * path.log_alpha2(s)))(t)
  ds2 = jax.vmap(jax.grad(lambda s: jnp.exp(path.log_sigma2(s))))(t)
  np.testing.assert_allclose(np.asarray(path.f(t)), np.asarray(dla), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(path.g2(t)),
                             np.asarray(ds2 - 2 * path.f(t) * sigma**2), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(path.t_from_logsnr(path.logsnr(t))), np.asarray(t),
                             rtol=1e-5)
  # The probability-flow drift of the converted score is the velocity itself.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 2)), jnp.float32)
  v = jnp.asarray(np.random.default_rng(1).normal(size=(7, 2)), jnp.float32)
  drift = path.probability_flow_drift(x, t, fm.velocity_to_score(v, x, t))
  np.testing.assert_allclose(np.asarray(drift), np.asarray(v), atol=1e-4)


@pytest.fixture(scope="module")
def exact_objective():
  obj = fm.FlowMatchingObjective(model=ExactGaussianVelocity(), data_shape=(2,))
  params = obj.init(jax.random.PRNGKey(0), {"x": jnp.zeros((2, 2))})
  return obj, params


def test_likelihood_of_exact_velocity_is_exact(exact_objective):
  obj, params = exact_objective
  x = MU + S * jnp.asarray(np.random.default_rng(2).normal(size=(16, 2)), jnp.float32)
  logp = obj.log_prob(params, x)
  # For Gaussian data the flow map to time T is affine: x -> (1 - T) MU + v_T (x - MU) / S with
  # v_T^2 = (1 - T)^2 S^2 + T^2, and the likelihood code scores the image under the prior
  # N(0, T^2 I). That is the exact answer to what the ODE computes (tolerances 1e-5).
  big_t = obj.path.T
  v_t = math.sqrt((1 - big_t) ** 2 * S**2 + big_t**2)
  z = (1 - big_t) * MU + v_t * (x - MU) / S
  expected = (jnp.sum(-0.5 * (z / big_t) ** 2 - math.log(big_t) - 0.5 * math.log(2 * math.pi), -1)
              + 2 * math.log(v_t / S))
  np.testing.assert_allclose(np.asarray(logp), np.asarray(expected), atol=1e-3)
  # Against the true density the prior's neglect of (1 - T) x_0 adds |z . (1 - T) MU| <~ 0.01.
  np.testing.assert_allclose(np.asarray(logp), np.asarray(_gauss_logp(x)), atol=1e-2)


def test_sampling_exact_velocity_recovers_the_gaussian(exact_objective):
  obj, params = exact_objective
  n = 4000
  x, info = obj.sample(params, jax.random.PRNGKey(3), n, sampler="heun", steps=32)
  assert info["nfe"] > 0
  # Mean: SE = S / sqrt(n) = 0.008; std: SE ~ S / sqrt(2n) = 0.006; 5 SE plus solver error.
  np.testing.assert_allclose(np.asarray(x.mean(0)), np.asarray(MU), atol=0.05)
  np.testing.assert_allclose(np.asarray(x.std(0)), S, atol=0.04)


def test_reflow_pairs_are_coupled_by_the_ode(exact_objective):
  obj, params = exact_objective
  batch = obj.reflow_pairs(params, jax.random.PRNGKey(4), 8)
  # For a Gaussian the flow map is affine: from x_T = T e at time T to time eps it is
  # x_eps = (1 - eps) MU + v_eps (x_T - (1 - T) MU) / v_T, v_t^2 = (1 - t)^2 S^2 + t^2.
  eps, big_t = obj.path.eps, obj.path.T
  v = lambda t: math.sqrt((1 - t) ** 2 * S**2 + t**2)
  expected = (1 - eps) * MU + v(eps) * (big_t * batch["noise"] - (1 - big_t) * MU) / v(big_t)
  np.testing.assert_allclose(np.asarray(batch["x"]), np.asarray(expected), atol=1e-3)


def test_training_reduces_the_flow_matching_loss():
  ring = toy.Ring(num_modes=8, radius=4.0, std=0.3, dim=2)
  obj = fm.make_objective((2,), hidden=32, depth=2)
  key = jax.random.key(0, impl="rbg")
  x_eval, _ = ring.sample(jax.random.fold_in(key, 10**6), 2048)
  params = jax.jit(obj.init)(key, {"x": x_eval[:8]})
  tx = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, i):
      params, opt = carry
      x, _ = ring.sample(jax.random.fold_in(key, i), 256)
      g = jax.grad(lambda p: obj.loss(p, {"x": x}, jax.random.fold_in(key, -i - 1))[0])(params)
      updates, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, updates), opt), None
    return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(300))[0][0]

  eval_loss = jax.jit(lambda p: obj.loss(p, {"x": x_eval}, jax.random.fold_in(key, 7))[0])
  before = float(eval_loss(params))
  after = float(eval_loss(train(params)))
  # At init v ~ 0 and the loss is E|e - x_0|^2 = 2 + 16.2 ~ 18; the conditional velocity's own
  # variance bounds it from below, and 300 steps get well under half of the start.
  assert after < 0.5 * before, (before, after)


def test_bad_inputs_fail_clearly():
  with pytest.raises(ValueError, match="0 < eps < T < 1"):
    fm.StraightPath(T=1.0)
  obj = fm.FlowMatchingObjective(model=ExactGaussianVelocity(), data_shape=(2,))
  with pytest.raises(ValueError, match="unconditional"):
    obj.sample({}, jax.random.PRNGKey(0), 2, labels=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"expected \[B, \*\(2,\)\]"):
    obj.log_prob({}, jnp.zeros((2, 3)))
