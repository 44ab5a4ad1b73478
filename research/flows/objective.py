"""Maximum-likelihood training of coupling flows: the objective the trainer sees.

It implements the objective protocol (research/objective.py):
  init(rng, batch) -> params
  loss(params, batch, rng) -> (scalar loss, metrics dict)
  sample(params, rng, num, *, labels=None, temperature=1.0) -> (x [num, *dims], info)
      one inverse pass: no sampler names, `temperature` its only option
  check_options(options, steps);  log_likelihood(params, x, rng, *, labels=None) (exact)
  log_prob(params, x, labels=None) -> [B]
A batch is a dict {"x": float32 [B, *dims], "label": int32 [B] (optional)}.

What the data is assumed to be:
  * toy / continuous data (`dequantize=False`): x is used as is; the loss is -log p(x) in nats.
  * 8-bit images (`dequantize=True`): x = k / 127.5 - 1 in [-1, 1] for integer pixels k in
    0..255 (data_range "[-1,1]"; "[0,1]" means x = k / 255). The loss dequantises x with uniform
    noise from `rng` and is the negative log-likelihood of the *discrete* data in nats per
    example, -log p(y) + D log(256 / 2) (research.diffusion.bpd); the "bpd" metric is that
    divided by D log 2. `log_prob` is the continuous model density at model-space x.
All methods are pure and jit-able; RNG is explicit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion import bpd as bpd_lib
from research.diffusion.likelihood import check_finite_rows
from research.flows import bijectors
from research.flows import models

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class FlowObjective:
  """A normalizing flow with a standard-normal prior, trained by maximum likelihood.

  Attributes:
    flow: a Linen flow with forward(x, labels) / inverse(z, labels) -> (., logdet [B]).
    data_shape: shape of one example, e.g. (2,) or (8, 8, 1).
    dequantize: 8-bit image data: uniform dequantisation and bits/dim (see module docstring).
    data_range: "[-1,1]" or "[0,1]", the range 8-bit data was mapped to.
    num_bins: 256 for 8-bit data.
    num_classes: > 0 for a class-conditional flow (batch["label"] is then required).
  """
  flow: nn.Module
  data_shape: Tuple[int, ...]
  dequantize: bool = False
  data_range: str = "[-1,1]"
  num_bins: int = 256
  num_classes: int = 0

  sampler_names = ()
  guidance_kinds = ()
  has_likelihood = True

  def __post_init__(self):
    object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
    object.__setattr__(self, "_log_prob_jit", jax.jit(self.log_prob))
    if self.dequantize:
      bpd_lib.log_scale_per_dim(data_range=self.data_range, num_bins=self.num_bins)  # validates

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.data_shape, dtype=np.int64))

  def _check_x(self, x: Array, name: str = "x"):
    if tuple(x.shape[1:]) != self.data_shape:
      raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B, *{self.data_shape}].")

  def _labels(self, batch: Dict[str, Array]) -> Optional[Array]:
    if not self.num_classes:
      return None  # an unconditional flow ignores labels that come with the data
    if "label" not in batch:
      raise ValueError(f"the flow is class-conditional (num_classes={self.num_classes}); "
                       "batch['label'] is required.")
    return batch["label"].astype(jnp.int32)

  def _dequantize(self, rng, x: Array) -> Array:
    if not self.dequantize:
      return x
    return bpd_lib.dequantize(rng, x, data_range=self.data_range, num_bins=self.num_bins)

  # -- training ------------------------------------------------------------------------------
  def init(self, rng: jax.Array, batch: Dict[str, Array]):
    """Parameters, with every ActNorm initialised from `batch` as it flows through the layers."""
    x = batch["x"]
    self._check_x(x, "batch['x']")
    p_rng, d_rng = jax.random.split(rng)
    x = self._dequantize(d_rng, x)
    return self.flow.init({"params": p_rng}, x, self._labels(batch), method="forward")["params"]

  def log_prob(self, params, x: Array, labels: Optional[Array] = None) -> Array:
    """log p(x) [B] in nats under the flow (continuous density in model space)."""
    self._check_x(x)
    z, logdet = self.flow.apply({"params": params}, x, labels, method="forward")
    return bijectors.standard_normal_log_prob(z) + logdet

  def loss(self, params, batch: Dict[str, Array], rng: jax.Array):
    """Mean negative log-likelihood in nats per example, with metrics.

    Metrics: "loss" (= "nll"), "logdet" (mean log|det| of the flow), and for 8-bit images
    "bpd" (bits/dim of the discrete data, an upper bound through dequantisation).
    """
    x = self._dequantize(rng, batch["x"])
    self._check_x(x, "batch['x']")
    z, logdet = self.flow.apply({"params": params}, x, self._labels(batch), method="forward")
    logp = bijectors.standard_normal_log_prob(z) + logdet
    if self.dequantize:
      nll = bpd_lib.discrete_nll(logp, self.num_dims, data_range=self.data_range,
                                 num_bins=self.num_bins)
    else:
      nll = -logp
    loss = jnp.mean(nll)
    metrics = {"loss": loss, "nll": loss, "logdet": jnp.mean(logdet)}
    if self.dequantize:
      metrics["bpd"] = bpd_lib.nll_to_bpd(loss, self.num_dims)
    return loss, metrics

  def log_likelihood(self, params, x: Array, rng: jax.Array, *,
                     labels: Optional[Array] = None, **settings):
    """(log p(x) [B] in nats, info): the exact density; ODE `settings` do not apply."""
    del rng, settings
    check_finite_rows(x)
    return self._log_prob_jit(params, x, labels), {"nfe": 0, "method": "exact_density",
                                                    "estimator": "exact"}

  # -- sampling ------------------------------------------------------------------------------
  def check_options(self, options: Dict[str, Any], steps: int) -> None:
    """One inverse pass takes `temperature` (> 0) and nothing else; `steps` does not apply."""
    del steps
    unknown = sorted(set(options) - {"temperature"})
    t = options.get("temperature", 1.0)
    if unknown or isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
      raise ValueError("a coupling flow samples in one inverse pass and takes '' or "
                       "'temperature=T' with T > 0"
                       + (f" (unknown option(s) {unknown})" if unknown else ""))

  def sample(self, params, rng: jax.Array, num: int, *, labels: Optional[Array] = None,
             temperature: float = 1.0):
    """Draws z ~ N(0, temperature^2 I) and maps it through the inverse flow.

    Args:
      params: flow parameters.
      rng: PRNG key.
      num: number of samples (static).
      labels: int [num] class labels for a conditional flow; None draws them uniformly.
        Must be None for an unconditional flow.
      temperature: prior scale (Glow); < 1 trades diversity for typicality.

    Returns:
      x [num, *data_shape] in data space (8-bit images clipped to the data range) and an info
      dict with "temperature" and, for a conditional flow, "labels".
    """
    z_rng, l_rng = jax.random.split(rng)
    info: Dict[str, Any] = {"temperature": temperature}
    if self.num_classes:
      if labels is None:
        labels = jax.random.randint(l_rng, (num,), 0, self.num_classes)
      labels = jnp.asarray(labels, jnp.int32)
      if labels.shape != (num,):
        raise ValueError(f"labels has shape {labels.shape}; expected [num]=({num},).")
      info["labels"] = labels
    elif labels is not None:
      raise ValueError("labels were given but the flow is unconditional (num_classes=0); "
                       "pass labels=None.")
    z = temperature * jax.random.normal(z_rng, (num, *self.data_shape), jnp.float32)
    x, _ = self.flow.apply({"params": params}, z, labels, method="inverse")
    if self.dequantize:
      lo, hi = bpd_lib.DATA_RANGES[self.data_range]
      x = jnp.clip(x, lo, hi)
    return x, info


def make_objective(kind: str, data_shape: Sequence[int], *, image: bool, num_layers: int = 8,
                   hidden: int = 128, depth: int = 2, num_scales: int = 2,
                   scale_bound: float = 2.0, num_classes: int = 0, remat: bool = False,
                   data_range: str = "[-1,1]", actnorm: Optional[bool] = None,
                   num_bins: int = 8, tail_bound: float = 5.0) -> FlowObjective:
  """A FlowObjective around models.make_flow(kind, ...); image=True means 8-bit image data."""
  flow = models.make_flow(kind, data_shape, num_layers=num_layers, hidden=hidden, depth=depth,
                          num_scales=num_scales, scale_bound=scale_bound,
                          num_classes=num_classes, remat=remat, actnorm=actnorm,
                          num_bins=num_bins, tail_bound=tail_bound)
  return FlowObjective(flow=flow, data_shape=tuple(data_shape), dequantize=image,
                       data_range=data_range, num_classes=num_classes)
