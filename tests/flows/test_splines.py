"""Rational-quadratic splines, spline couplings and the masked autoregressive flow (MADE).

Against references that do not share the code under test: jax.jacfwd / jax.grad for the
log-derivatives, the forward map for the inverse, exact equality for the identity tails and
exact zeros for the autoregressive structure. The whole-flow bijector checks (inverse, jacfwd
log-determinant of stacked spline / maf flows) run in test_bijectors.py with the other kinds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.flows import bijectors
from research.flows import models
from research.flows import splines

SETTINGS = splines.SplineSettings(num_bins=6, tail_bound=3.0)
# One compilation per (shape, direction) instead of one per primitive in eager mode.
_spline = jax.jit(splines.rational_quadratic_spline, static_argnums=2,
                  static_argnames="inverse")


def _params(seed, n, scale, settings=SETTINGS):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal((n, settings.num_params)), jnp.float32)


def _inputs(seed, n, settings=SETTINGS, margin=1.0):
  b = settings.tail_bound + margin
  return jnp.asarray(np.random.default_rng(seed).uniform(-b, b, n), jnp.float32)


@jax.jit
def _both_ways(x, p):
  y, ld = splines.rational_quadratic_spline(x, p, SETTINGS)
  x_back, ld_inv = splines.rational_quadratic_spline(y, p, SETTINGS, inverse=True)
  # d y_i / d x_i element by element (the map is element-wise), the reference for ld.
  dydx = jax.vmap(jax.grad(
      lambda a, q: splines.rational_quadratic_spline(a[None], q[None], SETTINGS)[0][0]))(x, p)
  return y, ld, x_back, ld_inv, dydx


@pytest.mark.parametrize("seed", [0, 1])
def test_spline_inverse_and_log_derivative(seed):
  x, p = _inputs(seed, 4096), _params(seed, 4096, scale=0.4)
  y, ld, x_back, ld_inv, dydx = _both_ways(x, p)
  assert float(jnp.max(jnp.abs(y - x))) > 0.1  # a non-trivial map
  np.testing.assert_allclose(np.asarray(x_back), np.asarray(x), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ld_inv), -np.asarray(ld), rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ld), np.log(np.asarray(dydx, np.float64)), rtol=0,
                             atol=1e-4)


def test_spline_inverse_accuracy_follows_the_slope():
  """Strongly curved splines: forward(inverse(y)) stays exact; inverse(forward(x)) is off by
  at most the fp32 rounding of y divided by the local slope (flat bins lose information)."""
  x, p = _inputs(2, 4096), _params(2, 4096, scale=2.0)
  y, ld, x_back, _, _ = _both_ways(x, p)
  y2, _ = _spline(x_back, p, SETTINGS)
  np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=0, atol=1e-5)
  slope = np.exp(np.asarray(ld, np.float64))
  err = np.abs(np.asarray(x_back, np.float64) - np.asarray(x, np.float64))
  assert np.all(err <= 1e-5 + 8 * np.finfo(np.float32).eps * SETTINGS.tail_bound / slope)


def test_spline_is_monotone_and_maps_the_interval_onto_itself():
  b = SETTINGS.tail_bound
  grid = jnp.linspace(-b - 1.0, b + 1.0, 2001)
  seeds = 4
  p = jnp.repeat(_params(10, seeds, scale=2.0)[:, None], grid.shape[0], axis=1)  # [S, N, P]
  xs = jnp.concatenate([jnp.broadcast_to(grid, (seeds, grid.shape[0])),
                        jnp.tile(jnp.array([-b, b]), (seeds, 1))], axis=1)
  p = jnp.concatenate([p, p[:, :2]], axis=1)
  y, ld = _spline(xs, p, SETTINGS)
  y, ld = np.asarray(y, np.float64), np.asarray(ld)
  assert np.all(np.diff(y[:, :-2], axis=1) > 0)
  assert np.all(np.isfinite(ld))
  np.testing.assert_allclose(y[:, -2:], np.tile([-b, b], (seeds, 1)), atol=1e-5)


def test_spline_tails_are_exactly_the_identity():
  b = SETTINGS.tail_bound
  x = jnp.concatenate([jnp.linspace(-50.0, -b - 1e-3, 100), jnp.linspace(b + 1e-3, 50.0, 100),
                       jnp.array([-b, b])])
  p = _params(3, x.shape[0], scale=2.0)
  for inverse in (False, True):
    y, ld = _spline(x, p, SETTINGS, inverse=inverse)
    np.testing.assert_array_equal(np.asarray(y[:-2]), np.asarray(x[:-2]))
    np.testing.assert_array_equal(np.asarray(ld[:-2]), 0.0)
    # The derivative is 1 at both ends, so the spline joins the linear tails smoothly.
    np.testing.assert_allclose(np.asarray(ld[-2:]), 0.0, atol=1e-5)


def test_zero_parameters_are_the_identity_and_bins_respect_the_minimum():
  x = _inputs(4, 4096)
  y, ld = _spline(x, jnp.zeros((4096, SETTINGS.num_params)), SETTINGS)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ld), 0.0, atol=1e-6)
  # Very peaked widths: no bin narrower than min_bin_width * 2B.
  raw = np.array([[50.0] + [-50.0] * (SETTINGS.num_bins - 1)], np.float32)
  widths, knots = jax.jit(splines._knots, static_argnums=(1, 2))(
      raw, SETTINGS.tail_bound, SETTINGS.min_bin_width)
  assert float(jnp.min(widths)) >= SETTINGS.min_bin_width * 2 * SETTINGS.tail_bound * (1 - 1e-4)
  np.testing.assert_allclose(np.asarray(knots[0, [0, -1]]), [-3.0, 3.0], atol=0)


def test_bad_spline_settings_fail_clearly():
  with pytest.raises(ValueError, match="min_bin_width"):
    splines.SplineSettings(num_bins=8, min_bin_width=0.2).validate()
  with pytest.raises(ValueError, match="spline params have shape"):
    splines.rational_quadratic_spline(jnp.zeros(3), jnp.zeros((3, 4)), SETTINGS)


def _random_variables(module, x, *args, seed=0, scale=0.3, method="forward"):
  v = jax.jit(lambda x, *a: module.init(jax.random.PRNGKey(0), x, *a, method=method))(x, *args)
  leaves, treedef = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [l + scale * jax.random.normal(k, l.shape)
                                      for l, k in zip(leaves, keys)])


def test_made_is_autoregressive():
  d, p_out = 5, 3
  made = bijectors.MADE(hidden=16, depth=2, out_per_input=p_out)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, d)), jnp.float32)
  ctx = jnp.ones((1, 2))
  v = _random_variables(made, x, ctx, method=None)

  @jax.jit
  def jacobians(x, ctx):
    jac = jax.jacfwd(lambda a: made.apply(v, a[None], ctx)[0])(x[0])  # [D, P, D]
    dctx = jax.jacfwd(lambda c: made.apply(v, x, c[None])[0])(ctx[0])  # [D, P, E]
    return jac, dctx

  jac, dctx = jacobians(x, ctx)
  jac = np.asarray(jac)
  for i in range(d):
    np.testing.assert_array_equal(jac[i, :, i:], 0.0)   # no dependence on x_i, x_{i+1}, ...
    if i > 0:
      assert np.max(np.abs(jac[i, :, :i])) > 0          # but on the earlier ones
  # The context reaches every output group, the first one (biases only) included.
  assert np.all(np.max(np.abs(np.asarray(dctx)), axis=(1, 2)) > 0)


def test_made_masks_connect_as_the_degrees_say():
  masks = bijectors.made_masks(4, 6, 2, 2)
  assert [m.shape for m in masks] == [(4, 6), (6, 6), (6, 8)]
  conn = masks[0]
  for m in masks[1:]:
    conn = (conn @ m > 0).astype(np.float32)  # input -> output reachability
  expect = np.repeat(np.tril(np.ones((4, 4)), -1), 2, axis=0).T  # out group i <- inputs < i
  np.testing.assert_array_equal(conn, expect)


def test_maf_layer_jacobian_is_triangular_and_inverse_is_exact():
  d = 3
  layer = bijectors.MaskedAutoregressive(hidden=8, depth=2, spline=SETTINGS)
  x = jnp.asarray(1.5 * np.random.default_rng(1).standard_normal((3, d)), jnp.float32)
  v = _random_variables(layer, x, scale=0.1)

  @jax.jit
  def run(x):
    y, ld = layer.apply(v, x, method="forward")
    x_back, ld_inv = layer.apply(v, y, method="inverse")
    jac = jax.vmap(jax.jacfwd(lambda a: layer.apply(v, a[None], method="forward")[0][0]))(x)
    return y, ld, x_back, ld_inv, jac

  y, ld, x_back, ld_inv, jac = run(x)
  jac = np.asarray(jac, np.float64)
  assert float(jnp.max(jnp.abs(y - x))) > 1e-2
  for b in range(x.shape[0]):
    np.testing.assert_array_equal(np.triu(jac[b], 1), 0.0)  # y_i ignores x_j for j > i
    assert np.all(np.diag(jac[b]) > 0)                      # monotone in its own input
    assert np.max(np.abs(np.tril(jac[b], -1))) > 0          # and depends on earlier ones
    np.testing.assert_allclose(float(ld[b]), np.sum(np.log(np.diag(jac[b]))), atol=1e-4)
  np.testing.assert_allclose(np.asarray(x_back), np.asarray(x), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ld_inv), -np.asarray(ld), atol=1e-4)


def test_spline_coupling_passes_the_conditioning_half_and_far_inputs_through():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 4)), jnp.float32)
  x = x.at[:4, 2:].multiply(40.0)  # transformed half far outside [-B, B] in rows 0..3
  m = jnp.asarray(bijectors.make_mask("channel", (4,)))
  coupling = bijectors.Coupling(kind="spline", hidden=8, spline=SETTINGS)
  v = _random_variables(coupling, x, m, scale=0.3)
  v0 = jax.jit(lambda x: coupling.init(jax.random.PRNGKey(0), x, m, method="forward"))(x)
  apply = jax.jit(lambda v, x: coupling.apply(v, x, m, method="forward"))
  y, ld = apply(v, x)
  np.testing.assert_array_equal(np.asarray(y[:, :2]), np.asarray(x[:, :2]))
  far = np.abs(np.asarray(x[:4, 2:])) > SETTINGS.tail_bound
  np.testing.assert_array_equal(np.asarray(y[:4, 2:])[far], np.asarray(x[:4, 2:])[far])
  assert float(jnp.max(jnp.abs(y[4:, 2:] - x[4:, 2:]))) > 1e-2
  y0, ld0 = apply(v0, x)  # zero-initialised last layer: the identity
  np.testing.assert_allclose(np.asarray(y0), np.asarray(x), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ld0), 0.0, atol=1e-5)


def test_vector_flows_default_to_no_actnorm_and_images_keep_it():
  for kind in ("realnvp", "glow", "spline", "maf"):
    assert not models.step_config(kind, image=False).actnorm
    assert models.step_config(kind, image=False, actnorm=True).actnorm
  for kind in ("realnvp", "glow", "spline"):
    assert models.step_config(kind, image=True).actnorm
    assert not models.step_config(kind, image=True, actnorm=False).actnorm
  x = jnp.ones((2, 2))
  names = lambda flow: str(jax.tree.structure(jax.eval_shape(
      lambda x: flow.init(jax.random.PRNGKey(0), x), x)))
  assert "actnorm" not in names(models.make_flow("realnvp", (2,), num_layers=2, hidden=4))
  assert "actnorm" in names(models.make_flow("realnvp", (2,), num_layers=2, hidden=4,
                                             actnorm=True))
