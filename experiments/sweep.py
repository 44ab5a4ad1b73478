"""--mode=sweep: compare samplers cell by cell, resumably, with intervals over seeds.

A cell is (training variant, sampler, options, steps, guidance scale, seed): config.sweep names
the samplers, per-family option
grids (`sweep.grid = "ddim: eta=0|0.5, grid=uniform|quadratic; heun: S_churn=0|10"`, a
product per family), explicit cells (`sweep.cells = ("ddim: eta=0.3",)`), the step counts or
NFE budgets (`sweep.nfe`: each cell gets the most steps whose NFE fits, from
samplers.steps_for_nfe, so Heun's two evaluations per step and a final denoise count) and
the seeds. `sweep.score = "exact"` samples toy Gaussian mixtures with the true score (no
checkpoint: sampler error apart from training error); "model" uses the run's latest
checkpoint (train it first with --mode=train). `sweep.guidance_scales` adds classifier-free
guidance weights w as an axis for class-conditional models (every class in equal shares, the
same noise at every w). `sweep.train` lists config overrides that need training
("diffusion.prediction='eps'"): each variant is trained in WORKDIR/runs/<entry>/ (resumable:
the train loop continues from the run's latest checkpoint, a finished run is not retrained)
and then sampled with the whole grid.

Devices: each cell's batch is split over every visible device (the run's mesh for a
checkpoint, config.mesh for the exact score), so a host with several devices samples every
cell data-parallel; results agree with one device to float32 rounding.

Each finished cell is stored at once in WORKDIR/sweep/cells/<key>.json, keyed by its
parameters and the checkpoint step; a rerun (after a kill, or with cells added) samples
only cells without a stored result. The tables are regenerated from the stored cells:

  WORKDIR/sweep/results.json, results.csv   one row per (sampler, options, steps): every option,
                                            the NFE measured, mean and 95% interval over seeds
                                            of each metric, warm seconds per sample
  WORKDIR/sweep/results.md                  the table and the best sampler at each NFE budget
  WORKDIR/sweep/quality_vs_nfe.png          the headline metric against NFE, error bars, every
                                            variant; quality_vs_nfe_<family>.png one per sampler
                                            family; quality_vs_guidance.png with guidance scales

`report(config, workdir)` rewrites them from the stored cells without sampling.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
from absl import logging

from experiments import builders
from experiments import data as data_lib
from experiments import guided
from experiments import mesh as mesh_lib
from experiments import plotting
from experiments import sample as sample_lib
from experiments import train as train_lib
from experiments import workdir as wd
from experiments.options import ConfigError, SampleRequest
from experiments.sweep_cells import cells, check, train_variants  # noqa: F401  (re-exported)
from experiments.state import restore_trained
from research.diffusion import analytic
from research.diffusion import guidance as guidance_lib
from research.diffusion import samplers as samplers_lib

CELLS_DIR = os.path.join("sweep", "cells")


def cell_key(cell: Dict[str, Any], target: Dict[str, Any]) -> str:
  blob = json.dumps({**cell, **target}, sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:16]


# --- sampling -----------------------------------------------------------------------------------
def _exact_mixture(spec):
  ds = spec.toy
  if ds is None or not all(hasattr(ds, a) for a in ("means", "stds", "weights")):
    raise ConfigError("config.sweep.score='exact' needs toy Gaussian-mixture data (ring, grid, "
                      "...); use 'model' for this dataset.")
  return analytic.GaussianMixture(np.asarray(ds.means), np.asarray(ds.stds),
                                  np.asarray(ds.weights))


class _Target:
  """What a sweep samples: the exact mixture score, or the run's (trained) checkpoint."""

  def __init__(self, config, workdir: str, spec):
    self.config, self.spec = config, spec
    self.objective = builders.build_objective(config, spec, workdir)
    self.mesh, self.devices = None, 1
    # Part of every cell's key: a cell drawn with another sample count is another result.
    num = int(config.sweep.num_samples or config.sample.num_samples)
    if config.sweep.score == "exact":
      self.gmm = _exact_mixture(spec)
      self.score = self.gmm.score_fn(self.objective.sde)
      self.key = {"score": "exact", "num_samples": num}
      self.params = None
      self.mesh = mesh_lib.build_mesh(config) if jax.device_count() > 1 else None
      return
    state = restore_trained(config, workdir, self.objective, spec)
    self.params = state.ema_params if config.sample.use_ema else state.params
    self.key = {"score": "model", "checkpoint_step": int(state.step), "num_samples": num}
    mesh = mesh_lib.mesh_of(self.params)  # draw_samples splits each batch over it
    self.devices = 1 if mesh is None else int(mesh.devices.size)

  def labels(self, num: int) -> Optional[np.ndarray]:
    """A conditional model's labels: every class in equal shares, in order."""
    if self.params is None or not self.config.data.conditional:
      return None
    return np.arange(num, dtype=np.int32) % self.spec.num_classes

  def draw(self, cell, num: int, rng):
    """(samples [num, *dims] on the host, NFE) of one cell; the batch split over the devices."""
    if self.params is None:
      dims = tuple(self.spec.dims)
      out, nfe = [], 0
      chunk = self.config.sample.batch_size
      with mesh_lib.use(self.mesh):
        for i, start in enumerate(range(0, num, chunk)):
          n = min(chunk, num - start)
          x, info = samplers_lib.sample(cell["sampler"], self.score, self.objective.sde,
                                        (n, *dims), jax.random.fold_in(rng, i),
                                        steps=cell["steps"], **cell["options"])
          self.devices = max(self.devices, len(x.sharding.device_set))
          out.append(mesh_lib.gather(x))
          nfe = int(info["nfe"])
      return np.concatenate(out, 0), nfe
    labels = self.labels(num)
    w = cell.get("guidance_scale")
    if w is not None and not getattr(self.objective, "guidance_in_sample", False):
      samples, nfe = guided.draw_guided(
          self.config, self._cfg_score(), self.objective.sde, tuple(self.spec.dims), labels,
          float(w), rng, mesh_lib.mesh_of(self.params), sampler=cell["sampler"],
          steps=cell["steps"], options=dict(cell["options"]))
      return samples, nfe
    request = SampleRequest(cell["sampler"], cell["steps"], tuple(cell["options"].items()),
                            "sweep")
    extra = {} if w is None else {"guidance_scale": float(w)}  # objectives that guide in sample
    samples, info = sample_lib.draw_samples(self.config, self.objective, self.params, request,
                                            rng, num, labels=labels, **extra)
    return samples, int(info["nfe"])

  def _cfg_score(self):
    if getattr(self, "_make_cfg", None) is None:
      self._make_cfg = guided.cfg_score_factory(self.objective, self.params, self.spec)
    return self._make_cfg


