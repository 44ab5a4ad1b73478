"""Guidance benchmark: accuracy and within-mode spread against the guidance scale.

  python -m experiments.benchmarks.guidance                 # exact + trained tables (CPU: ~15 min)
  python -m experiments.benchmarks.guidance --smoke         # tiny sizes, seconds-to-minutes
  python -m experiments.benchmarks.guidance --parts exact   # only the exact-score table

Two parts, each a markdown table (printed, and written with JSON to --out):

  exact    The 8-Gaussian ring (radius 4, std 0.1) with exact scores, component = class:
           CFG on the exact conditional model (gmm_conditional_model) and classifier guidance
           of the exact marginal score with the exact noisy classifier, for every sampler.
           At w = s = 1 both are the exact conditional score, so accuracy ~ 1 and spread ~ 1
           measure the samplers alone; the two wrappers are the same function for every
           scale here (marg + w (cond - marg)), so their columns must agree.
  trained  configs/toy/ring_guided.py trained in --workdir (resumed if already there), then
           CFG at every scale with each sampler of --trained_samplers, and classifier
           guidance of the same model's unconditional (null-label) score with a trained
           noise-conditional classifier.

accuracy = share of samples nearest the requested mode's mean; std ratio = within-mode
std of those samples around the requested mean over the true std
(guidance.conditional_mode_metrics).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
# Steps per sampler for the exact part (as in tests/diffusion/test_guidance.py).
EXACT_SAMPLERS = (
    ("ddpm", 200, {"grid": "logsnr"}),
    ("ddim", 100, {"grid": "logsnr"}),
    ("euler_maruyama", 200, {"grid": "logsnr"}),
    ("pc", 200, {}),
    ("ode_euler", 100, {"grid": "logsnr"}),
    ("heun", 50, {}),
    ("ode_adaptive", 1000, {}),
    ("dpm_solver++", 30, {}),
)


def _fmt(v):
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(rows, columns) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def run_exact(n_per_class: int, scales, sampler_list):
  from research.diffusion import analytic, guidance, samplers
  from research.diffusion.sde import VPSDE
  sde = VPSDE()
  k, std = 8, 0.1
  gmm = analytic.GaussianMixture.ring(k, 4.0, std)
  labels = jnp.repeat(jnp.arange(k, dtype=jnp.int32), n_per_class)
  model = guidance.gmm_conditional_model(gmm, sde, "eps")
  logits = guidance.gmm_classifier_logits(gmm, sde)
  rows = []
  for name, steps, opts in sampler_list:
    for scale in scales:
      row = {"sampler": name, "steps": steps, "scale": float(scale)}
      fns = {
          "cfg": guidance.classifier_free_guidance(model, labels, scale, sde=sde,
                                                   prediction="eps", null_label=k),
          "classifier": guidance.classifier_guidance(gmm.score_fn(sde), logits, labels, scale),
      }
      for kind, fn in fns.items():
        x, info = samplers.sample(name, fn, sde, (labels.shape[0], 2), jax.random.PRNGKey(0),
                                  steps=steps, denoise=True, **opts)
        m = guidance.conditional_mode_metrics(x, labels, gmm.means, std)
        row["nfe"] = info["nfe"]
        row[f"{kind}_accuracy"] = m["accuracy"]
        row[f"{kind}_std_ratio"] = m["std_ratio"]
      rows.append(row)
      print(row, flush=True)
  return rows


def run_trained(workdir: str, smoke: bool, sampler_list, scales):
  from configs.toy import ring_guided
  from experiments import guided
  from experiments import train as train_lib
  from experiments import validate

  def config(kind, sampler=None, steps=None):
    c = ring_guided.get_config(("tiny," if smoke else "") + f"kind={kind}")
    with c.unlocked():
      c.guidance.scales = tuple(scales)
      if sampler:
        c.sample.sampler, c.sample.steps = sampler, steps
      c.train.progress = False
    return c

  t0 = time.perf_counter()
  c = config("cfg")
  validate.validate(c)
  state = train_lib.train(c, workdir)
  train_seconds = time.perf_counter() - t0
  rows = []
  for sampler, steps in sampler_list:
    for kind in ("cfg", "classifier"):
      c = config(kind, sampler, steps)
      validate.validate(c)
      res = guided.guided_sample_and_evaluate(c, workdir, state)
      for m in res.values():
        rows.append({"kind": kind, "sampler": sampler, "steps": steps, "scale": m["scale"],
                     "nfe": m["nfe"], "accuracy": m["accuracy"], "std_ratio": m["std_ratio"]})
        print(rows[-1], flush=True)
  # The classifier's final logged loss against the Bayes-optimal loss on the same batch.
  from experiments import workdir as wd
  clf = [r for r in wd.read_metrics(workdir) if r["split"] == "classifier"]
  return rows, {"train_seconds": train_seconds, "train_steps": int(state.step),
                "samples_per_class": int(c.guidance.samples_per_class),
                "classifier_loss": clf[-1]["loss"] if clf else None,
                "classifier_loss_bayes": clf[-1].get("loss_bayes") if clf else None}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes (a quick check that it runs)")
  p.add_argument("--parts", default="exact,trained", help="comma list of: exact, trained")
  p.add_argument("--workdir", default="/tmp/ring_guided_bench",
                 help="workdir of the trained ring_guided run (resumed when present)")
  p.add_argument("--trained_samplers", default="dpm_solver++:50,ddpm:1000",
                 help="sampler:steps list for the trained part")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                 help="folder for guidance.json and guidance.md")
  args = p.parse_args()
  parts = [s.strip() for s in args.parts.split(",") if s.strip()]
  bad = sorted(set(parts) - {"exact", "trained"})
  if bad:
    p.error(f"--parts: unknown {bad}; allowed: exact, trained")
  trained_samplers = []
  for item in args.trained_samplers.split(","):
    name, _, steps = item.partition(":")
    trained_samplers.append((name.strip(), int(steps or 100)))
  out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "smoke": args.smoke}
  md = [f"# Guidance benchmark\n\nDevice: {out['device']}, jax {jax.__version__}"
        f"{' (smoke sizes)' if args.smoke else ''}. Generated by "
        "`python -m experiments.benchmarks.guidance`.\n"]
  if "exact" in parts:
    n = 50 if args.smoke else 1000
    samplers_ = EXACT_SAMPLERS[:2] if args.smoke else EXACT_SAMPLERS
    rows = run_exact(n, SCALES, samplers_)
    out["exact"] = rows
    md.append(f"## Exact scores: 8-Gaussian ring (std 0.1), {8 * n} samples per cell\n\n"
              "CFG on the exact conditional model vs classifier guidance with the exact noisy "
              "classifier (scale = w = s).\n")
    md.append(markdown(rows, ["sampler", "steps", "nfe", "scale", "cfg_accuracy",
                              "cfg_std_ratio", "classifier_accuracy",
                              "classifier_std_ratio"]) + "\n")
  if "trained" in parts:
    samplers_ = [("ddim", 10)] if args.smoke else trained_samplers
    scales = (0.0, 3.0) if args.smoke else SCALES
    rows, info = run_trained(args.workdir, args.smoke, samplers_, scales)
    out["trained"], out["trained_info"] = rows, info
    md.append("## Trained: configs/toy/ring_guided.py (conditional MLP, label dropout 0.2)\n\n"
              f"{info['train_steps']} training steps ({info['train_seconds']:.0f} s here); "
              "classifier guidance adds a trained noise-conditional classifier (final loss "
              f"{_fmt(info['classifier_loss'])} nats vs {_fmt(info['classifier_loss_bayes'])} "
              "for the exact posterior on the same batch) to the model's null-label score. "
              f"{info['samples_per_class']} samples per class per cell.\n")
    md.append(markdown(rows, ["kind", "sampler", "steps", "nfe", "scale", "accuracy",
                              "std_ratio"]) + "\n")
  os.makedirs(args.out, exist_ok=True)
  name = "guidance_smoke" if args.smoke else "guidance"
  with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump(out, f, indent=1)
  text = "\n".join(md)
  with open(os.path.join(args.out, f"{name}.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
