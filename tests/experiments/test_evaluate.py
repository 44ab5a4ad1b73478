"""--mode=evaluate: sample metrics plus test NLL next to the true entropy, in metrics.jsonl."""
import math

import ml_collections
import numpy as np
import pytest

from configs import base, quickstart
from configs.common import override
from experiments import evaluate as evaluate_lib
from experiments import main as main_lib
from experiments import train as train_lib
from experiments import workdir as wd
from experiments.validate import ConfigError

# The 8-Gaussian ring (std 0.1, d = 2) has modes 3 apart, so its entropy is that of one
# component plus log 8: log 8 + (d / 2) log(2 pi e std^2).
RING_ENTROPY = math.log(8) + math.log(2 * math.pi * math.e * 0.1**2)


def _tiny(likelihood=None, **over):
  c = override(quickstart.get_config("tiny"), **over)
  if likelihood is not None:
    with c.unlocked():
      c.eval.likelihood = ml_collections.ConfigDict(likelihood)
  return c


def test_evaluate_writes_nll_next_to_true_entropy(tmp_path):
  workdir = str(tmp_path)
  train_lib.train(_tiny(), workdir)  # 20 steps of the tiny quickstart model
  # 256 fresh test points, two ODE batches (exact trace, D = 2).
  c = _tiny(likelihood=dict(num_examples=256, batch_size=128, rtol=1e-4, atol=1e-4))
  out = main_lib.run(c, workdir, "evaluate")
  rows = wd.read_metrics(workdir)
  sample_rows = [r for r in rows if r["split"] == "sample"]
  eval_rows = [r for r in rows if r["split"] == "eval"]
  assert len(sample_rows) == 1 and len(eval_rows) == 1
  ev = eval_rows[0]
  assert ev["step"] == 20
  assert ev["likelihood_method"] == "probability_flow_ode"
  assert ev["likelihood_estimator"] == "exact" and ev["likelihood_num"] == 256
  assert ev["nll_nonfinite"] == 0.0 and ev["likelihood_nfe"] > 0
  for k in ("nll", "nll_stderr", "entropy", "entropy_stderr", "nll_minus_entropy",
            "nll_minus_entropy_stderr"):
    assert np.isfinite(ev[k]), k
    assert out[k] == ev[k]
  # The entropy estimate is the exact log-density on fresh samples: unbiased for H(p).
  assert abs(ev["entropy"] - RING_ENTROPY) <= 4 * ev["entropy_stderr"]
  # nll - H estimates KL(p || q) >= 0 (up to sampling noise and the 1e-4 solver tolerance).
  assert ev["nll_minus_entropy"] >= -3 * ev["nll_minus_entropy_stderr"] - 0.01
  np.testing.assert_allclose(ev["nll_minus_entropy"], ev["nll"] - ev["entropy"], rtol=1e-6,
                             atol=1e-9)
  # Sample metrics are still computed by --mode=evaluate.
  for key in ("logp_gap", "std_ratio", "nfe"):
    assert key in sample_rows[0] and key in out


@pytest.mark.parametrize("field,value,pattern", [
    ("estimator", "trace", r"config\.eval\.likelihood\.estimator='trace'.*'auto', 'exact'"),
    ("rtol", 0.0, r"config\.eval\.likelihood\.rtol=0\.0.*\(0, 1\)"),
    ("num_probes", 0, r"config\.eval\.likelihood\.num_probes=0.*integer >= 1"),
    ("solver", "rk45", r"config\.eval\.likelihood\.solver='rk45'.*'tsit5'"),
    ("bogus", 1, r"unknown field\(s\) \['bogus'\]"),
])
def test_bad_likelihood_settings_fail_before_anything_runs(tmp_path, field, value, pattern):
  with pytest.raises(ConfigError, match=pattern):
    evaluate_lib.evaluate(_tiny(likelihood={field: value}), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()


def test_default_settings_without_a_likelihood_block():
  s = evaluate_lib.likelihood_settings(_tiny())
  assert s == dict(base.get_config().eval.likelihood)  # the defaults live in configs/base.py
  c = _tiny()
  with c.unlocked():
    del c.eval["likelihood"]
  assert evaluate_lib.likelihood_settings(c) == s
