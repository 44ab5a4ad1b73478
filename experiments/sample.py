"""Sampling and evaluation of a trained model: samples/<tag>.npz, figures/<tag>.png, metrics.

  sample_and_evaluate(config, workdir, state=None, request=None) -> metrics
  sample_all(config, workdir, state)         the main run of config.sample, then sample.extra
  guidance_table(config, workdir, state)     CFG over guidance.scales for objectives that
                                             guide inside `sample` (latent diffusion)

Text-conditional objectives (objective.takes_prompts) are sampled on sample.prompts (each
sample.per_prompt times) or, without prompts, on the test split's captions; their npz holds
"prompts", their grid shows each prompt under its image, and their metrics add prompt
adherence. Objectives with a trained stage 1 add its reconstruction metrics to every row.
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
from experiments.options import ConfigError, NonFiniteError, SampleRequest, sample_requests
from experiments.state import restore_trained
from research.metrics.toy import toy_sample_metrics


def requests(config, objective) -> Tuple[SampleRequest, ...]:
  """The sampling runs config.sample asks of this objective (the main one, then extras)."""
  return sample_requests(config, objective.sampler_names)


def draw_samples(config, objective, params, request: SampleRequest, rng, num: int,
                 labels=None, prompts=None, **options):
  """Draws `num` samples in chunks of sample.batch_size; returns (samples, info).

  `prompts` (num strings) go to objective.sample(prompts=...) chunk by chunk; `options` are
  added to the request's (e.g. guidance_scale for an objective that guides in `sample`).
  """
  chunks, nfe = [], 0
  chunk = config.sample.batch_size
  kwargs = {**request.kwargs(), **options}
  mesh = mesh_lib.mesh_of(params)  # the batch is split over the devices the state lives on
  with mesh_lib.use(mesh):
    for i, start in enumerate(range(0, num, chunk)):
      n = min(chunk, num - start)
      cond = {"labels": None if labels is None else labels[start:start + n]}
      if prompts is not None:
        cond = {"prompts": list(prompts[start:start + n])}
      x, info = objective.sample(params, jax.random.fold_in(rng, i), n, **cond, **kwargs)
      chunks.append(mesh_lib.gather(x))
      nfe = int(info.get("nfe", 0))
  return np.concatenate(chunks, 0), {"nfe": nfe}


def sample_metrics(config, spec, samples: np.ndarray, labels, rng) -> Dict[str, float]:
  """The quality metrics of `samples`: toy (mode shares, log-density gap, sliced Wasserstein
  against fresh data from fold_in(rng, 7)) or image (fd_<dataset>, ...)."""
  if spec.kind == "toy":
    return toy_sample_metrics(spec.toy, samples, jax.random.fold_in(rng, 7),
                              num_reference=config.eval.num_reference,
                              num_projections=config.eval.num_projections)
  return image_metrics.image_metrics(config, spec, samples, labels)


def sample_prompts(config, objective=None) -> list:
  """The prompts of a text-conditional run: each of sample.prompts sample.per_prompt times,
  or the first sample.num_samples captions of the test split (repeated if it has fewer)."""
  given = config.sample.prompts
  if isinstance(given, str) or not isinstance(given, (tuple, list)):
    raise ConfigError(f"config.sample.prompts={given!r} is not allowed: a tuple of strings, "
                      "e.g. \"('large red circle at centre',)\" (one item needs the comma).")
  if given:
    prompts = [str(p) for p in given for _ in range(int(config.sample.per_prompt))]
  else:
    captions = data_lib.load_captions(config, "test")
    prompts = [str(c) for c in np.resize(captions, int(config.sample.num_samples))]
  if objective is not None:
    try:  # unknown words fail here, naming the vocabulary, before anything is sampled
      objective.encode_prompts(prompts, len(prompts))
    except ValueError as e:
      raise ConfigError(f"config.sample.prompts: {e}") from None
  return prompts


def _guidance_options(config, objective, scale=None) -> Dict[str, float]:
  """{"guidance_scale": w} for objectives that guide inside `sample`, else {}."""
  if not getattr(objective, "guidance_in_sample", False):
    return {}
  w = config.sample.guidance_scale if scale is None else scale
  return {"guidance_scale": float(w)}


def _conditioning(config, spec, objective, labels):
  """(labels, prompts) of a sampling run."""
  if getattr(objective, "takes_prompts", False):
    return None, sample_prompts(config, objective)
  if labels is None and config.data.conditional:
    # A conditional model without guidance: every class in equal shares, in order.
    labels = np.arange(config.sample.num_samples, dtype=np.int32) % spec.num_classes
  return labels, None


def _stage1_metrics(config, workdir: str) -> Dict[str, float]:
  """The finished stage 1's reconstruction metrics ("autoencoder_*"), for latent objectives."""
  if not builders.has_autoencoder_stage(config):
    return {}
  info = builders.autoencoder_info(config, workdir) or {}
  return {f"autoencoder_{k}": v for k, v in info.items() if isinstance(v, (int, float))}


