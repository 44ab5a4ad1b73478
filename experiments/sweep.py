"""--mode=sweep: every (sampler, steps) cell of config.sweep on the latest checkpoint.

Writes WORKDIR/sweep/results.csv (one row per cell), results.md (a table) and a
quality-vs-NFE plot.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List

from experiments import sample as sample_lib
from experiments import workdir as wd


def sweep(config, workdir: str) -> List[Dict]:
  from research.diffusion import samplers
  rows = []
  for name in config.sweep.samplers:
    if name not in samplers.available():
      raise ValueError(f"config.sweep.samplers: unknown sampler {name!r}; allowed: "
                       f"{samplers.available()}.")
  # One restore for every cell (each cell would otherwise rebuild and restore the model).
  from experiments import builders
  spec = builders.build_data_spec(config)
  state = sample_lib.restore_trained(config, workdir, builders.build_objective(config, spec), spec)
  for name in config.sweep.samplers:
    for steps in config.sweep.steps:
      cell = sample_lib.with_sampler(config, name, steps)
      with cell.unlocked():
        cell.sample.tag = f"sweep_{name}_{steps}"
      m = sample_lib.sample_and_evaluate(cell, workdir, state)
      rows.append({"sampler": name, "steps": steps, **m})
  out = os.path.join(workdir, "sweep")
  os.makedirs(out, exist_ok=True)
  keys = ["sampler", "steps"] + sorted({k for r in rows for k in r} - {"sampler", "steps", "tag"}
                                      - {k for r in rows for k in r if k.startswith("mode_share")})
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
    for r in rows:
      f.write("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |\n")
  _plot(rows, os.path.join(out, "quality_vs_nfe.png"), _headline_metric(config, spec))
  return rows


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _headline_metric(config, spec) -> str:
  """What the plot shows: fd_<dataset> for images, else the log-density gap where the toy
  data has a density, else the sliced Wasserstein distance."""
  if spec.kind == "image":
    from experiments import image_data
    return image_data.fd_metric(config)
  return "logp_gap" if getattr(spec.toy, "has_density", False) else "sliced_wasserstein"


def _plot(rows, path, key):
  from experiments.plotting import _plt
  if not any(key in r for r in rows):  # e.g. samples outside a bounded support: no logp_gap
    key = "sliced_wasserstein" if any("sliced_wasserstein" in r for r in rows) else "nfe"
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
  for name in sorted({r["sampler"] for r in rows}):
    pts = sorted((r["nfe"], r.get(key, float("nan"))) for r in rows if r["sampler"] == name)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
  ax.set_xscale("log")
  ax.set_xlabel("NFE")
  ax.set_ylabel(key)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
