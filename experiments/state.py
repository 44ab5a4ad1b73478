"""Train states: create, restore, and the one training loop (`fit`) every trainer uses.

  state = create_state(config, objective, spec, rng)        fresh params + AdamW + EMA
  state, ckpt = restore_or_create(config, workdir, objective, spec)
  state = restore_trained(config, workdir, objective, spec) the latest checkpoint, or an error
  state = fit(objective, state, batches, ...)               jitted donated steps, metrics,
                                                            NaN checks, checkpoints

The diffusion/flow trainer (experiments/train.py) and the noise-conditional classifier of
classifier guidance (experiments/guided.py) both train through `fit`: anything with
`loss(params, batch, rng) -> (loss, metrics)` can be trained.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from experiments import data as data_lib
from experiments import mesh as mesh_lib
from experiments import workdir as wd
from experiments.options import CheckpointError, NonFiniteError
from research.train_state import TrainState, make_optimizer


class NonFiniteLossError(NonFiniteError):
  """Training became NaN or inf (loss, gradients, parameters or the update)."""


def optimizer(config, total_steps: Optional[int] = None):
  """(optax transformation, learning-rate schedule) of config.optim."""
  o = config.optim
  return make_optimizer(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
      total_steps=config.train.steps if total_steps is None else total_steps,
      weight_decay=o.weight_decay, grad_clip=o.grad_clip, b1=o.b1, b2=o.b2, schedule=o.schedule)


def create_state(config, objective, spec, rng, mesh=None) -> TrainState:
  """A fresh TrainState: params from objective.init on one batch, AdamW + schedule.

  With a `mesh` the state is created by one jitted init whose outputs are laid out by
  mesh.state_shardings (so an fsdp-sharded model never exists whole on one device).
  """
  first = next(data_lib.train_batches(config, spec, 0, mesh))
  tx, _ = optimizer(config)

  def make(rng, batch):
    return TrainState.create(objective.init(rng, batch), tx, ema_decay=config.optim.ema_decay)

  if mesh is None:
    return make(rng, first)
  shardings = mesh_lib.state_shardings(jax.eval_shape(make, rng, first), mesh)
  with jax.set_mesh(mesh):
    return jax.jit(make, out_shardings=shardings)(rng, first)


def restore_or_create(config, workdir, objective, spec, *, quarantine: bool = False, mesh=None):
  """(state, checkpointer): the newest restorable checkpoint in workdir, else a fresh state.

  Damaged steps are skipped with a warning (and, with `quarantine`, moved aside so training
  can write them again); a checkpoint of a different state raises CheckpointError naming the
  changed config fields. The checkpointer is closed if anything raises.
  """
  rng = jax.random.PRNGKey(config.seed)
  state = create_state(config, objective, spec, jax.random.fold_in(rng, 0), mesh)
  return restore_newest(config, workdir, state, quarantine=quarantine)


def restore_newest(config, directory: str, state, *, quarantine: bool = False,
                   what: str = "Resumed") -> Tuple[TrainState, "wd.Checkpointer"]:
  """(state, checkpointer): `state` replaced by the newest good checkpoint in `directory`
  (restored into the shardings of `state`: any device count resumes any checkpoint). The
  checkpointer is closed if anything raises."""
  ckpt = wd.Checkpointer(directory, keep=config.train.keep_ckpts)
  try:
    restored, step = ckpt.restore_newest_good(state, config=config, quarantine=quarantine)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state = restored
    logging.info("%s from checkpoint at step %d in %s", what, step, ckpt.directory)
  return state, ckpt


def restore_trained(config, workdir: str, objective, spec, mesh=None) -> TrainState:
  """The newest good checkpoint's state; a clear error (not an untrained model) when none.

  A reflow job's trained model is its last round's (experiments.workdir.trained_dir)."""
  workdir = wd.trained_dir(config, workdir)
  ckpt = wd.Checkpointer(workdir, keep=config.train.keep_ckpts)
  latest, directory = ckpt.latest_step(), ckpt.directory
  ckpt.close()
  if latest is None:
    raise CheckpointError(
        f"No checkpoint in {directory}: run --mode=train with this --workdir first "
        "(sample, evaluate and sweep read the latest checkpoint).")
  if mesh is None:  # the run's mesh: sampling and evaluation split batches over it too
    mesh = mesh_lib.build_mesh(config)
  state, ckpt = restore_or_create(config, workdir, objective, spec, mesh=mesh)
  ckpt.close()
  return state


def make_train_step(objective, lr_schedule, state=None, mesh=None):
  """One optimisation step; `state` is donated, the step's RNG is fold_in(rng, step).

  With a `mesh`, one jit with explicit shardings: the state keeps the layout it has (from
  create_state), the batch is split over the batch axes, rng and metrics are replicated.
  """

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

  if mesh is None:
    return jax.jit(step_fn, donate_argnums=(0,))
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  repl = mesh_lib.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_sh, mesh_lib.batch_sharding(mesh), repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))


# Checked before every log row and checkpoint: a NaN/inf in any of them stops the run.
_CHECKED = ("loss", "grad_norm", "param_norm", "update_norm")


def _progress(total: int, initial: int, enabled: bool, desc: str):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is a dependency; this only guards odd environments
    return None
  return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
              mininterval=1.0)


def fit(objective, state: TrainState, batches: Iterator[dict], *, rng, lr_schedule,
        total: int, ckpt: "wd.Checkpointer", writer: "wd.MetricWriter", split: str = "train",
        log_every: int = 100, ckpt_every: Optional[int] = None, progress: bool = False,
        nonfinite_hint: str = "", mesh=None,
        on_checkpoint: Optional[Callable[[int], None]] = None) -> TrainState:
  """Trains `state` from its step to `total` with objective.loss; returns the final state.

  Every `log_every` steps, before every checkpoint and at the end, the pending steps' loss,
  gradient, parameter and update norms are checked (a NaN or inf raises NonFiniteLossError
  naming the step and the last good checkpoint, before anything is saved) and the last
  step's metrics are written to `writer` under `split`, with
  steps_per_sec. A checkpoint is saved every `ckpt_every` steps (None: only at the end) and
  at the end; `on_checkpoint(step)` runs after each save (e.g. to refresh the curve figure).
  The checkpointer is closed on the way out, also on errors.
  """
  start = int(state.step)
  writer.drop_after(split, start)  # rows a killed run logged past its last checkpoint
  step_fn = make_train_step(objective, lr_schedule, state, mesh)
  if mesh is not None:
    rng = jax.device_put(rng, mesh_lib.replicated(mesh))
  bar = _progress(total, start, progress, split)
  pending = []  # (step, metrics) not yet checked/logged: no host sync on every step
  t_last, s_last = time.perf_counter(), start
  ckpt_every = ckpt_every or total

  def flush(step_now: int):
    nonlocal pending, t_last, s_last
    if not pending:
      return
    checked = jax.device_get([{k: m[k] for k in _CHECKED if k in m} for _, m in pending])
    for (bad_step, _), values in zip(pending, checked):
      bad = {k: float(v) for k, v in values.items() if not np.isfinite(v)}
      if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"Training became non-finite at step {bad_step} ({what}). Stopped before saving; "
            f"the last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. "
            f"{nonfinite_hint}".rstrip())
    now = time.perf_counter()
    sps = (step_now - s_last) / max(now - t_last, 1e-9)
    t_last, s_last = now, step_now
    last = {k: float(v) for k, v in jax.device_get(pending[-1][1]).items()}
    last["steps_per_sec"] = sps
    writer.write(step_now, split, last)
    if bar is not None:
      bar.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{sps:.0f}")
    pending = []

  context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  try:
    with context:  # the model's shard_map'ed kernels see the mesh
      for step in range(start, total):
        batch = next(batches)
        state, metrics = step_fn(state, batch, rng)
        pending.append((step + 1, metrics))
        done = step + 1
        if bar is not None:
          bar.update(1)
        if done % log_every == 0 or done == total:
          flush(done)
        if done % ckpt_every == 0 or done == total:
          flush(done)  # never checkpoint a state whose loss we have not checked
          ckpt.save(done, state)
          if on_checkpoint is not None:
            on_checkpoint(done)
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
  return state
