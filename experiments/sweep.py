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
  for name in config.sweep.samplers:
    for steps in config.sweep.steps:
      cell = sample_lib.with_sampler(config, name, steps)
      with cell.unlocked():
        cell.sample.tag = f"sweep_{name}_{steps}"
      m = sample_lib.sample_and_evaluate(cell, workdir)
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
  _plot(rows, os.path.join(out, "quality_vs_nfe.png"))
  return rows


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(rows, path):
  from experiments.plotting import _plt
  # The headline metric of the data: log-density gap (toy data with a density), else the
  # sliced Wasserstein distance (toy), else fd_<dataset> (images).
  keys = {k for r in rows for k in r}
  fd_keys = sorted(k for k in keys if k.startswith("fd_") and not k.endswith("_train_vs_test")
                   and k not in ("fd_num_samples", "fd_num_test"))
  key = next((k for k in ("logp_gap", "sliced_wasserstein", *fd_keys) if k in keys), "nfe")
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
