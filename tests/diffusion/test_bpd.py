"""The bits/dim helper against exact answers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from research.diffusion import bpd


@pytest.mark.parametrize("data_range, lo, hi", [("[-1,1]", -1.0, 1.0), ("[0,1]", 0.0, 1.0)])
def test_dequantize_stays_in_its_bin(data_range, lo, hi):
  k = np.arange(256, dtype=np.float64).reshape(16, 16)
  x = jnp.asarray(lo + (hi - lo) * k / 255.0, jnp.float32)  # the canonical 8-bit map
  np.testing.assert_array_equal(np.asarray(bpd.to_integers(x, data_range=data_range)), k)
  y = np.asarray(bpd.dequantize(jax.random.PRNGKey(0), x, data_range=data_range), np.float64)
  v = (y - lo) / (hi - lo) * 256.0  # = k + u
  assert np.all(y >= lo) and np.all(y < hi)
  np.testing.assert_array_equal(np.floor(v + 1e-4), k)  # u in [0, 1): same bin
  u = v - k
  # The noise is U[0, 1): mean 1/2 and variance 1/12 (256 draws: SE of the mean 0.018).
  assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / 256)
  assert abs(u.var() - 1 / 12) < 0.02


@pytest.mark.parametrize("data_range, lo, hi", [("[-1,1]", -1.0, 1.0), ("[0,1]", 0.0, 1.0)])
def test_uniform_model_has_exactly_8_bits(data_range, lo, hi):
  # The uniform density on [lo, hi]^D gives every 8-bit image probability 256^-D.
  d = 64
  logp = jnp.full((3,), -d * math.log(hi - lo))
  np.testing.assert_allclose(np.asarray(bpd.bits_per_dim(logp, d, data_range=data_range)), 8.0,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(bpd.discrete_nll(logp, d, data_range=data_range)),
                             d * math.log(256.0), rtol=1e-6)


def test_offsets():
  assert bpd.log_scale_per_dim(data_range="[-1,1]") == pytest.approx(math.log(128.0))
  assert bpd.log_scale_per_dim(data_range="[0,1]") == pytest.approx(math.log(256.0))


def test_dequantised_bound_matches_exact_discrete_likelihood():
  """For a smooth density the dequantised bits/dim is within the Jensen gap of the exact ones.

  Model: N(0, 0.4^2) per pixel in [-1, 1] space, with exact bin probabilities from the normal
  CDF. E_u[-log p(y)] >= -log P(k) (Jensen), and the gap is tiny for a density that is almost
  constant over one bin (width 2/256).
  """
  sigma = 0.4
  rng = np.random.default_rng(0)
  k = np.clip(np.round(127.5 + 127.5 * sigma * rng.standard_normal((512, 4))), 0, 255)
  x = jnp.asarray(k / 127.5 - 1.0, jnp.float32)
  edges_lo, edges_hi = -1 + 2 * k / 256, -1 + 2 * (k + 1) / 256
  exact_bits = -np.log2(stats.norm.cdf(edges_hi / sigma) - stats.norm.cdf(edges_lo / sigma))
  exact_bpd = exact_bits.mean()
  draws = []
  for i in range(8):
    y = bpd.dequantize(jax.random.PRNGKey(i), x)
    logp = jnp.sum(stats.norm.logpdf(np.asarray(y, np.float64), scale=sigma), axis=-1)
    draws.append(np.asarray(bpd.bits_per_dim(logp, 4)).mean())
  est, se = np.mean(draws), np.std(draws) / math.sqrt(len(draws))
  assert est >= exact_bpd - 4 * se - 1e-6
  assert est - exact_bpd < 1e-3 + 4 * se, (est, exact_bpd)


@pytest.mark.parametrize("call, match", [
    (lambda: bpd.bits_per_dim(jnp.zeros(2), 4, data_range="[0,255]"), "data_range"),
    (lambda: bpd.bits_per_dim(jnp.zeros(2), 0), "num_dims"),
    (lambda: bpd.dequantize(jax.random.PRNGKey(0), jnp.zeros(2), num_bins=1), "num_bins"),
])
def test_bad_arguments_fail_clearly(call, match):
  with pytest.raises(ValueError, match=match):
    call()
