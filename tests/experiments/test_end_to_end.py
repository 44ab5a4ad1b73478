"""End to end on a tiny config: train -> checkpoint -> sample -> metrics, resume, NaN stop."""
import json
import os

import jax
import numpy as np
import pytest

from configs import quickstart
from configs.common import override
from experiments import main as main_lib
from experiments import train as train_lib
from experiments import workdir as wd


def _tiny(**over):
  return override(quickstart.get_config("tiny"), **over)


def test_train_checkpoint_sample_metrics(tmp_path):
  workdir = str(tmp_path)
  metrics = main_lib.run(_tiny(**{"sample.extra": ("ddim:5",)}), workdir, "train")
  # Workdir contract.
  assert json.load(open(tmp_path / "config.json"))["data"]["name"] == "ring"
  assert (tmp_path / "checkpoints").is_dir()
  ckpt = wd.Checkpointer(workdir)
  assert ckpt.latest_step() == 20
  ckpt.close()
  rows = wd.read_metrics(workdir)
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
  for key in ("loss", "grad_norm", "learning_rate", "steps_per_sec"):
    assert all(np.isfinite(r[key]) for r in train_rows), key
  sample_rows = [r for r in rows if r["split"] == "sample"]
  # The main sampler, then each sample.extra entry on the same checkpoint.
  assert [r["tag"] for r in sample_rows] == ["ddpm_20", "ddim_5"]
  assert sample_rows[1]["nfe"] < sample_rows[0]["nfe"]
  for key in ("logp_gap", "std_ratio", "mode_weight_error", "sliced_wasserstein", "nfe"):
    assert key in sample_rows[0]
  assert sample_rows[0]["nfe"] > 0
  data = np.load(tmp_path / "samples" / "ddpm_20.npz")
  assert data["samples"].shape == (256, 2) and data["samples"].dtype == np.float32
  assert (tmp_path / "figures" / "ddpm_20.png").stat().st_size > 1000
  # --mode=sample reuses the checkpoint and writes under its own tag.
  c = _tiny(**{"sample.tag": "again"})
  m2 = main_lib.run(c, workdir, "sample")
  assert os.path.exists(tmp_path / "samples" / "again.npz")
  np.testing.assert_allclose(m2["std_ratio"], metrics["std_ratio"], rtol=1e-5)
  # --mode=sweep: every (sampler, steps) cell on the same checkpoint, a table and a plot.
  c = _tiny(**{"sweep.samplers": ("ddim", "ode_euler"), "sweep.steps": (2, 4)})
  cells = main_lib.run(c, workdir, "sweep")
  assert [(r["sampler"], r["steps"]) for r in cells] == [
      ("ddim", 2), ("ddim", 4), ("ode_euler", 2), ("ode_euler", 4)]
  assert all(np.isfinite(r["sliced_wasserstein"]) for r in cells)
  assert len(open(tmp_path / "sweep" / "results.csv").read().strip().splitlines()) == 5
  assert (tmp_path / "sweep" / "quality_vs_nfe.png").stat().st_size > 1000


@pytest.mark.parametrize("mode", ["sample", "evaluate", "sweep"])
def test_modes_that_read_a_checkpoint_refuse_an_empty_workdir(tmp_path, mode):
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*run --mode=train"):
    main_lib.run(_tiny(), str(tmp_path), mode)


def test_resume_equals_uninterrupted(tmp_path):
  full = train_lib.train(_tiny(), str(tmp_path / "full"))
  # Interrupt a run of the same config right after its step-10 checkpoint, then rerun it.
  resumed_dir = str(tmp_path / "resumed")
  c = _tiny()
  orig_save = wd.Checkpointer.save

  class Stop(Exception):
    pass

  def save_then_crash(self, step, state):
    orig_save(self, step, state)
    if step == 10:
      self.wait()
      raise Stop()

  wd.Checkpointer.save = save_then_crash
  try:
    with pytest.raises(Stop):
      train_lib.train(c, resumed_dir)
  finally:
    wd.Checkpointer.save = orig_save
  ck = wd.Checkpointer(resumed_dir)
  assert ck.latest_step() == 10
  ck.close()
  resumed = train_lib.train(c, resumed_dir)
  assert int(resumed.step) == 20
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(full.ema_params), jax.tree.leaves(resumed.ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_nonfinite_loss_stops_with_step(tmp_path):
  c = _tiny(**{"optim.learning_rate": 1e30, "optim.grad_clip": 0.0, "optim.warmup_steps": 0})
  with pytest.raises(train_lib.NonFiniteLossError, match=r"at step \d+"):
    train_lib.train(c, str(tmp_path))


def test_debug_mode_runs_the_whole_job_without_jit(tmp_path):
  """--debug (no jit, NaN checks on) trains, samples and computes every metric."""
  c = _tiny(**{"train.steps": 2, "train.ckpt_every": 2, "train.log_every": 1,
               "sample.steps": 2, "sample.num_samples": 64, "sample.batch_size": 64,
               "eval.num_reference": 64})
  try:
    metrics = main_lib.run(c, str(tmp_path), "train", debug=True)
    assert jax.config.jax_disable_jit and jax.config.jax_debug_nans
  finally:
    jax.config.update("jax_disable_jit", False)
    jax.config.update("jax_debug_nans", False)
  assert metrics["nfe"] == 3 and "logp_gap" in metrics and "sliced_wasserstein" in metrics
