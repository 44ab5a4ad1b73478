"""Stage 1 of a latent diffusion job: the KL autoencoder, trained once and frozen.

  info = train_autoencoder(config, workdir)   trains (or resumes, or skips) stage 1
  save_tokenizer(workdir, spec)               WORKDIR/tokenizer.json (the caption vocabulary)

Stage 1 lives in builders.autoencoder_dir (WORKDIR/autoencoder, or a finished one named by
latent.autoencoder_workdir) with its own checkpoints/, metrics.jsonl and config.json, and is
trained by the one training loop (state.fit) on AutoencoderObjective. When it reaches
latent.steps its frozen params (the EMA ones) are written to autoencoder_params.msgpack, then
the latent scale factor (1 / std of posterior samples of latent.scale_images train images) is
computed once and written with the reconstruction metrics of the test split (PSNR, fd of the
reconstructions) and the step to latent.json, atomically and last: its presence marks stage 1
finished, so a rerun skips it and an interrupted one resumes from its checkpoints.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import builders
from experiments import data as data_lib
from experiments import image_metrics
from experiments import state as state_lib
from experiments import workdir as wd
from experiments.options import CheckpointError
from research.data import pipeline
from research.models.autoencoder import latent_scale_factor
from research.models.classifier import perceptual_distance_fn
from research.train_state import TrainState, make_optimizer

_RECON_BATCH = 500


def save_tokenizer(workdir: str, spec) -> None:
  """WORKDIR/tokenizer.json from the data's captions, unless a run already wrote one."""
  path = os.path.join(workdir, builders.TOKENIZER_FILE)
  if spec.tokenizer is not None and not os.path.exists(path):
    wd.atomic_write_bytes(path, spec.tokenizer.to_json().encode())


def _reconstruct(objective, params, x: np.ndarray) -> np.ndarray:
  """Posterior-mean reconstructions in equal chunks (the last one padded: one compile)."""
  out = []
  chunk = min(_RECON_BATCH, len(x))
  for s in range(0, len(x), chunk):
    xb = x[s:s + chunk]
    n = len(xb)
    if n < chunk:
      xb = np.concatenate([xb, np.repeat(xb[-1:], chunk - n, 0)])
    out.append(np.asarray(objective.reconstruct(params, jnp.asarray(xb)))[:n])
  return np.concatenate(out)


def reconstruction_metrics(config, spec, objective, params) -> Dict[str, float]:
  """PSNR (peak-to-peak 2 of [-1, 1] images, per image then averaged) and fd of the
  posterior-mean reconstructions of the first sample.num_samples test images."""
  images, _, _ = data_lib.load_split(config, "test")
  x = pipeline.to_model_space(images[:int(config.sample.num_samples)])
  t0 = time.perf_counter()
  x_hat = _reconstruct(objective, params, x)
  mse = np.mean(np.square(np.clip(x_hat, -1, 1) - x).reshape(len(x), -1), axis=1)
  out = {"reconstruction_psnr": float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-10)))),
         "reconstruction_l1": float(np.mean(np.abs(x_hat - x))),
         "reconstruction_num": int(len(x)),
         "reconstruction_seconds": time.perf_counter() - t0}
  fd = image_metrics.image_metrics(config, spec, x_hat)
  key = data_lib.fd_metric(config)
  if key in fd:
    out[f"{key}_reconstruction"] = fd[key]
    out[f"{key}_train_vs_test"] = fd[f"{key}_train_vs_test"]
  return out


