"""KL autoencoder: shapes for f = 1, 2, 4 (eval_shape, no compile), the posterior's KL and
moments, the perceptual term, and a short training run that lowers reconstruction error and
ends with a scale factor that gives unit-variance latents."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.models import autoencoder as ae_lib
from research.models.autoencoder import AutoencoderKL, DiagonalGaussian, FrozenAutoencoder
from research.models.classifier import Classifier, perceptual_distance_fn


def _key(seed):
  """An rbg PRNG key: the code under test takes any key, and XLA:CPU compiles threefry's
  random draws ~10x slower (about 2 s per draw site), which would dominate these tests."""
  return jax.random.key(seed, impl="rbg")


def _random_params(init, *args, scale=0.2, seed=0):
  """Every parameter drawn N(0, scale^2) in numpy: no RNG compile (slow for XLA on CPU)."""
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype),
                      shapes)


@pytest.mark.parametrize("ch_mult,f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4)])
def test_round_trip_shapes(ch_mult, f):
  model = AutoencoderKL(ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=4, out_channels=3,
                        attention_impl="xla")
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  post = jax.eval_shape(lambda v, x: model.apply(v, x, method=AutoencoderKL.encode),
                        variables, x)
  assert isinstance(post, DiagonalGaussian)
  assert post.mean.shape == post.logvar.shape == (2, 32 // f, 32 // f, 4)
  assert model.latent_shape((32, 32, 3)) == (32 // f, 32 // f, 4)
  x_hat = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), variables, post.mean)
  assert x_hat.shape == (2, 32, 32, 3)
  # The mid blocks self-attend through MultiHeadAttention.
  for part in ("encoder", "decoder"):
    assert "MultiHeadAttention_0" in variables["params"][part]["_MidBlock_0"]["AttnBlock_0"]


def test_bad_shapes_fail_clearly():
  model = AutoencoderKL(ch=8, ch_mult=(1, 2, 2), out_channels=3, attention_impl="xla")
  with pytest.raises(ValueError, match="divisible by f=4"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 3)))
  with pytest.raises(ValueError, match="out_channels=3"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="reconstruction='l3'"):
    ae_lib.AutoencoderObjective(model, reconstruction="l3")
  with pytest.raises(ValueError, match="needs perceptual_fn"):
    ae_lib.AutoencoderObjective(model, perceptual_weight=0.1)


def test_posterior_kl_is_the_closed_form_and_samples_have_its_moments():
  rng = np.random.default_rng(0)
  mean = rng.normal(0, 1, (3, 2, 2, 2)).astype(np.float32)
  logvar = rng.uniform(-2, 1, (3, 2, 2, 2)).astype(np.float32)
  post = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
  np.testing.assert_allclose(post.std, np.exp(0.5 * logvar), rtol=1e-6)
  np.testing.assert_array_equal(post.mode(), mean)
  # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2 per dimension, summed.
  s = np.exp(0.5 * logvar.astype(np.float64))
  want = np.sum(np.log(1 / s) + (s**2 + mean**2) / 2 - 0.5, axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(), want, rtol=1e-5)
  assert post.kl().shape == (3,)
  # ... and it is E_q[log q(z) - log p(z)], estimated from draws of `sample`.
  n = 20000
  many = DiagonalGaussian(jnp.broadcast_to(post.mean, (n, *mean.shape)),
                          jnp.broadcast_to(post.logvar, (n, *mean.shape)))
  draws = np.asarray(many.sample(_key(1)), np.float64)  # [n, 3, 2, 2, 2]
  log_q = -0.5 * ((draws - mean) / s)**2 - np.log(s)
  log_p = -0.5 * draws**2
  np.testing.assert_allclose((log_q - log_p).sum(axis=(2, 3, 4)).mean(0), want, rtol=0.05,
                             atol=0.05)
  # Sample moments match the posterior within ~5 standard errors.
  np.testing.assert_allclose(draws.mean(0), mean, atol=5 * s.max() / np.sqrt(n))
  np.testing.assert_allclose(draws.std(0), s, rtol=0.05)
  # logvar is clipped as in SD, so exp(logvar) stays finite.
  big = DiagonalGaussian.from_moments(jnp.concatenate([mean, 1e3 + 0 * logvar], -1))
  assert float(big.logvar.max()) == ae_lib.LOGVAR_RANGE[1] and np.all(np.isfinite(big.kl()))


def _blobs(n, size, seed):
  """Smooth random images in [-1, 1]: a bright Gaussian blob at a random place."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] + 0.5
  c = rng.uniform(2, size - 2, (n, 2))
  r = rng.uniform(1.0, 2.5, (n, 1, 1))
  img = np.exp(-((yy - c[:, :1, None])**2 + (xx - c[:, 1:, None])**2) / (2 * r**2))
  return (2 * img - 1)[..., None].astype(np.float32)


