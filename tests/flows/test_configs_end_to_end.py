"""The flow configs through experiments.main: train -> checkpoint -> samples -> --mode=evaluate."""
import numpy as np
import pytest

from configs.common import override
from configs.flows import digits as digits_config
from configs.flows import ring as ring_config
from experiments import main as main_lib
from experiments import workdir as wd


@pytest.mark.parametrize("module,arg,over,eval_key", [
    (ring_config, "kind=glow,tiny", {"sample.options": "temperature=0.7"}, "nll"),
    (ring_config, "kind=fm,tiny", {}, "nll"),
    (ring_config, "kind=spline,tiny", {}, "nll"),
    (ring_config, "kind=maf,tiny", {"flow.actnorm": "on"}, "nll"),
    (digits_config, "kind=realnvp,tiny,conditional", {}, "bpd"),
], ids=["ring-glow", "ring-flow-matching", "ring-spline", "ring-maf-actnorm",
        "digits-realnvp-conditional"])
def test_flow_config_trains_samples_and_evaluates(tmp_path, module, arg, over, eval_key):
  workdir = str(tmp_path)
  c = module.get_config(arg)
  if module is digits_config:
    over = {**over, "data.data_dir": str(tmp_path / "tfds")}
  override(c, **over)
  sample_metrics = main_lib.run(c, workdir, "train")
  assert sample_metrics["nonfinite_fraction" if module is ring_config else
                        "samples_out_of_range"] <= 0.5
  main_lib.run(c, workdir, "evaluate")
  rows = wd.read_metrics(workdir)
  ev = [r for r in rows if r["split"] == "eval"]
  assert len(ev) == 1 and np.isfinite(ev[0][eval_key]), ev
  if eval_key == "nll":  # next to the data's true entropy
    assert np.isfinite(ev[0]["entropy"]) and ev[0]["nll"] > ev[0]["entropy"] - 0.5
  else:  # 8-bit digits: bits/dim of an untrained-ish flow, between 0 and 16
    assert 0 < ev[0]["bpd"] < 16
  if "temperature" in c.sample.options:  # T < 1 draws a narrower sample than T = 1
    override(c, **{"sample.options": "", "sample.tag": "t1"})
    main_lib.run(c, workdir, "sample")
    cold = np.load(tmp_path / "samples" / "flow.npz")["samples"]
    warm = np.load(tmp_path / "samples" / "t1.npz")["samples"]
    assert np.std(warm) > 1.2 * np.std(cold), (np.std(warm), np.std(cold))