def _run_cell(config, target: _Target, cell) -> Dict[str, Any]:
  num = int(config.sweep.num_samples or config.sample.num_samples)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000 + cell["seed"])
  t0 = time.perf_counter()
  samples, nfe = target.draw(cell, num, rng)
  seconds = time.perf_counter() - t0
  labels = target.labels(num)
  metrics = sample_lib.sample_metrics(config, target.spec, samples, labels, rng)
  toy = target.spec.toy
  if labels is not None and toy is not None and hasattr(toy, "means") and hasattr(toy, "std"):
    # conditional toy mixtures: the share of samples in the requested mode and its spread
    cond = guidance_lib.conditional_mode_metrics(samples, labels, toy.means, toy.std)
    metrics.update({"accuracy": cond["accuracy"], "cond_std_ratio": cond["std_ratio"]})
  metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))
             and not k.startswith("mode_share")}
  return {**cell, "nfe": nfe, "seconds_per_sample": seconds / num, "devices": target.devices,
          "metrics": metrics}


def run_dir(workdir: str, name: str) -> str:
  """WORKDIR/runs/<name>/: where a training variant of config.sweep.train is trained."""
  return os.path.join(workdir, "runs", name)


def _variants(config, workdir: str):
  """(train text or None, its config, its workdir) of every target the sweep samples."""
  if not config.sweep.train:
    return [(None, config, workdir)]
  return [(text, sub, run_dir(workdir, name)) for text, name, sub in train_variants(config)]


