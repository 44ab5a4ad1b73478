"""The two-stage latent diffusion job end to end on configs/latent/shapes_ldm.py:tiny: stage 1
in WORKDIR/autoencoder (skipped when finished, resumed when interrupted), stage 2 on its
latents, prompts from the command line, the npz / figure / metrics contract, and config errors.

(Every sampler on latents is tested on the objective itself: tests/diffusion/test_latent.py.)
The fd and attribute classifiers are trained with a few steps here: their quality is tested
in tests/metrics; these tests only need the numbers to exist."""
import dataclasses
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from configs.common import override
from configs.latent import cifar10_ldm, shapes_ldm
from experiments import builders
from experiments import data as data_lib
from experiments import image_metrics
from experiments import latent as latent_lib
from experiments import main as main_lib
from experiments import train as train_lib
from experiments import validate
from experiments import workdir as wd
from experiments.data import DataSpec
from experiments.options import ConfigError, check_sample_requests
from research.diffusion.latent import LatentDiffusionObjective
from research.metrics import fd as fd_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "latent" / "shapes_ldm.py")
PROMPTS = ("large red circle at centre", "small blue triangle at top left")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(autouse=True)
def rbg_keys():
  """rbg PRNG keys: XLA:CPU compiles threefry's random draws ~10x slower, and the job has
  many draw sites (noise, times, dropouts, posterior samples); nothing here pins values."""
  old = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", old)


@pytest.fixture(autouse=True)
def quick_judges(monkeypatch):
  """fd's feature network and the attribute classifier with a few training steps."""
  monkeypatch.setattr(image_metrics, "_feature_settings",
                      lambda h: fd_lib.FeatureNetSettings(ch=8, ch_mult=(1, 2, 2), steps=5,
                                                          batch_size=16))
  monkeypatch.setattr(image_metrics, "ATTRIBUTE_NET_SETTINGS", dataclasses.replace(
      image_metrics.ATTRIBUTE_NET_SETTINGS, steps=5, batch_size=16))


def _config(data_dir, arg="tiny", **over):
  return override(shapes_ldm.get_config(arg), **{"data.data_dir": data_dir, **over})


def _rows(workdir, split):
  return [r for r in wd.read_metrics(str(workdir)) if r["split"] == split]


