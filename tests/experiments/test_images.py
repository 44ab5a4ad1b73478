"""Image diffusion end to end on the digits (tiny UNet, a few steps) and the image data glue."""
import itertools
import os

import numpy as np
import pytest

from configs.common import override
from configs.images import digits_ddpm, digits_edm, shapes_ddpm
from experiments import data as data_lib
from experiments import image_metrics
from experiments import main as main_lib
from experiments import workdir as wd
from experiments.validate import ConfigError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(module, data_dir, arg="tiny", **over):
  return override(module.get_config(arg), **{"data.data_dir": data_dir, **over})


def test_digits_train_sample_metrics(data_dir, tmp_path):
  c = _config(digits_ddpm, data_dir)
  metrics = main_lib.run(c, str(tmp_path), "train")
  rows = wd.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in rows if r["split"] == "train")
  samples = np.load(tmp_path / "samples" / "ddpm_5.npz")["samples"]
  assert samples.shape == (16, 8, 8, 1) and np.all(np.isfinite(samples))
  assert (tmp_path / "figures" / "ddpm_5.png").stat().st_size > 1000
  # The reference: test vs train in the feature space of a classifier that learned the digits.
  assert metrics["feature_net_test_accuracy"] > 0.9
  ref = metrics["fd_digits_train_vs_test"]
  assert 0 < ref < metrics["fd_digits"]  # 4 training steps are far from the data
  assert metrics["fd_num_test"] == 359 and metrics["fd_num_samples"] == 16
  assert os.listdir(os.path.join(data_dir, "genjax_metrics"))  # cached for the next run
  # Real digits score near the reference; noise scores far from it.
  images, _, _ = data_lib.load_split(c, "test")
  from research.data import pipeline
  real = image_metrics.image_metrics(c, None, pipeline.to_model_space(images[:200]))
  noise = image_metrics.image_metrics(
      c, None, np.random.default_rng(0).uniform(-1, 1, (200, 8, 8, 1)).astype(np.float32))
  assert real["fd_digits"] < 3 * ref + 1 < noise["fd_digits"]
  # Conditional samples get a classifier accuracy (true labels of real digits: high).
  _, labels, _ = data_lib.load_split(c, "test")
  acc = image_metrics.image_metrics(c, None, pipeline.to_model_space(images[:200]), labels[:200])
  assert acc["classifier_accuracy"] > 0.9


def test_edm_config_trains_and_samples_end_to_end(data_dir, tmp_path):
  """configs/images/digits_edm.py:tiny: EDM's process (t = sigma on [0.002, 80]), loss and
  preconditioning, sampled with EDM's Heun on its sigma^(1/7) grid."""
  from experiments import builders
  from research.diffusion import sde as sde_lib
  c = _config(digits_edm, data_dir)
  sde = builders.build_sde(c)
  assert isinstance(sde, sde_lib.EDMSDE) and (sde.eps, sde.T) == (0.002, 80.0)
  metrics = main_lib.run(c, str(tmp_path), "train")
  rows = wd.read_metrics(str(tmp_path))
  assert all(np.isfinite(r["loss"]) for r in rows if r["split"] == "train")
  samples = np.load(tmp_path / "samples" / "heun_3.npz")["samples"]
  assert samples.shape == (16, 8, 8, 1) and np.all(np.isfinite(samples))
  assert metrics["nfe"] == 2 * 3 + 1  # two per Heun step, then the final denoising call
  assert np.isfinite(metrics["fd_digits"])


def test_restarted_run_sees_the_same_data_order(data_dir):
  c = _config(digits_ddpm, data_dir, **{"data.random_flip": True})
  spec = data_lib.build_data_spec(c)
  assert spec.kind == "image" and spec.dims == (8, 8, 1) and spec.num_classes == 10
  full = list(itertools.islice(data_lib.train_batches(c, spec, 0), 6))
  resumed = list(itertools.islice(data_lib.train_batches(c, spec, 4), 2))
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert full[0]["x"].shape == (16, 8, 8, 1) and full[0]["x"].dtype == np.float32
  assert full[0]["x"].min() >= -1 and full[0]["x"].max() <= 1
  # Eval batches cover the test split once, in order.
  n = sum(len(b["x"]) for b in data_lib.eval_batches(c, spec, batch_size=100))
  assert n == 359


def test_shapes_data_and_bad_configs(data_dir):
  c = _config(shapes_ddpm, data_dir)
  spec = data_lib.build_data_spec(c)
  assert spec.dims == (32, 32, 3) and spec.num_classes == 3
  batch = next(data_lib.train_batches(c, spec, 0))
  assert batch["x"].shape == (8, 32, 32, 3) and set(batch["label"]) <= {0, 1, 2}
  with pytest.raises(ConfigError, match="image_size"):
    data_lib.build_data_spec(_config(digits_ddpm, data_dir, **{"data.image_size": 12}))
  with pytest.raises(ConfigError, match="ch_mult"):
    data_lib.build_data_spec(_config(digits_ddpm, data_dir, **{"model.ch_mult": (1, 2, 2, 2, 2)}))


def test_classifier_free_guidance_on_images(data_dir, tmp_path):
  """CFG on a conditional image model: per scale, samples for every class, fd_digits and the
  feature classifier's accuracy on the requested classes, and the summary figure."""
  c = _config(digits_ddpm, data_dir, "tiny,conditional",
              **{"guidance.kind": "cfg", "guidance.scales": (0.0, 2.0),
                 "guidance.samples_per_class": 2})
  results = main_lib.run(c, str(tmp_path), "train")
  assert sorted(results) == ["cfg_w0_ddpm_5", "cfg_w2_ddpm_5"]
  for m in results.values():
    assert 0.0 <= m["classifier_accuracy"] <= 1.0 and np.isfinite(m["fd_digits"])
    assert m["fd_num_samples"] == 20  # 10 classes x 2
  labels = np.load(tmp_path / "samples" / "cfg_w2_ddpm_5.npz")["labels"]
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
  assert (tmp_path / "figures" / "guidance_cfg.png").stat().st_size > 1000