def _train_variant(text: str, config, workdir: str) -> None:
  """Trains a variant up to train.steps, resuming from its latest checkpoint; a finished run
  is left untouched."""
  ckpt = wd.Checkpointer(workdir, keep=config.train.keep_ckpts)
  latest = ckpt.latest_step()
  ckpt.close()
  if latest is not None and latest >= config.train.steps:
    logging.info("Sweep: variant %r already trained (step %d) in %s.", text, latest, workdir)
    return
  logging.info("Sweep: training variant %r in %s (from step %s).", text, workdir, latest or 0)
  train_lib.train(config, workdir)


def sweep(config, workdir: str) -> List[Dict]:
  """Trains any training variant not yet trained, runs every cell without a stored result,
  then writes the tables; returns the rows."""
  todo = cells(config)
  directory = os.path.join(workdir, CELLS_DIR)
  if wd.is_writer():
    os.makedirs(directory, exist_ok=True)
  keys: Dict[Optional[str], Dict[str, Any]] = {}
  for text, sub, sub_dir in _variants(config, workdir):
    if text is not None:
      _train_variant(text, sub, sub_dir)
    target = _Target(sub, sub_dir, data_lib.build_data_spec(sub))
    keys[text] = target.key
    mine = [c for c in todo if c.get("train") == text]
    pending = [c for c in mine
               if not os.path.exists(os.path.join(directory, cell_key(c, target.key) + ".json"))]
    logging.info("Sweep%s: %d cells, %d stored, %d to sample (%s).",
                 "" if text is None else f" [{text}]", len(mine), len(mine) - len(pending),
                 len(pending), target.key)
    bar = None
    if pending and config.train.progress:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=len(pending), desc="sweep cells", dynamic_ncols=True)
    for c in pending:
      result = _run_cell(sub, target, c)
      if wd.is_writer():
        wd.atomic_write_bytes(os.path.join(directory, cell_key(c, target.key) + ".json"),
                              json.dumps({**result, "target": target.key}).encode())
      if bar is not None:
        bar.update(1)
        bar.set_postfix(cell=f"{c['sampler']}:{c['steps']}")
    if bar is not None:
      bar.close()
  return _write_tables(config, workdir, data_lib.build_data_spec(config), keys, todo)


def report(config, workdir: str) -> str:
  """Rewrites the sweep tables from the stored cells (no sampling); returns the markdown."""
  spec = data_lib.build_data_spec(config)
  directory = os.path.join(workdir, CELLS_DIR)
  stored = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    if name.endswith(".json"):
      with open(os.path.join(directory, name)) as f:
        stored.append(json.load(f))
  if not stored:
    raise ConfigError(f"no stored sweep cells in {directory}: run --mode=sweep first.")
  # Per training variant, the target of its newest cells (e.g. the latest checkpoint step)
  # drawn with this config's sample count.
  num = int(config.sweep.num_samples or config.sample.num_samples)
  keys: Dict[Optional[str], Dict[str, Any]] = {}
  for c in stored:
    if c["target"].get("num_samples") != num:
      continue
    old = keys.get(c.get("train"))
    if old is None or c["target"].get("checkpoint_step", -1) > old.get("checkpoint_step", -1):
      keys[c.get("train")] = c["target"]
  _write_tables(config, workdir, spec, keys, cells(config))
  with open(os.path.join(workdir, "sweep", "results.md")) as f:
    return f.read()