def test_short_training_lowers_reconstruction_error_and_scale_gives_unit_latents():
  x = _blobs(64, 8, 0)
  model = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, out_channels=1,
                        attention_impl="xla")
  objective = ae_lib.AutoencoderObjective(model, reconstruction="l2", kl_weight=1e-3,
                                          data_shape=(8, 8, 1))
  params = _random_params(model.init, x[:1], scale=0.1)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, o, xb, i):
    (_, metrics), g = jax.value_and_grad(objective.loss, has_aux=True)(
        p, {"x": xb}, jax.random.fold_in(_key(0), i))
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, metrics

  opt = tx.init(params)
  history = []
  for i in range(60):
    params, opt, metrics = step(params, opt, x[(i % 4) * 16:(i % 4 + 1) * 16], i)
    history.append(jax.device_get(metrics))
  assert all(np.isfinite(m["loss"]) for m in history)
  first, last = np.mean([m["mse"] for m in history[:4]]), np.mean([m["mse"] for m in history[-4:]])
  assert last < 0.5 * first, (first, last)

  # The scale factor turns posterior samples into unit-variance latents; decode inverts it.
  scale = ae_lib.latent_scale_factor(model, params, x, _key(1), batch_size=64)
  frozen = FrozenAutoencoder(model, params, scale)
  z = np.asarray(frozen.encode(jnp.asarray(x), _key(1)))
  assert z.shape == (64, 4, 4, 2)
  assert abs(z.std() - 1.0) < 0.05
  mean_scale = ae_lib.latent_scale_factor(model, params, x, None, use_mean=True)
  mode = FrozenAutoencoder(model, params, mean_scale, sample_posterior=False)
  z_mode = mode.encode(jnp.asarray(x), None)
  np.testing.assert_allclose(np.asarray(z_mode).std(), 1.0, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(mode.decode(z_mode)),
                             np.asarray(objective.reconstruct(params, jnp.asarray(x))),
                             rtol=1e-4, atol=1e-4)
  # The reconstructions are good, not just better: mean error well below the data's spread.
  assert np.mean((np.asarray(mode.decode(z_mode)) - x)**2) < 0.5 * np.var(x)


def test_perceptual_term_is_zero_on_equal_images_only_and_enters_the_loss():
  x = jnp.asarray(_blobs(4, 8, 1))
  clf = Classifier(num_classes=2, ch=4, ch_mult=(1,), feature_dim=8)
  fn = perceptual_distance_fn(clf, _random_params(clf.init, x[:1], seed=2))
  both = np.asarray(jax.jit(lambda a, b: fn(jnp.concatenate([a, a]), jnp.concatenate([a, b])))(
      x, x[::-1]))
  np.testing.assert_allclose(both[:4], 0.0, atol=1e-6)
  assert both.shape == (8,) and np.all(both[4:] > 1e-3)
  # With a weight, the loss carries the term (traced only: the value is the function's above).
  model = AutoencoderKL(ch=8, ch_mult=(1, 2), z_channels=2, out_channels=1, attention_impl="xla")
  objective = ae_lib.AutoencoderObjective(model, perceptual_weight=0.5, perceptual_fn=fn)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  loss, metrics = jax.eval_shape(objective.loss, params, {"x": x}, jax.random.PRNGKey(0))
  assert loss.shape == () and metrics["perceptual"].shape == ()
