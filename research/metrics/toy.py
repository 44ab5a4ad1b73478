"""Sample-quality metrics for toy data with a known density.

All functions take float arrays [N, D] and return Python floats / dicts (host side: they run
once per evaluation on at most ~1e5 points).
"""
from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np


def log_density_gap(log_prob_fn, samples, reference) -> float:
  """mean log p(samples) - mean log p(fresh data), in nats. 0 is ideal; negative = off-manifold."""
  return float(jnp.mean(log_prob_fn(samples)) - jnp.mean(log_prob_fn(reference)))


def nearest_mode(x, means) -> jnp.ndarray:
  """Index of the nearest mixture mean for each point [N]."""
  d = jnp.sum((x[:, None, :] - means[None]) ** 2, -1)
  return jnp.argmin(d, -1)


def mixture_metrics(samples, means, std: float, weights=None) -> Dict[str, float]:
  """Mode coverage and spread of samples from an isotropic Gaussian mixture.

  Returns:
    mode_share_k: the fraction of samples nearest to mean k;
    mode_weight_error: max_k |share_k - w_k|;
    modes_covered: modes holding at least a quarter of their weight;
    std_ratio: within-mode std (pooled over modes and coordinates, around the true means)
      divided by the true std (1 is ideal).
  """
  samples = jnp.asarray(samples)
  k = means.shape[0]
  weights = jnp.full((k,), 1.0 / k) if weights is None else jnp.asarray(weights)
  idx = nearest_mode(samples, means)
  share = jnp.bincount(idx, length=k) / samples.shape[0]
  resid = samples - means[idx]
  std_hat = jnp.sqrt(jnp.mean(resid**2))
  out = {f"mode_share_{i}": float(share[i]) for i in range(k)}
  out.update(
      mode_weight_error=float(jnp.max(jnp.abs(share - weights))),
      modes_covered=int(jnp.sum(share >= 0.25 * weights)),
      std_ratio=float(std_hat / std),
  )
  return out


def sliced_wasserstein(x, y, rng, num_projections: int = 256) -> float:
  """Sliced 2-Wasserstein distance between two equal-size point clouds [N, D]."""
  n = min(x.shape[0], y.shape[0])
  x, y = jnp.asarray(x[:n]), jnp.asarray(y[:n])
  dirs = jax.random.normal(rng, (x.shape[1], num_projections))
  dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
  px = jnp.sort(x @ dirs, axis=0)
  py = jnp.sort(y @ dirs, axis=0)
  return float(jnp.sqrt(jnp.mean((px - py) ** 2)))


def toy_sample_metrics(dataset, samples, rng, num_reference: int = 10000,
                       num_projections: int = 256) -> Dict[str, float]:
  """Every metric that applies to `dataset` (a research.data.toy distribution)."""
  samples = jnp.asarray(samples, jnp.float32)
  r_rng, p_rng = jax.random.split(rng)
  reference, _ = dataset.sample(r_rng, num_reference)
  out: Dict[str, float] = {}
  finite = jnp.all(jnp.isfinite(samples), axis=-1)
  out["nonfinite_fraction"] = float(1.0 - jnp.mean(finite))
  samples = samples[np.asarray(finite)]
  if samples.shape[0] == 0:
    return out
  if getattr(dataset, "has_density", False):
    # On the host: -inf log-densities (outside a bounded support) must not reach jax ops,
    # which --debug's NaN checks would stop on.
    lp = np.asarray(dataset.log_prob(samples), np.float64)
    in_support = np.isfinite(lp)
    out["support_fraction"] = float(np.mean(in_support))
    if bool(np.all(in_support)):
      ref_lp = np.asarray(dataset.log_prob(reference), np.float64)
      out["logp_gap"] = float(np.mean(lp) - np.mean(ref_lp))
    if bool(np.any(in_support)):
      out["logp_mean"] = float(np.mean(lp[in_support]))  # over the samples in the support
  if hasattr(dataset, "means") and hasattr(dataset, "std"):
    out.update(mixture_metrics(samples, dataset.means, dataset.std))
  out["sliced_wasserstein"] = sliced_wasserstein(samples, reference, p_rng, num_projections)
  out["sliced_wasserstein_floor"] = sliced_wasserstein(
      dataset.sample(jax.random.fold_in(r_rng, 1), num_reference)[0], reference, p_rng,
      num_projections)
  return out
