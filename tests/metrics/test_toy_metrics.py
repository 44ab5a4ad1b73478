import jax
import numpy as np

from research.data import toy
from research.metrics import toy as metrics


def test_true_samples_score_as_perfect():
  ds = toy.Ring()
  x, _ = ds.sample(jax.random.PRNGKey(0), 20000)
  m = metrics.toy_sample_metrics(ds, x, jax.random.PRNGKey(1), num_reference=20000)
  assert abs(m["logp_gap"]) < 0.05
  assert abs(m["std_ratio"] - 1) < 0.01
  assert m["mode_weight_error"] < 0.015
  assert m["modes_covered"] == 8
  assert m["sliced_wasserstein"] < 3 * m["sliced_wasserstein_floor"] + 1e-3


def test_metrics_detect_defects():
  ds = toy.Ring()
  # Too wide, and missing half of the modes.
  labels = jax.random.randint(jax.random.PRNGKey(0), (8000,), 0, 4)
  x, _ = toy.Ring(std=0.2).sample(jax.random.PRNGKey(1), 8000, labels=labels)
  m = metrics.toy_sample_metrics(ds, x, jax.random.PRNGKey(2), num_reference=8000)
  assert m["modes_covered"] == 4
  assert abs(m["std_ratio"] - 2.0) < 0.05
  assert abs(m["mode_weight_error"] - 0.125) < 0.02
  assert m["logp_gap"] < -1.0  # log(1/2^2)... a wider mode loses ~1.5 nats per point
  assert m["sliced_wasserstein"] > 10 * m["sliced_wasserstein_floor"]
