"""Config validation: every bad value fails here, before anything is compiled.

  validate(config, mode)       static checks of every field, then the objective's own checks
                               of the sampling runs, guidance and mode (it is built, not run)
  likelihood_settings(config)  config.eval.likelihood merged over configs/base.py's defaults

Each error names the field (as it is written on the command line) and what is allowed. The
allowed names come from the library's registries and constants.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict

from configs import base as base_config
from experiments import builders
from experiments import data as data_lib
from experiments import mesh as mesh_lib
from experiments import sweep_cells
from experiments.options import (MODES, ConfigError, boolean, check_sample_requests, choice,
                                 fail, field, parse_extra, parse_options, positive_float,
                                 positive_int, unit_interval)
from kernels.attention import available_implementations
from research.data import toy
from research.diffusion import latent as latent_diffusion
from research.diffusion import likelihood as likelihood_lib
from research.diffusion import losses as losses_lib
from research.diffusion import samplers
from research.diffusion import sde as sde_lib
from research.diffusion.schedules import SCHEDULES
from research.flows import cnf as cnf_lib
from research.flows.models import KINDS as FLOW_KINDS
from research.flows.models import VECTOR_ONLY_KINDS as VECTOR_ONLY_FLOW_KINDS
from research.diffusion.parameterization import NETWORK_PREDICTIONS
from research.models import autoencoder as autoencoder_lib
from research.models import registry as model_registry
from research.models.layers import TIME_EMBEDDINGS
from research.objective import GUIDANCE_KINDS
from research.train_state import SCHEDULES as LR_SCHEDULES

GUIDANCE = ("none",) + GUIDANCE_KINDS
ACTNORM_CHOICES = ("auto", "on", "off")


def _data(config):
  name = config.data.name
  if not isinstance(name, str) or not name:
    fail("data.name", name, "a toy dataset (" + ", ".join(toy.DATASETS.names())
         + ") or an image dataset name")
  positive_int(config, "data.batch_size")
  positive_int(config, "data.dim")
  positive_int(config, "data.num_modes")
  positive_float(config, "data.std")
  positive_float(config, "data.radius")
  if name == "checkerboard" and config.data.dim != 2:
    fail("data.dim", config.data.dim, "2 for the checkerboard")
  if name in ("ring", "grid") and config.data.dim < 2:
    fail("data.dim", config.data.dim, f"an integer >= 2 for {name!r} (its means lie in the "
         "first two coordinates)")
  boolean(config, "data.conditional")
  boolean(config, "data.captions")
  boolean(config, "data.random_flip")
  positive_int(config, "data.num_workers", zero_ok=True)
  positive_int(config, "data.image_size", zero_ok=True)
  if not isinstance(config.data.data_dir, str):
    fail("data.data_dir", config.data.data_dir, "a directory path, or '' for the default")


def _model(config):
  choice(config, "model.name", tuple(model_registry.available()))
  positive_int(config, "model.hidden")
  positive_int(config, "model.depth")
  choice(config, "model.time_embedding", TIME_EMBEDDINGS)
  unit_interval(config, "model.dropout", high_open=True)
  choice(config, "model.attention_impl", ("auto",) + tuple(available_implementations()))
  if config.model.name != "unet":
    return
  positive_int(config, "model.ch")
  positive_int(config, "model.num_res_blocks")
  positive_int(config, "model.num_heads")
  mult = config.model.ch_mult
  if (not isinstance(mult, (tuple, list)) or not mult
      or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult)):
    fail("model.ch_mult", mult, "a non-empty tuple of integers >= 1")
  for name in ("model.attn_resolutions", "model.transformer_resolutions"):
    res = field(config, name)
    if (not isinstance(res, (tuple, list))
        or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in res)):
      fail(name, res, "a tuple of resolutions in pixels (integers >= 1)")
  positive_int(config, "model.transformer_depth")
  res = config.model.attn_resolutions
  if res:
    bad = [config.model.ch * m for m in mult if (config.model.ch * m) % config.model.num_heads]
    if bad:
      fail("model.num_heads", config.model.num_heads,
           f"a divisor of every attention width (model.ch * model.ch_mult = "
           f"{[config.model.ch * m for m in mult]}; {bad} do not divide)")


def _diffusion(config):
  choice(config, "objective", tuple(builders.OBJECTIVES))
  choice(config, "diffusion.sde", sde_lib.SDES)
  choice(config, "diffusion.schedule", SCHEDULES)
  choice(config, "diffusion.loss", losses_lib.LOSSES)
  choice(config, "diffusion.prediction", NETWORK_PREDICTIONS)
  choice(config, "diffusion.weighting", losses_lib.WEIGHTINGS)
  unit_interval(config, "diffusion.p_uncond")
  df = config.diffusion
  positive_float(config, "diffusion.beta_min")
  positive_float(config, "diffusion.beta_max")
  if df.beta_max <= df.beta_min:
    fail("diffusion.beta_max", df.beta_max, f"a number > diffusion.beta_min={df.beta_min}")
  if df.sde in ("ve", "edm"):
    positive_float(config, "diffusion.sigma_min")
    positive_float(config, "diffusion.sigma_max")
    if df.sigma_max <= df.sigma_min:
      fail("diffusion.sigma_max", df.sigma_max, f"a number > diffusion.sigma_min={df.sigma_min}")
  if df.loss == "edm":
    positive_float(config, "diffusion.sigma_data")
    positive_float(config, "diffusion.p_std")
  if df.loss == "edm" and df.prediction != "eps":
    fail("diffusion.prediction", df.prediction,
         "'eps' (the default) with diffusion.loss='edm', which trains its own preconditioned "
         "parameterisation")
  if df.p_uncond > 0 and not (config.data.conditional or config.data.captions):
    fail("diffusion.p_uncond", df.p_uncond,
         "0 unless data.conditional=True or data.captions=True (label / caption dropout "
         "needs labels or captions)")


def _flow(config):
  choice(config, "flow.kind", FLOW_KINDS)
  positive_int(config, "flow.num_layers")
  positive_int(config, "flow.hidden")
  positive_int(config, "flow.num_scales")
  positive_int(config, "flow.depth")
  positive_float(config, "flow.scale_bound")
  if not isinstance(config.flow.remat, bool):
    fail("flow.remat", config.flow.remat, "True or False")
  choice(config, "flow.actnorm", ACTNORM_CHOICES)
  if config.flow.kind == "nice" and config.flow.actnorm == "on":
    fail("flow.actnorm", "on", "'auto' or 'off' with flow.kind='nice'")
  if not isinstance(config.flow.num_bins, int) or config.flow.num_bins < 2:
    fail("flow.num_bins", config.flow.num_bins, "an integer >= 2")
  positive_float(config, "flow.tail_bound")
  if (config.objective == "flow" and config.flow.kind in VECTOR_ONLY_FLOW_KINDS
      and config.data.name not in toy.DATASETS.names()):
    fail("flow.kind", config.flow.kind, "a vector-data dataset (" + ", ".join(
        toy.DATASETS.names()) + f") or, for images, one of "
        f"{', '.join(k for k in FLOW_KINDS if k not in VECTOR_ONLY_FLOW_KINDS)}")


def _optim_and_loop(config):
  positive_float(config, "optim.learning_rate")
  choice(config, "optim.schedule", LR_SCHEDULES)
  positive_int(config, "optim.warmup_steps", zero_ok=True)
  positive_float(config, "optim.weight_decay", zero_ok=True)
  positive_float(config, "optim.grad_clip", zero_ok=True)
  unit_interval(config, "optim.b1", high_open=True)
  unit_interval(config, "optim.b2", low_open=True, high_open=True)
  unit_interval(config, "optim.ema_decay", high_open=True)
  positive_int(config, "train.steps")
  positive_int(config, "train.log_every")
  positive_int(config, "train.ckpt_every")
  positive_int(config, "train.keep_ckpts")
  boolean(config, "train.progress")


def _sampling_and_eval(config):
  choice(config, "sample.sampler", tuple(samplers.available()))
  positive_int(config, "sample.steps")
  positive_int(config, "sample.num_samples")
  positive_int(config, "sample.batch_size")
  boolean(config, "sample.denoise")
  boolean(config, "sample.use_ema")
  if not isinstance(config.sample.tag, str) or "/" in config.sample.tag:
    fail("sample.tag", config.sample.tag, "a file name without '/' ('' = '<sampler>_<steps>')")
  parse_options(config.sample.options)
  parse_extra(config.sample.extra, tuple(samplers.available()))
  positive_int(config, "eval.num_reference")
  positive_int(config, "eval.num_projections")
  w = config.eval.get("inception_weights", "")
  if not isinstance(w, str) or (w and not os.path.isfile(os.path.expanduser(w))):
    fail("eval.inception_weights", w,
         '"" (off) or an existing .npz made by experiments/convert_inception_weights.py')


def _ints(config, name: str, lo: int = 1):
  v = field(config, name)
  if (not isinstance(v, (tuple, list)) or not v
      or any(isinstance(m, bool) or not isinstance(m, int) or m < lo for m in v)):
    fail(name, v, f"a non-empty tuple of integers >= {lo}")


def _latent(config):
  """latent.* (stage 1 and the text encoder of objective='latent_diffusion') and the
  text-conditional sampling fields."""
  choice(config, "latent.conditioning", latent_diffusion.CONDITIONINGS)
  choice(config, "latent.reconstruction", autoencoder_lib.RECONSTRUCTIONS)
  w = config.latent.autoencoder_workdir
  if not isinstance(w, str) or (w and not os.path.isdir(os.path.expanduser(w))):
    fail("latent.autoencoder_workdir", w, "'' (train stage 1 in WORKDIR/autoencoder) or the "
         "existing autoencoder directory of a finished latent job")
  for name in ("latent.ch", "latent.num_res_blocks", "latent.z_channels", "latent.num_heads",
               "latent.steps", "latent.batch_size", "latent.scale_images", "latent.text_width",
               "latent.text_depth", "latent.text_heads"):
    positive_int(config, name)
  positive_int(config, "latent.warmup_steps", zero_ok=True)
  _ints(config, "latent.ch_mult")
  positive_float(config, "latent.kl_weight", zero_ok=True)
  positive_float(config, "latent.perceptual_weight", zero_ok=True)
  positive_float(config, "latent.learning_rate")
  unit_interval(config, "latent.ema_decay", high_open=True)
  boolean(config, "latent.sample_posterior")
  la = config.latent
  if la.text_width % la.text_heads:
    fail("latent.text_heads", la.text_heads, f"a divisor of latent.text_width={la.text_width}")
  p = config.sample.prompts
  if (not isinstance(p, (tuple, list)) or any(not isinstance(x, str) or not x.strip()
                                              for x in p)):
    fail("sample.prompts", p, "a tuple of non-empty strings, e.g. \"('large red circle at "
         "centre',)\" (one item needs the comma); () = the test split's captions")
  positive_int(config, "sample.per_prompt")
  positive_float(config, "sample.guidance_scale", zero_ok=True)


def _guidance(config):
  """guidance.* (experiments/guided.py; research/diffusion/guidance.py)."""
  g = config.guidance
  choice(config, "guidance.kind", GUIDANCE)
  if g.kind == "cfg" and not (config.data.conditional or config.data.captions):
    fail("guidance.kind", g.kind,
         "'none' or 'classifier' unless data.conditional=True or data.captions=True (CFG "
         "needs a conditional model)")
  if g.kind == "cfg" and config.diffusion.p_uncond <= 0:
    fail("diffusion.p_uncond", config.diffusion.p_uncond,
         "> 0 with guidance.kind='cfg' (the unconditional model is trained by label dropout)")
  if g.kind == "none":
    return
  scales = g.scales
  if (not isinstance(scales, (tuple, list)) or not scales
      or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0
             for s in scales)):
    fail("guidance.scales", scales, "a non-empty tuple of numbers >= 0")
  if config.data.name == "swissroll":
    fail("guidance.kind", g.kind, "'none' for data.name='swissroll' (it has no labels)")
  positive_int(config, "guidance.samples_per_class")
  if g.kind != "classifier":
    return
  positive_int(config, "guidance.classifier_steps")
  positive_int(config, "guidance.classifier_hidden")
  positive_int(config, "guidance.classifier_depth")
  positive_float(config, "guidance.classifier_learning_rate")
  choice(config, "guidance.classifier_base", ("unconditional", "conditional"))
  if (g.classifier_base == "unconditional" and config.data.conditional
      and config.diffusion.p_uncond <= 0):
    fail("guidance.classifier_base", g.classifier_base,
         "'conditional' when diffusion.p_uncond=0 (the null label of a conditional model "
         "is only trained by label dropout)")


WANDB_MODES = ("offline", "online")


def _logging(config):
  boolean(config, "log.tensorboard")
  boolean(config, "log.wandb")
  choice(config, "log.wandb_mode", WANDB_MODES)
  if not isinstance(config.log.wandb_project, str) or not config.log.wandb_project:
    fail("log.wandb_project", config.log.wandb_project, "a non-empty project name")
  if config.log.tensorboard and importlib.util.find_spec("tensorboardX") is None:
    raise ConfigError("config.log.tensorboard=True needs the tensorboardX package, which is not "
                      "installed: pip install tensorboardX, or set config.log.tensorboard=False.")
  if config.log.wandb and importlib.util.find_spec("wandb") is None:
    raise ConfigError("config.log.wandb=True needs the wandb package, which is not installed: "
                      "pip install wandb, or set config.log.wandb=False.")


def _devices(config):
  choice(config, "train.compute_dtype", ("float32", "bfloat16"))
  boolean(config, "model.remat")
  mesh = mesh_lib.build_mesh(config)  # a bad mesh or a batch the devices do not split: here
  mesh_lib.check_batch(config, mesh)


def _reflow(config, objective) -> None:
  """flow.reflow_* against what the objective can do; ConfigError naming the field."""
  positive_int(config, "flow.reflow_rounds", zero_ok=True)
  if not config.flow.reflow_rounds:
    return
  if not hasattr(objective, "reflow_pairs") or not hasattr(objective, "straightness"):
    fail("flow.reflow_rounds", config.flow.reflow_rounds,
         f"0 for objective={config.objective!r}, which has no ODE coupling to reflow "
         "(allowed: objective='flow_matching' or 'cnf')")
  positive_int(config, "flow.reflow_pairs")
  positive_int(config, "flow.reflow_steps")
  positive_int(config, "flow.reflow_sampler_steps")
  names = tuple(objective.sampler_names)
  odes = [n for n in names if n in cnf_lib.ODE_SAMPLERS]  # integrate dx/dt = v themselves
  if config.flow.reflow_sampler not in odes:
    fail("flow.reflow_sampler", config.flow.reflow_sampler,
         "an ODE sampler that draws a deterministic coupling: one of "
         + ", ".join(map(repr, odes)))
  steps = config.flow.reflow_eval_steps
  if (not isinstance(steps, (tuple, list)) or not steps
      or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps)):
    fail("flow.reflow_eval_steps", steps, "a non-empty tuple of integers >= 1, e.g. (1, 2, 4, 8)")
  if config.data.conditional:
    fail("flow.reflow_rounds", config.flow.reflow_rounds,
         "0 with data.conditional=True (reflow here couples unconditional samples)")


def _objective(config, mode: str):
  """What the config asks of the objective, asked of the objective itself."""
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  name = builders.objective_name(config)
  check_sample_requests(config, objective)
  _reflow(config, objective)
  if config.sample.prompts:
    if not getattr(objective, "takes_prompts", False):
      fail("sample.prompts", tuple(config.sample.prompts),
           f"() for objective={name!r}, whose samples are not conditioned on text")
    prompts = list(config.sample.prompts)
    try:
      objective.encode_prompts(prompts, len(prompts))
    except ValueError as e:
      fail("sample.prompts", tuple(prompts), f"prompts in the captions' vocabulary ({e})")
  kind = config.guidance.kind
  if kind != "none" and kind not in objective.guidance_kinds:
    fail("guidance.kind", kind,
         f"'none' for objective={name!r}, whose samples take "
         + (" or ".join(repr(k) for k in objective.guidance_kinds) or "no guidance"))
  if mode != "sweep":
    return
  if not objective.sampler_names:
    raise ConfigError(f"--mode=sweep compares samplers and step counts; objective={name!r} "
                      "samples by one inverse pass and has neither (allowed: an objective with "
                      "samplers, e.g. 'diffusion' or 'flow_matching').")
  sweep_cells.check(config, objective)


def likelihood_settings(config) -> Dict[str, Any]:
  """config.eval.likelihood merged over the defaults of configs/base.py, validated."""
  defaults = dict(base_config.get_config().eval.likelihood)
  given = dict(config.eval.likelihood) if "likelihood" in config.eval else {}
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(f"config.eval.likelihood has unknown field(s) {unknown}; allowed: "
                      f"{sorted(defaults)}.")
  s = {**defaults, **given}

  def bad(name, allowed):
    raise ConfigError(f"config.eval.likelihood.{name}={s[name]!r} is not allowed: {allowed}.")

  if not isinstance(s["enabled"], bool):
    bad("enabled", "True or False")
  for name, lo in (("num_examples", 0), ("batch_size", 1), ("num_probes", 1)):
    v = s[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      bad(name, f"an integer >= {lo}")
  for name in ("rtol", "atol", "t_min"):
    v = s[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
      bad(name, "a number in (0, 1)")
  if s["estimator"] not in ("auto",) + likelihood_lib.ESTIMATORS:
    bad("estimator", "one of 'auto', " + ", ".join(map(repr, likelihood_lib.ESTIMATORS)))
  if s["probe"] not in likelihood_lib.PROBES:
    bad("probe", "one of " + ", ".join(map(repr, likelihood_lib.PROBES)))
  if s["solver"] not in likelihood_lib.SOLVERS:
    bad("solver", "one of " + ", ".join(map(repr, likelihood_lib.SOLVERS)))
  if not isinstance(s["split"], str) or not s["split"]:
    bad("split", "a TFDS split name such as 'test'")
  return s


def validate(config, mode: str = "train") -> None:
  """Raises ConfigError naming the first bad field; returns None when the config is usable."""
  if mode not in MODES:
    raise ConfigError(f"--mode={mode!r} is not allowed: one of {', '.join(MODES)}.")
  positive_int(config, "seed", zero_ok=True)
  _data(config)
  _model(config)
  _diffusion(config)
  _flow(config)
  _optim_and_loop(config)
  _sampling_and_eval(config)
  _latent(config)
  _guidance(config)
  _logging(config)
  _devices(config)
  if mode == "evaluate":
    likelihood_settings(config)
  _objective(config, mode)
  if mode == "sweep" and config.sweep.train:
    for text, _, sub in sweep_cells.train_variants(config):
      try:  # each training variant must be a config that trains
        validate(sub, "train")
      except ConfigError as e:
        raise ConfigError(f"config.sweep.train entry {text!r}: {e}") from None
