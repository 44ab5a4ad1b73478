"""Guidance for conditional sampling: classifier-free guidance (CFG) and classifier guidance.

Both wrappers return an ordinary `score_fn(x [B, *dims], t [B]) -> [B, *dims]`, so every
sampler in research.diffusion.samplers (DDPM, DDIM, reverse SDE, PF ODE, adaptive ODE,
DPM-Solver++) runs guided without knowing it.

Conventions (documented once, used everywhere):

  CFG (Ho & Salimans 2022, in the convention of latent diffusion and DPM-Solver):
      eps_w = eps_u + w (eps_c - eps_u)
    so w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1 sharpens.
    (Ho & Salimans write (1 + w') eps_c - w' eps_u, i.e. w = 1 + w'.) At fixed (x, t) the
    maps between eps, x0, v and the score are affine, and the weights (1 - w, w) sum to 1,
    so guiding in any of these spaces gives the same result; we combine in eps.
    The conditional and unconditional predictions come from ONE network call on the doubled
    batch [x; x] with labels [y; null], where null = num_classes (the token that label
    dropout trained; see objective.DiffusionObjective and models.mlp.MLP).
    `classifier_free_guidance_on` is the same for any condition pytree (text features and
    lengths in research.diffusion.latent, whose null condition is the empty caption).

  Classifier guidance (Song et al. 2021; Dhariwal & Nichol 2021):
      score_s(x, t) = score(x, t) + s * grad_x log p(y | x, t)
    so s = 0 is the base model and s = 1 with the unconditional score and the exact noisy
    classifier is exactly the conditional score grad_x log p_t(x | y) (Bayes' rule). The
    classifier gives logits [B, K] for x_t at time t; log_softmax makes them log p(y | x_t).

Scales may be a scalar or one value per example ([B]), so one batch can mix scales.
For w, s > 1 the guided field is not the score of any diffused family, so samplers differ:
with exact scores the stochastic ones (ddpm, euler_maruyama, pc) keep the true mode spread
at w = 5, the deterministic ones widen it ~1.3x at w = 3 and ~1.9x at w = 5 (measured in
experiments/benchmarks/results/guidance.md).

Jit caching: the samplers compile once per score_fn *object* unless it is a
`jax.tree_util.Partial` (whose leaves are traced). When every callable passed in here is a
Partial (e.g. `flax_model_fn`, `gmm_conditional_model`, `gmm_classifier_logits`), the
wrappers return a Partial too, whose leaves include the labels and the scale: changing
params, labels or the scale then reuses the compiled sampler. Plain callables give a plain
closure (correct, but each new closure compiles afresh).

Also here: `label_score_fn` (the network's score at fixed labels, e.g. the null label: the
usual base of classifier guidance), the exact Gaussian-mixture "network" and classifier
(component = class) that the tests and benchmarks use as ground truth, the noisy-classifier
training loss, and the per-class accuracy / within-mode spread metric of guided samples.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from research import mixture
from research.diffusion import parameterization as param
from research.diffusion.sde import bcast

Array = jax.Array
Partial = jax.tree_util.Partial
ModelFn = Callable[[Array, Array, Array], Array]     # (x [B,*dims], t [B], labels [B]) -> out
LogitsFn = Callable[[Array, Array], Array]           # (x [B,*dims], t [B]) -> logits [B, K]
ScoreFn = Callable[[Array, Array], Array]            # (x [B,*dims], t [B]) -> score


def _bind(impl, *args):
  """Partial(impl, *args) when every callable argument is a Partial, else a closure."""
  fns = [a for a in args if callable(a)]
  if all(isinstance(f, Partial) for f in fns):
    return Partial(impl, *args)
  return lambda x, t: impl(*args, x, t)


def _as_labels(labels) -> Array:
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers (class indices), got dtype {labels.dtype}.")
  if labels.ndim > 1:
    raise ValueError(f"labels must be a scalar or [B], got shape {labels.shape}.")
  return labels.astype(jnp.int32)


def _as_scale(scale, name: str) -> Array:
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim > 1:
    raise ValueError(f"{name} must be a scalar or one value per example [B], got shape "
                     f"{scale.shape}.")
  return scale


def _per_example(a: Array, batch: int) -> Array:
  return jnp.broadcast_to(a, (batch,))


# ---- classifier-free guidance ------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cfg_condition_impl(sde, prediction: str, sigma_data: float):
  """CFG for any condition pytree; one function object per static setting, so Partials built
  on it share jit caches."""

  def score(model_fn, cond, null_cond, scale, x, t):
    b = x.shape[0]
    xin = param.model_input(x, t, sde, prediction, sigma_data)
    # One network call on the doubled batch: rows [0, B) conditional, [B, 2B) unconditional.
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n], 0), cond, null_cond)
    out = model_fn(jnp.concatenate([xin, xin], 0), jnp.concatenate([t, t], 0), both)
    _, eps_c = param.to_x0_eps(out[:b], x, t, sde, prediction, sigma_data)
    _, eps_u = param.to_x0_eps(out[b:], x, t, sde, prediction, sigma_data)
    eps = eps_u + bcast(scale, x) * (eps_c - eps_u)
    return param.eps_to_score(eps, t, sde, x)

  return score


@functools.lru_cache(maxsize=None)
def _cfg_impl(sde, prediction: str, null_label: int, sigma_data: float):
  """CFG on class labels: the condition is labels [B], the null condition `null_label`."""
  core = _cfg_condition_impl(sde, prediction, sigma_data)

  def score(model_fn, labels, scale, x, t):
    b = x.shape[0]
    return core(model_fn, _per_example(labels, b), jnp.full((b,), null_label, jnp.int32),
                scale, x, t)

  return score


def classifier_free_guidance(model_fn: ModelFn, labels, scale, *, sde, prediction: str,
                             null_label: int, sigma_data: float = 0.5) -> ScoreFn:
  """The CFG score eps_u + w (eps_c - eps_u), from one network call per evaluation.

  Args:
    model_fn: the conditional network, (x [N, *dims], t [N], labels [N] int) -> raw output.
      It is called once per score evaluation with N = 2B (the doubled batch).
    labels: requested classes, int scalar or [B]; must not be the null label.
    scale: w, scalar or [B]. 1: conditional; 0: unconditional; > 1: guided.
    sde: the SDE the network was trained with (fixes alpha(t), sigma(t)).
    prediction: what the network predicts (parameterization.PREDICTIONS).
    null_label: the label index of the unconditional (null) token, e.g. num_classes.
    sigma_data: only for prediction "edm".
  Returns:
    score_fn(x [B, *dims], t [B]) -> [B, *dims]; a Partial when model_fn is one.
  """
  param.check_prediction(prediction)
  if int(null_label) != null_label or null_label < 0:
    raise ValueError(f"null_label must be a non-negative int, got {null_label!r}.")
  impl = _cfg_impl(sde, prediction, int(null_label), float(sigma_data))
  return _bind(impl, model_fn, _as_labels(labels), _as_scale(scale, "scale"))


@functools.lru_cache(maxsize=None)
def _condition_score_impl(sde, prediction: str, sigma_data: float):
  def score(model_fn, cond, x, t):
    net = lambda xx, tt: model_fn(xx, tt, cond)  # noqa: E731
    return param.score_fn_from_model(net, sde, prediction, sigma_data=sigma_data)(x, t)
  return score


@functools.lru_cache(maxsize=None)
def _label_score_impl(sde, prediction: str, sigma_data: float):
  core = _condition_score_impl(sde, prediction, sigma_data)

  def score(model_fn, labels, x, t):
    return core(model_fn, _per_example(labels, x.shape[0]), x, t)
  return score


def label_score_fn(model_fn: ModelFn, labels, *, sde, prediction: str,
                   sigma_data: float = 0.5) -> ScoreFn:
  """The score of a conditional network at fixed labels, one call on the plain batch.

  With labels = the null label this is the unconditional score (CFG at w = 0, at half the
  cost), the usual base of classifier guidance. A Partial when model_fn is one.
  """
  param.check_prediction(prediction)
  return _bind(_label_score_impl(sde, prediction, float(sigma_data)), model_fn,
               _as_labels(labels))


def classifier_free_guidance_on(model_fn: Callable, cond, null_cond, scale, *, sde,
                                prediction: str, sigma_data: float = 0.5) -> ScoreFn:
  """CFG for a condition that is any pytree of arrays [B, ...] (e.g. text features and their
  lengths), with the same convention and the same single call as classifier_free_guidance.

  Args:
    model_fn: (x [N, *dims], t [N], cond pytree of [N, ...]) -> raw output; called once per
      score evaluation with N = 2B on the doubled batch, cond = [cond; null_cond] leafwise.
    cond: the requested condition, a pytree of arrays with leading dimension B.
    null_cond: the null condition (the one dropout trained), same structure and shapes.
    scale: w, scalar or [B].
    sde, prediction, sigma_data: as classifier_free_guidance.
  Returns:
    score_fn(x [B, *dims], t [B]); a Partial when model_fn is one.
  """
  param.check_prediction(prediction)
  if jax.tree.structure(cond) != jax.tree.structure(null_cond):
    raise ValueError("cond and null_cond must have the same pytree structure, got "
                     f"{jax.tree.structure(cond)} and {jax.tree.structure(null_cond)}.")
  return _bind(_cfg_condition_impl(sde, prediction, float(sigma_data)), model_fn, cond,
               null_cond, _as_scale(scale, "scale"))


def condition_score_fn(model_fn: Callable, cond, *, sde, prediction: str,
                       sigma_data: float = 0.5) -> ScoreFn:
  """The score of a conditional network at a fixed condition pytree [B, ...] (one call on the
  plain batch): CFG at w = 1 at half the cost. A Partial when model_fn is one."""
  param.check_prediction(prediction)
  return _bind(_condition_score_impl(sde, prediction, float(sigma_data)), model_fn, cond)


# ---- classifier guidance -----------------------------------------------------------------
def _classifier_guided_score(score_fn, logits_fn, labels, scale, x, t):
  labels = _per_example(labels, x.shape[0])
  grad = classifier_log_prob_grad(logits_fn, x, t, labels)
  return score_fn(x, t) + bcast(scale, x) * grad


def classifier_log_prob_grad(logits_fn: LogitsFn, x: Array, t: Array, labels: Array) -> Array:
  """grad_x log p(y | x_t = x) per example, [B, *dims].

  Taken as the gradient of the batch sum, which is the per-example gradient because the
  classifier treats examples independently (no batch statistics; LayerNorm is per example).
  """
  def total_log_prob(x):
    log_p = jax.nn.log_softmax(logits_fn(x, t), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_p, labels[:, None], axis=-1))
  return jax.grad(total_log_prob)(x)


def classifier_guidance(score_fn: ScoreFn, logits_fn: LogitsFn, labels, scale) -> ScoreFn:
  """score(x, t) + s * grad_x log p(y | x_t = x).

  Args:
    score_fn: the base score (usually the unconditional model's), (x, t) -> [B, *dims].
    logits_fn: a noise-conditional classifier, (x [B, *dims], t [B]) -> logits [B, K].
    labels: requested classes, int scalar or [B].
    scale: s, scalar or [B]. 0: the base model; 1 with an unconditional base and an exact
      classifier: the exact conditional score.
  Returns:
    score_fn(x, t); a Partial when score_fn and logits_fn are Partials. Each evaluation
    costs one base-score call plus one classifier forward and backward pass.
  """
  return _bind(_classifier_guided_score, score_fn, logits_fn, _as_labels(labels),
               _as_scale(scale, "scale"))


def noisy_classifier_loss(logits_fn: LogitsFn, sde, x0: Array, labels: Array,
                          rng: Array) -> Array:
  """Cross-entropy of a noise-conditional classifier on x_t at t ~ U(eps, T), [B].

  x_t = alpha(t) x0 + sigma(t) noise, exactly the states the sampler will visit, so the
  classifier learns p(y | x_t) at every noise level (Dhariwal & Nichol 2021, Sec. 4).
  """
  t_rng, n_rng = jax.random.split(rng)
  b = x0.shape[0]
  t = jax.random.uniform(t_rng, (b,), jnp.float32, sde.eps, sde.T)
  alpha, sigma = sde.marginal(t)
  xt = bcast(alpha, x0) * x0 + bcast(sigma, x0) * jax.random.normal(n_rng, x0.shape, x0.dtype)
  log_p = jax.nn.log_softmax(logits_fn(xt, t), axis=-1)
  return -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


# ---- Flax modules as Partials --------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flax_apply(module):
  def apply(params, x, t, labels):
    return module.apply({"params": params}, x, t, labels, train=False)
  return apply


def flax_model_fn(module, params) -> ModelFn:
  """A score network as model_fn(x, t, labels) -> out, a Partial over its params.

  `module` is called as module.apply({"params": params}, x, t, labels, train=False) (the
  research.models contract); the Partial keeps one jit cache per module.
  """
  return Partial(_flax_apply(module), params)


def classifier_input(x: Array, t: Array, sde) -> Array:
  """x_t / sqrt(alpha^2 + sigma^2): what a noise-conditional classifier sees.

  For unit-scale data this keeps the input O(1) at every t (a no-op for VP, where
  alpha^2 + sigma^2 = 1; it matters for VE, whose x_t reaches sigma_max).
  """
  alpha, sigma = sde.marginal(t)
  return x * bcast(jax.lax.rsqrt(alpha**2 + sigma**2), x)


@functools.lru_cache(maxsize=None)
def _flax_classifier(module, sde):
  def logits(params, x, t):
    return module.apply({"params": params}, classifier_input(x, t, sde), sde.network_time(t),
                        train=False)
  return logits


def flax_classifier_fn(module, params, sde) -> LogitsFn:
  """A noise-conditional classifier module as logits_fn(x_t, t) -> [B, K], a Partial.

  `module` is called as module.apply({"params": params}, classifier_input(x, t, sde),
  sde.network_time(t), train=False) (research.models.noise_classifier's
  NoiseConditionalClassifier for vectors, research.models.classifier.Classifier with a
  time embedding for images).
  """
  return Partial(_flax_classifier(module, sde), params)


# ---- exact Gaussian-mixture model and classifier (component = class) ------------------------
def _gmm_logits(means, stds, log_weights, x, t, *, sde):
  """log w_k + log N(x; alpha mu_k, v_k I): log p(k | x_t) up to a per-example constant."""
  return mixture.posterior_logits(x, means, stds, log_weights, t, sde)


@functools.lru_cache(maxsize=None)
def _gmm_logits_impl(sde):
  return functools.partial(_gmm_logits, sde=sde)


def gmm_classifier_logits(gmm, sde) -> LogitsFn:
  """The exact noisy classifier of a Gaussian mixture: logits [B, K] with
  log_softmax(logits) = log p(component k | x_t) under the diffused mixture p_t.

  Args:
    gmm: research.diffusion.analytic.GaussianMixture (component k = class k).
    sde: the SDE that diffuses it.
  """
  return Partial(_gmm_logits_impl(sde), gmm.means, gmm.stds, gmm.log_weights)


@functools.lru_cache(maxsize=None)
def _gmm_model_impl(sde, prediction: str):
  def model(means, stds, log_weights, x, t, labels):
    flat = x.reshape(x.shape[0], -1)
    _, _, m, v = mixture.diffused(means, stds, t, sde)
    k = means.shape[0]
    # Mixture score: posterior-weighted component scores.
    r = jax.nn.softmax(_gmm_logits(means, stds, log_weights, x, t, sde=sde), axis=-1)
    comp = (m - flat[:, None, :]) / v[..., None]                  # [B, K, D]
    mix = jnp.einsum("bk,bkd->bd", r, comp)
    # Component score for labels < K; label K (null) is the mixture.
    idx = jnp.clip(labels, 0, k - 1)
    chosen = jnp.take_along_axis(comp, idx[:, None, None], axis=1)[:, 0]
    score = jnp.where((labels == k)[:, None], mix, chosen).reshape(x.shape)
    x0 = param.score_to_x0(score, t, sde, x)
    eps = param.score_to_eps(score, t, sde, x)
    return param.from_x0_eps(x0, eps, x, t, sde, prediction)
  return model


def gmm_conditional_model(gmm, sde, prediction: str = "eps") -> ModelFn:
  """A perfect conditional network for a Gaussian mixture, component k = class k.

  model_fn(x, t, labels) returns the `prediction` ("eps", "x0", "v" or "score") of the exact
  score of p_t(x | k) for labels k < K and of the whole mixture p_t(x) for the null label K.
  So CFG at w = 1 on it is the exact conditional score, at w = 0 the exact marginal score.
  """
  if prediction not in ("eps", "x0", "v", "score"):
    raise ValueError(f"prediction={prediction!r}; allowed: 'eps', 'x0', 'v', 'score' (edm "
                     "networks see a preconditioned input and are not modelled here).")
  return Partial(_gmm_model_impl(sde, prediction), gmm.means, gmm.stds, gmm.log_weights)


# ---- evaluation ----------------------------------------------------------------------------
def conditional_mode_metrics(samples, labels, means, std: float) -> Dict[str, float]:
  """How well guided samples land in the requested mixture component.

  Args:
    samples: [N, D] samples.
    labels: [N] the class (component) each sample was asked for.
    means: [K, D] component means.
    std: the components' true per-coordinate std.
  Returns:
    accuracy: share of samples whose nearest mean is the requested one;
    std_ratio: within-mode spread of those accurate samples, sqrt(mean over samples and
      coordinates of (x - mu_y)^2), over `std` (1 = the true conditional spread; < 1 means
      guidance has sharpened the mode);
    nonfinite: share of samples with a NaN/inf entry (counted as inaccurate).
  """
  x = np.asarray(samples, np.float64)
  y = np.asarray(labels).astype(np.int64)
  mu = np.asarray(means, np.float64)
  if x.ndim != 2 or y.shape != (x.shape[0],) or mu.ndim != 2 or mu.shape[1] != x.shape[1]:
    raise ValueError(f"need samples [N, D], labels [N], means [K, D]; got {x.shape}, "
                     f"{y.shape}, {mu.shape}.")
  finite = np.all(np.isfinite(x), axis=-1)
  d2 = np.sum((np.where(finite[:, None], x, 0.0)[:, None, :] - mu[None]) ** 2, axis=-1)
  hit = finite & (np.argmin(d2, axis=-1) == y)
  resid = x[hit] - mu[y[hit]]
  spread = float(np.sqrt(np.mean(resid**2))) if hit.any() else float("nan")
  return {"accuracy": float(np.mean(hit)), "std_ratio": spread / float(std),
          "nonfinite": float(1.0 - np.mean(finite))}
