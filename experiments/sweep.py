"""--mode=sweep: every (sampler, steps) cell of config.sweep on the latest checkpoint.

Writes WORKDIR/sweep/results.csv (one row per cell), results.md (a table) and a
quality-vs-NFE plot.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List

from experiments import builders
from experiments import data as data_lib
from experiments import plotting
from experiments import sample as sample_lib
from experiments.options import SampleRequest
from experiments.state import restore_trained


def sweep(config, workdir: str) -> List[Dict]:
  """Samples every cell (validate has checked the names and steps) on one restored state."""
  spec = data_lib.build_data_spec(config)
  state = restore_trained(config, workdir, builders.build_objective(config, spec, workdir), spec)
  rows = []
  for name in config.sweep.samplers:
    for steps in config.sweep.steps:
      cell = SampleRequest(name, int(steps), (("denoise", config.sample.denoise),),
                           f"sweep_{name}_{steps}")
      m = sample_lib.sample_and_evaluate(config, workdir, state, cell)
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
    return data_lib.fd_metric(config)
  return "logp_gap" if getattr(spec.toy, "has_density", False) else "sliced_wasserstein"


def _plot(rows, path, key):
  if path is None:  # not the writing process
    return
  if not any(key in r for r in rows):  # e.g. samples outside a bounded support: no logp_gap
    key = "sliced_wasserstein" if any("sliced_wasserstein" in r for r in rows) else "nfe"
  plt = plotting.pyplot()
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