def _evaluate_samples(config, spec, workdir, samples, labels, prompts) -> Dict[str, float]:
  metrics: Dict[str, float] = {}
  metrics.update(image_metrics.image_metrics(config, spec, samples, labels))
  if prompts is not None:
    metrics.update(image_metrics.adherence_metrics(config, samples, prompts))
  metrics.update(_stage1_metrics(config, workdir))
  return metrics


def _check_finite(samples, tag, state, workdir):
  finite = np.isfinite(samples.reshape(samples.shape[0], -1)).all(axis=1)
  if not finite.all():
    raise NonFiniteError(
        f"{int((~finite).sum())} of {len(samples)} samples of {tag!r} (checkpoint step "
        f"{int(state.step)} in {workdir}) are NaN or inf; nothing was saved. Try another "
        "sampler or more steps (--config.sample.sampler / --config.sample.steps), or an "
        "earlier checkpoint.")


def _image_figure(workdir, tag, samples, prompts, title):
  if prompts is not None:
    return plotting.prompt_grid(wd.figure_path(workdir, tag), samples, prompts, title=title)
  return plotting.image_grid(wd.figure_path(workdir, tag), samples, title=title)


def sample_and_evaluate(config, workdir: str, state=None,
                        request: Optional[SampleRequest] = None,
                        labels=None) -> Dict[str, float]:
  """Samples the (EMA) model, saves npz + figure, and writes sample metrics at the state's step.

  `request` defaults to the main run of config.sample.
  """
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec, workdir)
  main_run = request is None
  if request is None:
    request = requests(config, objective)[0]
  if state is None:
    state = restore_trained(config, workdir, objective, spec)
  params = state.ema_params if config.sample.use_ema else state.params
  tag = request.tag
  labels, prompts = _conditioning(config, spec, objective, labels)
  num = len(prompts) if prompts is not None else config.sample.num_samples
  options = _guidance_options(config, objective)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)
  t0 = time.perf_counter()
  samples, info = draw_samples(config, objective, params, request, rng, num, labels=labels,
                               prompts=prompts, **options)
  seconds = time.perf_counter() - t0
  _check_finite(samples, tag, state, workdir)
  wd.save_samples(workdir, tag, samples, labels, prompts)
  metrics: Dict[str, float] = {"tag": tag, "nfe": info["nfe"], "sample_seconds": seconds,
                               **options}
  if spec.kind == "toy":
    metrics.update(sample_metrics(config, spec, samples, labels, rng))
  if spec.kind == "toy":
    ref, _ = spec.toy.sample(jax.random.fold_in(rng, 8), 5000)
    figure = plotting.scatter(
        wd.figure_path(workdir, tag), samples, ref, labels=labels,
        title=f"{config.data.name}: {tag} ({info['nfe']} NFE), step {int(state.step)}")
  else:
    metrics.update(_evaluate_samples(config, spec, workdir, samples, labels, prompts))
    figure = _image_figure(workdir, tag, samples, prompts, f"{tag}, step {int(state.step)}")
  with summaries.writer(config, workdir) as writer:
    writer.write(int(state.step), "sample", metrics)
    writer.image(int(state.step), "sample", tag, figure)
  logging.info("Samples %s: %s", tag, {k: (round(v, 4) if isinstance(v, float) else v)
                                       for k, v in metrics.items() if not k.startswith("mode_share")})
  if (main_run and config.guidance.kind == "cfg"
      and getattr(objective, "guidance_in_sample", False)):
    # The main run's samples are the table's row at w = sample.guidance_scale (same noise).
    guidance_table(config, workdir, state, objective=objective, spec=spec,
                   done={options["guidance_scale"]: (samples, info, metrics)})
  return metrics


