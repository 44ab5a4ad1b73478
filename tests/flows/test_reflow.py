"""Reflow through the flow-matching job: it straightens the learned paths on the ring."""
import os

from configs.common import override
from configs.flows import ring as ring_config
from experiments import main as main_lib
from experiments import workdir as wd


def test_reflow_reduces_path_curvature_on_the_ring(tmp_path):
  workdir = str(tmp_path)
  c = ring_config.get_config("kind=fm,reflow=1,tiny")
  override(c, **{"model.hidden": 64, "model.depth": 2, "data.batch_size": 256,
                 "train.steps": 400, "train.log_every": 200, "train.ckpt_every": 400,
                 "optim.warmup_steps": 20, "flow.reflow_steps": 400,
                 "flow.reflow_pairs": 4096, "flow.reflow_sampler_steps": 32,
                 "flow.reflow_eval_steps": (1, 8), "sample.num_samples": 1024,
                 "sample.batch_size": 1024, "eval.num_reference": 1024})
  main_lib.run(c, workdir, "train")
  rows = [r for r in wd.read_metrics(workdir) if r["split"] == "reflow"]
  assert sorted((r["round"], r["euler_steps"]) for r in rows) == [(0, 1), (0, 8), (1, 1), (1, 8)]
  s = {r["round"]: r["straightness"] for r in rows}
  assert s[1] < 0.7 * s[0], s  # a measured property of this run, not a fixed number
  assert os.path.exists(tmp_path / "reflow" / "round_1" / "pairs.npz")
  assert os.path.exists(tmp_path / "reflow" / "results.md")
  # sample / evaluate restore the last round, not stage 1.
  assert wd.trained_dir(c, workdir) == wd.reflow_round_dir(workdir, 1)
  # A rerun resumes: the round is finished, nothing is retrained or redrawn.
  mtime = os.path.getmtime(tmp_path / "reflow" / "round_1" / "pairs.npz")
  main_lib.run(c, workdir, "train")
  assert os.path.getmtime(tmp_path / "reflow" / "round_1" / "pairs.npz") == mtime
