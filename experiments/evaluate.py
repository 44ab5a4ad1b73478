"""--mode=evaluate: sample metrics of the latest checkpoint plus the test log-likelihood.

Sample metrics come from experiments.sample.sample_and_evaluate (split "sample"). The
likelihood goes to metrics.jsonl with split "eval":

  toy data     nll = -mean log q(x) in nats on fresh samples x ~ p of the toy distribution,
               next to the true entropy H(p) = -mean log p(x) on the same samples (exact
               log_prob, where the distribution has one). Their paired difference estimates
               KL(p || q) >= 0 and has a much smaller standard error than either term.
  image data   bits/dim of the 8-bit test split under uniform dequantisation, through THE one
               helper research.diffusion.bpd (nll in nats per example, bpd).

The likelihood is the objective's own (`objective.log_likelihood`, where
`objective.has_likelihood`): the probability-flow ODE for diffusion and flow matching
(research.diffusion.likelihood), the exact density for coupling flows; without one, sample
metrics only, with a warning.

Settings live in config.eval.likelihood (defaults and comments in configs/base.py;
validate.likelihood_settings merges and checks them).
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
from experiments import data as data_lib
from experiments import mesh as mesh_lib
from experiments import sample as sample_lib
from experiments import summaries
from experiments import workdir as wd
from experiments.options import NonFiniteError
from experiments.state import restore_trained
from experiments.validate import likelihood_settings  # noqa: F401  (re-exported)
from research.data import pipeline
from research.diffusion import bpd

_EXACT_MAX_DIM = 32
_ODE_SETTINGS = ("estimator", "num_probes", "probe", "rtol", "atol", "t_min", "solver")


def _mean_se(v: np.ndarray):
  v = np.asarray(v, np.float64)
  se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
  return float(v.mean()), se


class _ModelLogProb:
  """log q(x) [B] in nats for one objective and its parameters, batch by batch."""

  def __init__(self, objective, params, settings, dim: int):
    self.objective, self.params = objective, params
    est = settings["estimator"]
    if est == "auto":
      est = "exact" if dim <= _EXACT_MAX_DIM else "hutchinson"
    self.settings = {k: settings[k] for k in _ODE_SETTINGS}
    self.settings["estimator"] = est
    self.kind, self.estimator = None, est
    self.nfe = []
    self.mesh = mesh_lib.mesh_of(params)  # batches are split over the devices of the state

  def __call__(self, x, labels, rng):
    mesh = self.mesh
    if mesh is not None and x.shape[0] % mesh_lib.batch_size(mesh) == 0:
      x = jax.device_put(x, mesh_lib.batch_sharding(mesh))
      if labels is not None:
        labels = jax.device_put(labels, mesh_lib.batch_sharding(mesh))
    with mesh_lib.use(mesh):
      logp, info = self.objective.log_likelihood(self.params, x, rng, labels=labels,
                                                 **self.settings)
    self.kind, self.estimator = info["method"], info["estimator"]
    if info.get("nfe"):
      self.nfe.append(info["nfe"])
    return mesh_lib.gather(logp)


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
  data_dir = data_lib.data_dir(config)
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
  if not objective.has_likelihood:
    logging.warning("objective %r has no likelihood; --mode=evaluate wrote sample metrics only.",
                    builders.describe(config))
    return None
  model = _ModelLogProb(objective, params, settings, int(np.prod(spec.dims)))
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
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec, workdir)
  state = restore_trained(config, workdir, objective, spec)
  metrics = dict(sample_lib.sample_and_evaluate(config, workdir, state))
  if not settings["enabled"]:
    return metrics
  params = state.ema_params if config.sample.use_ema else state.params
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 5)
  eval_metrics = compute_test_likelihood(config, spec, objective, params, settings, rng)
  if eval_metrics is None:
    return metrics
  with summaries.writer(config, workdir) as writer:
    writer.write(int(state.step), "eval", eval_metrics)
  logging.info("Eval (step %d): %s", int(state.step),
               {k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                for k, v in eval_metrics.items()})
  metrics.update(eval_metrics)
  if eval_metrics.get("nll_nonfinite", 0.0) > 0:
    raise NonFiniteError(
        f"the test log-likelihood is NaN or inf on {eval_metrics['nll_nonfinite']:.1%} of the "
        f"examples (checkpoint step {int(state.step)}; metrics.jsonl has the rest). Tighten "
        "config.eval.likelihood.rtol/atol or raise t_min.")
  return metrics
