"""Probability-flow likelihood: our on-device diffrax solve vs score_sde's host-side scipy solve.

score_sde (Song et al. 2021, likelihood.py) integrates the probability-flow ODE together with
the divergence by calling `scipy.integrate.solve_ivp(..., method="RK45")` on the host: every
function evaluation copies the state to the device, runs a jitted drift and divergence, and
copies the result back. We run the same ODE in one `diffrax.diffeqsolve` on the device.

Same inputs (data, Hutchinson probes), same tolerances (rtol, atol), same functions. Two
host baselines: "score_sde" does what score_sde's likelihood.py does, two jitted device calls
per evaluation (the drift, then the divergence, which computes the drift again inside its
Jacobian products); "fused" is a faster variant of it with one jitted call returning both
(`likelihood.drift_and_divergence`), a lower bound on the host approach's cost. The speedup
columns are against each. scipy's RK45 is the Dormand-Prince 5(4) pair, the same method as
diffrax's Dopri5, so the `dopri5` row compares like with like.

Wall times are the best of --repeats warm runs (after compilation, which is reported
apart); |logp - exact| is the mean error against the closed-form mixture density.

  python -m experiments.benchmarks.likelihood                 # full: batch 256, d = 2 and 16
  python -m experiments.benchmarks.likelihood --smoke         # seconds
  python -m experiments.benchmarks.likelihood --workdir=/tmp/quickstart   # + a trained model
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import scipy
from scipy import integrate

from research.diffusion import likelihood
from research.diffusion import sde as sde_lib
from research.diffusion.analytic import GaussianMixture

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def jitted_drift_and_divergence(score_fn, sde, probes=None, ad_mode="auto"):
  """(x, t) -> (drift, divergence), jitted once (build it once, reuse it across solves)."""
  return jax.jit(lambda y, t: likelihood.drift_and_divergence(score_fn, sde, y, t, probes,
                                                              ad_mode=ad_mode))


def jitted_drift_then_divergence(score_fn, sde, probes=None, ad_mode="auto"):
  """score_sde's layout: (x, t) -> drift and (x, t) -> divergence, two jitted functions."""
  drift = jax.jit(lambda y, t: likelihood.ProbabilityFlow(score_fn, sde)(
      y, jnp.full((y.shape[0],), t, jnp.float32)))
  div = jax.jit(lambda y, t: likelihood.drift_and_divergence(score_fn, sde, y, t, probes,
                                                             ad_mode=ad_mode)[1])
  return lambda y, t: (drift(y, t), div(y, t))


