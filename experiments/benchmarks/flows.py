"""Density-estimation benchmark for normalizing flows (NICE, RealNVP, Glow, neural spline
couplings, masked autoregressive spline flows) and flow matching.

Two tasks:
  ring    8 Gaussians on a circle of radius 4, std 0.3 (research.data.toy.Ring). Training data
          is fresh every step; the test NLL is -mean log q(x) on held-out samples and the true
          entropy H(p) = -E log p(x) is a Monte Carlo estimate with the exact mixture density on
          the same samples, so the gap NLL - H = KL(p || q) comes with a paired standard error.
  digits  scikit-learn's 8x8 digits (research.data.digits), 8-bit, trained with uniform
          dequantisation; test bits/dim averaged over several dequantisation draws.
With --seeds N every model is trained N times (training seeds seed .. seed+N-1: parameter
init and the training data stream; the test set stays fixed) and the table gives the mean +- std
over those runs next to the mean test-sampling error of one run.
Prints a markdown table and writes results.json, results.md and sample figures under --out.

  python -m experiments.benchmarks.flows --out /tmp/flows            # full run
  python -m experiments.benchmarks.flows --out /tmp/flows --smoke    # a tiny run (seconds)
  python -m experiments.benchmarks.flows --out /tmp/r --tasks ring --models realnvp --seeds 3 \
      --actnorm on                                                   # the ActNorm ablation
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.data import digits as digits_lib
from research.data import toy
from research.flows import objective as flow_objective

COUPLING_MODELS = ("nice", "realnvp", "glow", "spline", "maf")


def _flow_matching_available() -> bool:
  """Flow matching needs the shared samplers and likelihood code (research.diffusion)."""
  try:
    from research.flows import flow_matching  # noqa: F401
    from research.diffusion import likelihood  # noqa: F401
    from research.diffusion import samplers  # noqa: F401
  except ImportError:
    return False
  return True


def _is_actnorm(path) -> bool:
  return any("actnorm" in str(getattr(k, "key", k)) for k in path)


def actnorm_stats(params) -> Dict:
  """Where the learned ActNorms ended: per-layer log-scales [L, C] summed over layers, extremes."""
  found = {}
  jax.tree_util.tree_map_with_path(
      lambda p, x: found.setdefault(str(getattr(p[-1], "key", p[-1])), []).append(x)
      if _is_actnorm(p) else None, params)
  if not found:
    return {}
  ls = np.concatenate([np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
                       for x in found["log_scale"]])
  bias = np.concatenate([np.asarray(x).reshape(-1) for x in found["bias"]])
  return {"actnorm_log_scale_total": ls.sum(axis=0).tolist(),
          "actnorm_log_scale_abs_max": float(np.abs(ls).max()),
          "actnorm_log_scale_layer0": ls[0].tolist(),
          "actnorm_bias_abs_max": float(np.abs(bias).max())}


def train(objective, init_batch, next_batch: Callable, *, steps: int, lr: float, seed: int,
          chunk: int = 100, actnorm_init: str = "data", actnorm_lr_scale: float = 1.0):
  """Adam with warmup + cosine decay and global-norm clipping; `chunk` steps per device call.

  The ActNorm ablation knobs (no effect on a flow without ActNorm): actnorm_init="identity"
  resets every ActNorm to the identity after the data-dependent init; actnorm_lr_scale scales
  the ActNorm parameters' updates (0 freezes them at their initial values). The log also
  records the global gradient norm before clipping, the share of it that falls on ActNorm
  parameters and the fraction of steps the clip was active.
  """
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), steps, lr * 0.01)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  params = jax.jit(objective.init)(init_rng, init_batch)
  if actnorm_init == "identity":
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if _is_actnorm(p) else x, params)
  an_mask = jax.tree_util.tree_map_with_path(lambda p, _: _is_actnorm(p), params)
  opt_state = tx.init(params)

  def one_step(carry, step):
    params, opt_state = carry
    batch = next_batch(step)
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        params, batch, jax.random.fold_in(rng, step))
    gnorm = optax.global_norm(grads)
    an_sq = sum(jnp.sum(g**2) for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(an_mask))
                if m)
    updates, opt_state = tx.update(grads, opt_state, params)
    if actnorm_lr_scale != 1.0:
      updates = jax.tree.map(lambda u, m: u * actnorm_lr_scale if m else u, updates, an_mask)
    diag = jnp.stack([loss, gnorm, jnp.sqrt(an_sq) / gnorm, (gnorm > 1.0).astype(jnp.float32)])
    return (optax.apply_updates(params, updates), opt_state), diag

  @jax.jit
  def run_chunk(params, opt_state, start):
    (params, opt_state), diag = jax.lax.scan(one_step, (params, opt_state),
                                             start + jnp.arange(chunk))
    return params, opt_state, jnp.mean(diag, axis=0)

  t0 = time.time()
  log = []
  for start in range(0, steps, chunk):
    params, opt_state, diag = run_chunk(params, opt_state, start)
    if (start // chunk) % max(1, steps // chunk // 10) == 0 or start + chunk >= steps:
      loss, gnorm, an_share, clipped = (float(v) for v in diag)
      if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} at step {start + chunk}")
      log.append((start + chunk, loss, gnorm, an_share, clipped))
      print(f"    step {start + chunk:6d}  train loss {loss:.4f}  grad norm {gnorm:.3f} "
            f"(ActNorm share {an_share:.2f}, clipped {clipped:.0%})  ({time.time() - t0:.0f}s)",
            flush=True)
  return params, time.time() - t0, log


# --- ring --------------------------------------------------------------------------------------

def _flow_kwargs(model: str, args) -> Dict:
  """Options every coupling / autoregressive flow of the benchmark shares."""
  actnorm = {"auto": None, "on": True, "off": False}[args.actnorm]
  if model == "nice":
    actnorm = None
  return dict(actnorm=actnorm, num_bins=args.num_bins, tail_bound=args.tail_bound)


def ring_task(model: str, args, seed: int) -> Dict:
  dist = toy.Ring(num_modes=8, radius=4.0, std=0.3, dim=2)
  data_rng = jax.random.PRNGKey(seed + 1)
  test_x, _ = dist.sample(jax.random.PRNGKey(args.seed + 2), args.ring_test)

  def next_batch(step):
    x, _ = dist.sample(jax.random.fold_in(data_rng, step), args.ring_batch)
    return {"x": x}

  if model == "flow_matching":
    from research.flows import flow_matching
    obj = flow_matching.make_objective((2,), hidden=args.ring_hidden, depth=args.fm_depth)
  else:
    layers = args.spline_layers if model in ("spline", "maf") and args.spline_layers else \
        args.ring_layers
    obj = flow_objective.make_objective(model, (2,), image=False, num_layers=layers,
                                        hidden=args.ring_hidden, depth=2,
                                        **_flow_kwargs(model, args))
  params, seconds, log = train(obj, next_batch(args.ring_steps), next_batch, steps=args.ring_steps,
                               lr=args.lr, seed=seed, actnorm_init=args.actnorm_init,
                               actnorm_lr_scale=args.actnorm_lr_scale)
  t0 = time.time()
  # Flow matching: the shared probability-flow likelihood (exact divergence; it jits itself).
  log_prob = obj.log_prob if model == "flow_matching" else jax.jit(obj.log_prob)
  log_q = jnp.concatenate([log_prob(params, xb)
                           for xb in jnp.split(test_x, args.ring_test // 2000)])
  eval_seconds = time.time() - t0
  log_p = dist.log_prob(test_x)
  nll, entropy = float(-jnp.mean(log_q)), float(-jnp.mean(log_p))
  gap = np.asarray(log_p - log_q, np.float64)
  sample = obj.sample if model == "flow_matching" else jax.jit(obj.sample, static_argnums=2)
  samples, _ = sample(params, jax.random.PRNGKey(seed + 3), 2000)
  _scatter(np.asarray(samples), np.asarray(test_x[:2000]), f"{model} on the ring",
           os.path.join(args.out, f"ring_{model}_seed{seed}.png"))
  return {"task": "ring", "model": model + args.tag, "seed": seed, "test_nll": nll, "true_entropy": entropy,
          "gap": float(gap.mean()), "gap_se": float(gap.std() / math.sqrt(len(gap))),
          # A heavy tail of badly covered test points shows up here before it does in the mean.
          "gap_median": float(np.median(gap)), "gap_max": float(gap.max()),
          "frac_gap_over_3": float(np.mean(gap > 3.0)),
          "entropy_se": float(np.std(np.asarray(log_p)) / math.sqrt(len(gap))),
          "train_seconds": seconds, "eval_seconds": eval_seconds, "steps": args.ring_steps,
          "final_train_loss": log[-1][1], "train_log": log, **actnorm_stats(params)}


# --- digits ------------------------------------------------------------------------------------

def digits_task(model: str, args, seed: int) -> Dict:
  train_x = jnp.asarray(digits_lib.to_model_space(digits_lib.load_digits("train", args.seed)[0]))
  test_x = jnp.asarray(digits_lib.to_model_space(digits_lib.load_digits("test", args.seed)[0]))
  data_rng = jax.random.PRNGKey(seed + 1)
  n = train_x.shape[0]

  def next_batch(step):
    idx = jax.random.randint(jax.random.fold_in(data_rng, step), (args.digits_batch,), 0, n)
    return {"x": train_x[idx]}

  if model == "flow_matching":
    from research.flows import flow_matching
    obj = flow_matching.make_objective((8, 8, 1), image=True, ch=args.digits_hidden,
                                       ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=())
  else:
    obj = flow_objective.make_objective(model, (8, 8, 1), image=True,
                                        num_layers=args.digits_layers, hidden=args.digits_hidden,
                                        num_scales=2, **_flow_kwargs(model, args))
  params, seconds, log = train(obj, next_batch(args.digits_steps), next_batch, steps=args.digits_steps,
                               lr=args.lr, seed=seed, actnorm_init=args.actnorm_init,
                               actnorm_lr_scale=args.actnorm_lr_scale)
  # Test bits/dim on the whole test set, averaged over dequantisation draws: the loss for
  # coupling flows, the probability-flow ODE likelihood for flow matching.
  t0 = time.time()
  if model == "flow_matching":
    opts = {"estimator": args.fm_estimator}
    bpd_fn = lambda p, x, r: float(jnp.mean(obj.bits_per_dim(p, x[:args.fm_eval_images], r,
                                                             **opts)))
    draws = max(1, args.dequant_draws // 5)
  else:
    loss_fn = jax.jit(lambda p, x, r: obj.loss(p, {"x": x}, r)[1]["bpd"])
    bpd_fn = lambda p, x, r: float(loss_fn(p, x, r))
    draws = args.dequant_draws
  bpds = [bpd_fn(params, test_x, jax.random.PRNGKey(1000 + i)) for i in range(draws)]
  train_bpd = bpd_fn(params, train_x[:359], jax.random.PRNGKey(999))
  eval_seconds = time.time() - t0
  result = {"task": "digits", "model": model + args.tag, "seed": seed, "test_bpd": float(np.mean(bpds)),
            "test_bpd_se": float(np.std(bpds) / math.sqrt(len(bpds))), "train_bpd": train_bpd,
            "train_seconds": seconds, "eval_seconds": eval_seconds, "steps": args.digits_steps,
            "final_train_loss": log[-1][1]}
  for temp in ((1.0,) if model == "flow_matching" else (1.0, 0.7)):
    if model == "flow_matching":
      x, _ = obj.sample(params, jax.random.PRNGKey(seed + 4), 64)
    else:
      x, _ = jax.jit(lambda p, r: obj.sample(p, r, 64, temperature=temp))(
          params, jax.random.PRNGKey(seed + 4))
    _grid(np.asarray(x), os.path.join(args.out, f"digits_{model}_t{temp}_seed{seed}.png"),
          f"{model}, T={temp}")
  return result


# --- figures -----------------------------------------------------------------------------------

def _scatter(samples, data, title, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
  for ax, pts, name in zip(axes, (data, samples), ("data", "samples")):
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
    ax.set_title(f"{name}" if name == "data" else title)
    ax.set_xlim(-6, 6)
    ax.set_ylim(-6, 6)
    ax.set_aspect("equal")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _grid(x, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  x = (np.clip(x, -1, 1) + 1) / 2
  n = int(math.sqrt(x.shape[0]))
  # A 1-pixel grey frame around each image: digits have blank borders and would merge.
  x = np.pad(x[:n * n, :, :, 0], ((0, 0), (1, 1), (1, 1)), constant_values=0.5)
  h, w = x.shape[1:3]
  img = x.reshape(n, n, h, w).transpose(0, 2, 1, 3).reshape(n * h, n * w)
  fig = plt.figure(figsize=(4, 4.3))
  plt.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  plt.title(title)
  plt.axis("off")
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _mean_std(values):
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summarize(results):
  """One row per (task, model): mean +- std over training seeds, mean test-sampling error."""
  rows = []
  for task, key, se_key in (("ring", "gap", "gap_se"), ("digits", "test_bpd", "test_bpd_se")):
    for model in dict.fromkeys(r["model"] for r in results if r["task"] == task):
      runs = [r for r in results if r["task"] == task and r["model"] == model]
      mean, std = _mean_std([r[key] for r in runs])
      rows.append({"task": task, "model": model, "seeds": [r["seed"] for r in runs],
                   key: mean, f"{key}_seed_std": std,
                   se_key: float(np.mean([r[se_key] for r in runs])),
                   "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                   **({"true_entropy": runs[0]["true_entropy"],
                       "entropy_se": runs[0]["entropy_se"],
                       "test_nll": float(np.mean([r["test_nll"] for r in runs]))}
                      if task == "ring" else
                      {"train_bpd": float(np.mean([r["train_bpd"] for r in runs]))})})
  return rows


def _pm(std):
  return "" if not math.isfinite(std) else f" ± {std:.3f}"


def _table(results) -> str:
  lines = []
  rows = summarize(results)
  ring = [r for r in rows if r["task"] == "ring"]
  if ring:
    lines += ["| ring (8 Gaussians, r=4, std 0.3) | seeds | test NLL (nats) | true entropy | "
              "gap (KL), mean ± std over seeds | test-sampling error | train s (mean) |",
              "|---|---|---|---|---|---|---|"]
    for r in ring:
      lines.append(f"| {r['model']} | {len(r['seeds'])} | {r['test_nll']:.3f} | "
                   f"{r['true_entropy']:.3f} ± {r['entropy_se']:.3f} | "
                   f"{r['gap']:.3f}{_pm(r['gap_seed_std'])} | ± {r['gap_se']:.3f} | "
                   f"{r['train_seconds']:.0f} |")
    lines.append("")
  dig = [r for r in rows if r["task"] == "digits"]
  if dig:
    lines += ["| digits (8x8, 8-bit) | seeds | test bits/dim, mean ± std over seeds | "
              "dequantisation error | train bits/dim (<= 359 images) | train s (mean) |",
              "|---|---|---|---|---|---|"]
    for r in dig:
      lines.append(f"| {r['model']} | {len(r['seeds'])} | "
                   f"{r['test_bpd']:.3f}{_pm(r['test_bpd_seed_std'])} | ± {r['test_bpd_se']:.3f} | "
                   f"{r['train_bpd']:.3f} | {r['train_seconds']:.0f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (created)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
  p.add_argument("--models", default="nice,realnvp,glow,flow_matching",
                 help="comma-separated; flow_matching is skipped until its dependencies exist")
  p.add_argument("--tasks", default="ring,digits")
  p.add_argument("--seed", type=int, default=0, help="first training seed; also fixes the test set")
  p.add_argument("--seeds", type=int, default=1, help="training seeds per model (mean ± std)")
  p.add_argument("--actnorm", default="auto", choices=("auto", "on", "off"),
                 help="ActNorm in every step of the coupling / autoregressive flows; auto = the "
                      "library default (off for vectors, on for images)")
  p.add_argument("--actnorm_init", default="data", choices=("data", "identity"),
                 help="ActNorm ablation: 'identity' resets every ActNorm after the data init")
  p.add_argument("--actnorm_lr_scale", type=float, default=1.0,
                 help="ActNorm ablation: scale of the ActNorm parameters' updates (0 = frozen)")
  p.add_argument("--tag", default="", help="suffix of the model name in the table")
  p.add_argument("--num_bins", type=int, default=8, help="spline / maf: bins per spline")
  p.add_argument("--tail_bound", type=float, default=5.0,
                 help="spline / maf: splines on [-B, B], identity outside")
  p.add_argument("--spline_layers", type=int, default=0,
                 help="ring: layers of the spline / maf flows (0 = --ring_layers)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--ring_steps", type=int, default=20000)
  p.add_argument("--ring_batch", type=int, default=1024)
  p.add_argument("--ring_layers", type=int, default=16)
  p.add_argument("--ring_hidden", type=int, default=256)
  p.add_argument("--ring_test", type=int, default=100000)
  p.add_argument("--fm_depth", type=int, default=4)
  p.add_argument("--fm_estimator", default="exact", choices=("exact", "hutchinson"),
                 help="divergence estimator of the flow-matching likelihood on digits")
  p.add_argument("--fm_eval_images", type=int, default=100000,
                 help="flow matching on digits: evaluate bits/dim on the first N images only")
  p.add_argument("--digits_steps", type=int, default=10000)
  p.add_argument("--digits_batch", type=int, default=256)
  p.add_argument("--digits_layers", type=int, default=8)
  p.add_argument("--digits_hidden", type=int, default=64)
  p.add_argument("--dequant_draws", type=int, default=10)
  args = p.parse_args()
  if args.smoke:
    args.ring_steps, args.ring_batch, args.ring_layers, args.ring_hidden = 200, 256, 4, 32
    args.ring_test, args.digits_steps, args.digits_batch = 4000, 200, 64
    args.digits_layers, args.digits_hidden, args.dequant_draws = 2, 16, 2
  os.makedirs(args.out, exist_ok=True)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  bad = [m for m in models if m not in COUPLING_MODELS + ("flow_matching",)]
  if bad:
    raise SystemExit(f"--models has {bad}; allowed: {COUPLING_MODELS + ('flow_matching',)}")
  if "flow_matching" in models and not _flow_matching_available():
    print("flow_matching skipped: research.flows.flow_matching or the shared samplers/likelihood "
          "code is not there yet")
    models.remove("flow_matching")
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  for t in tasks:
    if t not in ("ring", "digits"):
      raise SystemExit(f"--tasks has {t!r}; allowed: ring, digits")

  print(f"devices: {jax.devices()}")
  results = []
  if args.seeds < 1:
    raise SystemExit(f"--seeds={args.seeds} is not allowed; it must be >= 1")
  for task in tasks:
    for model in models:
      for seed in range(args.seed, args.seed + args.seeds):
        print(f"== {task} / {model} / seed {seed}", flush=True)
        fn = ring_task if task == "ring" else digits_task
        results.append(fn(model, args, seed))
        print(json.dumps(results[-1]), flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
          json.dump({"args": vars(args), "device": str(jax.devices()[0]), "results": results,
                     "summary": summarize(results)}, f, indent=1)
  table = _table(results)
  print(table)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(f"device: {jax.devices()[0]}\n\n{table}\n")


if __name__ == "__main__":
  main()
