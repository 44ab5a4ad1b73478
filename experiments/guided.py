"""Guided sampling after training: every class at every guidance scale, saved and scored.

  guided_sample_and_evaluate(config, workdir, state=None) -> {tag: metrics}

With config.guidance.kind == "cfg" the conditional model (trained with label dropout) is
sampled with classifier-free guidance at each w in config.guidance.scales; with "classifier"
a noise-conditional classifier is trained first (on x_t at random t, checkpointed under
WORKDIR/classifier/) and its gradient guides the base score at each s. Sampling uses
config.sample.sampler / steps / options. Per scale it writes

  samples/<tag>.npz    "samples" [K * n, *dims] float32 and the requested "labels" [K * n]
  figures/<tag>.png    scatter coloured by requested class (vector data) or an image grid
  metrics.jsonl        split "guidance": scale, nfe, and for Gaussian-mixture data the
                       accuracy (share of samples nearest the requested mode's mean) and the
                       within-mode std ratio (guidance.conditional_mode_metrics)

and finally figures/guidance_<kind>.png (accuracy and spread against the scale).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import builders
from experiments import data as data_lib
from experiments import image_metrics
from experiments import mesh as mesh_lib
from experiments import plotting
from experiments import sample as sample_lib
from experiments import state as state_lib
from experiments import summaries
from experiments import workdir as wd
from experiments.options import parse_options
from research.diffusion import guidance
from research.diffusion import samplers
from research.diffusion.analytic import GaussianMixture
from research.models.classifier import Classifier
from research.models.noise_classifier import NoiseConditionalClassifier
from research.train_state import TrainState, make_optimizer

CLASSIFIER_DIR = "classifier"


def scale_tag(config, scale: float) -> str:
  """samples/<tag>.npz name of one guidance scale, e.g. "cfg_w3_ddpm_1000"."""
  g = config.guidance
  letter = "w" if g.kind == "cfg" else "s"
  return f"{g.kind}_{letter}{float(scale):g}_{config.sample.sampler}_{config.sample.steps}"


# ---- the noise-conditional classifier ----------------------------------------------------
def build_classifier(config, spec):
  """The noise-conditional classifier: residual MLP for vector data; for images the UNet's
  encoder half (research.models.classifier.Classifier with a time embedding: per level
  guidance.classifier_depth residual blocks of guidance.classifier_hidden x model.ch_mult
  channels, strided downsampling, global mean pool)."""
  g = config.guidance
  if spec.kind == "image":
    return Classifier(num_classes=spec.num_classes, ch=g.classifier_hidden,
                      ch_mult=tuple(config.model.ch_mult), num_res_blocks=g.classifier_depth,
                      time_embedding=config.model.time_embedding or "sinusoidal")
  return NoiseConditionalClassifier(num_classes=spec.num_classes, hidden=g.classifier_hidden,
                                    depth=g.classifier_depth,
                                    time_embedding=config.model.time_embedding)


def _exact_classifier(spec, sde):
  """The exact noisy classifier when the data is an isotropic Gaussian mixture, else None."""
  ds = spec.toy
  if ds is None or not (hasattr(ds, "means") and hasattr(ds, "std")):
    return None
  return guidance.gmm_classifier_logits(GaussianMixture(ds.means, ds.stds, ds.weights), sde)


@dataclasses.dataclass(frozen=True)
class ClassifierObjective:
  """Cross-entropy of a noise-conditional classifier on x_t (guidance.noisy_classifier_loss),
  trainable by experiments.state.fit like any objective. `exact` (optional) is the exact
  noisy classifier of the data: its loss on the same batch is logged as "loss_bayes"."""
  module: Any
  sde: Any
  exact: Any = None

  def init(self, rng, batch):
    t0 = jnp.full((batch["x"].shape[0],), 0.5, jnp.float32)
    return self.module.init(rng, batch["x"], t0)["params"]

  def loss(self, params, batch, rng):
    logits_fn = guidance.flax_classifier_fn(self.module, params, self.sde)
    loss = jnp.mean(guidance.noisy_classifier_loss(logits_fn, self.sde, batch["x"],
                                                   batch["label"], rng))
    metrics = {"loss": loss}
    if self.exact is not None:  # same t and noise (same rng): the Bayes-optimal loss
      metrics["loss_bayes"] = jnp.mean(guidance.noisy_classifier_loss(
          self.exact, self.sde, batch["x"], batch["label"], rng))
    return loss, metrics


def train_classifier(config, workdir: str, spec, sde) -> Tuple[object, object]:
  """Trains (or resumes) the noise-conditional classifier; returns (module, params).

  Cross-entropy on x_t = alpha x_0 + sigma noise at t ~ U(eps, T)
  (guidance.noisy_classifier_loss), AdamW with warmup + cosine decay, checkpoints in
  WORKDIR/classifier/checkpoints, trained by the same loop as every model (state.fit). For
  Gaussian-mixture data each log row also carries the loss of the exact posterior on the
  same batch ("loss_bayes", the lowest achievable).
  """
  g = config.guidance
  module = build_classifier(config, spec)
  total = int(g.classifier_steps)
  objective = ClassifierObjective(module, sde, _exact_classifier(spec, sde))
  first = next(data_lib.train_batches(config, spec, 0))
  params = objective.init(jax.random.fold_in(jax.random.PRNGKey(config.seed), 11), first)
  tx, lr = make_optimizer(learning_rate=g.classifier_learning_rate,
                          warmup_steps=min(100, total // 10), total_steps=total,
                          grad_clip=config.optim.grad_clip)
  state = TrainState.create(params, tx, ema_decay=0.0)  # EMA unused: we keep `params`
  ckpt = wd.Checkpointer(os.path.join(workdir, CLASSIFIER_DIR), keep=1)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(state, start)
  start = int(state.step)
  with summaries.writer(config, workdir) as writer:
    state = state_lib.fit(
        objective, state, data_lib.train_batches(config, spec, start),
        rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 12), lr_schedule=lr,
        total=total, ckpt=ckpt, writer=writer, split="classifier",
        log_every=max(1, min(config.train.log_every, total)),
        nonfinite_hint="Try a lower guidance.classifier_learning_rate.",
        on_checkpoint=lambda step: summaries.refresh_curves(workdir, "classifier"))
  logging.info("Noise-conditional classifier: %d steps (%s)", total,
               os.path.join(workdir, CLASSIFIER_DIR))
  return module, state.params


# ---- guided score functions --------------------------------------------------------------
def cfg_score_factory(objective, params, spec):
  """make(labels [B], w) -> the classifier-free guided score_fn (a jax Partial)."""
  if not objective.conditional:
    raise ValueError("guidance.kind='cfg' needs a conditional model (data.conditional=True).")
  model_fn = guidance.flax_model_fn(objective.model, params)
  return lambda labels, scale: guidance.classifier_free_guidance(
      model_fn, labels, scale, sde=objective.sde, prediction=objective.sampling_prediction,
      null_label=spec.num_classes, sigma_data=objective.sigma_data)


def guided_score_factory(config, objective, params, spec, classifier=None):
  """Returns make(labels [B], scale) -> score_fn, a jax Partial (one compile for all calls).

  `classifier` is (module, params) of the noise-conditional classifier (kind "classifier").
  """
  kind = config.guidance.kind
  null = spec.num_classes
  if kind == "cfg":
    return cfg_score_factory(objective, params, spec)
  if kind == "classifier":
    if classifier is None:
      raise ValueError("guidance.kind='classifier' needs the trained classifier (module, params).")
    module, clf_params = classifier
    logits_fn = guidance.flax_classifier_fn(module, clf_params, objective.sde)
    base = config.guidance.classifier_base

    model_fn = guidance.flax_model_fn(objective.model, params)

    def make(labels, scale):
      if not objective.conditional:
        base_score = objective.score_fn(params, None)
      else:
        base_labels = jnp.full(labels.shape, null, jnp.int32) if base == "unconditional" else labels
        # Built from the module (hashable) rather than the objective instance, so a rebuilt
        # objective reuses the compiled sampler.
        base_score = guidance.label_score_fn(model_fn, base_labels, sde=objective.sde,
                                             prediction=objective.sampling_prediction,
                                             sigma_data=objective.sigma_data)
      return guidance.classifier_guidance(base_score, logits_fn, labels, scale)
    return make
  raise ValueError(f"config.guidance.kind={kind!r}; guided sampling needs 'cfg' or 'classifier'.")


def draw_guided(config, make_score, sde, dims, labels: np.ndarray, scale: float, rng,
                mesh=None, sampler=None, steps=None, options=None):
  """Samples for `labels` in equal-size chunks (the last one padded), so one compile serves;
  returns (samples, nfe). sampler, steps, options default to config.sample's."""
  if options is None:
    options = parse_options(config.sample.options)
    options.setdefault("denoise", config.sample.denoise)
  sampler = config.sample.sampler if sampler is None else sampler
  steps = config.sample.steps if steps is None else steps
  chunk = min(config.sample.batch_size, labels.shape[0])
  out, nfe = [], 0
  for i, start in enumerate(range(0, labels.shape[0], chunk)):
    lab = labels[start:start + chunk]
    n = lab.shape[0]
    if n < chunk:
      lab = np.concatenate([lab, np.resize(lab, chunk - n)])
    with mesh_lib.use(mesh):
      score_fn = make_score(jnp.asarray(lab, jnp.int32), jnp.float32(scale))
      x, info = samplers.sample(sampler, score_fn, sde, (chunk, *dims),
                                jax.random.fold_in(rng, i), steps=steps, **options)
    out.append(mesh_lib.gather(x)[:n])
    nfe = int(info["nfe"])
  return np.concatenate(out, 0), nfe


