"""The training loop: init or resume, jitted donated step, metrics, checkpoints, then sample + eval."""
from __future__ import annotations

import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from experiments import builders
from experiments import workdir as wd
from research.train_state import TrainState, make_optimizer


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf."""


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is a dependency; this only guards odd environments
    return None
  return tqdm(total=total, initial=initial, desc="train", file=sys.stderr, dynamic_ncols=True,
              mininterval=1.0)


def create_state(config, objective, spec, rng) -> TrainState:
  """A fresh TrainState: params from objective.init on one batch, AdamW + schedule."""
  first = next(builders.train_batches(config, spec, 0))
  params = objective.init(rng, first)
  tx, _ = make_optimizer(
      learning_rate=config.optim.learning_rate, warmup_steps=config.optim.warmup_steps,
      total_steps=config.train.steps, weight_decay=config.optim.weight_decay,
      grad_clip=config.optim.grad_clip, b1=config.optim.b1, b2=config.optim.b2,
      schedule=config.optim.schedule)
  return TrainState.create(params, tx, ema_decay=config.optim.ema_decay)


def make_train_step(objective, lr_schedule):
  """One optimisation step; `state` is donated, the step's RNG is fold_in(rng, step)."""

  def step_fn(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        state.params, batch, rng)
    new_state = state.apply_gradients(grads)
    metrics = dict(metrics)
    metrics.update(
        loss=loss, grad_norm=optax.global_norm(grads),
        param_norm=optax.global_norm(new_state.params),
        update_norm=optax.global_norm(jax.tree.map(jnp.subtract, new_state.params, state.params)),
        learning_rate=lr_schedule(state.step))
    return new_state, metrics

  return jax.jit(step_fn, donate_argnums=(0,))


def restore_or_create(config, workdir, objective, spec):
  """(state, checkpointer): the latest checkpoint in workdir when there is one, else fresh."""
  rng = jax.random.PRNGKey(config.seed)
  state = create_state(config, objective, spec, jax.random.fold_in(rng, 0))
  ckpt = wd.Checkpointer(workdir, keep=config.train.keep_ckpts)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(state, latest)
    logging.info("Resumed from checkpoint at step %d in %s", latest, ckpt.directory)
  return state, ckpt


def train(config, workdir: str) -> TrainState:
  """Trains `config` in `workdir` (resuming if checkpoints exist) and returns the final state."""
  spec = builders.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  wd.write_config(workdir, config)
  writer = wd.MetricWriter(workdir)
  state, ckpt = restore_or_create(config, workdir, objective, spec)
  start = int(state.step)
  total = config.train.steps
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  model_name = (f"{config.flow.kind} flow" if config.objective == "flow" else config.model.name)
  logging.info("Model %s (%s): %s parameters; training steps %d -> %d", model_name,
               config.objective, f"{n_params:,}", start, total)
  if start == 0:
    writer.write(0, "info", {"num_params": n_params})
  if start >= total:
    logging.info("Checkpoint already at step %d >= train.steps=%d: nothing to train.", start, total)
    ckpt.close()
    return state

  _, lr_schedule = make_optimizer(
      learning_rate=config.optim.learning_rate, warmup_steps=config.optim.warmup_steps,
      total_steps=total, schedule=config.optim.schedule)
  step_fn = make_train_step(objective, lr_schedule)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  batches = builders.train_batches(config, spec, start)
  bar = _progress(total, start, config.train.progress)
  pending = []  # (step, metrics) not yet checked/logged: no host sync on every step
  t_last, s_last = time.perf_counter(), start

  def flush(step_now: int):
    nonlocal pending, t_last, s_last
    if not pending:
      return
    losses = np.asarray(jax.device_get([m["loss"] for _, m in pending]))
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      bad_step = pending[int(bad[0])][0]
      raise NonFiniteLossError(
          f"Training loss is {losses[bad[0]]} at step {bad_step}. Stopped before saving; the "
          f"last good checkpoint is step {ckpt.latest_step()}. Try a lower optim.learning_rate, "
          "optim.grad_clip > 0, or --debug to find the first NaN.")
    now = time.perf_counter()
    sps = (step_now - s_last) / max(now - t_last, 1e-9)
    t_last, s_last = now, step_now
    last = {k: float(v) for k, v in jax.device_get(pending[-1][1]).items()}
    last["steps_per_sec"] = sps
    writer.write(step_now, "train", last)
    if bar is not None:
      bar.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{sps:.0f}")
    pending = []

  try:
    for step in range(start, total):
      batch = next(batches)
      state, metrics = step_fn(state, batch, rng)
      pending.append((step + 1, metrics))
      done = step + 1
      if bar is not None:
        bar.update(1)
      if done % config.train.log_every == 0 or done == total:
        flush(done)
      if done % config.train.ckpt_every == 0 or done == total:
        flush(done)  # never checkpoint a state whose loss we have not checked
        ckpt.save(done, state)
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
  return state