def _finish(config, spec, objective, state, directory: str) -> Dict[str, Any]:
  """Writes the frozen params, then latent.json (scale factor + metrics) last."""
  la = config.latent
  params = state.ema_params if la.ema_decay > 0 else state.params
  wd.save_tree(os.path.join(directory, builders.AUTOENCODER_PARAMS), params)
  images, _, _ = data_lib.load_split(config, "train")
  n = min(int(la.scale_images), len(images))
  t0 = time.perf_counter()
  scale = latent_scale_factor(objective.model, params, pipeline.to_model_space(images[:n]),
                              jax.random.fold_in(jax.random.PRNGKey(config.seed), 21),
                              batch_size=min(_RECON_BATCH, n))
  info: Dict[str, Any] = {"scale_factor": scale, "scale_images": n, "step": int(state.step),
                          "scale_seconds": time.perf_counter() - t0,
                          "latent_shape": list(objective.model.latent_shape(spec.dims))}
  info.update(reconstruction_metrics(config, spec, objective, params))
  wd.MetricWriter(directory).write(int(state.step), "reconstruction", info)
  wd.write_json(os.path.join(directory, builders.AUTOENCODER_INFO), info)
  logging.info("Stage 1 finished (%s): scale factor %.4f, reconstruction PSNR %.2f dB",
               directory, scale, info["reconstruction_psnr"])
  return info


def train_autoencoder(config, workdir: str) -> Dict[str, Any]:
  """Stage 1: skipped when finished, resumed when interrupted; returns its latent.json record.

  With latent.autoencoder_workdir the finished stage 1 there is used as it is (never trained
  or written: it belongs to another job); a directory without one is a CheckpointError.
  """
  la = config.latent
  directory = builders.autoencoder_dir(config, workdir)
  info = builders.autoencoder_info(config, workdir)
  if la.autoencoder_workdir:
    if info is None:
      raise CheckpointError(
          f"config.latent.autoencoder_workdir={la.autoencoder_workdir!r} holds no finished "
          f"stage 1 ({builders.AUTOENCODER_INFO} and {builders.AUTOENCODER_PARAMS}): give the "
          "autoencoder directory of a finished latent job, or '' to train one here.")
    logging.info("Stage 1: using the finished autoencoder in %s (step %d).", directory,
                 info["step"])
    return info
  if info is not None and int(info["step"]) >= int(la.steps):
    logging.info("Stage 1 already finished in %s (step %d): skipped.", directory, info["step"])
    return info
  spec = data_lib.build_data_spec(config)
  perceptual_fn = None
  if la.perceptual_weight > 0:
    net = image_metrics.feature_net(config)["net"]
    perceptual_fn = perceptual_distance_fn(net.model, net.params)
  objective = builders.autoencoder_objective(config, spec, perceptual_fn)
  total, batch_size = int(la.steps), int(la.batch_size)
  rng = jax.random.PRNGKey(config.seed)
  first = next(data_lib.train_batches(config, spec, 0, batch_size=batch_size))
  params = objective.init(jax.random.fold_in(rng, 20), {"x": first["x"]})
  tx, lr = make_optimizer(learning_rate=la.learning_rate,
                          warmup_steps=min(int(la.warmup_steps), total // 2), total_steps=total,
                          weight_decay=0.0, grad_clip=config.optim.grad_clip)
  state = TrainState.create(params, tx, ema_decay=float(la.ema_decay))
  state, ckpt = state_lib.restore_newest(config, directory, state, quarantine=True,
                                         what="Stage 1: resumed")
  wd.write_config(directory, config)
  start = int(state.step)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  logging.info("Stage 1: autoencoder (f=%d, latents %s), %s parameters; steps %d -> %d",
               objective.model.downsampling_factor, objective.model.latent_shape(spec.dims),
               f"{n_params:,}", start, total)
  if start < total:
    state = state_lib.fit(
        objective, state, data_lib.train_batches(config, spec, start, batch_size=batch_size),
        rng=jax.random.fold_in(rng, 22), lr_schedule=lr, total=total, ckpt=ckpt,
        writer=wd.MetricWriter(directory), split="train",
        log_every=max(1, min(config.train.log_every, total)),
        ckpt_every=config.train.ckpt_every, progress=config.train.progress,
        nonfinite_hint="Try a lower latent.learning_rate or latent.kl_weight.")
  else:
    ckpt.close()
  return _finish(config, spec, objective, state, directory)
