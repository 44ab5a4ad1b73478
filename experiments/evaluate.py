"""--mode=evaluate: sample metrics of the latest checkpoint plus the test log-likelihood.

Sample metrics come from experiments.sample.sample_and_evaluate (split "sample"). The
likelihood goes to metrics.jsonl with split "eval":

  toy data     nll = -mean log q(x) in nats on fresh samples x ~ p of the toy distribution,
               next to the true entropy H(p) = -mean log p(x) on the same samples (exact
               log_prob, where the distribution has one). Their paired difference estimates
               KL(p || q) >= 0 and has a much smaller standard error than either term.
  image data   bits/dim of the 8-bit test split under uniform dequantisation, through THE one
               helper research.diffusion.bpd (nll in nats per example, bpd).

Which likelihood, by what the objective offers:
  * `sde` and `score_fn(params, labels)` (diffusion): the probability-flow ODE,
    research.diffusion.likelihood.log_likelihood;
  * `log_prob(params, x, labels)` (coupling flows): the exact density;
  * `log_likelihood(params, x, rng, labels=None) -> (logp [B], info)` (e.g. flow matching
    through research.diffusion.likelihood.ode_log_likelihood): that;
  * none of these: sample metrics only, with a warning.

Settings live in config.eval.likelihood (see LIKELIHOOD_DEFAULTS; a config without that
block gets the defaults).
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import builders
from experiments import sample as sample_lib
from experiments import workdir as wd
from experiments.validate import ConfigError

# config.eval.likelihood fields and their defaults (proposed for configs/base.py).
LIKELIHOOD_DEFAULTS = {
    "enabled": True,        # compute the test likelihood in --mode=evaluate
    "num_examples": 2000,   # toy: fresh test samples; images: first N of the test split (0 = all)
    "batch_size": 500,      # examples per ODE solve (the batch shares the adaptive step size)
    "estimator": "auto",    # auto (exact trace for D <= 32, else hutchinson) | exact | hutchinson
    "num_probes": 1,        # hutchinson: probes per example, averaged
    "probe": "rademacher",  # hutchinson: rademacher | gaussian
    "rtol": 1e-5,           # ODE solver relative tolerance
    "atol": 1e-5,           # ODE solver absolute tolerance
    "t_min": 1e-5,          # start of the ODE solve (data side)
    "solver": "dopri5",     # dopri5 | tsit5 (dopri5 took fewer steps in our benchmark)
    "split": "test",        # images: the TFDS split evaluated
}
_EXACT_MAX_DIM = 32


def likelihood_settings(config) -> Dict[str, Any]:
  """config.eval.likelihood merged over the defaults, validated (raises ConfigError)."""
  from research.diffusion import likelihood as ll
  given = {}
  if "likelihood" in config.eval:
    given = dict(config.eval.likelihood)
  unknown = sorted(set(given) - set(LIKELIHOOD_DEFAULTS))
  if unknown:
    raise ConfigError(f"config.eval.likelihood has unknown field(s) {unknown}; allowed: "
                      f"{sorted(LIKELIHOOD_DEFAULTS)}.")
  s = {**LIKELIHOOD_DEFAULTS, **given}

  def fail(field, allowed):
    raise ConfigError(f"config.eval.likelihood.{field}={s[field]!r} is not allowed: {allowed}.")

  if not isinstance(s["enabled"], bool):
    fail("enabled", "True or False")
  for field, lo in (("num_examples", 0), ("batch_size", 1), ("num_probes", 1)):
    v = s[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      fail(field, f"an integer >= {lo}")
  for field in ("rtol", "atol", "t_min"):
    v = s[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
      fail(field, "a number in (0, 1)")
  if s["estimator"] not in ("auto",) + ll.ESTIMATORS:
    fail("estimator", "one of 'auto', " + ", ".join(map(repr, ll.ESTIMATORS)))
  if s["probe"] not in ll.PROBES:
    fail("probe", "one of " + ", ".join(map(repr, ll.PROBES)))
  if s["solver"] not in ll.SOLVERS:
    fail("solver", "one of " + ", ".join(map(repr, ll.SOLVERS)))
  if not isinstance(s["split"], str) or not s["split"]:
    fail("split", "a TFDS split name such as 'test'")
  return s


def _mean_se(v: np.ndarray):
  v = np.asarray(v, np.float64)
  se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
  return float(v.mean()), se


class _ModelLogProb:
  """log q(x) [B] in nats for one objective and its parameters, batch by batch."""

  def __init__(self, config, objective, params, settings, dim: int):
    self.objective, self.params, self.s = objective, params, settings
    self.kind = None
    self.nfe = []
    if hasattr(objective, "sde") and hasattr(objective, "score_fn"):
      self.kind = "probability_flow_ode"
      est = settings["estimator"]
      self.estimator = est if est != "auto" else ("exact" if dim <= _EXACT_MAX_DIM
                                                  else "hutchinson")

      # One function object for every batch; params and labels ride in a Partial as traced
      # leaves, so the solve compiles once per batch shape (not per batch or checkpoint).
      def score(params, labels, x, t):
        return objective.score_fn(params, labels)(x, t)
      self._score = score
    elif hasattr(objective, "log_prob"):
      self.kind = "exact_density"
      self.estimator = "exact"
      self._log_prob = jax.jit(objective.log_prob)
    elif hasattr(objective, "log_likelihood"):
      self.kind = "objective_log_likelihood"
      self.estimator = settings["estimator"]

  def __call__(self, x, labels, rng):
    if self.kind == "probability_flow_ode":
      from research.diffusion import likelihood as ll
      score_fn = jax.tree_util.Partial(self._score, self.params, labels)
      s = self.s
      logp, info = ll.log_likelihood(score_fn, self.objective.sde, x, rng,
                                     estimator=self.estimator, num_probes=s["num_probes"],
                                     probe=s["probe"], rtol=s["rtol"], atol=s["atol"],
                                     t_min=s["t_min"], solver=s["solver"])
      self.nfe.append(info["nfe"])
      return logp
    if self.kind == "exact_density":
      return self._log_prob(self.params, x, labels)
    logp, info = self.objective.log_likelihood(self.params, x, rng, labels=labels)
    self.nfe.append(int(info.get("nfe", 0)))
    return logp


def _batched_log_prob(model: _ModelLogProb, x: np.ndarray, labels, batch_size: int, rng,
                      transform=None) -> np.ndarray:
  out = []
  for i, start in enumerate(range(0, x.shape[0], batch_size)):
    xb = jnp.asarray(x[start:start + batch_size])
    lb = None if labels is None else jnp.asarray(labels[start:start + batch_size])
    key = jax.random.fold_in(rng, i)
    if transform is not None:
      xb = transform(jax.random.fold_in(key, 1), xb)
    out.append(np.asarray(model(xb, lb, key), np.float64))
  return np.concatenate(out)


def _finite_summary(prefix: str, values: np.ndarray, metrics: Dict[str, Any]) -> np.ndarray:
  finite = np.isfinite(values)
  metrics[f"{prefix}nonfinite"] = float(1.0 - finite.mean())
  return finite


def toy_likelihood(config, spec, model: _ModelLogProb, settings, rng) -> Dict[str, Any]:
  """NLL on fresh samples of the toy distribution, next to its true entropy."""
  n = settings["num_examples"] or 2000
  x, labels = spec.toy.sample(jax.random.fold_in(rng, 0), n)
  x = np.asarray(x, np.float32)
  cond = bool(config.data.conditional)
  labels = np.asarray(labels) if (cond and labels is not None) else None
  logq = _batched_log_prob(model, x, labels, settings["batch_size"], jax.random.fold_in(rng, 1))
  metrics: Dict[str, Any] = {"likelihood_method": model.kind,
                             "likelihood_estimator": model.estimator,
                             "likelihood_num": int(n), "conditional": cond}
  ok = _finite_summary("nll_", logq, metrics)
  metrics["nll"], metrics["nll_stderr"] = _mean_se(-logq[ok])
  if getattr(spec.toy, "has_density", False):
    if cond and hasattr(spec.toy, "component_log_prob"):
      logp = np.asarray(spec.toy.component_log_prob(jnp.asarray(x), jnp.asarray(labels)),
                        np.float64)  # H(x | y): the conditional model's target
    else:
      logp = np.asarray(spec.toy.log_prob(jnp.asarray(x)), np.float64)
    ok = ok & np.isfinite(logp)
    metrics["entropy"], metrics["entropy_stderr"] = _mean_se(-logp[ok])
    metrics["nll_minus_entropy"], metrics["nll_minus_entropy_stderr"] = _mean_se(
        logp[ok] - logq[ok])
  return metrics


def image_likelihood(config, spec, model: _ModelLogProb, settings, rng) -> Dict[str, Any]:
  """Bits/dim of the 8-bit evaluation split, through research.diffusion.bpd."""
  from research.data import pipeline
  from research.diffusion import bpd
  data_dir = config.data.data_dir or pipeline.default_data_dir()
  source = pipeline.open_source(config.data.name, settings["split"], data_dir,
                                image_size=int(config.data.image_size))
  images, labels = pipeline.load_arrays(source)
  if settings["num_examples"]:
    images = images[:settings["num_examples"]]
    labels = None if labels is None else labels[:settings["num_examples"]]
  if not config.data.conditional:
    labels = None
  x = pipeline.to_model_space(images)  # k / 127.5 - 1: data_range "[-1,1]"
  data_range = getattr(spec, "data_range", "[-1,1]")
  num_dims = int(np.prod(x.shape[1:]))
  dequant = lambda key, xb: bpd.dequantize(key, xb, data_range=data_range)
  logq = _batched_log_prob(model, x, labels, settings["batch_size"], rng, transform=dequant)
  metrics: Dict[str, Any] = {"likelihood_method": model.kind,
                             "likelihood_estimator": model.estimator,
                             "likelihood_num": int(x.shape[0]), "split_evaluated":
                             settings["split"], "conditional": bool(config.data.conditional)}
  ok = _finite_summary("nll_", logq, metrics)
  b = np.asarray(bpd.bits_per_dim(jnp.asarray(logq[ok]), num_dims, data_range=data_range),
                 np.float64)
  nll = np.asarray(bpd.discrete_nll(jnp.asarray(logq[ok]), num_dims, data_range=data_range),
                   np.float64)
  metrics["bpd"], metrics["bpd_stderr"] = _mean_se(b)
  metrics["nll"], metrics["nll_stderr"] = _mean_se(nll)
  return metrics


def compute_test_likelihood(config, spec, objective, params, settings,
                            rng) -> Optional[Dict[str, Any]]:
  """The "eval" metrics for one set of parameters, or None where no likelihood exists."""
  model = _ModelLogProb(config, objective, params, settings, int(np.prod(spec.dims)))
  if model.kind is None:
    logging.warning("objective %r has no likelihood (no score/SDE, log_prob or "
                    "log_likelihood); --mode=evaluate wrote sample metrics only.",
                    config.objective)
    return None
  t0 = time.perf_counter()
  if spec.kind == "toy":
    metrics = toy_likelihood(config, spec, model, settings, rng)
  else:
    metrics = image_likelihood(config, spec, model, settings, rng)
  metrics["likelihood_seconds"] = time.perf_counter() - t0
  if model.nfe:
    metrics["likelihood_nfe"] = float(np.mean(model.nfe))
  if model.kind == "probability_flow_ode":
    metrics.update(likelihood_rtol=settings["rtol"], likelihood_atol=settings["atol"],
                   likelihood_t_min=settings["t_min"])
  return metrics


def evaluate(config, workdir: str) -> Dict[str, Any]:
  """Sample metrics (split "sample") and test likelihood (split "eval") of the latest checkpoint.

  Returns the sample metrics updated with the eval metrics.
  """
  settings = likelihood_settings(config)  # fails before anything is built or compiled
  spec = builders.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  state = sample_lib.restore_trained(config, workdir, objective, spec)
  metrics = dict(sample_lib.sample_and_evaluate(config, workdir, state))
  if not settings["enabled"]:
    return metrics
  params = state.ema_params if config.sample.use_ema else state.params
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 5)
  eval_metrics = compute_test_likelihood(config, spec, objective, params, settings, rng)
  if eval_metrics is None:
    return metrics
  wd.MetricWriter(workdir).write(int(state.step), "eval", eval_metrics)
  logging.info("Eval (step %d): %s", int(state.step),
               {k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                for k, v in eval_metrics.items()})
  metrics.update(eval_metrics)
  return metrics