def scipy_log_likelihood(fn, sde, x, *, rtol, atol, t_min):
  """The host-side approach: scipy RK45 calling `fn(x, t) -> (drift, divergence)` (jitted,
  one or two device calls) and copying both back to numpy at every evaluation.

  Returns (logp [B] numpy float64, nfe).
  """
  shape = x.shape
  b = shape[0]
  n = int(np.prod(shape))

  def ode_func(t, y):
    xt = jnp.asarray(y[:n].reshape(shape), jnp.float32)
    f, div = fn(xt, jnp.float32(t))
    return np.concatenate([np.asarray(f, np.float64).reshape(-1), np.asarray(div, np.float64)])

  y0 = np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(b)])
  sol = integrate.solve_ivp(ode_func, (t_min, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
  if not sol.success:
    raise RuntimeError(f"solve_ivp failed: {sol.message}")
  z = sol.y[:n, -1].reshape(shape)
  delta = sol.y[n:, -1]
  prior = np.asarray(sde.prior_logp(jnp.asarray(z, jnp.float32)), np.float64)
  return prior + delta, int(sol.nfev)


def _timed(fn, repeats):
  """Best of `repeats` warm runs (as timeit: the least disturbed by other processes)."""
  times, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return min(times), out


def run_case(name, score_fn, sde, x, rng, *, estimator, probe, rtol, atol, t_min, repeats,
             ad_mode="auto", exact_logp=None) -> List[Dict[str, Any]]:
  """One input: scipy baseline plus our solve with each solver. Returns one row per solver."""
  probes = None
  if estimator == "hutchinson":
    probes = likelihood.draw_probes(rng, x.shape, 1, probe)  # the probes _solve draws from rng
  # Baselines: the first solve compiles the jitted functions; then warm timings.
  def baseline(fn):
    solve = lambda: scipy_log_likelihood(fn, sde, x, rtol=rtol, atol=atol, t_min=t_min)
    t0 = time.perf_counter()
    solve()
    first = time.perf_counter() - t0
    seconds, (logp, nfe) = _timed(solve, repeats)
    return seconds, logp, nfe, max(first - seconds, 0.0)
  sd_s, _, _, _ = baseline(jitted_drift_then_divergence(score_fn, sde, probes, ad_mode))
  base_s, base_logp, base_nfe, base_compile = baseline(
      jitted_drift_and_divergence(score_fn, sde, probes, ad_mode))
  rows = []
  for solver in ("dopri5", "tsit5"):
    def ours():
      logp, info = likelihood.log_likelihood(score_fn, sde, x, rng, estimator=estimator,
                                             probe=probe, rtol=rtol, atol=atol, t_min=t_min,
                                             solver=solver, ad_mode=ad_mode)
      return np.asarray(jax.block_until_ready(logp)), info
    t0 = time.perf_counter()
    ours()
    first = time.perf_counter() - t0
    ours_s, (logp, info) = _timed(ours, repeats)
    row = {
        "case": name, "dim": int(np.prod(x.shape[1:])), "batch": int(x.shape[0]),
        "estimator": estimator, "probe": probe if estimator == "hutchinson" else "",
        "rtol": rtol, "atol": atol, "t_min": t_min, "solver": solver, "ad_mode": ad_mode,
        "nfe": info["nfe"], "seconds": ours_s, "compile_seconds": max(first - ours_s, 0.0),
        "scipy_nfe": base_nfe, "scipy_seconds": base_s, "scipy_score_sde_seconds": sd_s,
        "scipy_compile_seconds": base_compile,
        "speedup": base_s / ours_s, "speedup_vs_score_sde": sd_s / ours_s,
        "max_abs_diff_vs_scipy": float(np.max(np.abs(logp - base_logp))),
        "mean_logp": float(np.mean(logp)),
    }
    if exact_logp is not None:
      row["mean_abs_err"] = float(np.mean(np.abs(logp - exact_logp)))
      row["scipy_mean_abs_err"] = float(np.mean(np.abs(base_logp - exact_logp)))
    rows.append(row)
    print(_fmt_row(row), flush=True)
  return rows


HEADER = ("| case | D | batch | estimator | solver | NFE | time (s) | scipy RK45 NFE | "
          "scipy, score_sde's 2 calls (s) | speedup | scipy, fused 1 call (s) | speedup | "
          "mean abs err (ours / scipy, nats) | compile (s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt_row(r):
  err = (f"{r['mean_abs_err']:.1e} / {r['scipy_mean_abs_err']:.1e}" if "mean_abs_err" in r
         else f"diff {r['max_abs_diff_vs_scipy']:.1e}")
  est = r["estimator"] + (f" ({r['probe']})" if r["probe"] else "")
  return (f"| {r['case']} | {r['dim']} | {r['batch']} | {est} | {r['solver']} | {r['nfe']} | "
          f"{r['seconds']:.3f} | {r['scipy_nfe']} | {r['scipy_score_sde_seconds']:.3f} | "
          f"{r['speedup_vs_score_sde']:.1f}x | {r['scipy_seconds']:.3f} | "
          f"{r['speedup']:.1f}x | {err} | {r['compile_seconds']:.1f} |")


def _trained_score(workdir):
  """score_fn, sde and data of a trained toy run (e.g. configs/quickstart.py)."""
  import ml_collections
  from experiments import builders
  from experiments import data as data_lib
  from experiments import state as state_lib
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  state = state_lib.restore_trained(config, workdir, objective, spec)
  return objective.score_fn(state.ema_params), objective.sde, spec, int(state.step)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--dims", default="2,16", help="comma-separated dimensions of the GMM ring")
  p.add_argument("--std", type=float, default=0.1, help="std of each ring component")
  p.add_argument("--estimators", default="exact,hutchinson")
  p.add_argument("--probe", default="rademacher", choices=likelihood.PROBES)
  p.add_argument("--rtol", type=float, default=1e-5)
  p.add_argument("--atol", type=float, default=1e-5)
  p.add_argument("--t_min", type=float, default=1e-5)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--ad_mode", default="auto", choices=likelihood.AD_MODES,
                 help="Jacobian products for the divergence (both sides use the same function)")
  p.add_argument("--workdir", default="", help="also benchmark this trained toy run's model")
  p.add_argument("--out", default=None,
                 help="writes OUT.json and OUT.md (default: experiments/benchmarks/results/"
                 "likelihood; nothing with --smoke)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
  args = p.parse_args(argv)
  dims = [int(d) for d in args.dims.split(",") if d]
  estimators = [e for e in args.estimators.split(",") if e]
  for e in estimators:
    if e not in likelihood.ESTIMATORS:
      p.error(f"--estimators: {e!r} is not one of {likelihood.ESTIMATORS}")
  if args.smoke:
    args.batch, dims, args.repeats, args.rtol, args.atol = 16, [2], 1, 1e-3, 1e-3
  elif args.out is None:
    args.out = os.path.join(RESULTS_DIR, "likelihood")

  sde = sde_lib.VPSDE()
  rows: List[Dict[str, Any]] = []
  print(HEADER, flush=True)
  for d in dims:
    gmm = GaussianMixture.ring(num_modes=8, radius=4.0, std=args.std, dim=d)
    x = gmm.sample(jax.random.PRNGKey(d), args.batch)
    exact = np.asarray(gmm.log_prob(x), np.float64)
    for est in estimators:
      rows += run_case(f"gmm ring std={args.std}", gmm.score_fn(sde), sde, x,
                       jax.random.PRNGKey(100 + d), estimator=est, probe=args.probe,
                       rtol=args.rtol, atol=args.atol, t_min=args.t_min, repeats=args.repeats,
                       ad_mode=args.ad_mode, exact_logp=exact)
  if args.workdir:
    score_fn, msde, spec, step = _trained_score(args.workdir)
    x, _ = spec.toy.sample(jax.random.PRNGKey(7), args.batch)
    exact = np.asarray(spec.toy.log_prob(x), np.float64) if getattr(spec.toy, "has_density",
                                                                    False) else None
    for est in estimators:
      # The model's error vs the true density is model error, not solver error; the
      # column still shows how far the trained model is from the data density.
      rows += run_case(f"trained mlp (step {step})", score_fn, msde, x,
                       jax.random.PRNGKey(7), estimator=est, probe=args.probe, rtol=args.rtol,
                       atol=args.atol, t_min=args.t_min, repeats=args.repeats,
                       ad_mode=args.ad_mode, exact_logp=exact)

  env = {"device": str(jax.devices()[0]), "platform": jax.default_backend(),
         "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
         "scipy": scipy.__version__, "smoke": args.smoke}
  md = [f"Probability-flow likelihood, on device (diffrax) vs host scipy RK45 "
        f"(rtol={args.rtol}, atol={args.atol}, t_min={args.t_min}, VP SDE, ad_mode="
        f"{args.ad_mode}). "
        f"Device: {env['device']} ({env['platform']}, {env['cpu_count']} CPUs), jax "
        f"{env['jax']}, scipy {env['scipy']}. Best of {args.repeats} warm runs.", "",
        HEADER] + [_fmt_row(r) for r in rows]
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump({"env": env, "args": vars(args), "rows": rows}, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")
  return rows


if __name__ == "__main__":
  main()
