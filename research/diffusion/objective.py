"""Diffusion as a training objective: the glue between a score network, an SDE, a loss and samplers.

It implements the objective protocol (research/objective.py): init, loss, sample,
check_options, log_likelihood (the probability-flow ODE), plus the diffusion-only
  score_fn(params, labels=None) -> score_fn(x, t)
that guidance and the likelihood build on. Every sampler of research.diffusion.samplers
works (`sampler_names`); both guidance kinds apply.
A batch is a dict {"x": float32 [B, *dims], "label": int32 [B] (optional)}.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import objective as objective_lib
from research.diffusion import likelihood as likelihood_lib
from research.diffusion import losses as losses_lib
from research.diffusion import parameterization
from research.diffusion import samplers as samplers_lib


def check_sampler_options(options: Dict[str, Any], sde, steps: int) -> None:
  """options = {"sampler": name, **that sampler's options}; raises ValueError if not allowed."""
  opts = dict(options)
  name = opts.pop("sampler", None)
  if name not in samplers_lib.available():
    raise ValueError(f"sampler={name!r} is not allowed: one of "
                     + ", ".join(repr(n) for n in samplers_lib.available()) + ".")
  samplers_lib.get(name).resolve(opts, sde, steps)


def pf_ode_log_likelihood(score_fn, sde, x, rng, **settings):
  """(logp [B], info) through the probability-flow ODE, info naming method and estimator."""
  logp, info = likelihood_lib.log_likelihood(score_fn, sde, x, rng, **settings)
  info = dict(info, method="probability_flow_ode",
              estimator=settings.get("estimator", "exact"))
  return logp, info


@dataclasses.dataclass(frozen=True)
class DiffusionObjective:
  """A score-based diffusion model.

  Attributes:
    model: Linen module called as model(x, t, labels=None, train=False).
    sde: an SDE from research.diffusion.sde.
    loss_name: research.diffusion.losses name ("ddpm", "dsm", "v", "edm").
    prediction: what the network predicts ("eps", "x0", "v", "score").
    loss_options: extra keyword options for the loss (e.g. weighting).
    conditional: feed batch["label"] to the network.
    p_uncond: probability of replacing a label by the null token during training (CFG).
    num_classes: number of classes; label `num_classes` is the null token.
    data_shape: shape of one example (what `sample` draws).
  """
  model: nn.Module
  sde: Any
  loss_name: str = "ddpm"
  prediction: str = "eps"
  loss_options: Tuple[Tuple[str, Any], ...] = ()
  conditional: bool = False
  p_uncond: float = 0.0
  num_classes: int = 0
  data_shape: Tuple[int, ...] = ()

  guidance_kinds = objective_lib.GUIDANCE_KINDS
  has_likelihood = True

  @property
  def sampler_names(self) -> Tuple[str, ...]:
    return tuple(samplers_lib.available())

  def __post_init__(self):
    object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
    # Build the loss eagerly so a bad loss name/option fails before any compile.
    object.__setattr__(self, "_loss_fn", losses_lib.get_loss_fn(
        self.loss_name, self.sde, prediction=self.prediction, **dict(self.loss_options)))

  # -- training ------------------------------------------------------------------------------
  def init(self, rng, batch: Dict[str, jnp.ndarray]):
    x = batch["x"]
    t = jnp.full((x.shape[0],), 0.5, jnp.float32)
    labels = batch.get("label") if self.conditional else None
    return self.model.init({"params": rng, "dropout": rng}, x, t, labels, train=False)["params"]

  def _labels(self, batch, rng):
    if not self.conditional:
      return None
    labels = batch["label"].astype(jnp.int32)
    if self.p_uncond > 0:
      drop = jax.random.bernoulli(rng, self.p_uncond, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)
    return labels

  def loss(self, params, batch, rng):
    l_rng, d_rng, drop_rng = jax.random.split(rng, 3)
    labels = self._labels(batch, l_rng)

    def model_fn(x, t):
      return self.model.apply({"params": params}, x, self.sde.network_time(t), labels,
                              train=True, rngs={"dropout": drop_rng})

    per_example = self._loss_fn(model_fn, batch["x"], d_rng)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss}

  # -- sampling ------------------------------------------------------------------------------
  def model_fn(self, params, labels: Optional[jnp.ndarray] = None):
    """The network as model_fn(x, t) -> raw output, in eval mode, with fixed labels."""
    def fn(x, t):
      lab = labels
      if self.conditional and lab is None:
        lab = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      return self.model.apply({"params": params}, x, self.sde.network_time(t),
                              lab if self.conditional else None, train=False)
    return fn

  @property
  def sampling_prediction(self) -> str:
    """What the raw network output means at sampling time ("edm" for the EDM loss, whose
    network sees preconditioned inputs; otherwise `prediction`)."""
    return losses_lib.sampling_prediction(self.loss_name, self.prediction)

  @property
  def sigma_data(self) -> float:
    return float(dict(self.loss_options).get("sigma_data", 0.5))

  def _score(self, params, labels, x, t):
    return parameterization.score_fn_from_model(
        self.model_fn(params, labels), self.sde, self.sampling_prediction,
        sigma_data=self.sigma_data)(x, t)

  def score_fn(self, params, labels: Optional[jnp.ndarray] = None):
    """score_fn(x, t) as a jax.tree_util.Partial: params and labels are traced leaves, so the
    samplers compile once per shape and reuse that compilation for new parameters."""
    return jax.tree_util.Partial(self._score, params, labels)

  def check_options(self, options: Dict[str, Any], steps: int) -> None:
    check_sampler_options(options, self.sde, steps)

  def sample(self, params, rng, num: int, *, labels=None, sampler: str = "ddpm",
             steps: int = 1000, **options):
    """`num` samples [num, *data_shape] with `sampler` (labels [num] for a conditional model)."""
    if not self.data_shape:
      raise ValueError("DiffusionObjective.sample needs data_shape (the shape of one example).")
    score_fn = self.score_fn(params, labels)
    return samplers_lib.sample(sampler, score_fn, self.sde, (num, *self.data_shape), rng,
                               steps=steps, **options)

  def log_likelihood(self, params, x, rng, *, labels=None, **settings):
    """log p(x) [B] in nats through the probability-flow ODE (research.diffusion.likelihood)."""
    return pf_ode_log_likelihood(self.score_fn(params, labels), self.sde, x, rng, **settings)
