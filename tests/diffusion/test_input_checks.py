"""Bad library inputs fail up front with a TypeError / ValueError naming the argument.

Samplers (every entry point goes through samplers.base.check_call) and log_likelihood
(non-finite rows). Nothing here compiles a sampler or solve except the bit-for-bit check.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import analytic, likelihood, samplers
from research.diffusion import sde as sde_lib

VP = sde_lib.VPSDE()
RING = analytic.GaussianMixture.ring(num_modes=4, radius=2.0, std=0.3, dim=2)
SCORE = RING.score_fn(VP)
KEY = jax.random.PRNGKey(0)


def _sample(name="ddim", score_fn=SCORE, shape=(4, 2), steps=3, **options):
  return samplers.sample(name, score_fn, VP, shape, KEY, steps=steps, **options)


@pytest.mark.parametrize("shape,exc,match", [
    ((), ValueError, r"shape must be a non-empty tuple.*got \(\)"),
    ((4, -2), ValueError, r"shape must be .*positive ints, got \(4, -2\)"),
    ((0, 2), ValueError, r"shape must be .*positive ints, got \(0, 2\)"),
    (4, TypeError, r"shape must be a tuple \(B, \*dims\) of positive ints, got 4"),
    ((4, 2.0), TypeError, r"shape must be a tuple .*got \(4, 2.0\)"),
    ((4, True), TypeError, r"shape must be a tuple .*got \(4, True\)"),
    (None, TypeError, r"shape must be a tuple .*got None"),
])
def test_sampler_bad_shape(shape, exc, match):
  with pytest.raises(exc, match=match):
    _sample(shape=shape)


@pytest.mark.parametrize("steps,exc,match", [
    (None, TypeError, r"steps must be a positive int, got None \(NoneType\)"),
    (True, TypeError, r"steps must be a positive int, got True \(bool\)"),
    (2.5, TypeError, r"steps must be a positive int, got 2.5 \(float\)"),
    ("10", TypeError, r"steps must be a positive int, got '10' \(str\)"),
    (-1, ValueError, r"steps must be a positive int, got -1"),
])
def test_sampler_bad_steps(steps, exc, match):
  with pytest.raises(exc, match=match):
    _sample(steps=steps)


@pytest.mark.parametrize("name", samplers.available())
def test_sampler_score_shape_checked_for_every_sampler(name):
  # A [B, 1] score would broadcast against x [B, 2] into garbage samples.
  bad = lambda x, t: jnp.sum(x, axis=-1, keepdims=True)
  match = (re.escape(f"sampler {name!r}: ")
           + r"score_fn returned shape \(4, 1\); expected \(4, 2\) \(the shape of x\)")
  with pytest.raises(ValueError, match=match):
    _sample(name, score_fn=bad)


def test_sampler_bad_score_fn():
  with pytest.raises(TypeError, match="score_fn must be callable"):
    _sample(score_fn="score")
  with pytest.raises(TypeError, match=r"score_fn must return one array of shape \(4, 2\)"):
    _sample(score_fn=lambda x, t: (x, t))
  with pytest.raises(ValueError, match=r"score_fn returned shape \(4,\); expected \(4, 2\)"):
    _sample(score_fn=lambda x, t: t)


def test_compile_sampler_checks_too():
  with pytest.raises(ValueError, match="shape must be a non-empty tuple"):
    samplers.compile_sampler("heun", SCORE, VP, (), steps=3)
  with pytest.raises(TypeError, match="steps must be a positive int"):
    samplers.compile_sampler("ode_adaptive", SCORE, VP, (4, 2), steps=None)


def test_good_sampler_call_unchanged_bit_for_bit():
  # The checks only look at shapes: the sample equals the family's run function, jitted
  # directly with the same arguments and no checks. A list shape and a numpy int steps are
  # accepted as before.
  for name, steps in (("ddim", 4), ("euler_maruyama", 3)):
    spec = samplers.get(name)
    want, nfe, _ = jax.jit(lambda rng: spec.run(SCORE, VP, (4, 2), rng, steps,
                                                 **spec.defaults))(KEY)
    got, info = _sample(name, shape=[4, 2], steps=np.int64(steps))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert info["nfe"] == int(nfe) == steps


# -- log_likelihood --------------------------------------------------------------------------
def _x_with_bad_rows(rows, value=np.nan, b=8):
  x = np.asarray(RING.sample(jax.random.PRNGKey(1), b))
  x = x.copy()
  for r in rows:
    x[r, r % 2] = value
  return x


@pytest.mark.parametrize("rows,value,as_jax", [
    ([3], np.nan, False),
    ([1, 5], np.inf, True),
    ([0], -np.inf, False),
])
def test_log_likelihood_rejects_non_finite_rows(rows, value, as_jax):
  x = _x_with_bad_rows(rows, value)
  x = jnp.asarray(x) if as_jax else x
  with pytest.raises(ValueError, match=rf"x has non-finite values in rows \{rows}\ \(of 8\); "
                                       "likelihood needs finite data"):
    likelihood.log_likelihood(SCORE, VP, x, KEY)


def test_ode_log_likelihood_rejects_non_finite_rows():
  x = _x_with_bad_rows([6])
  with pytest.raises(ValueError, match=r"x has non-finite values in rows \[6\] \(of 8\)"):
    likelihood.ode_log_likelihood(lambda y, t: -y, VP.prior_logp, x, KEY, t0=0.0, t1=1.0)


def test_non_finite_message_lists_at_most_ten_rows():
  x = np.full((16, 2), np.nan, np.float32)
  with pytest.raises(ValueError, match=r"rows \[0, 1, .*, 9\] and 6 more \(of 16\)"):
    likelihood.log_likelihood(SCORE, VP, x, KEY)


def test_finite_check_skipped_when_traced():
  # Under an outer jit the values are unknown: no check, no error (the solve would see NaN).
  f = jax.jit(lambda x: likelihood.check_finite_rows(x) or x)
  assert f(jnp.full((2, 2), jnp.nan)).shape == (2, 2)
  likelihood.check_finite_rows(np.zeros((3, 2), np.int32))  # integer data: nothing to check
