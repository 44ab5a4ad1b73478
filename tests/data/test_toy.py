import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.data import toy


def _grid_integral(log_prob, lo=-6.0, hi=6.0, n=801):
  g = np.linspace(lo, hi, n)
  xx, yy = np.meshgrid(g, g, indexing="ij")
  pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
  p = np.exp(np.asarray(log_prob(pts), np.float64))
  return p.sum() * (g[1] - g[0]) ** 2


@pytest.mark.parametrize("ds", [
    toy.Ring(num_modes=8, radius=4.0, std=0.3),
    toy.Ring(num_modes=5, radius=2.0, std=0.5),
    toy.Grid(side=5, spacing=2.0, std=0.2),
    toy.Checkerboard(),
], ids=["ring8", "ring5", "grid", "checkerboard"])
def test_log_density_integrates_to_one(ds):
  assert abs(_grid_integral(ds.log_prob) - 1.0) < 2e-3


@pytest.mark.parametrize("name", ["ring", "grid", "checkerboard", "moons", "swissroll"])
def test_sample_shapes_and_labels(name):
  ds = toy.get_dataset(name)
  x, labels = ds.sample(jax.random.PRNGKey(0), 500)
  assert x.shape == (500, 2) and x.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(x)))
  if ds.num_classes:
    assert labels.shape == (500,)
    assert int(labels.min()) >= 0 and int(labels.max()) < ds.num_classes
  if getattr(ds, "has_density", False):
    assert np.all(np.isfinite(np.asarray(ds.log_prob(x))))


def test_ring_in_higher_dimension_matches_moments():
  ds = toy.Ring(num_modes=8, radius=4.0, std=0.1, dim=16)
  x, labels = ds.sample(jax.random.PRNGKey(1), 20000)
  resid = np.asarray(x - ds.means[labels])
  assert resid.shape == (20000, 16)
  assert abs(resid.std() / 0.1 - 1) < 0.01
  shares = np.bincount(np.asarray(labels), minlength=8) / 20000
  assert np.max(np.abs(shares - 1 / 8)) < 0.015


def test_conditional_sampling_fixes_component():
  ds = toy.Ring()
  labels = jnp.full((100,), 3)
  x, lab = ds.sample(jax.random.PRNGKey(2), 100, labels=labels)
  d = np.linalg.norm(np.asarray(x - ds.means[3]), axis=-1)
  assert np.all(d < 1.0) and np.all(np.asarray(lab) == 3)


def test_unknown_options_are_named():
  with pytest.raises(ValueError, match="unknown options.*radios"):
    toy.get_dataset("ring", radios=3.0)
  with pytest.raises(KeyError, match="Valid toy datasets"):
    toy.get_dataset("spiral")