# --- tables -------------------------------------------------------------------------------------
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def interval95(values) -> Tuple[float, float]:
  """(mean, half-width of the 95% t-interval of the mean); 0 width for one value."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), 0.0
  dof = len(v) - 1
  # Between tabulated degrees of freedom, the next smaller one's t (a slightly wider interval).
  t = _T975.get(dof) or _T975[max(k for k in _T975 if k <= dof)]
  return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


def _headline_metric(config, spec) -> str:
  if spec.kind == "image":
    return data_lib.fd_metric(config)
  return "logp_gap" if getattr(spec.toy, "has_density", False) else "sliced_wasserstein"


def _label(row, scale: bool = True) -> str:
  """"ddim eta=0.5 w=3 [diffusion.prediction='v']": sampler, options, guidance, training."""
  opts = {k: v for k, v in row["options"].items() if k != "denoise" or v}
  out = row["sampler"] + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in opts.items()))
  if scale and row.get("guidance_scale") is not None:
    out += f" w={row['guidance_scale']:g}"
  if row.get("train") is not None:
    out += f" [{row['train']}]"
  return out


def aggregate(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One row per (training variant, sampler, options, steps, guidance scale): means and 95%
  intervals over the seeds."""
  groups: Dict[str, List[Dict[str, Any]]] = {}
  for r in results:
    groups.setdefault(json.dumps([r["sampler"], r["options"], r["steps"],
                                  r.get("guidance_scale"), r.get("train")], sort_keys=True),
                      []).append(r)
  rows = []
  for members in groups.values():
    first = members[0]
    row = {"sampler": first["sampler"], "options": first["options"], "steps": first["steps"],
           **{k: first[k] for k in ("guidance_scale", "train") if k in first},
           "nfe_budget": first.get("nfe_budget"), "nfe": float(np.mean([m["nfe"] for m in members])),
           "seeds": len(members), "devices": max(m.get("devices", 1) for m in members),
           # warm: the fastest seed (the first one of a new shape also compiles)
           "seconds_per_sample": min(m["seconds_per_sample"] for m in members)}
    for k in sorted(first["metrics"]):
      mean, half = interval95([m["metrics"][k] for m in members if k in m["metrics"]])
      row[k], row[k + "_ci95"] = mean, half
    rows.append(row)
  return rows


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def _write_tables(config, workdir, spec, target_keys, todo) -> List[Dict]:
  """The tables and plots of the stored cells of `todo`; target_keys: train text (None
  without training variants) -> the target its cells were sampled on."""
  directory = os.path.join(workdir, CELLS_DIR)
  results = []
  for c in todo:
    key = target_keys.get(c.get("train"))
    path = None if key is None else os.path.join(directory, cell_key(c, key) + ".json")
    if path is not None and os.path.exists(path):
      with open(path) as f:
        results.append(json.load(f))
  order = list(dict.fromkeys(c.get("train") for c in todo))  # config order, not stored order
  target_key = (target_keys[None] if list(target_keys) == [None]
                else {str(k): target_keys[k] for k in order if k in target_keys})
  rows = aggregate(results)
  if not wd.is_writer():
    return rows
  headline = _headline_metric(config, spec)
  if rows and headline not in rows[0]:
    headline = "sliced_wasserstein" if "sliced_wasserstein" in rows[0] else "nfe"
  out = os.path.join(workdir, "sweep")
  axes = [k for k in ("guidance_scale", "train") if any(k in r for r in rows)]
  metric_keys = sorted({k for r in rows for k in r} - {"sampler", "options", "steps", "nfe",
                                                        "nfe_budget", "seeds", "devices",
                                                        "seconds_per_sample", *axes})
  option_keys = sorted({k for r in rows for k in r["options"]})
  keys = [k for k in ("train",) if k in axes] + ["sampler", *option_keys, "steps"] + [
      k for k in ("guidance_scale",) if k in axes] + [
          "nfe_budget", "nfe", "seeds", "devices", "seconds_per_sample", *metric_keys]
  flat = [{**{k: r["options"].get(k, "") for k in option_keys}, **r} for r in rows]
  wd.atomic_write_bytes(os.path.join(out, "results.json"), json.dumps(
      {"target": target_key, "headline": headline, "rows": rows}, indent=1).encode())
  with open(os.path.join(out, "results.csv.tmp"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(flat)
  os.replace(os.path.join(out, "results.csv.tmp"), os.path.join(out, "results.csv"))
  wd.atomic_write_bytes(os.path.join(out, "results.md"),
                        to_markdown(rows, headline, target_key).encode())
  _plot(rows, os.path.join(out, "quality_vs_nfe.png"), headline)
  for family in dict.fromkeys(r["sampler"] for r in rows):
    _plot([r for r in rows if r["sampler"] == family],
          os.path.join(out, f"quality_vs_nfe_{family_file(family)}.png"), headline, title=family)
  if "guidance_scale" in axes:
    _plot_guidance(rows, os.path.join(out, "quality_vs_guidance.png"), headline)
  return rows


def family_file(name: str) -> str:
  """A sampler name as a file-name part: "dpm_solver++" -> "dpm_solverpp"."""
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace("+", "p"))


def to_markdown(rows, headline: str, target_key) -> str:
  show = [headline] + [k for k in ("classifier_accuracy", "accuracy", "cond_std_ratio",
                                   "modes_covered", "mode_weight_error", "std_ratio")
                       if rows and k in rows[0] and k != headline]
  lines = [f"Sweep on {target_key}; mean +- 95% interval over seeds; seconds per sample warm.",
           "", "| sampler | steps | NFE | seeds | " + " | ".join(show) + " | s/sample |",
           "|---|---|---|---|" + "---|" * len(show) + "---|"]
  for r in rows:
    vals = " | ".join(f"{_fmt(r.get(k))} +- {_fmt(r.get(k + '_ci95'))}" for k in show)
    lines.append(f"| {_label(r)} | {r['steps']} | {_fmt(r['nfe'])} | {r['seeds']} | {vals} | "
                 f"{r['seconds_per_sample']:.2e} |")
  budgets = sorted({r["nfe_budget"] for r in rows if r.get("nfe_budget")})
  if budgets and headline in (rows[0] if rows else {}):
    # logp_gap: closest to 0 is best; a distance: smallest is best.
    score = (lambda r: abs(r[headline])) if headline == "logp_gap" else (lambda r: r[headline])
    lines += ["", f"Best at each NFE budget (by {headline}):", "",
              f"| NFE budget | sampler | steps | {headline} |", "|---|---|---|---|"]
    for b in budgets:
      best = min((r for r in rows if r.get("nfe_budget") == b), key=score)
      lines.append(f"| {b} | {_label(best)} | {best['steps']} | {_fmt(best[headline])} +- "
                   f"{_fmt(best[headline + '_ci95'])} |")
  return "\n".join(lines) + "\n"


def _plot_guidance(rows, path, key):
  """The headline metric (and the classifier's accuracy, where measured) against w, one line
  per (sampler, options, steps, training variant)."""
  plt = plotting.pyplot()
  extra = next((k for k in ("classifier_accuracy", "accuracy") if k in rows[0]), None)
  panels = [key] + ([extra] if extra else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), dpi=110,
                           squeeze=False)
  for ax, metric in zip(axes[0], panels):
    for label in dict.fromkeys(_label(r, scale=False) + f" {r['steps']} steps" for r in rows):
      pts = sorted((r["guidance_scale"], r.get(metric, float("nan")),
                    r.get(metric + "_ci95", 0.0)) for r in rows
                   if _label(r, scale=False) + f" {r['steps']} steps" == label)
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                  fmt="o-", capsize=2, label=label)
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel(metric)
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _plot(rows, path, key, title=""):
  if path is None or not rows:
    return
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  if title:
    ax.set_title(title, fontsize=9)
  for label in dict.fromkeys(_label(r) for r in rows):
    pts = sorted((r["nfe"], r.get(key, float("nan")), r.get(key + "_ci95", 0.0)) for r in rows
                 if _label(r) == label)
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-",
                capsize=2, label=label)
  ax.set_xscale("log")
  ax.set_xlabel("NFE")
  ax.set_ylabel(key)
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
