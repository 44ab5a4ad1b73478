"""CNF by maximum likelihood: analytic likelihood of an affine field, adjoint gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest

from research.flows import cnf

A = jnp.array([[-0.3, 0.8], [-0.5, 0.2]], jnp.float32)
B = jnp.array([0.4, -0.7], jnp.float32)


class AffineField(nn.Module):
  """v(x, t) = A x + b with A, b parameters (initialised to the constants above)."""
  diagonal: bool = False

  @nn.compact
  def __call__(self, x, t, labels=None, train=False):
    a = self.param("a", lambda k: jnp.diag(jnp.diag(A)) if self.diagonal else A)
    b = self.param("b", lambda k: B)
    return x @ a.T + b


def _analytic(obj, a, x):
  """z = x(T) and log p(x) = log N(z; 0, T^2) + (T - eps) tr(A) for dx/dt = A x + b."""
  tau = obj.path.T - obj.path.eps
  e = jsl.expm(a * tau)
  z = x @ e.T + jnp.linalg.solve(a, (e - jnp.eye(2)) @ B)
  return z, obj.path.prior_logp(z) + tau * jnp.trace(a)


def test_exact_log_likelihood_of_an_affine_field_is_the_change_of_variables_value():
  obj = cnf.CNFObjective(model=AffineField(), data_shape=(2,))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 2)) * 2.0
  params = obj.init(jax.random.PRNGKey(0), {"x": x})
  logp, info = obj.log_likelihood(params, x, jax.random.PRNGKey(2), rtol=1e-7, atol=1e-7)
  _, want = _analytic(obj, A, x)
  np.testing.assert_allclose(np.asarray(logp), np.asarray(want), rtol=0, atol=2e-4)
  assert info["method"] == "cnf_ode" and info["nfe"] > 0


def test_training_solve_of_an_affine_field_matches_the_analytic_integrals():
  """Diagonal A with Rademacher probes: e^T A e = tr A and ||A e||^2 = ||A||_F^2 exactly, so
  the Hutchinson loss equals the exact NLL; the kinetic energy is checked by quadrature."""
  s = cnf.CNFSettings(solver="dopri5", rtol=1e-7, atol=1e-7, probe="rademacher",
                      kinetic_weight=0.5, jacobian_weight=0.25)
  obj = cnf.CNFObjective(model=AffineField(diagonal=True), data_shape=(2,), settings=s)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 2))
  params = obj.init(jax.random.PRNGKey(0), {"x": x})
  loss, m = jax.jit(obj.loss)(params, {"x": x}, jax.random.PRNGKey(4))
  a = jnp.diag(jnp.diag(A))
  tau = obj.path.T - obj.path.eps
  _, logp = _analytic(obj, a, x)
  np.testing.assert_allclose(float(m["nll"]), float(-jnp.mean(logp)), rtol=1e-5)
  np.testing.assert_allclose(float(m["jacobian_frobenius"]), float(tau * jnp.sum(a**2)),
                             rtol=1e-5)
  ts = jnp.linspace(0.0, tau, 2001)
  traj = jax.vmap(lambda s_: x @ jsl.expm(a * s_).T
                  + jnp.linalg.solve(a, (jsl.expm(a * s_) - jnp.eye(2)) @ B))(ts)
  speed2 = jnp.sum((traj @ a.T + B) ** 2, -1).mean(-1)  # [T], mean over the batch
  np.testing.assert_allclose(float(m["kinetic"]), float(jnp.trapezoid(speed2, ts)), rtol=1e-4)
  np.testing.assert_allclose(float(loss), float(m["nll"] + 0.5 * m["kinetic"]
                                                + 0.25 * m["jacobian_frobenius"]), rtol=1e-6)
  assert float(m["solve_failed"]) == 0 and float(m["nfe"]) % 6 == 1


class TanhField(nn.Module):
  """v(x, t) = W2 tanh(W1 x + w t + b1) + b2: small, smooth in x and t (a fast compile)."""
  hidden: int = 8

  @nn.compact
  def __call__(self, x, t, labels=None, train=False):
    h = nn.Dense(self.hidden)(x) + nn.Dense(self.hidden, use_bias=False)(t[:, None])
    init = nn.initializers.normal(0.5)
    return nn.Dense(x.shape[-1], kernel_init=init, bias_init=init)(jnp.tanh(h))


def test_adjoint_gradients_match_backprop_through_the_solver():
  """Fixed steps, so "direct" (backprop through the unrolled solver) is the reference."""
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 2)) * 2.0
  grads = {}
  for adjoint in cnf.ADJOINTS:
    s = cnf.CNFSettings(solver="heun", steps=16, adjoint=adjoint, kinetic_weight=0.1,
                        jacobian_weight=0.1)
    obj = cnf.CNFObjective(model=TanhField(), data_shape=(2,), settings=s)
    params = obj.init(jax.random.PRNGKey(0), {"x": x})
    g = jax.jit(jax.grad(lambda p: obj.loss(p, {"x": x}, jax.random.PRNGKey(7))[0]))(params)
    grads[adjoint] = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])
  ref = grads["direct"]
  scale = np.abs(ref).max()
  assert scale > 1e-2
  # Discretise-then-optimise: the same numbers as backprop through the unrolled solver.
  np.testing.assert_allclose(grads["recursive_checkpoint"], ref, rtol=0, atol=1e-5 * scale)
  # The continuous adjoint, solved backwards on the same grid: the gradient of the exact
  # flow, which the 16-step discrete gradient approximates to second order.
  err = np.abs(grads["backsolve"] - ref).max() / scale
  assert 1e-7 < err < 2e-2, err


def test_cnf_settings_and_samplers_refuse_bad_values():
  with pytest.raises(ValueError, match="steps=0 is not allowed"):
    cnf.CNFSettings(solver="euler", steps=0)
  with pytest.raises(ValueError, match="adjoint='x' is not allowed"):
    cnf.CNFSettings(adjoint="x")
  obj = cnf.CNFObjective(model=AffineField(), data_shape=(2,))
  with pytest.raises(ValueError, match="sampler='ddpm' is not allowed"):
    obj.check_options({"sampler": "ddpm"}, 10)
  with pytest.raises(ValueError, match="denoise"):
    obj.check_options({"sampler": "ode_euler", "denoise": True}, 10)
  obj.check_options({"sampler": "ode_euler", "denoise": False}, 10)


def test_ring_cnf_config_trains_samples_and_evaluates(tmp_path):
  from configs.flows import ring as ring_config
  from experiments import main as main_lib
  from experiments import workdir as wd
  c = ring_config.get_config("kind=cnf,tiny")
  sample_metrics = main_lib.run(c, str(tmp_path), "train")
  assert sample_metrics["nonfinite_fraction"] == 0
  main_lib.run(c, str(tmp_path), "evaluate")
  rows = wd.read_metrics(str(tmp_path))
  train = [r for r in rows if r["split"] == "train" and "nll" in r]
  assert train and all(r["nfe"] == 8 for r in train)  # heun, 4 fixed steps, 2 evaluations each
  ev = [r for r in rows if r["split"] == "eval"]
  assert len(ev) == 1 and ev[0]["likelihood_method"] == "cnf_ode"
  assert np.isfinite(ev[0]["nll"]) and ev[0]["nll"] > ev[0]["entropy"] - 0.5


def test_bad_cnf_and_reflow_fields_fail_validation_naming_the_field():
  from configs.common import override
  from configs.flows import ring as ring_config
  from experiments import validate
  from experiments.options import ConfigError
  c = ring_config.get_config("kind=cnf,tiny")
  override(c, **{"cnf.solver": "euler", "cnf.steps": 0})
  with pytest.raises(ConfigError, match=r"config\.cnf\.steps=0 is not allowed"):
    validate.validate(c)
  c = ring_config.get_config("kind=cnf,tiny")
  override(c, **{"sample.sampler": "euler_maruyama"})
  with pytest.raises(ConfigError, match="sampler='euler_maruyama' is not allowed for a CNF"):
    validate.validate(c)
  c = ring_config.get_config("kind=realnvp,reflow=1,tiny")
  with pytest.raises(ConfigError, match=r"config\.flow\.reflow_rounds=1 is not allowed"):
    validate.validate(c)
  c = ring_config.get_config("kind=fm,reflow=1,tiny")
  override(c, **{"flow.reflow_sampler": "ddpm"})
  with pytest.raises(ConfigError, match=r"config\.flow\.reflow_sampler='ddpm' is not allowed"):
    validate.validate(c)
  validate.validate(ring_config.get_config("kind=cnf,reflow=1,tiny"))  # a CNF can be reflowed
