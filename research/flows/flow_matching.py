"""Conditional flow matching with the straight (OT) path, a.k.a. rectified flow.

Path and loss (Lipman et al. 2023 with sigma_min = 0; Liu et al. 2023): for data x_0 and
noise e ~ N(0, I), x_t = (1 - t) x_0 + t e, whose conditional velocity is e - x_0. A network
v(x, t) regresses it:  L = E_{t ~ U[0,1], x_0, e} || v(x_t, t) - (e - x_0) ||^2.

Sampling and likelihood go through the shared diffusion code, which speaks in score
functions of a linear SDE. The straight path *is* such a process (`StraightPath`):
alpha(t) = 1 - t, sigma(t) = t, so f = dlog(alpha)/dt = -1/(1 - t) and
g^2 = d(sigma^2)/dt - 2 f sigma^2 = 2t / (1 - t). Since E[e | x_t] = x_t + (1 - t) v, the score
is  score(x, t) = -(x + (1 - t) v(x, t)) / t,  and the probability-flow drift of that score,
f x - g^2 score / 2, is exactly v: every ODE sampler in research.diffusion.samplers integrates
dx/dt = v, and research.diffusion.likelihood.log_likelihood integrates its divergence.

The process stops at T = 1 - 1e-3 (f is singular at t = 1), where the marginal is
N(0, T^2 I) up to a (1 - T) x_0 term (1e-3 of the data scale), which the prior ignores.

Reflow (Liu et al. 2023): `reflow_pairs` draws (noise, ODE(noise)) couples from a trained
model; training on batches that carry the coupled noise as batch["noise"] straightens paths.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion import bpd as bpd_lib
from research.diffusion import likelihood as likelihood_lib
from research.diffusion import samplers as samplers_lib
from research.diffusion import sde as sde_lib
from research.diffusion.objective import check_sampler_options, pf_ode_log_likelihood

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class StraightPath(sde_lib._LinearSDE):  # pylint: disable=protected-access
  """x_t = (1 - t) x_0 + t e as a linear SDE (see the module docstring).

  Attributes:
    eps: where samplers stop (data side).
    T: where the ODE starts (prior side), < 1 because f(t) = -1/(1 - t).
  """
  eps: float = 1e-3
  T: float = 1.0 - 1e-3

  def __post_init__(self):
    if not 0.0 < self.eps < self.T < 1.0:
      raise ValueError(f"StraightPath needs 0 < eps < T < 1, got eps={self.eps}, T={self.T}.")

  @property
  def prior_std(self) -> float:
    return float(self.T)  # sigma(T); alpha(T) x_0 is ignored

  def log_alpha2(self, t):
    return 2.0 * jnp.log1p(-jnp.asarray(t, jnp.float32))

  def log_sigma2(self, t):
    return 2.0 * jnp.log(jnp.asarray(t, jnp.float32))

  def f(self, t):
    return -1.0 / (1.0 - jnp.asarray(t, jnp.float32))

  def g2(self, t):
    t = jnp.asarray(t, jnp.float32)
    return 2.0 * t / (1.0 - t)

  def t_from_logsnr(self, lam):
    # lambda = 2 log((1 - t) / t)  =>  t = sigmoid(-lambda / 2).
    return jax.nn.sigmoid(-0.5 * jnp.asarray(lam, jnp.float32))


def velocity_to_score(v: Array, x: Array, t: Array) -> Array:
  """score(x, t) = -(x + (1 - t) v) / t for the straight path; t [B]."""
  t = sde_lib.bcast(t, x)
  return -(x + (1.0 - t) * v) / t


@dataclasses.dataclass(frozen=True)
class FlowMatchingObjective:
  """Flow matching with a velocity network called as model(x, t, labels, train=...).

  It implements the objective protocol (research/objective.py): init, loss,
  sample(params, rng, num, *, labels=None, sampler, steps, **options) with every sampler of
  research.diffusion.samplers, check_options, log_likelihood (the probability-flow ODE of
  the straight path); plus log_prob(params, x, labels=None, rng=None, **options) -> [B].

  Attributes:
    model: velocity network (research.models: "mlp" for vectors, "unet" for images).
    data_shape: shape of one example.
    dequantize: 8-bit image data in [-1, 1] (x = k / 127.5 - 1): train on uniformly
      dequantised data (so log_prob is a density of the dequantised data) and report bits/dim.
    num_classes: > 0 for a class-conditional network (labels from batch["label"]).
    path: the straight-path process used by the samplers and the likelihood.
  """
  model: nn.Module
  data_shape: Tuple[int, ...]
  dequantize: bool = False
  num_classes: int = 0
  path: StraightPath = StraightPath()

  guidance_kinds = ()
  has_likelihood = True

  def __post_init__(self):
    object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))

  @property
  def sampler_names(self) -> Tuple[str, ...]:
    return tuple(samplers_lib.available())

  def check_options(self, options, steps: int) -> None:
    check_sampler_options(options, self.path, steps)

  @property
  def sde(self) -> StraightPath:
    return self.path

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.data_shape, dtype=np.int64))

  def _labels(self, batch):
    if not self.num_classes:
      return None
    if "label" not in batch:
      raise ValueError(f"the model is class-conditional (num_classes={self.num_classes}); "
                       "batch['label'] is required.")
    return batch["label"].astype(jnp.int32)

  def _check_x(self, x, name="x"):
    if tuple(x.shape[1:]) != self.data_shape:
      raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B, *{self.data_shape}].")

  # -- training ------------------------------------------------------------------------------
  def init(self, rng, batch: Dict[str, Array]):
    x = batch["x"]
    self._check_x(x, "batch['x']")
    t = jnp.full((x.shape[0],), 0.5, jnp.float32)
    variables = self.model.init({"params": rng, "dropout": rng}, x, t, self._labels(batch),
                                train=False)
    return variables.get("params", {})  # a parameter-free (analytic) model has none

  def loss(self, params, batch: Dict[str, Array], rng):
    """Mean squared velocity error, summed over dimensions, averaged over the batch.

    batch["noise"] (optional, [B, *dims]) supplies coupled noise for reflow; otherwise the
    noise is independent of the data (the OT-path CFM objective).
    """
    x0 = batch["x"]
    self._check_x(x0, "batch['x']")
    d_rng, t_rng, n_rng, drop_rng = jax.random.split(rng, 4)
    if self.dequantize:
      x0 = bpd_lib.dequantize(d_rng, x0)
    b = x0.shape[0]
    t = jax.random.uniform(t_rng, (b,), jnp.float32)
    noise = batch.get("noise")
    if noise is None:
      noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
    tb = sde_lib.bcast(t, x0)
    xt = (1.0 - tb) * x0 + tb * noise
    v = self.model.apply({"params": params}, xt, t, self._labels(batch), train=True,
                         rngs={"dropout": drop_rng})
    per_example = jnp.sum((v - (noise - x0)).reshape(b, -1) ** 2, axis=-1)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "mse_per_dim": loss / self.num_dims}

  # -- the network as velocity and score -----------------------------------------------------
  def _velocity(self, params, labels, x, t):
    return self.model.apply({"params": params}, x, t, labels, train=False)

  def _score(self, params, labels, x, t):
    return velocity_to_score(self._velocity(params, labels, x, t), x, t)

  def velocity_fn(self, params, labels: Optional[Array] = None):
    """v(x, t) as a jax.tree_util.Partial (params and labels are traced leaves)."""
    return jax.tree_util.Partial(self._velocity, params, labels)

  def score_fn(self, params, labels: Optional[Array] = None):
    """score(x, t) of the straight path, for research.diffusion samplers and likelihood."""
    return jax.tree_util.Partial(self._score, params, labels)

  # -- sampling and likelihood ---------------------------------------------------------------
  def sample(self, params, rng, num: int, *, labels: Optional[Array] = None,
             sampler: str = "ode_adaptive", steps: int = 1000, **options):
    """Samples by integrating dx/dt = v from T to eps with a shared ODE sampler.

    Any sampler of research.diffusion.samplers works; the deterministic ones ("ode_euler",
    "heun", "ode_adaptive", "ddim", "dpm_solver++") integrate the flow's ODE itself. The
    default is the adaptive solver (`steps` is then its step limit): on Gaussian data with the
    exact velocity it reaches 4e-3 of the exact flow map, where heun with 32 steps (EDM's
    sigma grid, which here starts at sigma = T / (1 - T) = 999) is off by 3e-2.
    """
    if self.num_classes and labels is None:
      labels = jax.random.randint(jax.random.fold_in(rng, 1), (num,), 0, self.num_classes)
    elif not self.num_classes and labels is not None:
      raise ValueError("labels were given but the model is unconditional (num_classes=0).")
    x, info = samplers_lib.sample(sampler, self.score_fn(params, labels), self.path,
                                  (num, *self.data_shape), rng, steps=steps, **options)
    if self.dequantize:
      x = jnp.clip(x, -1.0, 1.0)
    info = dict(info)
    if labels is not None:
      info["labels"] = labels
    return x, info

  def log_prob(self, params, x: Array, labels: Optional[Array] = None, rng=None,
               **options) -> Array:
    """log p(x) [B] in nats through the probability-flow ODE (shared likelihood code).

    options go to research.diffusion.likelihood.log_likelihood (estimator="exact" by
    default; "hutchinson" with `rng` for large D, rtol, atol, ...).
    """
    self._check_x(x)
    if rng is None:
      rng = jax.random.PRNGKey(0)  # used by the Hutchinson estimator only
    logp, _ = likelihood_lib.log_likelihood(self.score_fn(params, labels), self.path, x, rng,
                                            **options)
    return logp

  def log_likelihood(self, params, x: Array, rng, *, labels: Optional[Array] = None,
                     **settings):
    """(log p(x) [B] in nats, info) through the probability-flow ODE (the protocol's form)."""
    self._check_x(x)
    return pf_ode_log_likelihood(self.score_fn(params, labels), self.path, x, rng, **settings)

  def bits_per_dim(self, params, x: Array, rng, labels: Optional[Array] = None,
                   **options) -> Array:
    """bits/dim [B] of 8-bit data x (in [-1, 1]): dequantise, then the shared bpd helper."""
    d_rng, l_rng = jax.random.split(rng)
    y = bpd_lib.dequantize(d_rng, x)
    return bpd_lib.bits_per_dim(self.log_prob(params, y, labels, l_rng, **options),
                                self.num_dims)

  def reflow_pairs(self, params, rng, num: int, labels: Optional[Array] = None, *,
                   sampler: str = "ode_adaptive", steps: int = 1000,
                   **options) -> Dict[str, Array]:
    """A reflow batch {"x": ODE(noise), "noise": noise} from the current model.

    The samplers start from sde.prior_sample(split(rng)[0], shape) = T * e, so the coupled
    unit noise is recovered from the same key.
    """
    x, info = self.sample(params, rng, num, labels=labels, sampler=sampler, steps=steps,
                          **options)
    noise = self.path.prior_sample(jax.random.split(rng)[0], x.shape) / self.path.prior_std
    batch = {"x": x, "noise": noise}
    if "labels" in info:
      batch["label"] = info["labels"]
    return batch

  def straightness(self, params, rng, num: int, *, labels: Optional[Array] = None,
                   steps: int = 64) -> Tuple[Array, Dict[str, Array]]:
    """Liu et al.'s straightness S = int E ||(Z_T - Z_eps) / (T - eps) - v(Z_t, t)||^2 dt.

    Z_t is the model's own ODE trajectory from the prior sample Z_T (the samplers' noise for
    `rng`) to Z_eps, integrated with `steps` Euler steps on the uniform grid; S is the mean
    over those steps of the squared gap (summed over dimensions, averaged over the `num`
    trajectories) between the velocity and the trajectory's average velocity. S = 0 exactly
    when every trajectory is a straight line at constant speed, which is what lets one
    Euler step land where the ODE does.

    Returns:
      (S, info) with info["mean_speed2"] = E ||(Z_T - Z_eps) / (T - eps)||^2 (S relative to
      it is scale-free) and info["nfe"] = steps.
    """
    shape = (num, *self.data_shape)
    x0 = self.path.prior_sample(jax.random.split(rng)[0], shape)
    grid = jnp.linspace(float(self.path.T), float(self.path.eps), steps + 1)

    def step(x, ts):
      t_cur, t_next = ts
      v = self._velocity(params, labels, x, jnp.full((num,), t_cur, jnp.float32))
      return x + (t_next - t_cur) * v, v

    x1, vs = jax.lax.scan(step, x0, (grid[:-1], grid[1:]))
    mean_v = (x0 - x1) / (self.path.T - self.path.eps)  # dx/dt runs from T down to eps
    gap = jnp.sum((vs - mean_v[None]).reshape(steps, num, -1) ** 2, axis=-1)
    speed2 = jnp.mean(jnp.sum(mean_v.reshape(num, -1) ** 2, axis=-1))
    return jnp.mean(gap), {"mean_speed2": speed2, "nfe": steps}


def make_objective(data_shape: Sequence[int], *, image: bool = False, hidden: int = 256,
                   depth: int = 4, num_classes: int = 0, model: Optional[nn.Module] = None,
                   **unet_kwargs) -> FlowMatchingObjective:
  """A flow-matching objective with the registered "mlp" (vectors) or "unet" (images)."""
  from research.models import get_model
  data_shape = tuple(int(s) for s in data_shape)
  if model is None:
    if len(data_shape) == 1:
      model = get_model("mlp", hidden=hidden, depth=depth, num_classes=num_classes)
    elif len(data_shape) == 3:
      model = get_model("unet", num_classes=num_classes, **unet_kwargs)
    else:
      raise ValueError(f"data_shape={data_shape} is not allowed: [D] or [H, W, C].")
  return FlowMatchingObjective(model=model, data_shape=data_shape, dequantize=image,
                               num_classes=num_classes)
