"""Sweeps (experiments/sweep.py, sweep_cells.py) on the exact ring score: no training needed."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import quickstart
from experiments import sweep as sweep_lib
from experiments import sweep_cells
from experiments import validate
from experiments.options import ConfigError


def _config(**over):
  c = quickstart.get_config("tiny")
  c.sweep.score = "exact"
  c.sample.num_samples = 128
  c.sample.batch_size = 128
  c.sweep.samplers = ("ddim", "heun", "pc")
  c.sweep.grid = "ddim: eta=0.0|1.0"
  c.sweep.nfe = (7, 12)
  c.sweep.seeds = (0, 1, 2)
  for k, v in over.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def test_grid_parsing_and_bad_sweeps_name_the_field():
  assert sweep_cells.parse_grid("ddim: eta=0|0.5, grid=uniform|quadratic; heun: S_churn=0|10") \
      == {"ddim": [{"eta": 0, "grid": "uniform"}, {"eta": 0, "grid": "quadratic"},
                   {"eta": 0.5, "grid": "uniform"}, {"eta": 0.5, "grid": "quadratic"}],
          "heun": [{"S_churn": 0}, {"S_churn": 10}]}
  for over, match in [({"sweep.grid": "ddim eta=0"}, "sweep.grid"),
                      ({"sweep.grid": "dpm_solver++: order=2"}, "sweep.grid names"),
                      ({"sweep.grid": "ddim: eta=-1"}, "config.sweep: cell ddim"),
                      ({"sweep.score": "true"}, "sweep.score"),
                      ({"sweep.seeds": ()}, "sweep.seeds"),
                      ({"sweep.nfe": (0,)}, "sweep.nfe")]:
    with pytest.raises(ConfigError, match=match):
      validate.validate(_config(**over), mode="sweep")


def test_cells_are_aligned_by_the_nfe_they_spend():
  cells = sweep_cells.cells(_config(**{"sweep.seeds": (0,)}))
  got = {(c["sampler"], c["options"].get("eta"), c["nfe_budget"]): c["steps"] for c in cells}
  # quickstart denoises at the end (1 NFE): ddim 1 per step, heun 2, pc 2 (1 Langevin step).
  assert got == {("ddim", 0.0, 7): 6, ("ddim", 0.0, 12): 11, ("ddim", 1.0, 7): 6,
                 ("ddim", 1.0, 12): 11, ("heun", None, 7): 3, ("heun", None, 12): 5,
                 ("pc", None, 7): 3, ("pc", None, 12): 5}


def test_sweep_options_seeds_intervals_resume_and_report(tmp_path):
  c = _config()
  validate.validate(c, mode="sweep")
  workdir = str(tmp_path)
  rows = sweep_lib.sweep(c, workdir)
  assert len(rows) == 8 and all(r["seeds"] == 3 for r in rows)
  for r in rows:  # measured NFE within the budget, and equal to it where the steps fill it
    assert r["nfe"] <= r["nfe_budget"]
  by = {(r["sampler"], r["options"].get("eta"), r["nfe_budget"]): r for r in rows}
  assert by[("ddim", 0.0, 12)]["nfe"] == 12 and by[("heun", None, 12)]["nfe"] == 11
  # The eta grid reaches the sampler: eta = 0 and eta = 1 give different samples.
  assert by[("ddim", 0.0, 12)]["logp_gap"] != by[("ddim", 1.0, 12)]["logp_gap"]
  # Mean and 95% t-interval over the three seeds, from the stored cells.
  cell_dir = tmp_path / "sweep" / "cells"
  stored = [json.loads(p.read_text()) for p in cell_dir.iterdir()]
  assert len(stored) == 24
  # keyed by the sample count too (another sweep.num_samples is another result)
  assert all(s["target"] == {"score": "exact", "num_samples": 128} for s in stored)
  vals = [s["metrics"]["logp_gap"] for s in stored
          if s["sampler"] == "ddim" and s["options"]["eta"] == 1.0 and s["nfe_budget"] == 12]
  assert len(vals) == 3 and len(set(vals)) == 3
  row = by[("ddim", 1.0, 12)]
  np.testing.assert_allclose(row["logp_gap"], np.mean(vals), rtol=1e-12)
  np.testing.assert_allclose(row["logp_gap_ci95"], 4.303 * np.std(vals, ddof=1) / np.sqrt(3),
                             rtol=1e-9)
  table = (tmp_path / "sweep" / "results.md").read_text()
  assert "Best at each NFE budget" in table
  assert (tmp_path / "sweep" / "quality_vs_nfe.png").stat().st_size > 1000

  def without_timing(md):  # the resampled cell's wall time is measured again; all else is equal
    # main-table rows end with the s/sample cell; the best-at-NFE rows (4 cells) have none
    return [line.rsplit("|", 2)[0] if line.startswith("| ") and line.count("|") > 6 else line
            for line in md.splitlines()]

  # A killed sweep: one cell lost. The rerun samples only that cell; the table is identical
  # (every metric, interval and NFE; the warm seconds of the resampled cell are a new timing).
  files = sorted(cell_dir.iterdir())
  lost = files[5]
  before = {p.name: p.stat().st_mtime_ns for p in files if p != lost}
  os.remove(lost)
  sweep_lib.sweep(c, workdir)
  assert lost.exists()
  assert {p.name: p.stat().st_mtime_ns for p in sorted(cell_dir.iterdir()) if p != lost} == before
  assert without_timing((tmp_path / "sweep" / "results.md").read_text()) == without_timing(table)
  table = (tmp_path / "sweep" / "results.md").read_text()

  # --mode=report regenerates the same tables from the stored cells without sampling.
  csv_text = (tmp_path / "sweep" / "results.csv").read_text()
  for name in ("results.md", "results.csv", "results.json"):
    os.remove(tmp_path / "sweep" / name)
  assert sweep_lib.report(c, workdir) == table
  assert (tmp_path / "sweep" / "results.csv").read_text() == csv_text

  # Adding a cell samples only the new one.
  c2 = _config(**{"sweep.cells": ("ddim: eta=0.5",)})
  sweep_lib.sweep(c2, workdir)
  assert len(list(cell_dir.iterdir())) == 24 + 2 * 3


def _trained_tiny(config, workdir, steps=20):
  from experiments import train as train_lib  # pylint: disable=import-outside-toplevel
  config.train.steps = steps
  train_lib.train(config, workdir)
  return config


def test_guidance_scales_are_a_cell_axis(tmp_path):
  """sweep.guidance_scales: cells (sampler, options, steps, w, seed) on a conditional model;
  w = 1 is the conditional model (the unguided cell to float32 rounding), w changes samples."""
  from configs.toy import ring_guided  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  c = _trained_tiny(ring_guided.get_config("tiny"), workdir, steps=30)
  c.sample.num_samples = c.sample.batch_size = 64
  c.sweep.score, c.sweep.samplers, c.sweep.grid = "model", ("ddim",), ""
  c.sweep.steps, c.sweep.nfe, c.sweep.seeds = (4,), (), (0, 1)
  c.sweep.guidance_scales = (0.0, 1.0, 4.0)
  validate.validate(c, mode="sweep")
  assert [(x["guidance_scale"], x["seed"]) for x in sweep_cells.cells(c)] == [
      (0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1), (4.0, 0), (4.0, 1)]
  rows = {r["guidance_scale"]: r for r in sweep_lib.sweep(c, workdir)}
  assert sorted(rows) == [0.0, 1.0, 4.0] and all(r["seeds"] == 2 for r in rows.values())
  assert 0.0 <= rows[4.0]["accuracy"] <= 1.0
  assert rows[0.0]["sliced_wasserstein"] != rows[4.0]["sliced_wasserstein"]
  assert rows[0.0]["accuracy"] != rows[4.0]["accuracy"]
  assert "w=4" in (tmp_path / "sweep" / "results.md").read_text()
  assert (tmp_path / "sweep" / "quality_vs_guidance.png").stat().st_size > 1000
  # The same cells without guidance (conditional sampling) = the w = 1 row.
  c.sweep.guidance_scales = ()
  (plain,) = sweep_lib.sweep(c, workdir)
  for k in ("sliced_wasserstein", "accuracy", "cond_std_ratio"):
    np.testing.assert_allclose(plain[k], rows[1.0][k], rtol=1e-3, atol=1e-3)
  for over, match in [({"sweep.guidance_scales": (-1.0,)}, "sweep.guidance_scales"),
                      ({"sweep.guidance_scales": (2.0,), "data.conditional": False},
                       "class-conditional")]:
    with pytest.raises(ConfigError, match=match):
      validate.validate(_config(**{"sweep.score": "model", **over}), mode="sweep")


def test_a_training_sweep_with_two_cells_trains_two_runs(tmp_path):
  """sweep.train: each entry trained in WORKDIR/runs/<entry>/ and sampled; a rerun trains and
  samples nothing again; --mode=report rebuilds the same table."""
  entries = ("diffusion.prediction='eps'", "diffusion.prediction='v'")
  c = _config(**{"sweep.score": "model", "sweep.samplers": ("ddim",), "sweep.grid": "",
                 "sweep.nfe": (5,), "sweep.seeds": (0, 1), "sweep.train": entries,
                 "train.steps": 6})
  validate.validate(c, mode="sweep")
  workdir = str(tmp_path)
  rows = sweep_lib.sweep(c, workdir)
  runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
  assert runs == ["diffusion.prediction=eps", "diffusion.prediction=v"]
  for name, want in zip(runs, ("eps", "v")):
    cfg = json.loads((tmp_path / "runs" / name / "config.json").read_text())
    assert cfg["diffusion"]["prediction"] == want and cfg["train"]["steps"] == 6
    assert (tmp_path / "runs" / name / "checkpoints" / "6").is_dir()
  assert [(r["train"], r["seeds"]) for r in rows] == [(e, 2) for e in entries]
  assert rows[0]["sliced_wasserstein"] != rows[1]["sliced_wasserstein"]  # two different models
  table = (tmp_path / "sweep" / "results.md").read_text()
  assert all(f"[{e}]" in table for e in entries)
  stamps = {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()
            and "sweep" not in p.parts}
  assert len(list((tmp_path / "sweep" / "cells").iterdir())) == 4
  sweep_lib.sweep(c, workdir)  # nothing to train or sample again
  assert {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()
          and "sweep" not in p.parts} == stamps
  os.remove(tmp_path / "sweep" / "results.md")
  assert sweep_lib.report(c, workdir) == table
  with pytest.raises(ConfigError, match="sweep.train entry .*optim.learning_rate"):
    validate.validate(_config(**{"sweep.score": "model",
                                 "sweep.train": ("optim.learning_rate=-1.0",)}), mode="sweep")
  with pytest.raises(ConfigError, match="not a config field"):
    validate.validate(_config(**{"sweep.score": "model", "sweep.train": ("diffusion.predict=1",)}),
                      mode="sweep")


def test_cells_split_over_two_devices_agree_with_one(tmp_path):
  """With two visible devices (simulated CPUs in a subprocess) each cell's batch is sampled
  split over both; the stored metrics equal the one-device run's to float32 rounding."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  over = ["--config.sweep.samplers=('dpm_solver++',)", "--config.sweep.grid=",
          "--config.sweep.nfe=(6,)", "--config.sweep.seeds=(0,)"]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  two = tmp_path / "two"
  proc = subprocess.run([sys.executable, "-m", "experiments.main",
                         "--config=configs/sweeps/ring_exact.py:tiny", f"--workdir={two}",
                         "--mode=sweep", *over], cwd=root, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from configs.sweeps import ring_exact  # pylint: disable=import-outside-toplevel
  c = ring_exact.get_config("tiny")
  c.sweep.samplers, c.sweep.grid = ("dpm_solver++",), ""
  c.sweep.nfe, c.sweep.seeds = (6,), (0,)
  one = {r["sampler"]: r for r in sweep_lib.sweep(c, str(tmp_path / "one"))}
  got = {r["sampler"]: r for r in json.loads((two / "sweep" / "results.json").read_text())["rows"]}
  assert sorted(got) == sorted(one) == ["dpm_solver++"]
  for name in one:
    assert got[name]["devices"] == 2 and one[name]["devices"] == 1
    for k in ("logp_gap", "sliced_wasserstein", "std_ratio"):
      np.testing.assert_allclose(got[name][k], one[name][k], rtol=1e-4, atol=1e-5)


def test_provided_digits_sweeps_validate_with_the_documented_cells():
  from configs.sweeps import digits_cfg, digits_ddim_eta  # pylint: disable=import-outside-toplevel
  for module, arg, count in [(digits_ddim_eta, None, 60), (digits_ddim_eta, "tiny", 16),
                             (digits_cfg, None, 108), (digits_cfg, "tiny", 12)]:
    c = module.get_config(arg)
    validate.validate(c, mode="sweep")
    assert len(sweep_cells.cells(c)) == count, (module.__name__, arg)
  etas = {c["options"]["eta"] for c in sweep_cells.cells(digits_ddim_eta.get_config())}
  assert etas == {0.0, 0.2, 0.5, 1.0}
  scales = {c["guidance_scale"] for c in sweep_cells.cells(digits_cfg.get_config())}
  assert scales == {0.0, 1.0, 2.0, 4.0}
