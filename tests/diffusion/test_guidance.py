"""Guidance wrappers against exact answers (Gaussian mixtures, component = class).

CFG at w = 1 and classifier guidance at s = 1 with the exact noisy classifier must both be
the exact conditional score; every sampler driven by them must land in the requested
component with the true within-component spread; CFG must cost one network call per step.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special as sp_special

from research.diffusion import analytic, guidance, samplers
from research.diffusion.sde import VESDE, VPSDE
from research.models.noise_classifier import NoiseConditionalClassifier

K, STD = 8, 0.1
VP = VPSDE()
# Jitted evaluation of a Partial score/logits function: one compile per function structure
# (cheaper on CPU than compiling every primitive eagerly).
_call = jax.jit(lambda f, x, t: f(x, t))
_call3 = jax.jit(lambda f, x, t, y: f(x, t, y))


def _ring():
  return analytic.GaussianMixture.ring(K, 4.0, STD)


def _exact_conditional_score(gmm, sde, x, t, labels):
  """(alpha mu_y - x) / (alpha^2 s_y^2 + sigma^2), written out independently, in float64."""
  alpha, sigma = (np.asarray(a, np.float64) for a in sde.marginal(t))
  mu = np.asarray(gmm.means, np.float64)[labels]
  v = (alpha * np.asarray(gmm.stds, np.float64)[labels])**2 + sigma**2
  return (alpha[:, None] * mu - np.asarray(x, np.float64)) / v[:, None]


def _points(rng, n=64, scale=3.0):
  kx, kt, kl = jax.random.split(rng, 3)
  x = scale * jax.random.normal(kx, (n, 2))
  t = jax.random.uniform(kt, (n,), minval=0.02, maxval=1.0)
  labels = jax.random.randint(kl, (n,), 0, K)
  return x, t, labels


@pytest.mark.parametrize("sde", [VP, VESDE(sigma_min=0.01, sigma_max=10.0)], ids=["vp", "ve"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_cfg_is_exact_interpolation_of_conditional_and_marginal(sde, prediction):
  gmm = _ring()
  x, t, labels = _points(jax.random.PRNGKey(1))
  model = guidance.gmm_conditional_model(gmm, sde, prediction)
  cond = _exact_conditional_score(gmm, sde, x, t, np.asarray(labels))
  marg = np.asarray(_call(gmm.score_fn(sde), x, t), np.float64)
  for w in (0.0, 1.0, 3.0):
    fn = guidance.classifier_free_guidance(model, labels, w, sde=sde, prediction=prediction,
                                           null_label=K)
    # In score space CFG is marg + w (cond - marg) (scores are affine in eps at fixed x, t).
    want = marg + w * (cond - marg)
    np.testing.assert_allclose(_call(fn, x, t), want, rtol=2e-3,
                               atol=2e-3 * np.abs(want).max())


def test_per_example_scale_mixes_scales_in_one_batch():
  gmm = _ring()
  x, t, labels = _points(jax.random.PRNGKey(2))
  model = guidance.gmm_conditional_model(gmm, VP)
  w = jnp.linspace(0.0, 4.0, x.shape[0])
  mixed = _call(guidance.classifier_free_guidance(model, labels, w, sde=VP, prediction="eps",
                                                  null_label=K), x, t)
  for i in (0, 17, 63):
    one = _call(guidance.classifier_free_guidance(model, labels, float(w[i]), sde=VP,
                                                  prediction="eps", null_label=K), x, t)
    np.testing.assert_allclose(mixed[i], one[i], rtol=1e-5, atol=1e-5)


def test_gmm_classifier_is_the_exact_posterior():
  gmm = _ring()
  x, t, _ = _points(jax.random.PRNGKey(3))
  log_post = np.asarray(jax.nn.log_softmax(_call(guidance.gmm_classifier_logits(gmm, VP), x, t)))
  # Bayes' rule in float64 with the diffused components N(alpha mu_k, (alpha^2 s^2 + sigma^2) I).
  alpha, sigma = (np.asarray(a, np.float64) for a in VP.marginal(t))
  mu = np.asarray(gmm.means, np.float64)
  v = (alpha * STD)**2 + sigma**2
  sq = np.sum((np.asarray(x, np.float64)[:, None] - alpha[:, None, None] * mu[None])**2, -1)
  logits = -np.log(2 * math.pi * v)[:, None] - 0.5 * sq / v[:, None] + math.log(1.0 / K)
  want = logits - sp_special.logsumexp(logits, axis=-1, keepdims=True)
  np.testing.assert_allclose(log_post, want, atol=2e-4 * max(1.0, np.abs(want).max()))


def test_classifier_guidance_with_exact_classifier_is_bayes():
  gmm = _ring()
  x, t, labels = _points(jax.random.PRNGKey(4))
  cond = _exact_conditional_score(gmm, VP, x, t, np.asarray(labels))
  marg = np.asarray(_call(gmm.score_fn(VP), x, t), np.float64)
  logits = guidance.gmm_classifier_logits(gmm, VP)
  # label_score_fn: the network's score at fixed labels (null label = marginal), one call.
  model = guidance.gmm_conditional_model(gmm, VP, "v")
  for lab, want in ((labels, cond), (jnp.full_like(labels, K), marg)):
    got = _call(guidance.label_score_fn(model, lab, sde=VP, prediction="v"), x, t)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
  for s in (0.0, 1.0, 2.5):
    fn = guidance.classifier_guidance(gmm.score_fn(VP), logits, labels, s)
    assert isinstance(fn, jax.tree_util.Partial)
    # grad log p(y | x_t) = score(x | y) - score(x), so the guided score is marg + s (cond - marg).
    want = marg + s * (cond - marg)
    np.testing.assert_allclose(_call(fn, x, t), want, rtol=2e-3,
                               atol=2e-3 * np.abs(want).max())


def test_cfg_makes_one_network_call_on_the_doubled_batch():
  gmm = _ring()
  exact = guidance.gmm_conditional_model(gmm, VP)
  calls = []

  def counting_model(x, t, labels):  # a plain Python function: every call is seen, traced or not
    calls.append((x.shape, t.shape, labels.shape))
    return exact(x, t, labels)

  x, t, labels = _points(jax.random.PRNGKey(5), n=12)
  fn = guidance.classifier_free_guidance(counting_model, labels, 3.0, sde=VP,
                                         prediction="eps", null_label=K)
  out = jax.jit(fn)(x, t)  # the counter runs at trace time: calls in the compiled program
  assert calls == [((24, 2), (24,), (24,))]
  # ... and the answer equals the combination of two separate calls.
  eps_c, eps_u = _call3(exact, x, t, labels), _call3(exact, x, t, jnp.full((12,), K))
  want = -(eps_u + 3.0 * (eps_c - eps_u)) / VP.marginal(t)[1][:, None]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
  # Inside a sampler: the scanned step is traced once and sees one doubled-batch call; the
  # final denoising step is the only other call. NFE counts score evaluations = network calls.
  calls.clear()
  _, info = samplers.sample("ddim", fn, VP, (12, 2), jax.random.PRNGKey(0), steps=7,
                            denoise=True)
  assert info["nfe"] == 8
  assert calls == [((24, 2), (24,), (24,))] * 2


_TRACES = []


def _traced_gmm_model(means, stds, log_weights, x, t, labels):
  _TRACES.append(x.shape)  # runs once per trace, not per step: counts compilations
  return guidance._gmm_model_impl(VP, "eps")(means, stds, log_weights, x, t, labels)


def test_guided_partial_compiles_once_across_labels_and_scales():
  gmm = _ring()
  model = jax.tree_util.Partial(_traced_gmm_model, gmm.means, gmm.stds, gmm.log_weights)
  _TRACES.clear()
  outs = []
  for w, lab in ((1.0, 0), (2.0, 3), (0.5, 5)):
    fn = guidance.classifier_free_guidance(model, jnp.full((16,), lab), w, sde=VP,
                                           prediction="eps", null_label=K)
    assert isinstance(fn, jax.tree_util.Partial)
    outs.append(samplers.sample("ddim", fn, VP, (16, 2), jax.random.PRNGKey(0), steps=5)[0])
  # For all three calls: one shape-only trace (the samplers' score_fn check, jax.eval_shape,
  # whose cache answers the later calls) and one trace of the scanned step.
  assert _TRACES == [(32, 2)] * 2
  assert not np.allclose(outs[0], outs[1])


# One sampler per family (euler_maruyama / pc share the reverse-SDE module, ode_euler / heun
# the fixed-step ODE module; the benchmark experiments/benchmarks/guidance.py runs all
# eight). Steps: enough that discretisation error stays well inside the 5% spread bar on
# this narrow (std 0.1, radius 4) ring; measured std ratios are 0.98-1.02.
SAMPLERS = [
    ("ddpm", 200, {"grid": "logsnr"}),
    ("ddim", 100, {"grid": "logsnr"}),
    ("euler_maruyama", 200, {"grid": "logsnr"}),
    ("ode_euler", 100, {"grid": "logsnr"}),
    ("ode_adaptive", 1000, {}),
    ("dpm_solver++", 30, {}),
]


@pytest.mark.parametrize("name,steps,opts", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_every_sampler_samples_the_requested_component(name, steps, opts):
  """CFG (w = 1) and classifier guidance (s = 1, exact classifier) on the exact scores.

  One sampler call draws both halves of the batch (CFG rows, then classifier-guided rows) to
  compile each sampler once; the rows are independent except for ode_adaptive's shared step
  size (both halves follow the same exact conditional score, so that is harmless).
  Bars: >= 99% of samples nearest the requested mean and within-mode std within 5% of the
  true std (its standard error at n = 2000 per half, pooled over 2 coordinates, is ~1.1%).
  """
  assert name in samplers.available()
  gmm = _ring()
  n = 2000
  labels = jnp.arange(n, dtype=jnp.int32) % K
  cfg = guidance.classifier_free_guidance(guidance.gmm_conditional_model(gmm, VP), labels, 1.0,
                                          sde=VP, prediction="eps", null_label=K)
  cg = guidance.classifier_guidance(gmm.score_fn(VP), guidance.gmm_classifier_logits(gmm, VP),
                                    labels, 1.0)
  both = jax.tree_util.Partial(_stacked, cfg, cg)
  x, info = samplers.sample(name, both, VP, (2 * n, 2), jax.random.PRNGKey(0), steps=steps,
                            denoise=True, **opts)
  assert info["nfe"] > 0
  for half, rows in (("cfg", x[:n]), ("classifier", x[n:])):
    m = guidance.conditional_mode_metrics(rows, labels, gmm.means, STD)
    assert m["nonfinite"] == 0.0, (half, m)
    assert m["accuracy"] >= 0.99, (half, m)
    assert abs(m["std_ratio"] - 1.0) <= 0.05, (half, m)


def _stacked(f, g, x, t):
  n = x.shape[0] // 2
  return jnp.concatenate([f(x[:n], t[:n]), g(x[n:], t[n:])], 0)


def test_conditional_mode_metrics_on_exact_samples():
  gmm = _ring()
  n = 4000
  labels = np.arange(n) % K
  x = np.asarray(gmm.means)[labels] + STD * np.random.default_rng(0).normal(size=(n, 2))
  m = guidance.conditional_mode_metrics(x, labels, gmm.means, STD)
  assert m["accuracy"] == 1.0
  assert abs(m["std_ratio"] - 1.0) < 4 / math.sqrt(2 * 2 * n)  # 4 standard errors
  wrong = guidance.conditional_mode_metrics(x, (labels + 1) % K, gmm.means, STD)
  assert wrong["accuracy"] == 0.0 and math.isnan(wrong["std_ratio"])
  x[0] = np.nan
  m = guidance.conditional_mode_metrics(x, labels, gmm.means, STD)
  assert m["nonfinite"] == pytest.approx(1 / n)


def test_noisy_classifier_loss_is_bounded_below_by_the_exact_posterior():
  """The exact posterior minimises the expected loss; a trained net approaches it from above."""
  gmm = _ring()
  rng = jax.random.PRNGKey(6)
  labels = jnp.arange(4096) % K
  x0 = gmm.means[labels] + STD * jax.random.normal(rng, (4096, 2))
  exact = guidance.gmm_classifier_logits(gmm, VP)
  loss = jax.jit(lambda f, x0, y, r: jnp.mean(guidance.noisy_classifier_loss(f, VP, x0, y, r)))
  bayes = float(loss(exact, x0, labels, rng))
  module = NoiseConditionalClassifier(num_classes=K, hidden=32, depth=1)
  params = jax.jit(module.init)(rng, x0[:2], jnp.ones((2,)))["params"]
  fn = guidance.flax_classifier_fn(module, params, VP)
  # Zero-initialised head: the untrained classifier is uniform, loss log K, no guidance.
  untrained = float(loss(fn, x0, labels, rng))
  np.testing.assert_allclose(untrained, math.log(K), rtol=1e-5)
  assert 0.0 < bayes < math.log(K)
  g = jax.jit(guidance.classifier_log_prob_grad)(fn, x0[:8], jnp.full((8,), 0.5), labels[:8])
  np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_bad_inputs_fail_with_clear_errors():
  gmm = _ring()
  model = guidance.gmm_conditional_model(gmm, VP)
  with pytest.raises(ValueError, match="labels must be integers"):
    guidance.classifier_free_guidance(model, jnp.zeros(3), 1.0, sde=VP, prediction="eps",
                                      null_label=K)
  with pytest.raises(ValueError, match="prediction"):
    guidance.classifier_free_guidance(model, jnp.zeros(3, jnp.int32), 1.0, sde=VP,
                                      prediction="noise", null_label=K)
  with pytest.raises(ValueError, match="null_label"):
    guidance.classifier_free_guidance(model, jnp.zeros(3, jnp.int32), 1.0, sde=VP,
                                      prediction="eps", null_label=-1)
  with pytest.raises(ValueError, match="scale"):
    guidance.classifier_guidance(gmm.score_fn(VP), guidance.gmm_classifier_logits(gmm, VP),
                                 jnp.zeros(3, jnp.int32), jnp.ones((3, 1)))
  with pytest.raises(ValueError, match="edm"):
    guidance.gmm_conditional_model(gmm, VP, "edm")
  with pytest.raises(ValueError, match="num_classes"):
    NoiseConditionalClassifier(num_classes=1).init(jax.random.PRNGKey(0), jnp.ones((2, 2)),
                                                   jnp.ones((2,)))
