"""A bad config value fails before any compile, naming the field and the allowed values."""
import subprocess
import sys

import pytest

from configs import quickstart
from configs.common import override
from experiments import validate


def _cfg(**overrides):
  return override(quickstart.get_config("tiny"), **overrides)


def test_quickstart_configs_validate():
  validate.validate(quickstart.get_config())
  validate.validate(quickstart.get_config("tiny"))


@pytest.mark.parametrize("key,value,pattern", [
    ("model.name", "transformerz", r"config\.model\.name='transformerz'.*'mlp'"),
    ("train.steps", -5, r"config\.train\.steps=-5.*integer >= 1"),
    ("data.batch_size", 0, r"config\.data\.batch_size=0"),
    ("diffusion.sde", "vpp", r"config\.diffusion\.sde='vpp'.*'vp', 'subvp', 've'"),
    ("diffusion.loss", "l2", r"config\.diffusion\.loss='l2'.*'ddpm'"),
    ("sample.sampler", "magic", r"config\.sample\.sampler='magic'.*'ddpm'"),
    ("optim.learning_rate", -1.0, r"config\.optim\.learning_rate=-1\.0.*> 0"),
    ("model.attention_impl", "flash", r"config\.model\.attention_impl='flash'.*'pallas'"),
    ("diffusion.p_uncond", 0.1, r"config\.diffusion\.p_uncond=0\.1.*data\.conditional"),
    ("sample.extra", ("ddim:50", "magic:5"), r"config\.sample\.extra=.*'sampler:steps'.*'magic:5'"),
    ("sample.extra", ("ddim:0",), r"config\.sample\.extra=.*steps an integer >= 1"),
    ("sample.options", "etaa=0.1", r"config\.sample\.options='etaa=0\.1'.*Unknown option.*'etaa'.*allowed: \['denoise'"),
    ("eval.inception_weights", "/nonexistent/pt_inception.npz",
     r"config\.eval\.inception_weights='/nonexistent/pt_inception\.npz'.*convert_inception_weights"),
])
def test_bad_values_name_the_field(key, value, pattern):
  with pytest.raises(validate.ConfigError, match=pattern):
    validate.validate(_cfg(**{key: value}))


@pytest.mark.parametrize("key,value,pattern", [
    ("flow.kind", "iaf", r"config\.flow\.kind='iaf'.*'nice', 'realnvp', 'glow', 'spline', 'maf'"),
    ("flow.actnorm", "yes", r"config\.flow\.actnorm='yes'.*'auto', 'on', 'off'"),
    ("flow.num_bins", 1, r"config\.flow\.num_bins=1.*integer >= 2"),
    ("flow.tail_bound", 0.0, r"config\.flow\.tail_bound=0\.0.*> 0"),
    ("flow.num_layers", 0, r"config\.flow\.num_layers=0.*integer >= 1"),
    ("flow.scale_bound", -1.0, r"config\.flow\.scale_bound=-1\.0.*> 0"),
])
def test_bad_flow_values_name_the_field(key, value, pattern):
  with pytest.raises(validate.ConfigError, match=pattern):
    validate.validate(_cfg(objective="flow", **{key: value}))


@pytest.mark.parametrize("overrides,pattern", [
    ({"diffusion.loss": "edm", "diffusion.prediction": "x0"},
     r"config\.diffusion\.prediction='x0'.*'eps'.*loss='edm'"),
    ({"diffusion.sde": "ve", "diffusion.sigma_max": 0.001},
     r"config\.diffusion\.sigma_max=0\.001.*> diffusion\.sigma_min=0\.01"),
    ({"model.name": "unet", "model.ch": 16, "model.ch_mult": (1, 2), "model.num_heads": 3},
     r"config\.model\.num_heads=3.*\[16, 32\]"),
    ({"model.name": "unet", "model.ch_mult": ()}, r"config\.model\.ch_mult=\(\).*non-empty"),
    ({"objective": "flow", "sample.options": "eta=0.5"},
     r"config\.sample\.options='eta=0\.5'.*temperature"),
    ({"objective": "flow", "flow.kind": "maf", "data.name": "digits"},
     r"config\.flow\.kind='maf'.*vector-data dataset.*for images.*'spline'|config\.flow\.kind='maf'.*spline"),
])
def test_bad_combinations_name_the_field(overrides, pattern):
  with pytest.raises(validate.ConfigError, match=pattern):
    validate.validate(_cfg(**overrides))


def test_sweep_of_a_coupling_flow_is_refused():
  with pytest.raises(validate.ConfigError, match="--mode=sweep.*objective='flow'"):
    validate.validate(_cfg(objective="flow"), mode="sweep")


def test_bad_mode():
  with pytest.raises(validate.ConfigError, match="--mode='fit'"):
    validate.validate(_cfg(), mode="fit")


def _main(tmp_path, *args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/quickstart.py:tiny",
       f"--workdir={tmp_path}", *args], capture_output=True, text=True, timeout=300,
      env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def test_cli_rejects_bad_values_before_compiling(tmp_path):
  r = _main(tmp_path, "--config.model.name=nope")
  assert r.returncode != 0
  assert "config.model.name='nope'" in r.stderr and "'mlp'" in r.stderr
  assert not (tmp_path / "checkpoints").exists()  # failed before any work
  r = _main(tmp_path, "--config.train.steps=-3")
  assert r.returncode != 0 and "config.train.steps=-3" in r.stderr
  # Wrong type: rejected by the flag parser, naming the field.
  r = _main(tmp_path, "--config.train.steps=many")
  assert r.returncode != 0 and "train.steps" in r.stderr
