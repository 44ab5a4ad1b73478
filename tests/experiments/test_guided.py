"""Guided sampling end to end on the tiny ring_guided config: the workdir contract per scale,
metrics, the noise-conditional classifier's training and checkpoint, and config errors."""
import math
import os

import jax
import numpy as np
import pytest

from configs.common import override
from configs.toy import ring_guided
from experiments import builders
from experiments import data as data_lib
from experiments import guided
from experiments import train as train_lib
from experiments import validate
from experiments import workdir as wd


def _config(arg="tiny", **over):
  return override(ring_guided.get_config(arg), **over)


def _fresh_state(config, workdir):
  """An untrained model's state (guided sampling of a workdir needs a checkpoint)."""
  spec = data_lib.build_data_spec(config)
  state, ckpt = train_lib.restore_or_create(config, workdir, builders.build_objective(config, spec),
                                            spec)
  ckpt.close()
  return state


def test_cfg_then_classifier_guidance_tiny(tmp_path):
  """On an untrained tiny model (the training loop is tested in test_end_to_end; the sample
  quality of guidance against exact scores in tests/diffusion/test_guidance.py)."""
  workdir = str(tmp_path)
  c = _config()
  results = guided.guided_sample_and_evaluate(c, workdir, _fresh_state(c, workdir))
  k, n = 8, c.guidance.samples_per_class
  want_labels = np.repeat(np.arange(k), n)
  tags = [guided.scale_tag(c, s) for s in c.guidance.scales]
  assert sorted(results) == sorted(tags) == ["cfg_w0_ddpm_20", "cfg_w3_ddpm_20"]
  for tag in tags:
    data = np.load(tmp_path / "samples" / f"{tag}.npz")
    assert data["samples"].shape == (k * n, 2) and data["samples"].dtype == np.float32
    np.testing.assert_array_equal(data["labels"], want_labels)
    assert (tmp_path / "figures" / f"{tag}.png").stat().st_size > 1000
    m = results[tag]
    assert m["nfe"] == c.sample.steps + 1  # 20 steps + the final denoising step
    assert 0.0 <= m["accuracy"] <= 1.0 and m["std_ratio"] > 0
  assert (tmp_path / "figures" / "guidance_cfg.png").exists()
  rows = [r for r in wd.read_metrics(workdir) if r["split"] == "guidance"]
  assert [(r["step"], r["scale"]) for r in rows] == [(0, 0.0), (0, 3.0)]
  for key in ("accuracy", "std_ratio", "nfe", "tag", "kind"):
    assert all(key in r for r in rows), key

  # Classifier guidance: trains the classifier first, checkpoints it under
  # WORKDIR/classifier/, logs its loss beside the exact (Bayes) posterior's on the same batch.
  cc = _config("tiny,kind=classifier", **{"guidance.classifier_steps": 40,
                                          "guidance.classifier_learning_rate": 1e-2})
  validate.validate(cc)
  guided.guided_sample_and_evaluate(cc, workdir, _fresh_state(cc, workdir))
  ck = wd.Checkpointer(os.path.join(workdir, guided.CLASSIFIER_DIR))
  assert ck.latest_step() == 40
  ck.close()
  clf = [r for r in wd.read_metrics(workdir) if r["split"] == "classifier"]
  assert [r["step"] for r in clf] == [5 * i for i in range(1, 9)]
  # It learns: from log K (the zero-initialised head is uniform) towards the Bayes loss.
  assert clf[-1]["loss"] < math.log(k) - 0.2
  assert all(r["loss_bayes"] < math.log(k) for r in clf)
  for tag in ("classifier_s0_ddpm_20", "classifier_s3_ddpm_20"):
    data = np.load(tmp_path / "samples" / f"{tag}.npz")
    np.testing.assert_array_equal(data["labels"], want_labels)
  # s = 0 is the base (null-label) score alone, i.e. CFG at w = 0: the same samples.
  np.testing.assert_allclose(
      np.load(tmp_path / "samples" / "classifier_s0_ddpm_20.npz")["samples"],
      np.load(tmp_path / "samples" / "cfg_w0_ddpm_20.npz")["samples"], rtol=1e-4, atol=1e-4)
  # A finished classifier is restored, not retrained.
  spec = data_lib.build_data_spec(cc)
  sde = builders.build_sde(cc)
  _, params = guided.train_classifier(cc, workdir, spec, sde)
  assert len([r for r in wd.read_metrics(workdir) if r["split"] == "classifier"]) == len(clf)
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("over,field", [
    ({"guidance.scales": (1.0, -1.0)}, "guidance.scales"),
    ({"guidance.scales": ()}, "guidance.scales"),
    ({"guidance.samples_per_class": 0}, "guidance.samples_per_class"),
    ({"guidance.kind": "classifier", "guidance.classifier_base": "both"},
     "guidance.classifier_base"),
    ({"guidance.kind": "classifier", "guidance.classifier_steps": 0},
     "guidance.classifier_steps"),
    ({"guidance.kind": "classifier", "diffusion.p_uncond": 0.0}, "guidance.classifier_base"),
    ({"guidance.kind": "classifier", "data.name": "digits"}, "guidance.kind"),
    ({"data.name": "swissroll"}, "guidance.kind"),
    ({"guidance.kind": "cfg", "diffusion.p_uncond": 0.0}, "diffusion.p_uncond"),
])
def test_bad_guidance_config_fails_naming_the_field(over, field):
  with pytest.raises(validate.ConfigError, match=f"config.{field}="):
    validate.validate(_config(**over))
