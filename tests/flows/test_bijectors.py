"""Property tests for every bijector and flow: exact inverse and exact log-determinant.

For random inputs and random parameters (the zero-initialised conditioners would otherwise
make every coupling the identity):
  * inverse(forward(x)) == x within 1e-5 (fp32),
  * forward logdet == log|det J| with J from jax.jacfwd, within 1e-4 (slogdet in float64),
  * inverse logdet == -forward logdet.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, example, given, settings, strategies as st

from research.flows import bijectors
from research.flows import models

# Few examples, no shrinking: every example compiles, and a failure prints its inputs anyway.
def key(seed):
  """An "rbg" PRNG key: XLA:CPU compiles its normal sampler ~8x faster than threefry's."""
  return jax.random.key(seed, impl="rbg")


def normal(seed, shape):
  """float32 standard-normal test inputs from numpy (no compilation)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


SETTINGS = settings(max_examples=3, deadline=None, derandomize=True,
                    phases=(Phase.explicit, Phase.generate))
# Whole flows: each drawn configuration is a new compilation, the dominant cost on CPU.
FLOW_SETTINGS = settings(SETTINGS, max_examples=2)


def _perturb(variables, rng, scale):
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(
      treedef, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


_RUNNERS = {}


def _runner(module, scale):
  """One jitted check per module configuration (its repr), reused across examples and seeds.

  The parameters are random N(0, scale^2) on the shapes that `init` would create (found by
  tracing only: compiling init on XLA:CPU costs more than the rest of the check); the
  zero-initialised conditioners would otherwise make every coupling the identity.
  Data-dependent initialisation has its own tests.
  """
  cache_key = (repr(module), scale)
  if cache_key not in _RUNNERS:
    @jax.jit
    def run(x, args, seed):
      shapes = jax.eval_shape(
          lambda x, args: module.init(key(0), x, *args, method="forward"), x, args)
      variables = _perturb(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                           jax.random.key(seed, impl="rbg"), scale)
      fwd = lambda v: module.apply(variables, v, *args, method="forward")
      y, ld = fwd(x)
      x_rec, ld_inv = module.apply(variables, y, *args, method="inverse")
      jac = jax.jacfwd(lambda v: fwd(v.reshape(x.shape))[0].reshape(-1))(x.reshape(-1))
      return variables, y, ld, x_rec, ld_inv, jac
    _RUNNERS[cache_key] = run
  return _RUNNERS[cache_key]


def check_bijector(module, x, *args, seed=0, scale=0.1, inv_tol=1e-5, det_tol=1e-4):
  """Asserts the bijector properties for `module` at the batch x (args go to both methods).

  Random parameters, both directions and the Jacobian run in one jitted function, compiled
  once per module configuration and input shape: further examples only execute it.
  """
  run = _runner(module, scale)
  variables, y, ld, x_rec, ld_inv, jac = run(x, args, seed)
  assert y.shape[0] == x.shape[0] and y.size == x.size and ld.shape == (x.shape[0],)
  # Random parameters must make a non-trivial map, or the checks below prove little.
  assert float(jnp.max(jnp.abs(y.reshape(-1) - x.reshape(-1)))) > 1e-3
  np.testing.assert_allclose(np.asarray(x_rec), np.asarray(x), rtol=0, atol=inv_tol)
  np.testing.assert_allclose(np.asarray(ld_inv), -np.asarray(ld), rtol=0, atol=det_tol)
  # Jacobian of the whole batch [B*D, B*D]: examples must not interact (off-diagonal blocks
  # vanish) and each diagonal block's log|det| (float64) is that example's logdet.
  b, d = x.shape[0], int(np.prod(x.shape[1:]))
  jac = np.asarray(jac, np.float64).reshape(b, d, b, d)
  for i in range(b):
    off = np.delete(jac[i], i, axis=1)
    assert np.max(np.abs(off), initial=0.0) == 0.0
    sign, logdet = np.linalg.slogdet(jac[i, :, i, :])
    assert sign != 0
    np.testing.assert_allclose(float(ld[i]), logdet, rtol=0, atol=det_tol)
  return variables, y, ld


_shapes = st.sampled_from([(4,), (6,), (4, 4, 2), (2, 4, 3)])


@SETTINGS
@given(shape=_shapes, kind=st.sampled_from(bijectors.COUPLINGS),
       mask=st.sampled_from(bijectors.MASK_KINDS), seed=st.integers(0, 2**16))
def test_coupling(shape, kind, mask, seed):
  x = normal(seed, (3,) + shape)
  m = jnp.asarray(bijectors.make_mask(mask, shape))
  context = normal(seed + 1, (3, 5))
  coupling = bijectors.Coupling(kind=kind, hidden=8, depth=2, scale_bound=2.0)
  # Splines: smaller parameters, so no bin is so flat that fp32 loses the inverse (see
  # test_spline_inverse_accuracy_follows_the_slope).
  check_bijector(coupling, x, m, context, seed=seed, scale=0.1 if kind == "spline" else 0.3)


def test_coupling_starts_as_identity_and_keeps_masked_part():
  x = normal(0, (4, 4, 4, 2))
  m = jnp.asarray(bijectors.make_mask("checkerboard", x.shape[1:]))
  coupling = bijectors.Coupling(kind="affine", hidden=8)

  @jax.jit
  def run(x):
    v = coupling.init(key(0), x, m, method="forward")
    y0, ld0 = coupling.apply(v, x, m, method="forward")
    y1, _ = coupling.apply(_perturb(v, key(1), 0.3), x, m, method="forward")
    return y0, ld0, y1

  y0, ld0, y1 = run(x)
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(x))  # zero-initialised: identity
  np.testing.assert_array_equal(np.asarray(ld0), 0.0)
  np.testing.assert_array_equal(np.asarray(y1 * m), np.asarray(x * m))  # conditioning half kept
  assert float(jnp.max(jnp.abs((y1 - x) * (1 - m)))) > 1e-3            # the other half moves


def test_coupling_contract_form_uses_its_own_mask():
  """forward(x) / inverse(y) as DESIGN.md writes them: the mask comes from mask_kind."""
  x = normal(3, (4, 6))
  coupling = bijectors.Coupling(kind="affine", hidden=8, mask_kind="channel")
  m = jnp.asarray(bijectors.make_mask("channel", (6,)))
  v = _perturb(coupling.init(key(0), x, method="forward"), key(1), 0.3)
  y, ld = coupling.apply(v, x, method="forward")
  y_m, ld_m = coupling.apply(v, x, m, method="forward")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_m))
  np.testing.assert_array_equal(np.asarray(ld), np.asarray(ld_m))
  x_back, ld_inv = coupling.apply(v, y, method="inverse")
  np.testing.assert_allclose(np.asarray(x_back), np.asarray(x), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ld_inv), -np.asarray(ld), atol=1e-5)


def test_affine_log_scale_is_bounded():
  x = 100.0 * normal(0, (16, 4))
  m = jnp.asarray(bijectors.make_mask("channel", (4,)))
  coupling = bijectors.Coupling(kind="affine", hidden=8, scale_bound=1.5)

  @jax.jit
  def run(x):
    v = _perturb(coupling.init(key(0), x, m, method="forward"), key(1), 5.0)
    return coupling.apply(v, x, m, method="forward")[1]

  ld = run(x)
  assert float(jnp.max(jnp.abs(ld))) <= 1.5 * 2  # two transformed dims, each |s| <= 1.5
  assert float(jnp.max(jnp.abs(ld))) > 1.0       # and the bound is actually approached


@SETTINGS
@given(shape=_shapes, seed=st.integers(0, 2**16))
def test_scaling(shape, seed):
  x = normal(seed, (3,) + shape)
  check_bijector(bijectors.Scaling(), x, seed=seed, scale=0.5)


@SETTINGS
@given(shape=_shapes, seed=st.integers(0, 2**16))
def test_actnorm(shape, seed):
  x = 2.0 + 3.0 * normal(seed, (5,) + shape)
  check_bijector(bijectors.ActNorm(), x, seed=seed, scale=0.2)


def test_actnorm_data_dependent_init():
  x = jnp.array([1.0, -2.0, 5.0]) + jnp.array([0.5, 2.0, 4.0]) * normal(0, (64, 4, 4, 3))
  actnorm = bijectors.ActNorm()
  v = actnorm.init(key(0), x, method="forward")
  y, _ = actnorm.apply(v, x, method="forward")
  np.testing.assert_allclose(np.asarray(jnp.mean(y, axis=(0, 1, 2))), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jnp.std(y, axis=(0, 1, 2))), 1.0, atol=1e-4)
  # Initialised through the inverse it is the identity instead.
  v = actnorm.init(key(0), x, method="inverse")
  np.testing.assert_array_equal(np.asarray(actnorm.apply(v, x, method="forward")[0]),
                                np.asarray(x))


@SETTINGS
@given(shape=_shapes, index=st.integers(0, 100), seed=st.integers(0, 2**16))
def test_conv1x1(shape, index, seed):
  x = normal(seed, (3,) + shape)
  perm = bijectors.fixed_permutation(seed, index, shape[-1])
  check_bijector(bijectors.Conv1x1(seed=seed), x, perm, seed=seed, scale=0.3)


def test_conv1x1_starts_as_fixed_permutation():
  x = normal(0, (2, 3, 3, 6))
  conv = bijectors.Conv1x1(seed=3)
  perm = bijectors.fixed_permutation(3, 7, 6)
  assert sorted(perm.tolist()) == list(range(6))
  v = conv.init(key(0), x, perm, method="forward")
  y, ld = conv.apply(v, x, perm, method="forward")
  np.testing.assert_allclose(np.asarray(y), np.asarray(x)[..., perm], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(ld), 0.0)


@SETTINGS
@given(shape=st.sampled_from([(4, 4, 1), (2, 6, 3)]), seed=st.integers(0, 2**16))
def test_squeeze(shape, seed):
  x = normal(seed, (2,) + shape)
  _, y, _ = check_bijector(bijectors.Squeeze(), x, seed=seed)
  b, h, w, c = x.shape
  assert y.shape == (b, h // 2, w // 2, 4 * c)
  # Each output position holds exactly its 2x2 input patch.
  np.testing.assert_array_equal(np.asarray(y[:, 0, 0, :]).reshape(b, 2, 2, c),
                                np.asarray(x[:, :2, :2, :]))


IMAGE_KINDS = tuple(k for k in models.KINDS if k not in models.VECTOR_ONLY_KINDS)


@FLOW_SETTINGS
@given(kind=st.sampled_from(models.KINDS), image=st.booleans(), remat=st.booleans(),
       seed=st.integers(0, 2**16))
def test_flow_stack_scan(kind, image, remat, seed):
  image = image and kind in IMAGE_KINDS
  shape = (4, 4, 2) if image else (4,)
  x = normal(seed, (3,) + shape)
  cfg = models.step_config(kind, image=image, hidden=8, depth=1, seed=seed)
  variables, _, _ = check_bijector(models.FlowStack(cfg, num_layers=3, remat=remat), x,
                                   seed=seed, scale=0.1)
  # Parameters of the 3 layers are stacked along a leading axis (one scanned step).
  for leaf in jax.tree.leaves(variables):
    assert leaf.shape[0] == 3


@FLOW_SETTINGS
@given(kind=st.sampled_from(models.KINDS), conditional=st.booleans(), seed=st.integers(0, 2**16))
@example(kind="maf", conditional=True, seed=5)  # the D-step inverse through a whole stack
def test_vector_flow(kind, conditional, seed):
  # Moderate inputs and parameters: the fp32 Jacobian from jacfwd (the reference) loses
  # digits when a deep random flow expands by e^10; the flow's own logdet stays exact.
  x = normal(seed, (4, 3))
  labels = jnp.arange(4) % 3 if conditional else None
  flow = models.VectorFlow(kind=kind, num_layers=4, hidden=8, depth=2,
                           num_classes=3 if conditional else 0)
  check_bijector(flow, x, labels, seed=seed, scale=0.1 if kind in ("spline", "maf") else 0.2)


@pytest.mark.parametrize("kind", IMAGE_KINDS)
@FLOW_SETTINGS
@given(seed=st.integers(0, 2**16))
def test_multiscale_flow(kind, seed):
  # 4x4x2 with two scales: levels (2, 2, 8) -> factor out 4 -> (1, 1, 16), so the 1x1 level
  # (channel masks only) is covered too.
  x = jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (2, 4, 4, 2)), jnp.float32)
  flow = models.MultiScaleFlow(kind=kind, num_scales=2, num_layers=2, hidden=8)
  check_bijector(flow, x, None, seed=seed, scale=0.1)


def test_multiscale_factors_out_half_the_channels():
  levels = models.multiscale_shapes((8, 8, 1), 3)
  assert levels == [((4, 4, 4), 2), ((2, 2, 8), 4), ((1, 1, 16), 0)]
  assert sum(h * w * out for (h, w, _), out in levels[:-1]) + 16 == 64


def test_masks_are_complementary():
  for shape in [(6,), (4, 4, 2)]:
    for kind in ("checkerboard", "channel"):
      m, m_inv = bijectors.make_mask(kind, shape), bijectors.make_mask(kind + "_inv", shape)
      np.testing.assert_array_equal(m + m_inv, np.ones(shape))
      assert m.sum() == m_inv.sum()  # even sizes: an even split


@pytest.mark.parametrize("call, match", [
    (lambda: bijectors.make_mask("stripes", (4,)), "mask kind='stripes'"),
    (lambda: bijectors.make_mask("channel", (4, 4, 1)), "at least 2 channels"),
    (lambda: bijectors.make_mask("checkerboard", (1, 1, 4)), "2 spatial positions"),
    (lambda: models.make_flow("iaf", (2,)), "flow kind='iaf'"),
    (lambda: models.make_flow("maf", (4, 4, 2)), "for vector data"),
    (lambda: models.make_flow("nice", (4,), actnorm=True), "actnorm=True"),
    (lambda: models.make_flow("spline", (4,), num_bins=1), "num_bins=1"),
    (lambda: models.make_flow("spline", (4,), tail_bound=0.0), "tail_bound=0.0"),
    (lambda: models.multiscale_shapes((6, 6, 1), 2), "divisible by 2\\*\\*num_scales"),
    (lambda: models.make_flow("glow", (4, 4)), "data_shape"),
])
def test_bad_arguments_fail_clearly(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_bad_coupling_kind_fails_clearly():
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match="coupling kind='cubic'"):
    bijectors.Coupling(kind="cubic").init(key(0), x, jnp.ones(4), method="forward")
