"""Sampling and evaluation of a trained model: samples/<tag>.npz, figures/<tag>.png, metrics.

  sample_and_evaluate(config, workdir, state=None, request=None) -> metrics
  sample_all(config, workdir, state)         the main run of config.sample, then sample.extra
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import jax
import numpy as np
from absl import logging

from experiments import builders
from experiments import data as data_lib
from experiments import image_metrics
from experiments import mesh as mesh_lib
from experiments import plotting
from experiments import summaries
from experiments import workdir as wd
from experiments.options import NonFiniteError, SampleRequest, sample_requests
from experiments.state import restore_trained
from research.metrics.toy import toy_sample_metrics


def requests(config, objective) -> Tuple[SampleRequest, ...]:
  """The sampling runs config.sample asks of this objective (the main one, then extras)."""
  return sample_requests(config, objective.sampler_names)


def draw_samples(config, objective, params, request: SampleRequest, rng, num: int,
                 labels=None):
  """Draws `num` samples in chunks of sample.batch_size; returns (samples, info)."""
  chunks, nfe = [], 0
  chunk = config.sample.batch_size
  mesh = mesh_lib.mesh_of(params)  # the batch is split over the devices the state lives on
  with mesh_lib.use(mesh):
    for i, start in enumerate(range(0, num, chunk)):
      n = min(chunk, num - start)
      lab = None if labels is None else labels[start:start + n]
      x, info = objective.sample(params, jax.random.fold_in(rng, i), n, labels=lab,
                                 **request.kwargs())
      chunks.append(mesh_lib.gather(x))
      nfe = int(info.get("nfe", 0))
  return np.concatenate(chunks, 0), {"nfe": nfe}


def sample_and_evaluate(config, workdir: str, state=None,
                        request: Optional[SampleRequest] = None,
                        labels=None) -> Dict[str, float]:
  """Samples the (EMA) model, saves npz + figure, and writes sample metrics at the state's step.

  `request` defaults to the main run of config.sample.
  """
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  if request is None:
    request = requests(config, objective)[0]
  if state is None:
    state = restore_trained(config, workdir, objective, spec)
  params = state.ema_params if config.sample.use_ema else state.params
  tag = request.tag
  if labels is None and config.data.conditional:
    # A conditional model without guidance: every class in equal shares, in order.
    labels = np.arange(config.sample.num_samples, dtype=np.int32) % spec.num_classes
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)
  t0 = time.perf_counter()
  samples, info = draw_samples(config, objective, params, request, rng,
                               config.sample.num_samples, labels=labels)
  seconds = time.perf_counter() - t0
  finite = np.isfinite(samples.reshape(samples.shape[0], -1)).all(axis=1)
  if not finite.all():
    raise NonFiniteError(
        f"{int((~finite).sum())} of {len(samples)} samples of {tag!r} (checkpoint step "
        f"{int(state.step)} in {workdir}) are NaN or inf; nothing was saved. Try another "
        "sampler or more steps (--config.sample.sampler / --config.sample.steps), or an "
        "earlier checkpoint.")
  wd.save_samples(workdir, tag, samples, labels)
  metrics: Dict[str, float] = {"tag": tag, "nfe": info["nfe"], "sample_seconds": seconds}
  if spec.kind == "toy":
    ds = spec.toy
    metrics.update(toy_sample_metrics(ds, samples, jax.random.fold_in(rng, 7),
                                      num_reference=config.eval.num_reference,
                                      num_projections=config.eval.num_projections))
    ref, _ = ds.sample(jax.random.fold_in(rng, 8), 5000)
    figure = plotting.scatter(
        wd.figure_path(workdir, tag), samples, ref, labels=labels,
        title=f"{config.data.name}: {tag} ({info['nfe']} NFE), step {int(state.step)}")
  else:
    metrics.update(image_metrics.image_metrics(config, spec, samples, labels))
    figure = plotting.image_grid(wd.figure_path(workdir, tag), samples,
                                 title=f"{tag}, step {int(state.step)}")
  with summaries.writer(config, workdir) as writer:
    writer.write(int(state.step), "sample", metrics)
    writer.image(int(state.step), "sample", tag, figure)
  logging.info("Samples %s: %s", tag, {k: (round(v, 4) if isinstance(v, float) else v)
                                       for k, v in metrics.items() if not k.startswith("mode_share")})
  return metrics


def sample_all(config, workdir: str, state) -> Dict[str, float]:
  """Every run of config.sample on `state`; returns the main run's metrics."""
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  main, *extra = requests(config, objective)
  metrics = sample_and_evaluate(config, workdir, state, main)
  for req in extra:
    sample_and_evaluate(config, workdir, state, req)
  return metrics