def guidance_table(config, workdir: str, state, *, objective=None, spec=None, done=None):
  """CFG at every w of guidance.scales (same noise, same prompts or labels): per scale
  samples/cfg_w<w>_<sampler>_<steps>.npz, its grid, and a metrics row (split "guidance":
  scale, nfe, fd, adherence); then figures/guidance_cfg.png. Returns the rows.

  `done` maps a scale to (samples, info, metrics) already drawn with the same noise (the
  main run's), which are reused instead of sampled again."""
  done = dict(done or {})
  spec = spec or data_lib.build_data_spec(config)
  objective = objective or builders.build_objective(config, spec, workdir)
  params = state.ema_params if config.sample.use_ema else state.params
  request = requests(config, objective)[0]
  labels, prompts = _conditioning(config, spec, objective, None)
  num = len(prompts) if prompts is not None else config.sample.num_samples
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)  # the main run's noise
  writer, step, rows = wd.MetricWriter(workdir), int(state.step), []
  for scale in config.guidance.scales:
    tag = f"cfg_w{float(scale):g}_{request.sampler}_{request.steps}"
    metrics: Dict[str, float] = {"tag": tag, "kind": "cfg", "scale": float(scale)}
    if float(scale) in done:
      samples, info, main_metrics = done[float(scale)]
      metrics.update({k: v for k, v in main_metrics.items() if k not in ("tag",)})
      metrics["reused_from"] = main_metrics["tag"]
    else:
      t0 = time.perf_counter()
      samples, info = draw_samples(config, objective, params, request, rng, num,
                                   labels=labels, prompts=prompts,
                                   **_guidance_options(config, objective, scale))
      metrics.update(nfe=info["nfe"], sample_seconds=time.perf_counter() - t0)
      _check_finite(samples, tag, state, workdir)
      metrics.update(_evaluate_samples(config, spec, workdir, samples, labels, prompts))
    wd.save_samples(workdir, tag, samples, labels, prompts)
    _image_figure(workdir, tag, samples, prompts, f"{tag} ({info['nfe']} NFE), step {step}")
    writer.write(step, "guidance", metrics)
    logging.info("Guided samples %s: %s", tag, {k: (round(v, 4) if isinstance(v, float) else v)
                                                for k, v in metrics.items()})
    rows.append(metrics)
  _guidance_figure(wd.figure_path(workdir, "guidance_cfg"), rows, data_lib.fd_metric(config))
  return rows


def _guidance_figure(path: str, rows, fd_key: str) -> None:
  """Adherence (or classifier accuracy) and fd against the CFG weight w."""
  quality = [k for k in ("adherence_all", "adherence_shape", "adherence_colour",
                         "classifier_accuracy") if rows and k in rows[0]]
  if not rows or (fd_key not in rows[0] and not quality):
    return
  plt = plotting.pyplot()
  scales = [r["scale"] for r in rows]
  fig, ax = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
  for k in quality:
    ax[0].plot(scales, [r[k] for r in rows], "o-", label=k)
  ax[0].set_ylabel("share matching the condition")
  ax[0].legend(fontsize=7)
  if fd_key in rows[0]:
    ax[1].plot(scales, [r[fd_key] for r in rows], "o-")
    ax[1].axhline(rows[0].get(f"{fd_key}_train_vs_test", 0.0), color="0.6", lw=0.8)
    ax[1].set_ylabel(fd_key)
  for a in ax:
    a.set_xlabel("w")
  fig.suptitle("classifier-free guidance", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def sample_all(config, workdir: str, state) -> Dict[str, float]:
  """Every run of config.sample on `state`; returns the main run's metrics."""
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec, workdir)
  main, *extra = requests(config, objective)
  metrics = sample_and_evaluate(config, workdir, state, main)
  for req in extra:
    sample_and_evaluate(config, workdir, state, req)
  return metrics