def _summary_figure(path: str, kind: str, rows, fd_key: str = "") -> None:
  if path is None:  # not the writing process
    return
  plt = plotting.pyplot()
  scales = [r["scale"] for r in rows]
  fig, ax = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
  if "accuracy" in rows[0]:  # toy mixtures
    ax[0].plot(scales, [r["accuracy"] for r in rows], "o-")
    ax[0].set_ylabel("accuracy (nearest mode = requested)")
    ax[1].plot(scales, [r["std_ratio"] for r in rows], "o-")
    ax[1].axhline(1.0, color="0.6", lw=0.8)
    ax[1].set_ylabel("within-mode std / true std")
  else:  # images: the feature classifier's accuracy and fd_<dataset>
    ax[0].plot(scales, [r["classifier_accuracy"] for r in rows], "o-")
    ax[0].set_ylabel("classifier accuracy on requested class")
    ax[1].plot(scales, [r[fd_key] for r in rows], "o-")
    ax[1].set_ylabel(fd_key)
  for a in ax:
    a.set_xlabel("w" if kind == "cfg" else "s")
  fig.suptitle(f"{kind} guidance", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def guided_sample_and_evaluate(config, workdir: str, state=None) -> Dict[str, Dict[str, float]]:
  """Samples every class at every scale in config.guidance.scales; returns {tag: metrics}."""
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec, workdir)
  if getattr(objective, "guidance_in_sample", False):
    # It guides inside `sample` (latent diffusion, on prompts or labels): the main run at
    # sample.guidance_scale, then the CFG table over guidance.scales, then sample.extra.
    if state is None:
      state = state_lib.restore_trained(config, workdir, objective, spec)
    main = sample_lib.sample_and_evaluate(config, workdir, state)
    for req in sample_lib.requests(config, objective)[1:]:
      sample_lib.sample_and_evaluate(config, workdir, state, req)
    return main
  if spec.num_classes < 2:
    raise ValueError(f"guidance needs labelled data with >= 2 classes; data.name="
                     f"{config.data.name!r} has {spec.num_classes}.")
  if state is None:
    state = state_lib.restore_trained(config, workdir, objective, spec)
  params = state.ema_params if config.sample.use_ema else state.params
  step = int(state.step)
  classifier = None
  if config.guidance.kind == "classifier":
    classifier = train_classifier(config, workdir, spec, objective.sde)
  make_score = guided_score_factory(config, objective, params, spec, classifier)
  with summaries.writer(config, workdir) as writer:
    return _guided_scales(config, workdir, objective, spec, make_score, params, step, writer)


