"""--mode=train: init or resume the objective's state and train it with state.fit.

A latent diffusion job (builders.has_autoencoder_stage) first runs stage 1 (experiments/
latent.py: the autoencoder, skipped when finished) and saves the caption vocabulary; stage 2
then trains in the workdir on the frozen encoder's scaled latents. A flow-matching job with
flow.reflow_rounds > 0 then runs its reflow rounds (experiments/reflow.py).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

from experiments import builders
from experiments import data as data_lib
from experiments import latent as latent_lib
from experiments import mesh as mesh_lib
from experiments import reflow as reflow_lib
from experiments import state as state_lib
from experiments import summaries
from experiments import workdir as wd
from experiments.state import NonFiniteLossError, restore_or_create  # noqa: F401  (re-exported)
from research.train_state import TrainState


def train(config, workdir: str) -> TrainState:
  """Trains `config` in `workdir` (resuming if checkpoints exist) and returns the final state."""
  spec = data_lib.build_data_spec(config)
  if builders.has_autoencoder_stage(config):
    latent_lib.train_autoencoder(config, workdir)
    latent_lib.save_tokenizer(workdir, spec)
  objective = builders.build_objective(config, spec, workdir)
  mesh = mesh_lib.build_mesh(config)
  mesh_lib.check_batch(config, mesh)
  state, ckpt = restore_or_create(config, workdir, objective, spec, quarantine=True, mesh=mesh)
  wd.write_config(workdir, config)  # after the restore: its check compares with the old one
  try:
    writer = summaries.writer(config, workdir)
  except BaseException:
    ckpt.close()
    raise
  try:
    state = _train(config, workdir, spec, objective, mesh, state, ckpt, writer)
  finally:
    writer.close()
  # flow.reflow_rounds > 0: the rectified-flow rounds, each in WORKDIR/reflow/round_<r>.
  return reflow_lib.reflow(config, workdir, objective, spec, state, mesh)


def _train(config, workdir, spec, objective, mesh, state, ckpt, writer) -> TrainState:
  start = int(state.step)
  total = config.train.steps
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  devices = mesh_lib.describe(mesh)
  logging.info("Model %s: %s parameters; training steps %d -> %d on %d device(s) in %d "
               "process(es), mesh data x fsdp = %d x %d, compute %s", builders.describe(config),
               f"{n_params:,}", start, total, devices["num_devices"], devices["num_processes"],
               devices["mesh_data"], devices["mesh_fsdp"], config.train.compute_dtype)
  if start == 0:
    writer.drop_after("info", -1)  # a run killed before its first checkpoint logged one
    writer.write(0, "info", {"num_params": n_params, "compute_dtype": config.train.compute_dtype,
                             **devices})
  writer.text(start, "info", "config", "    " + config.to_json(indent=2).replace("\n", "\n    "))
  if start >= total:
    logging.info("Checkpoint already at step %d >= train.steps=%d: nothing to train.", start, total)
    ckpt.close()
    return state
  _, lr_schedule = state_lib.optimizer(config, total)
  return state_lib.fit(
      objective, state, data_lib.train_batches(config, spec, start, mesh),
      rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 2), lr_schedule=lr_schedule,
      total=total, ckpt=ckpt, writer=writer, split="train", log_every=config.train.log_every,
      ckpt_every=config.train.ckpt_every, progress=config.train.progress,
      nonfinite_hint="Try a lower optim.learning_rate, optim.grad_clip > 0, or --debug to "
                     "find the first NaN.", mesh=mesh,
      on_checkpoint=lambda step: summaries.refresh_curves(workdir, "train"))
