"""The objective protocol: what every trainable model family offers the experiment runner.

Diffusion (research.diffusion.objective), coupling flows (research.flows.objective), flow
matching (research.flows.flow_matching) and every objective to come implement it; the runner
(experiments/) asks the object what it can do and never branches on which family it is.

  objective.init(rng, batch) -> params
  objective.loss(params, batch, rng) -> (scalar loss, metrics dict)
  objective.sample(params, rng, num, *, labels=None, **options) -> (x [num, *data_shape], info)
  objective.check_options(options, steps)            raises ValueError naming the bad option
  objective.log_likelihood(params, x, rng, *, labels=None, **settings) -> (logp [B], info)
      only where `has_likelihood`; logp in nats per example, info["nfe"], info["method"],
      info["estimator"]. `settings` are the probability-flow ODE's (estimator, num_probes,
      probe, rtol, atol, t_min, solver); an exact density ignores them.

Capabilities (plain attributes, asked instead of the family's name):
  data_shape       shape of one example
  sampler_names    the research.diffusion.samplers names `sample` takes as options["sampler"]
                   (with "steps"); empty for an objective that samples in one pass, whose
                   options are its own (a coupling flow: "temperature")
  guidance_kinds   the guidance kinds ("cfg", "classifier") its samples can be guided with
  has_likelihood   whether `log_likelihood` exists

A batch is a dict {"x": float32 [B, *data_shape], "label": int32 [B] (optional)}. All methods
are pure and jit-able where they return arrays; RNG is explicit.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Tuple, runtime_checkable

import jax

GUIDANCE_KINDS = ("cfg", "classifier")


@runtime_checkable
class Objective(Protocol):
  """Structural type of an objective (see the module docstring)."""

  data_shape: Tuple[int, ...]
  sampler_names: Tuple[str, ...]
  guidance_kinds: Tuple[str, ...]
  has_likelihood: bool

  def init(self, rng: jax.Array, batch: Dict[str, jax.Array]) -> Any:
    ...

  def loss(self, params, batch: Dict[str, jax.Array], rng: jax.Array):
    ...

  def sample(self, params, rng: jax.Array, num: int, *, labels: Optional[jax.Array] = None,
             **options):
    ...

  def check_options(self, options: Dict[str, Any], steps: int) -> None:
    ...
