"""The flows' log_likelihood rejects non-finite rows of concrete x before any density or solve."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.flows import flow_matching as fm
from research.flows import models
from research.flows import objective as objective_lib


def _x_nan_row(row, b=4, d=4):
  x = np.zeros((b, d), np.float32)
  x[row, 0] = np.nan
  return jnp.asarray(x)


def test_coupling_flow_log_likelihood_rejects_non_finite_rows():
  flow = models.VectorFlow(kind="realnvp", num_layers=2, hidden=8, depth=1)
  obj = objective_lib.FlowObjective(flow=flow, data_shape=(4,))
  # The check runs before the density, so no parameters are needed to reach it.
  with pytest.raises(ValueError, match=r"x has non-finite values in rows \[2\] \(of 4\)"):
    obj.log_likelihood(None, _x_nan_row(2), jax.random.PRNGKey(0))


def test_flow_matching_log_likelihood_rejects_non_finite_rows():
  obj = fm.FlowMatchingObjective(model=None, data_shape=(4,))
  with pytest.raises(ValueError, match=r"x has non-finite values in rows \[1\] \(of 4\)"):
    obj.log_likelihood(None, _x_nan_row(1), jax.random.PRNGKey(0))


def test_coupling_flow_log_likelihood_of_finite_x_unchanged():
  flow = models.VectorFlow(kind="realnvp", num_layers=2, hidden=8, depth=1)
  obj = objective_lib.FlowObjective(flow=flow, data_shape=(4,))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
  params = obj.init(jax.random.PRNGKey(0), {"x": x})
  logp, info = obj.log_likelihood(params, x, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(logp), np.asarray(jax.jit(obj.log_prob)(params, x)))
  assert info["nfe"] == 0
