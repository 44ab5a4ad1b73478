"""Reflow (rectified flow, Liu et al. 2023): the second stage of a flow-matching job.

With config.flow.reflow_rounds = R > 0, --mode=train runs, after the usual training (stage
1, WORKDIR/checkpoints), R rounds. Round r:

  1. draws flow.reflow_pairs coupled (noise, ODE(noise)) pairs from the previous model's (EMA)
     parameters with objective.reflow_pairs (sampler flow.reflow_sampler), saved once as
     WORKDIR/reflow/round_<r>/pairs.npz (a resumed round reuses them);
  2. trains a fresh optimizer state, started from the previous model's parameters, for
     flow.reflow_steps steps on batches of those pairs (the loss then regresses
     x_1 - x_0 of a *deterministic* coupling, which straightens the paths), with its own
     checkpoints and metrics in WORKDIR/reflow/round_<r>/ (resumable like any training);
  3. is measured with the rounds before it: samples at each of flow.reflow_eval_steps Euler
     steps (the toy metrics: log-density gap under the true density, modes covered, sliced
     Wasserstein) and the path straightness of objective.straightness, written to
     WORKDIR/metrics.jsonl (split "reflow", one row per round and step count) and
     WORKDIR/reflow/results.md.

The model a reflow job leaves is its last round's: --mode=train samples it, and sample,
evaluate and sweep restore it (experiments.state.restore_trained asks
experiments.workdir.trained_dir).

  reflow(config, workdir, objective, spec, state, mesh) -> the last round's state
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import jax
import numpy as np
from absl import logging

from experiments import mesh as mesh_lib
from experiments import state as state_lib
from experiments import summaries
from experiments import workdir as wd
from experiments.options import ConfigError
from research.metrics.toy import toy_sample_metrics
from research.train_state import TrainState

REFLOW_DIR = wd.REFLOW_DIR
STRAIGHTNESS_STEPS = 64  # Euler steps of the trajectory whose straightness is measured
_COLUMNS = ("logp_gap", "modes_covered", "mode_weight_error", "sliced_wasserstein")


round_dir = wd.reflow_round_dir


def rounds(config) -> int:
  return int(config.flow.get("reflow_rounds", 0))


def _pairs(config, objective, params, directory: str, r: int) -> Dict[str, np.ndarray]:
  path = os.path.join(directory, "pairs.npz")
  if os.path.exists(path):
    with np.load(path) as z:
      return {"x": z["x"], "noise": z["noise"]}
  f = config.flow
  n, chunk = int(f.reflow_pairs), int(config.sample.batch_size)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000 + r)
  xs, noises = [], []
  with mesh_lib.use(mesh_lib.mesh_of(params)):
    for i, start in enumerate(range(0, n, chunk)):
      b = objective.reflow_pairs(params, jax.random.fold_in(rng, i), min(chunk, n - start),
                                 sampler=f.reflow_sampler, steps=int(f.reflow_sampler_steps))
      xs.append(np.asarray(mesh_lib.gather(b["x"])))
      noises.append(np.asarray(mesh_lib.gather(b["noise"])))
  pairs = {"x": np.concatenate(xs), "noise": np.concatenate(noises)}
  if not all(np.isfinite(v).all() for v in pairs.values()):
    raise ConfigError(f"reflow round {r}: the pairs drawn with flow.reflow_sampler="
                      f"{f.reflow_sampler!r} are not finite; raise flow.reflow_sampler_steps.")
  os.makedirs(directory, exist_ok=True)
  if wd.is_writer():
    tmp = path + ".tmp.npz"
    np.savez(tmp, **pairs)
    os.replace(tmp, path)
  return pairs


def _pair_batches(config, pairs, r: int, start: int, mesh):
  """Batch i draws data.batch_size pairs with replacement; depends only on (seed, r, i)."""
  n = pairs["x"].shape[0]
  sharding = None if mesh is None else mesh_lib.batch_sharding(mesh)
  step = start
  while True:
    idx = np.random.default_rng([int(config.seed), r, step]).integers(
        0, n, int(config.data.batch_size))
    batch = {k: v[idx] for k, v in pairs.items()}
    yield batch if sharding is None else jax.device_put(batch, sharding)
    step += 1


def measure(config, spec, objective, params, r: int) -> List[Dict[str, Any]]:
  """One row per Euler step count of flow.reflow_eval_steps: sample metrics + straightness."""
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2000)  # same noise every round
  num = int(config.sample.num_samples)
  with mesh_lib.use(mesh_lib.mesh_of(params)):
    s, info = jax.jit(objective.straightness, static_argnums=2, static_argnames="steps")(
        params, jax.random.fold_in(rng, 1), num, steps=STRAIGHTNESS_STEPS)
    s, speed2 = float(s), float(info["mean_speed2"])
    rows = []
    for steps in config.flow.reflow_eval_steps:
      x, sinfo = objective.sample(params, rng, num, sampler="ode_euler", steps=int(steps))
      x = np.asarray(mesh_lib.gather(x))
      row: Dict[str, Any] = {"round": r, "euler_steps": int(steps), "nfe": int(sinfo["nfe"]),
                             "straightness": s, "straightness_rel": s / max(speed2, 1e-12)}
      if spec.kind == "toy":
        m = toy_sample_metrics(spec.toy, x, jax.random.fold_in(rng, 7),
                               num_reference=config.eval.num_reference,
                               num_projections=config.eval.num_projections)
        row.update({k: v for k, v in m.items() if not k.startswith("mode_share")})
      rows.append(row)
  return rows


def _table(rows) -> str:
  cols = [c for c in _COLUMNS if any(c in r for r in rows)]
  head = ["round", "Euler steps", "NFE", *cols, "straightness S", "S / E|x1-x0|^2"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    vals = [str(r["round"]), str(r["euler_steps"]), str(r["nfe"])]
    vals += [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
    vals += [f"{r['straightness']:.4g}", f"{r['straightness_rel']:.4g}"]
    lines.append("| " + " | ".join(vals) + " |")
  return "\n".join(lines)


def reflow(config, workdir: str, objective, spec, state: TrainState, mesh=None) -> TrainState:
  """Runs the reflow rounds after stage 1 (`state`); returns the last round's state."""
  total_rounds = rounds(config)
  if not total_rounds:
    return state
  use = lambda s: s.ema_params if config.sample.use_ema else s.params
  rows = measure(config, spec, objective, use(state), 0)
  for r in range(1, total_rounds + 1):
    directory = round_dir(workdir, r)
    pairs = _pairs(config, objective, use(state), directory, r)
    steps = int(config.flow.reflow_steps)
    tx, lr_schedule = state_lib.optimizer(config, steps)
    start_params = use(state)
    fresh = TrainState.create(start_params, tx, ema_decay=config.optim.ema_decay)
    fresh, ckpt = state_lib.restore_newest(config, directory, fresh, quarantine=True,
                                           what=f"Reflow round {r}: resumed")
    wd.write_config(directory, config)
    writer = summaries.writer(config, directory)
    try:
      logging.info("Reflow round %d: %d pairs, training steps %d -> %d in %s", r,
                   pairs["x"].shape[0], int(fresh.step), steps, directory)
      if int(fresh.step) < steps:
        state = state_lib.fit(
            objective, fresh, _pair_batches(config, pairs, r, int(fresh.step), mesh),
            rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 3000 + r),
            lr_schedule=lr_schedule, total=steps, ckpt=ckpt, writer=writer, split="train",
            log_every=config.train.log_every, ckpt_every=config.train.ckpt_every,
            progress=config.train.progress, mesh=mesh,
            nonfinite_hint="Try a lower optim.learning_rate for the reflow rounds.")
      else:
        ckpt.close()
        state = fresh
    finally:
      writer.close()
    rows += measure(config, spec, objective, use(state), r)
  main_writer = wd.MetricWriter(workdir)
  for row in rows:
    main_writer.write(int(state.step), "reflow", row)
  table = _table(rows)
  if wd.is_writer():
    with open(os.path.join(workdir, REFLOW_DIR, "results.md"), "w") as f:
      f.write(f"reflow: {total_rounds} round(s) of {config.flow.reflow_steps} steps on "
              f"{config.flow.reflow_pairs} pairs ({config.flow.reflow_sampler}); "
              f"{config.sample.num_samples} samples per row, straightness from "
              f"{STRAIGHTNESS_STEPS} Euler steps\n\n{table}\n")
  logging.info("Reflow:\n%s", table)
  return state