def _guided_scales(config, workdir, objective, spec, make_score, params, step, writer):
  """The guided samples, figures and "guidance" rows of every scale, written by `writer`."""
  k, n = spec.num_classes, config.guidance.samples_per_class
  labels = np.repeat(np.arange(k, dtype=np.int32), n)
  mixture = spec.toy is not None and hasattr(spec.toy, "means") and hasattr(spec.toy, "std")
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 13)
  results, rows = {}, []
  for scale in config.guidance.scales:
    tag = scale_tag(config, scale)
    t0 = time.perf_counter()
    # Same rng at every scale: the scales are compared on the same initial noise.
    samples, nfe = draw_guided(config, make_score, objective.sde, spec.dims, labels,
                               float(scale), rng, mesh_lib.mesh_of(params))
    metrics: Dict[str, float] = {"tag": tag, "kind": config.guidance.kind,
                                 "scale": float(scale), "nfe": nfe,
                                 "sample_seconds": time.perf_counter() - t0}
    if mixture:
      metrics.update(guidance.conditional_mode_metrics(samples, labels, spec.toy.means,
                                                       spec.toy.std))
      rows.append(metrics)
    elif spec.kind == "image":
      # fd_<dataset> and the feature classifier's accuracy on the requested classes.
      metrics.update(image_metrics.image_metrics(config, spec, samples, labels))
      if "classifier_accuracy" in metrics:
        rows.append(metrics)
    wd.save_samples(workdir, tag, samples, labels)
    title = f"{config.data.name}: {tag} ({nfe} NFE), step {step}"
    if spec.kind == "toy":
      ref, _ = spec.toy.sample(jax.random.fold_in(rng, 99), 5000)
      # Shuffled, so the scatter's first-N cut shows every class, not the first few.
      order = np.random.default_rng(0).permutation(labels.shape[0])
      figure = plotting.scatter(wd.figure_path(workdir, tag), samples[order], ref,
                                labels=labels[order], title=title)
    else:
      # One row per class (up to 10 classes x 10 samples), so every class is on the grid.
      per = min(n, 10)
      rows_idx = np.concatenate([np.arange(c * n, c * n + per) for c in range(min(k, 10))])
      figure = plotting.image_grid(wd.figure_path(workdir, tag), samples[rows_idx], title=title)
    writer.write(step, "guidance", metrics)
    writer.image(step, "guidance", tag, figure)
    logging.info("Guided samples %s: %s", tag, {kk: (round(v, 4) if isinstance(v, float) else v)
                                                for kk, v in metrics.items()})
    results[tag] = metrics
  if rows:
    fd_key = data_lib.fd_metric(config) if spec.kind == "image" else ""
    _summary_figure(wd.figure_path(workdir, f"guidance_{config.guidance.kind}"),
                    config.guidance.kind, rows, fd_key)
  return results
