"""Frechet distance against closed forms and a float64 scipy reference; the cached feature net."""
import json
import os

import numpy as np
import pytest
import scipy.linalg

from research.metrics import fd


def _spd(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_closed_form_for_diagonal_covariances():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
  s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(s1) - np.sqrt(s2))**2)
  np.testing.assert_allclose(fd.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)), expected,
                             rtol=1e-10)


def test_general_covariances_match_scipy_sqrtm():
  rng = np.random.default_rng(1)
  for d in (2, 7, 32):
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = _spd(rng, d), _spd(rng, d)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real  # the classic FID formula
    ref = np.sum((mu1 - mu2)**2) + np.trace(c1 + c2 - 2 * covmean)
    got = fd.frechet_distance(mu1, c1, mu2, c2)
    np.testing.assert_allclose(got, ref, rtol=1e-8)
    np.testing.assert_allclose(fd.frechet_distance(mu2, c2, mu1, c1), got, rtol=1e-8)
    assert fd.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)
  # Rank-deficient covariances stay real and finite.
  v = rng.standard_normal((4, 1))
  assert np.isfinite(fd.frechet_distance(np.zeros(4), v @ v.T, np.ones(4), np.eye(4)))


def test_estimate_from_samples_converges_to_the_true_distance():
  rng = np.random.default_rng(2)
  d, n = 4, 20000
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  c1, c2 = _spd(rng, d), _spd(rng, d)
  true = fd.frechet_distance(mu1, c1, mu2, c2)
  f1 = rng.multivariate_normal(mu1, c1, n)
  f2 = rng.multivariate_normal(mu2, c2, n)
  # Plug-in error is O(sqrt(d / n)) relative (~1.5% here); 10% is many standard errors.
  np.testing.assert_allclose(fd.frechet_distance_from_features(f1, f2), true, rtol=0.1)
  with pytest.raises(ValueError, match="features must be"):
    fd.gaussian_stats(np.zeros(3))


def test_feature_net_is_trained_once_and_cached(tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  # Two linearly separable classes: dark and bright 8x8 images.
  y = rng.integers(0, 2, 256)
  x = (np.where(y[:, None, None, None] == 1, 0.5, -0.5)
       + 0.2 * rng.standard_normal((256, 8, 8, 1))).astype(np.float32)
  s = fd.FeatureNetSettings(ch=4, ch_mult=(1,), feature_dim=8, steps=30, batch_size=32)
  net = fd.load_or_train_feature_net(str(tmp_path), "toy", x, y, 2, test_x=x,
                                     test_labels=y, settings=s)
  assert net.info["test_accuracy"] > 0.9
  path = fd.feature_net_path(str(tmp_path), "toy", (8, 8, 1), s)
  assert os.path.exists(path) and json.load(open(path[:-8] + ".json"))["name"] == "toy"
  # The second call loads the cache: training would fail here.
  monkeypatch.setattr(fd, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
  again = fd.load_or_train_feature_net(str(tmp_path), "toy", x, y, 2, settings=s)
  np.testing.assert_array_equal(again.features(x), net.features(x))
  assert again.features(x).shape == (256, 8)
