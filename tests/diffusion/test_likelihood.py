"""Probability-flow log-likelihood against exact Gaussian-mixture densities.

The exact score of a diffused GMM (analytic.GaussianMixture.score_fn) makes the ODE
likelihood checkable against the closed-form log-density: any error is solver error.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from research.diffusion import likelihood
from research.diffusion import sde as sde_lib
from research.diffusion.analytic import GaussianMixture

VP = sde_lib.VPSDE()


def _ring(std, dim):
  return GaussianMixture.ring(num_modes=8, radius=4.0, std=std, dim=dim)


@pytest.mark.parametrize("dim", [2, 16])
def test_exact_estimator_matches_gmm_log_prob(dim):
  # std 0.1: sharp, well separated modes (the hardest case for t_min and the solver);
  # std 0.3: broader modes whose posteriors overlap at moderate t. Both reuse one compile
  # (the mixture parameters are traced leaves of the Partial score).
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  traces = []
  for std in (0.1, 0.3):
    gmm = _ring(std, dim)
    x = gmm.sample(jax.random.PRNGKey(dim), 64)
    logp, info = likelihood.log_likelihood(gmm.score_fn(VP), VP, x, jax.random.PRNGKey(0),
                                           estimator="exact", rtol=1e-5, atol=1e-5)
    err = np.abs(np.asarray(logp) - np.asarray(gmm.log_prob(x)))
    assert logp.shape == (64,) and logp.dtype == jnp.float32
    assert err.mean() <= 0.01, (dim, std, err.mean(), err.max())
    assert info["nfe"] > 0 and info["nfe"] == 6 * info["num_steps"] + 1
    np.testing.assert_allclose(np.asarray(info["prior_logp"] + info["delta_logp"]),
                               np.asarray(logp), rtol=1e-6)
    traces.append(len(compiles))
  # A new mixture (new Partial leaves) reuses the compiled solve: the second pass, which does
  # everything the first did on arrays of the same shapes, compiles nothing.
  assert traces[1] == traces[0]


def test_ode_log_likelihood_backward_in_time():
  # Flow-matching convention: data at s = 1, noise at s = 0. The reversed probability flow
  # u(x, s) = -F(x, 1 - s), integrated from s0 = 1 - t_min down to 0, must give the same
  # log-density as the forward solve, i.e. the exact one.
  gmm = _ring(0.3, 2)
  score = gmm.score_fn(VP)
  flow = likelihood.ProbabilityFlow(score, VP)
  x = gmm.sample(jax.random.PRNGKey(8), 16)
  t_min = 1e-5

  def reversed_flow(y, s):
    return -flow(y, 1.0 - s)

  logp, info = likelihood.ode_log_likelihood(reversed_flow, VP.prior_logp, x,
                                             jax.random.PRNGKey(0), t0=1.0 - t_min, t1=0.0)
  assert info["nfe"] > 0
  assert np.abs(np.asarray(logp - gmm.log_prob(x))).mean() <= 0.01
  with pytest.raises(ValueError, match="t0=0.5 and t1=0.5 must differ"):
    likelihood.ode_log_likelihood(reversed_flow, VP.prior_logp, x, jax.random.PRNGKey(0),
                                  t0=0.5, t1=0.5)


def test_ve_sde_matches_log_prob_at_t_min():
  # The ODE gives log p_{t_min}; for VE, p_{t_min} includes the sigma_min = 0.01 floor
  # (visible at the 0.01-nat level for std 0.1), so compare with the exact diffused density.
  # (sub-VP shares VP's code path apart from sigma(t); the SDE helper tests its marginals.)
  sde = sde_lib.get_sde("ve")
  gmm = _ring(0.1, 2)
  x = gmm.sample(jax.random.PRNGKey(1), 32)
  t_min = 1e-5
  logp, _ = likelihood.log_likelihood(gmm.score_fn(sde), sde, x, jax.random.PRNGKey(0),
                                      t_min=t_min, solver="dopri5")
  want = gmm.log_prob_t(x, jnp.full((32,), t_min), sde)
  assert np.abs(np.asarray(logp - want)).mean() <= 0.01


def test_hutchinson_is_unbiased_within_three_standard_errors():
  # 64 independent single-probe estimates per example, in one solve: the batch of 8 points
  # tiled 64 times, so every copy gets its own probe. The trajectory x(t) does not depend
  # on the probe, only the accumulated trace does, so the mean must match the exact value
  # (the closed-form log p_{t_min}, which the exact estimator matches to ~1e-3 nats).
  dim, n, reps, t_min = 16, 8, 64, 1e-5
  gmm = _ring(0.3, dim)
  x = gmm.sample(jax.random.PRNGKey(3), n)
  exact = np.asarray(gmm.log_prob_t(x, jnp.full((n,), t_min), VP))
  tiled = jnp.tile(x, (reps, 1))
  for probe, seed in (("rademacher", 5), ("gaussian", 6)):
    est, _ = likelihood.log_likelihood(gmm.score_fn(VP), VP, tiled, jax.random.PRNGKey(seed),
                                       estimator="hutchinson", num_probes=1, probe=probe,
                                       t_min=t_min)
    est = np.asarray(est).reshape(reps, n)
    # The batch-mean log-likelihood: 64 i.i.d. replicates, their mean within 3 SE.
    per_rep = est.mean(axis=1)
    se = per_rep.std(ddof=1) / np.sqrt(reps)
    assert se > 1e-3, (probe, se)  # the estimator is really random here
    assert abs(per_rep.mean() - exact.mean()) <= 3 * se, (probe, per_rep.mean(), exact.mean(), se)
    # Per example (8 checks per probe, skewed chi-square-like estimates): within 4 SE, with
    # the 0.01-nat solver tolerance of the exact test as a floor for near-diagonal Jacobians
    # where Rademacher probes are almost exact.
    se_ex = est.std(axis=0, ddof=1) / np.sqrt(reps)
    assert np.all(np.abs(est.mean(axis=0) - exact) <= 4 * se_ex + 0.01), (probe, se_ex)


def _custom_vjp_score(score):
  """The same score behind jax.custom_vjp (as our attention kernel): forward mode fails on it."""
  @jax.custom_vjp
  def wrapped(x, t):
    return score(x, t)

  def fwd(x, t):
    out, pullback = jax.vjp(score, x, t)
    return out, pullback

  wrapped.defvjp(fwd, lambda pullback, g: pullback(g))
  return wrapped


def test_divergence_estimators_against_jacobian_trace():
  # One evaluation, no ODE: the exact trace against jnp.trace of each example's jacfwd
  # Jacobian (an independent route), in forward, reverse and auto mode (auto on a
  # custom_vjp score must fall back to reverse); and the probe average of v^T J v against
  # the per-probe values and, over 1000 probes, against the trace within 4 standard errors.
  dim, n, num_probes = 5, 6, 1000
  gmm = _ring(0.3, dim)
  score = gmm.score_fn(VP)
  opaque = _custom_vjp_score(score)
  x = gmm.sample(jax.random.PRNGKey(7), n)
  t = jnp.float32(0.3)

  @jax.jit
  def reference(x):
    def drift_one(xi):
      tb = jnp.full((1,), t)
      return VP.probability_flow_drift(xi[None], tb, score(xi[None], tb))[0]
    return jax.vmap(drift_one)(x), jax.vmap(lambda xi: jnp.trace(jax.jacfwd(drift_one)(xi)))(x)

  @jax.jit
  def ours(x, probes):
    outs = [likelihood.drift_and_divergence(score, VP, x, t, exact_chunk=2, ad_mode=mode)
            for mode in ("forward", "reverse")]
    outs.append(likelihood.drift_and_divergence(opaque, VP, x, t, exact_chunk=3))  # auto
    _, avg = likelihood.drift_and_divergence(score, VP, x, t, probes)
    _, avg_rev = likelihood.drift_and_divergence(opaque, VP, x, t, probes)
    per_probe = jax.vmap(lambda v: likelihood.drift_and_divergence(score, VP, x, t, v[None])[1])
    return outs, avg, avg_rev, per_probe(probes)

  f_ref, div_ref = reference(x)
  for probe in likelihood.PROBES:
    probes = likelihood.draw_probes(jax.random.PRNGKey(1), x.shape, num_probes, probe)
    outs, avg, avg_rev, per_probe = ours(x, probes)
    for f, div in outs:
      np.testing.assert_allclose(np.asarray(f), np.asarray(f_ref), rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(np.asarray(div), np.asarray(div_ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(avg), np.asarray(per_probe.mean(0)), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(avg_rev), np.asarray(avg), rtol=1e-4, atol=1e-4)
    se = np.asarray(per_probe.std(0)) / np.sqrt(num_probes)
    assert np.all(se > 0)
    assert np.all(np.abs(np.asarray(avg - div_ref)) <= 4 * se + 1e-5), probe
  with pytest.raises(TypeError, match="custom_vjp"):
    likelihood.drift_and_divergence(opaque, VP, x, t, ad_mode="forward")
  # The vectorised path (used above UNROLL_MAX_D dimensions), chunks of 2 over D = 5.
  saved, likelihood.UNROLL_MAX_D = likelihood.UNROLL_MAX_D, 0
  try:
    chunked = jax.jit(lambda x: [
        likelihood.drift_and_divergence(score, VP, x, t, exact_chunk=2, ad_mode=mode)[1]
        for mode in ("forward", "reverse")])(x)
  finally:
    likelihood.UNROLL_MAX_D = saved
  for div in chunked:
    np.testing.assert_allclose(np.asarray(div), np.asarray(div_ref), rtol=1e-4, atol=1e-4)


def test_nfe_equals_runtime_count_and_multiaxis_input():
  # An ordered host callback counts every real evaluation of the score; info["nfe"] (from
  # diffrax's step statistics) must equal it. The input has image-like axes [B, 2, 2, 1].
  gmm = _ring(0.3, 4)
  base = gmm.score_fn(VP)
  calls = []

  def counted(x, t):
    jax.debug.callback(lambda: calls.append(1), ordered=True)
    return base(x, t)

  x = gmm.sample(jax.random.PRNGKey(2), 8)
  logp, info = likelihood.log_likelihood(counted, VP, x.reshape(8, 2, 2, 1),
                                         jax.random.PRNGKey(0), estimator="exact")
  jax.effects_barrier()
  assert info["nfe"] == len(calls), (info, len(calls))
  assert info["num_steps"] == info["num_accepted_steps"] + info["num_rejected_steps"]
  assert info["num_rejected_steps"] > 0  # rejected steps are counted too
  assert np.abs(np.asarray(logp - gmm.log_prob(x))).mean() <= 0.01


def test_under_outer_jit_reports_failure_and_max_steps_raises():
  gmm = _ring(0.3, 2)
  x = gmm.sample(jax.random.PRNGKey(4), 4)

  @jax.jit
  def f(score, x):  # score: a tree_util.Partial, its mixture parameters traced
    return likelihood.log_likelihood(score, VP, x, jax.random.PRNGKey(0), estimator="hutchinson",
                                     num_probes=2, max_steps=3)

  # Under an outer jit nothing can raise: the counts stay arrays and "failed" is reported.
  logp, info = f(gmm.score_fn(VP), x)
  assert bool(info["failed"]) and int(info["num_steps"]) == 3 and int(info["nfe"]) == 19
  # Outside a trace the same (now concrete) result raises, naming the limit.
  with pytest.raises(RuntimeError, match="max_steps=3"):
    likelihood._finish(logp, dict(info), max_steps=3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="hutch"), "estimator='hutch'.*exact, hutchinson"),
    (dict(probe="normal"), "probe='normal'.*rademacher, gaussian"),
    (dict(solver="rk45"), "solver='rk45'.*tsit5, dopri5"),
    (dict(num_probes=0), "num_probes=0"),
    (dict(rtol=-1.0), "rtol=-1.0"),
    (dict(atol=0.0), "atol=0.0"),
    (dict(t_min=1.0), r"t_min=1.0.*\(0, sde.T=1.0\)"),
    (dict(max_steps=2.5), "max_steps=2.5"),
    (dict(ad_mode="jvp"), "ad_mode='jvp'.*auto, forward, reverse"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  gmm = _ring(0.3, 2)
  with pytest.raises(ValueError, match=match):
    likelihood.log_likelihood(gmm.score_fn(VP), VP, jnp.zeros((2, 2)), jax.random.PRNGKey(0),
                              **kwargs)


def test_bad_sde_and_shape():
  gmm = _ring(0.3, 2)
  with pytest.raises(ValueError, match="sde must be"):
    likelihood.log_likelihood(gmm.score_fn(VP), "vp", jnp.zeros((2, 2)), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"x must be a batch \[B, \*dims\]"):
    likelihood.log_likelihood(gmm.score_fn(VP), VP, jnp.zeros((2,)), jax.random.PRNGKey(0))