def test_tiny_two_stage_job_train_resume_and_prompts(data_dir, tmp_path, capsys):
  work = tmp_path / "ldm"
  c = _config(data_dir)
  main_lib.run(c, str(work), "train")
  ae = work / "autoencoder"
  # Stage 1: its own checkpoints and metrics, the frozen params and the scale factor.
  assert (ae / "checkpoints" / "2").is_dir() and (ae / "autoencoder_params.msgpack").is_file()
  info = json.loads((ae / "latent.json").read_text())
  assert info["step"] == 2 and np.isfinite(info["scale_factor"]) and info["scale_factor"] > 0
  assert info["latent_shape"] == [8, 8, 4]
  assert np.isfinite(info["reconstruction_psnr"]) and "fd_shapes_reconstruction" in info
  assert [r["step"] for r in _rows(ae, "train")] == [1, 2]
  # The vocabulary of the captions is in the workdir.
  vocab = json.loads((work / "tokenizer.json").read_text())["words"]
  assert {"red", "circle", "top", "left"} <= set(vocab)
  # Stage 2: checkpoints, samples with prompts (the test split's captions), metrics.
  assert (work / "checkpoints" / "2").is_dir()
  assert [r["step"] for r in _rows(work, "train")] == [1, 2]
  with np.load(work / "samples" / "ddim_3.npz") as z:
    assert z["samples"].shape == (8, 32, 32, 3) and z["samples"].dtype == np.float32
    assert np.all(np.isfinite(z["samples"]))
    captions = data_lib.load_captions(c, "test")[:8]
    assert z["prompts"].tolist() == captions.tolist() and "labels" not in z
  (sample_row,) = _rows(work, "sample")
  for key in ("fd_shapes", "fd_shapes_train_vs_test", "adherence_shape", "adherence_colour",
              "adherence_size", "adherence_position", "adherence_all",
              "attribute_net_test_accuracy_colour", "autoencoder_reconstruction_psnr",
              "autoencoder_fd_shapes_reconstruction"):
    assert np.isfinite(sample_row[key]), key
  assert sample_row["guidance_scale"] == 3.0
  (cfg_row,) = _rows(work, "guidance")
  assert cfg_row["scale"] == 3.0 and "adherence_all" in cfg_row
  assert (work / "samples" / "cfg_w3_ddim_3.npz").is_file()
  assert (work / "figures" / "ddim_3.png").stat().st_size > 1000
  assert (work / "figures" / "guidance_cfg.png").is_file()

  # A rerun skips stage 1 (no new stage-1 rows) and has nothing left to train.
  train_lib.train(c, str(work))
  assert len(_rows(ae, "train")) == 2 and len(_rows(ae, "reconstruction")) == 1
  assert len(_rows(work, "train")) == 2

  # Interrupted after its last checkpoint, before the export: resumed, not retrained.
  os.remove(ae / "latent.json")
  train_lib.train(c, str(work))
  assert len(_rows(ae, "train")) == 2 and len(_rows(ae, "reconstruction")) == 2
  assert json.loads((ae / "latent.json").read_text())["step"] == 2

  # --mode=sample with prompts from the command line, several images each.
  code = main_lib.cli(["main", f"--config={CONFIG}:tiny", f"--workdir={work}", "--mode=sample",
                       f"--config.data.data_dir={data_dir}",
                       f"--config.sample.prompts={PROMPTS!r}", "--config.sample.per_prompt=4",
                       "--config.sample.tag=prompts", "--config.guidance.scales=(3.0,)"])
  assert code == 0, capsys.readouterr().err
  with np.load(work / "samples" / "prompts.npz") as z:
    assert z["samples"].shape == (8, 32, 32, 3)
    assert z["prompts"].tolist() == [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
  assert _rows(work, "sample")[-1]["tag"] == "prompts"
  assert _rows(work, "guidance")[-1]["reused_from"] == "prompts"
  with np.load(work / "samples" / "cfg_w3_ddim_3.npz") as z:
    assert z["prompts"].tolist() == [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4

  # Stage 1 taken from another job's workdir: used as it is, nothing written there or here.
  other = tmp_path / "reuse"
  c2 = _config(data_dir, **{"latent.autoencoder_workdir": str(ae)})
  assert latent_lib.train_autoencoder(c2, str(other))["step"] == 2
  frozen = builders.frozen_autoencoder(c2, data_lib.build_data_spec(c2), str(other))
  assert frozen.scale_factor == info["scale_factor"]
  assert not other.exists() and len(_rows(ae, "reconstruction")) == 2


@pytest.mark.parametrize("field,value,match", [
    ("latent.conditioning", "words", "config.latent.conditioning='words'"),
    ("latent.ch_mult", (), "config.latent.ch_mult"),
    ("latent.kl_weight", -1.0, "config.latent.kl_weight"),
    ("latent.reconstruction", "l3", "config.latent.reconstruction"),
    ("latent.text_heads", 3, "config.latent.text_heads"),
    ("latent.autoencoder_workdir", "/no/such/dir", "config.latent.autoencoder_workdir"),
    ("sample.prompts", ("large purple circle at centre",), "unknown word 'purple'"),
    ("sample.per_prompt", 0, "config.sample.per_prompt"),
    ("data.captions", False, "data.captions=True"),
])
def test_bad_latent_values_name_the_field(data_dir, field, value, match):
  with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")) as e:
    validate.validate(_config(data_dir, **{field: value}), "train")
  assert "\n" not in str(e.value)


def _prepared(data_dir, capsys):
  """Generates the tiny shapes data first, so TFDS's progress bars are not in the error read."""
  data_lib.load_captions(_config(data_dir), "test")
  capsys.readouterr()


def test_bad_prompt_on_the_command_line_is_one_line(data_dir, tmp_path, capsys):
  _prepared(data_dir, capsys)
  code = main_lib.cli(["main", f"--config={CONFIG}:tiny", f"--workdir={tmp_path}",
                       "--mode=sample", f"--config.data.data_dir={data_dir}",
                       "--config.sample.prompts=('tiny red circle at centre',)"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err
  assert "config.sample.prompts" in err and "unknown word 'tiny'" in err and "magenta" in err


def test_sample_without_stage_one_says_what_to_run(data_dir, tmp_path, capsys):
  code = main_lib.cli(["main", f"--config={CONFIG}:tiny", f"--workdir={tmp_path}",
                       "--mode=sample", f"--config.data.data_dir={data_dir}"])
  err = capsys.readouterr().err
  assert code == 2 and "stage 1" in err and "--mode=train" in err


def test_cifar10_ldm_builds_without_the_data():
  c = cifar10_ldm.get_config()
  spec = DataSpec(dims=(32, 32, 3), num_classes=10, kind="image")
  objective = builders.build_objective(c, spec)
  assert isinstance(objective, LatentDiffusionObjective)
  assert objective.conditioning == "label" and objective.latent_shape == (8, 8, 4)
  assert not objective.takes_prompts and objective.guidance_in_sample
  check_sample_requests(c, objective)
