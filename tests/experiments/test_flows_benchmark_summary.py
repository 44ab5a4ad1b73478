"""The flows benchmark's table: mean +- std over training seeds next to the sampling error."""
import numpy as np

from experiments.benchmarks import flows as bench


def _ring(model, seed, gap, se):
  return {"task": "ring", "model": model, "seed": seed, "gap": gap, "gap_se": se,
          "test_nll": 2.5 + gap, "true_entropy": 2.5, "entropy_se": 0.007, "train_seconds": 10.0}


def test_summary_reports_seed_spread_and_sampling_error_separately():
  gaps = [0.09, 0.07, 0.08]
  results = [_ring("realnvp", s, g, 0.002 + 0.001 * s) for s, g in enumerate(gaps)]
  results.append(_ring("spline", 0, 0.006, 0.001))
  rows = bench.summarize(results)
  assert [r["model"] for r in rows] == ["realnvp", "spline"]
  r = rows[0]
  assert r["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(r["gap"], np.mean(gaps))
  np.testing.assert_allclose(r["gap_seed_std"], np.std(gaps, ddof=1))  # run-to-run spread
  np.testing.assert_allclose(r["gap_se"], 0.003)                       # one run's test error
  assert np.isnan(rows[1]["gap_seed_std"])                             # one seed: no spread
  table = bench._table(results)
  assert "| realnvp | 3 | 2.580 |" in table and "0.080 ± 0.010 | ± 0.003 |" in table
  assert "| spline | 1 |" in table and "| 0.006 | ± 0.001 |" in table
