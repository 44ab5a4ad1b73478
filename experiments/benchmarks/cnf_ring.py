"""CNF (maximum likelihood) vs flow matching vs RealNVP on the ring at a matched compute budget.

Each model is the objective of its ring config (configs/flows/ring.py:kind=cnf|fm|realnvp,
built by experiments.builders, trained by experiments.state's train step on the job's own
batches), trained with a constant learning rate after warmup until its budget of process CPU
seconds is spent (checked every `--chunk` steps; process CPU time, not wall time, because this
benchmark ran on a 2-core machine shared with other jobs whose load changed by the minute:
all threads' CPU seconds are what a model actually got; wall seconds are reported next to
them). Then, on the same fresh test samples x ~ p:

  test NLL  -mean log q(x) of the final (not EMA) parameters through each objective's own log_likelihood (the exact-trace ODE
            solve, dopri5 rtol = atol = 1e-5, for cnf and fm; the exact density for realnvp),
  H(p)      the true entropy -mean log p(x), and the paired gap NLL - H = KL(p || q) +- s.e.,
  NFE       vector-field evaluations per training step (cnf: its forward training solve, mean
            over the run; fm: 1; realnvp: 0, one pass of the flow) and per test log-likelihood
            solve (batch of 1000), and wall / CPU seconds of training and evaluation.

  python -m experiments.benchmarks.cnf_ring --out /tmp/cnf_ring --budget 240
  python -m experiments.benchmarks.cnf_ring --out /tmp/cnf_ring --smoke
  python -m experiments.benchmarks.cnf_ring --out /tmp/cnf_plain --kinds cnf \
      --set cnf.kinetic_weight=0.0,cnf.jacobian_weight=0.0      # without RNODE
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import numpy as np

from experiments import builders
from experiments import data as data_lib
from experiments import state as state_lib
from experiments.options import load_config, parse_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("cnf", "fm", "realnvp")


def run(kind: str, args) -> dict:
  over = {"optim.schedule": "constant", "optim.warmup_steps": 100, "seed": args.seed,
          **parse_options(args.set, "--set")}
  if args.smoke:
    over.update({"model.hidden": 16, "model.depth": 1, "flow.hidden": 16,
                 "flow.num_layers": 2, "data.batch_size": 64})
  config = load_config(f"configs/flows/ring.py:kind={kind}", over, root=ROOT)
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  state = state_lib.create_state(config, objective, spec, jax.random.PRNGKey(args.seed))
  _, lr_schedule = state_lib.optimizer(config, 10**9)
  step_fn = state_lib.make_train_step(objective, lr_schedule, state)
  batches = data_lib.train_batches(config, spec, 0)
  rng = jax.random.PRNGKey(args.seed + 1)
  nfe, losses = [], []
  # One step compiles (not charged to the budget), then train until the CPU budget is spent.
  t_compile = time.perf_counter()
  state, m = step_fn(state, next(batches), rng)
  jax.block_until_ready(m)
  compile_s, steps = time.perf_counter() - t_compile, 1
  w0, c0 = time.perf_counter(), time.process_time()
  while time.process_time() - c0 < args.budget:
    for _ in range(args.chunk):
      state, m = step_fn(state, next(batches), rng)
      steps += 1
    m = jax.device_get(m)
    losses.append(float(m["loss"]))
    if "nfe" in m:
      nfe.append(float(m["nfe"]))
    if not math.isfinite(losses[-1]):
      break
  train_wall, train_cpu = time.perf_counter() - w0, time.process_time() - c0
  # The raw parameters: with optim.ema_decay = 0.999 the EMA of a budget run would still weigh
  # the initialisation by 0.999^steps (76% after 276 CNF steps).
  params = state.params
  x, _ = spec.toy.sample(jax.random.PRNGKey(args.seed + 2), args.test)
  logp = np.asarray(spec.toy.log_prob(x), np.float64)
  w0, c0 = time.perf_counter(), time.process_time()
  logq, eval_nfe = [], []
  for i, start in enumerate(range(0, args.test, 1000)):
    lq, info = objective.log_likelihood(params, x[start:start + 1000],
                                        jax.random.PRNGKey(i), estimator="exact")
    logq.append(np.asarray(lq, np.float64))
    eval_nfe.append(int(info.get("nfe", 0)))
  logq = np.concatenate(logq)
  eval_wall, eval_cpu = time.perf_counter() - w0, time.process_time() - c0
  gap = logp - logq
  return {"kind": kind, "objective": config.objective, "describe": builders.describe(config),
          "num_params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
          "steps": steps, "batch_size": int(config.data.batch_size),
          "train_cpu_s": train_cpu, "train_wall_s": train_wall, "compile_s": compile_s,
          "train_nfe_per_step": (float(np.mean(nfe)) if nfe else
                                 (1.0 if kind == "fm" else 0.0)),
          "final_loss": losses[-1], "test_nll": float(-logq.mean()),
          "entropy": float(-logp.mean()), "gap": float(gap.mean()),
          "gap_se": float(gap.std(ddof=1) / math.sqrt(gap.size)),
          "eval_nfe_per_solve": float(np.mean(eval_nfe)), "eval_wall_s": eval_wall,
          "eval_cpu_s": eval_cpu, "num_test": int(args.test), "set": args.set}


def table(rows) -> str:
  head = ("| model | params | steps (batch) | train CPU s / wall s | NFE / train step | "
          "test NLL | H(p) | NLL - H (KL) | NFE / eval solve | eval wall s |")
  lines = [head, "|---" * 10 + "|"]
  for r in rows:
    lines.append(
        f"| {r['describe']}{' (' + r['set'] + ')' if r.get('set') else ''} | {r['num_params']:,} | {r['steps']} ({r['batch_size']}) | "
        f"{r['train_cpu_s']:.0f} / {r['train_wall_s']:.0f} | {r['train_nfe_per_step']:.1f} | "
        f"{r['test_nll']:.3f} | {r['entropy']:.3f} | {r['gap']:.3f} ± {r['gap_se']:.3f} | "
        f"{r['eval_nfe_per_solve']:.0f} | {r['eval_wall_s']:.0f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--kinds", default=",".join(KINDS))
  p.add_argument("--budget", type=float, default=240.0, help="process CPU seconds per model")
  p.add_argument("--chunk", type=int, default=25, help="steps between budget checks")
  p.add_argument("--test", type=int, default=2000, help="test samples (multiple of 1000)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--set", default="", help="config overrides 'a.b=v,c.d=w' for every model")
  p.add_argument("--smoke", action="store_true", help="tiny models, 5 CPU seconds each")
  args = p.parse_args()
  if args.smoke:
    args.budget, args.chunk, args.test = 5.0, 5, 1000
  kinds = [k for k in args.kinds.split(",") if k]
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise SystemExit(f"--kinds has {bad}; allowed: {KINDS}")
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for kind in kinds:
    print(f"== {kind}", flush=True)
    rows.append(run(kind, args))
    print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump({"args": vars(args), "device": str(jax.devices()[0]), "results": rows}, f,
                indent=1)
  md = table(rows)
  print(md)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(f"device: {jax.devices()[0]}; budget {args.budget:.0f} CPU s per model\n\n{md}\n")


if __name__ == "__main__":
  main()
