"""Every sampler on the exact GMM score: quality, NFE and wall time at a fixed NFE budget.

Data: the 8-Gaussian ring (radius 4, std 0.1) in d = 2 and d = 16 (ring in the first two
coordinates), VP SDE (eps = 1e-3). The exact score of p_t (analytic.GaussianMixture) takes
training error out of the picture, so the table measures sampler error alone. Quality:
  gap    mean log p_0(samples) - mean log p_0(fresh data), nats (0 is perfect; < 0 too
         noisy, > 0 too concentrated). In d dims a within-mode std ratio r shifts it by about
         -d/2 (r^2 - 1); stopping at eps = 1e-3 alone costs -0.01 (2-D) / -0.09 (16-D).
  std    within-mode std of the samples / the true 0.1 (residual to the nearest mode).
Every sampler is run at the target NFEs (steps = NFE / evaluations per step; variants with
the final denoising step spend one of them on it); ode_adaptive is run at a sweep of
tolerances instead and reports the NFE it took. Each configuration is compiled ahead of
time (samplers.compile_sampler; compile time in the JSON), then timed: wall time is the best
of --repeats runs, on whatever device JAX picks.

  python -m experiments.benchmarks.samplers            # full: 20,000 samples, ~30 min on CPU
  python -m experiments.benchmarks.samplers --smoke    # ~1 min on CPU (compiles dominate)
Writes results/samplers.{md,json} (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from typing import Any, Dict, List

import jax

from research.diffusion import analytic, samplers
from research.diffusion import sde as sde_lib

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

# (label, sampler, options, score evaluations per step). Denoise variants spend 1 NFE on it.
VARIANTS = [
    ("ddpm", "ddpm", {}, 1),
    ("ddpm quadratic grid", "ddpm", {"grid": "quadratic"}, 1),
    ("ddpm forward var.", "ddpm", {"variance": "forward"}, 1),
    ("ddim eta=0", "ddim", {}, 1),
    ("ddim eta=0 quadratic", "ddim", {"grid": "quadratic"}, 1),
    ("ddim eta=0 logsnr", "ddim", {"grid": "logsnr"}, 1),
    ("euler_maruyama", "euler_maruyama", {}, 1),
    ("pc (rev. diff. + 1 Langevin)", "pc", {}, 2),
    ("ode_euler", "ode_euler", {}, 1),
    ("heun (EDM grid)", "heun", {}, 2),
    ("heun churn 10", "heun", {"S_churn": 10.0, "S_min": 0.05, "S_max": 50.0}, 2),
    ("dpm_solver++ 2M", "dpm_solver++", {}, 1),
    ("dpm_solver++ 2M lof+denoise", "dpm_solver++",
     {"lower_order_final": True, "denoise": True}, 1),
    ("dpm_solver++ 3M", "dpm_solver++", {"order": 3}, 1),
]
ADAPTIVE_RTOLS = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]


def _steps_for(nfe: int, per_step: int, options: Dict[str, Any]) -> int:
  return max(1, (nfe - (1 if options.get("denoise") else 0)) // per_step)


def _run(gmm, sde, name, options, steps, n, rng, ref, repeats):
  fn, compile_s = samplers.compile_sampler(name, gmm.score_fn(sde), sde, (n, gmm.dim),
                                           steps=steps, **options)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    x, info = fn(rng)
    x.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  q = analytic.sample_quality(gmm, x, ref)
  return {"nfe": info["nfe"], "steps": steps, "wall_s": best, "compile_s": compile_s, **q}


def run(args) -> Dict[str, Any]:
  sde = sde_lib.get_sde(args.sde, eps=args.eps)
  rng = jax.random.PRNGKey(args.seed)
  rows: List[Dict[str, Any]] = []
  for dim in args.dims:
    gmm = analytic.GaussianMixture.ring(num_modes=8, radius=4.0, std=0.1, dim=dim)
    ref = gmm.sample(jax.random.PRNGKey(args.seed + 1), args.num_samples)
    jobs = []
    seen = set()
    for label, name, opts, per_step in VARIANTS:
      if args.samplers and name not in args.samplers:
        continue
      if args.smoke and name in seen:  # smoke: one variant per sampler
        continue
      seen.add(name)
      for nfe in args.nfe:
        jobs.append((label, name, opts, _steps_for(nfe, per_step, opts), nfe))
    if not args.samplers or "ode_adaptive" in args.samplers:
      for rtol in args.adaptive_rtols:
        jobs.append((f"ode_adaptive tsit5 rtol={rtol:g}", "ode_adaptive",
                     {"rtol": rtol, "atol": rtol}, 100000, None))
    for label, name, opts, steps, nfe in jobs:
      res = _run(gmm, sde, name, opts, steps, args.num_samples, rng, ref, args.repeats)
      row = {"dim": dim, "label": label, "sampler": name, "options": opts,
             "target_nfe": nfe, **res}
      rows.append(row)
      print(f"d={dim:2d} {label:32s} nfe={res['nfe']:5d} gap={res['gap']:+.4f} "
            f"std={res['std_ratio']:.4f} wall={res['wall_s']:.3f}s", flush=True)
  return {"rows": rows, "meta": {
      "sde": args.sde, "eps": args.eps, "num_samples": args.num_samples, "seed": args.seed,
      "device": str(jax.devices()[0]), "backend": jax.default_backend(),
      "jax": jax.__version__, "python": platform.python_version(),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "repeats": args.repeats}}


def _passes(r2, r16, gap_tol, std_tol, gap_in_16=True):
  ok2 = abs(r2["gap"]) <= gap_tol and abs(r2["std_ratio"] - 1) <= std_tol
  ok16 = abs(r16["std_ratio"] - 1) <= std_tol and (not gap_in_16 or abs(r16["gap"]) <= gap_tol)
  return ok2 and ok16


def to_markdown(result: Dict[str, Any]) -> str:
  rows, meta = result["rows"], result["meta"]
  dims = sorted({r["dim"] for r in rows})
  by_key: Dict[Any, Dict[int, Dict]] = {}
  for r in rows:
    by_key.setdefault((r["label"], r["target_nfe"] if r["target_nfe"] is not None else -1,
                       r["steps"]), {})[r["dim"]] = r
  head = "| sampler | target NFE | NFE | " + " | ".join(
      f"{d}-D gap | {d}-D std | {d}-D wall s" for d in dims) + " |"
  lines = [
      f"Samplers on the exact score: 8-Gaussian ring (radius 4, std 0.1), {meta['sde']} SDE "
      f"(eps={meta['eps']:g}), {meta['num_samples']} samples, device {meta['device']} "
      f"(jax {meta['jax']}). gap: mean log p0(samples) - mean log p0(fresh data), nats; "
      "std: within-mode std / true std. Wall: best warm run (compile excluded).", "",
      head, "|" + "---|" * (3 + 3 * len(dims))]
  for (label, nfe, _), per_dim in by_key.items():
    first = next(iter(per_dim.values()))
    cells = []
    for d in dims:
      r = per_dim.get(d)
      cells += ([f"{r['gap']:+.3f}", f"{r['std_ratio']:.4f}", f"{r['wall_s']:.3f}"]
                if r else ["", "", ""])
    lines.append(f"| {label} | {nfe if nfe >= 0 else '-'} | {first['nfe']} | "
                 + " | ".join(cells) + " |")
  # The criteria, evaluated on this table.
  if set(dims) >= {2, 16}:
    lines += ["", "Criteria (issue 3):"]
    for (label, nfe, _), per_dim in by_key.items():
      if 2 in per_dim and 16 in per_dim and per_dim[2]["nfe"] <= 25:
        if _passes(per_dim[2], per_dim[16], 0.15, 0.03):
          lines.append(f"- <= 25 NFE, |gap| <= 0.15 and |std - 1| <= 0.03 in 2-D and 16-D: "
                       f"{label} at NFE {per_dim[2]['nfe']}")
      if 2 in per_dim and 16 in per_dim and label.startswith("ddpm") and nfe == 1000:
        ok = (abs(per_dim[2]["gap"]) <= 0.05 and abs(per_dim[2]["std_ratio"] - 1) <= 0.01
              and abs(per_dim[16]["std_ratio"] - 1) <= 0.01)
        lines.append(f"- ddpm at 1000 steps, |gap| <= 0.05 (2-D), std within 1% (both): "
                     f"{label}: {'yes' if ok else 'no'}")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
  p.add_argument("--num_samples", type=int, default=20000)
  p.add_argument("--dims", type=int, nargs="+", default=[2, 16])
  p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
  p.add_argument("--adaptive_rtols", type=float, nargs="+", default=ADAPTIVE_RTOLS)
  p.add_argument("--samplers", nargs="*", default=None, help="subset of sampler names")
  p.add_argument("--sde", default="vp", choices=sde_lib.SDES)
  p.add_argument("--eps", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--out", default=os.path.join(RESULTS_DIR, "samplers"),
                 help="output path prefix; writes <out>.md and <out>.json")
  args = p.parse_args(argv)
  if args.samplers:
    unknown = sorted(set(args.samplers) - set(samplers.available()))
    if unknown:
      p.error(f"unknown --samplers {unknown}; allowed: {samplers.available()}")
  if args.smoke:
    args.num_samples, args.nfe, args.adaptive_rtols = 256, [10], [1e-2]
    args.dims = [2, 16]
    if args.out == os.path.join(RESULTS_DIR, "samplers"):
      args.out = os.path.join(RESULTS_DIR, "samplers_smoke")
  result = run(args)
  md = to_markdown(result)
  print(md)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(md)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
