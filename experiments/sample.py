"""Sampling and evaluation of a trained model: samples/<tag>.npz, figures/<tag>.png, metrics."""
from __future__ import annotations

import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import builders
from experiments import plotting
from experiments import validate as validate_lib
from experiments import workdir as wd


def default_tag(config) -> str:
  if config.sample.tag:
    return config.sample.tag
  if config.objective == "flow":
    return "flow"
  return f"{config.sample.sampler}_{config.sample.steps}"


def restore_trained(config, workdir: str, objective, spec):
  """The latest checkpoint's state; a clear error (not an untrained model) when there is none."""
  ckpt = wd.Checkpointer(workdir, keep=config.train.keep_ckpts)
  latest, directory = ckpt.latest_step(), ckpt.directory
  ckpt.close()
  if latest is None:
    raise FileNotFoundError(
        f"No checkpoint in {directory}: run --mode=train with this --workdir first "
        "(sample, evaluate and sweep read the latest checkpoint).")
  from experiments import train as train_lib
  state, ckpt = train_lib.restore_or_create(config, workdir, objective, spec)
  ckpt.close()
  return state


def with_sampler(config, sampler: str, steps: int):
  """A copy of `config` that samples with `sampler` at `steps` (default options and tag)."""
  cell = config.copy_and_resolve_references()
  with cell.unlocked():
    cell.sample.sampler = sampler
    cell.sample.steps = int(steps)
    cell.sample.options = ""
    cell.sample.tag = ""
  return cell


def draw_samples(config, objective, params, spec, rng, num: int, labels=None):
  """Draws `num` samples in chunks of sample.batch_size; returns (samples, info)."""
  options = validate_lib.parse_options(config.sample.options)
  if config.objective != "flow":
    options.setdefault("denoise", config.sample.denoise)
  chunks, nfe = [], 0
  chunk = config.sample.batch_size
  for i, start in enumerate(range(0, num, chunk)):
    n = min(chunk, num - start)
    lab = None if labels is None else labels[start:start + n]
    if config.objective == "flow":
      x, info = objective.sample(params, jax.random.fold_in(rng, i), n, labels=lab,
                                 temperature=float(options.get("temperature", 1.0)))
    else:
      x, info = objective.sample(params, jax.random.fold_in(rng, i), n, spec.dims, labels=lab,
                                 sampler=config.sample.sampler, steps=config.sample.steps,
                                 **options)
    chunks.append(np.asarray(x))
    nfe = int(info.get("nfe", 0))
  return np.concatenate(chunks, 0), {"nfe": nfe}


def sample_and_evaluate(config, workdir: str, state=None, tag: Optional[str] = None,
                        labels=None) -> Dict[str, float]:
  """Samples the (EMA) model, saves npz + figure, and writes sample metrics at the state's step."""
  spec = builders.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  if state is None:
    state = restore_trained(config, workdir, objective, spec)
  params = state.ema_params if config.sample.use_ema else state.params
  tag = tag or default_tag(config)
  if labels is None and config.data.conditional:
    # A conditional model without guidance: every class in equal shares, in order.
    labels = np.arange(config.sample.num_samples, dtype=np.int32) % spec.num_classes
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)
  t0 = time.perf_counter()
  samples, info = draw_samples(config, objective, params, spec, rng, config.sample.num_samples,
                               labels=labels)
  seconds = time.perf_counter() - t0
  wd.save_samples(workdir, tag, samples, labels)
  metrics: Dict[str, float] = {"tag": tag, "nfe": info["nfe"], "sample_seconds": seconds}
  if spec.kind == "toy":
    ds = spec.toy
    from research.metrics.toy import toy_sample_metrics
    metrics.update(toy_sample_metrics(ds, samples, jax.random.fold_in(rng, 7),
                                      num_reference=config.eval.num_reference,
                                      num_projections=config.eval.num_projections))
    ref, _ = ds.sample(jax.random.fold_in(rng, 8), 5000)
    plotting.scatter(wd.figure_path(workdir, tag), samples, ref, labels=labels,
                     title=f"{config.data.name}: {tag} ({info['nfe']} NFE), step {int(state.step)}")
  else:
    from experiments import image_data
    metrics.update(image_data.image_metrics(config, spec, samples, labels))
    plotting.image_grid(wd.figure_path(workdir, tag), samples, title=f"{tag}, step {int(state.step)}")
  wd.MetricWriter(workdir).write(int(state.step), "sample", metrics)
  logging.info("Samples %s: %s", tag, {k: (round(v, 4) if isinstance(v, float) else v)
                                       for k, v in metrics.items() if not k.startswith("mode_share")})
  return metrics
