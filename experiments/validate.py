"""Config validation: every bad value fails here, before anything is compiled.

Each error names the field (as it is written on the command line) and what is allowed.
"""
from __future__ import annotations

import ast
import os
from typing import Any, Dict, Tuple

TOY_DATA = ("ring", "grid", "checkerboard", "moons", "swissroll")
OBJECTIVES = ("diffusion", "flow", "flow_matching")
SDES = ("vp", "subvp", "ve")
LOSSES = ("ddpm", "dsm", "v", "edm")
PREDICTIONS = ("eps", "x0", "v", "score")
ATTENTION = ("auto", "pallas", "triton", "cudnn", "xla")
MODES = ("train", "sample", "evaluate", "sweep")


class ConfigError(ValueError):
  """A config field holds a value that is not allowed."""


def _fail(field: str, value: Any, allowed: str):
  raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")


def _choice(c, field: str, allowed):
  v = _get(c, field)
  if v not in allowed:
    _fail(field, v, "one of " + ", ".join(repr(a) for a in allowed))


def _positive_int(c, field: str, zero_ok: bool = False):
  v = _get(c, field)
  if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
    _fail(field, v, "an integer " + (">= 0" if zero_ok else ">= 1"))


def _positive_float(c, field: str, zero_ok: bool = False):
  v = _get(c, field)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not zero_ok):
    _fail(field, v, "a number " + (">= 0" if zero_ok else "> 0"))


def _unit_interval(c, field: str):
  v = _get(c, field)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
    _fail(field, v, "a number in [0, 1]")


def _get(c, field: str):
  for part in field.split("."):
    c = c[part]
  return c


def parse_options(text: str, field: str = "sample.options") -> Dict[str, Any]:
  """'eta=0.5,grid=quadratic' -> {'eta': 0.5, 'grid': 'quadratic'} (values as Python literals)."""
  out: Dict[str, Any] = {}
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      raise ConfigError(f"config.{field}: item {item!r} must look like key=value.")
    k, v = item.split("=", 1)
    try:
      out[k.strip()] = ast.literal_eval(v.strip())
    except (ValueError, SyntaxError):
      out[k.strip()] = v.strip()
  return out


def parse_extra(extra, allowed_samplers) -> Tuple[Tuple[str, int], ...]:
  """("ddim:50", "dpm_solver++:20") -> (("ddim", 50), ("dpm_solver++", 20))."""
  allowed = ("a tuple of 'sampler:steps' strings, sampler one of "
             + ", ".join(repr(a) for a in allowed_samplers))
  if isinstance(extra, str) or not isinstance(extra, (tuple, list)):
    _fail("sample.extra", extra, allowed)
  out = []
  for item in extra:
    name, _, steps = str(item).partition(":")
    if name not in allowed_samplers or not steps.isdigit() or int(steps) < 1:
      _fail("sample.extra", extra, allowed + f" and steps an integer >= 1 (bad item {item!r})")
    out.append((name, int(steps)))
  return tuple(out)


def _check_sampler_options(config, options: Dict[str, Any], extra) -> None:
  """sample.options against the sampler's own option list, before anything is trained."""
  if config.objective == "flow":
    unknown = sorted(set(options) - {"temperature"})
    t = options.get("temperature", 1.0)
    if unknown or isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
      _fail("sample.options", config.sample.options,
            "'' or 'temperature=T' with T > 0 for objective='flow'")
    return
  from research.diffusion import samplers
  if config.objective == "flow_matching":
    from research.flows.flow_matching import StraightPath
    sde = StraightPath()
  else:
    from experiments import builders
    sde = builders.build_sde(config)
  try:
    opts = {**options, "denoise": options.get("denoise", config.sample.denoise)}
    samplers.get(config.sample.sampler).resolve(opts, sde, config.sample.steps)
    for name, steps in extra:  # extra runs use the sampler's default options
      samplers.get(name).resolve({"denoise": config.sample.denoise}, sde, steps)
  except ValueError as e:
    raise ConfigError(f"config.sample.options={config.sample.options!r} / "
                      f"config.sample.extra={tuple(config.sample.extra)!r} is not allowed "
                      f"with config.sample.sampler={config.sample.sampler!r}: {e}") from None


def validate(config, mode: str = "train") -> None:
  """Raises ConfigError naming the first bad field; returns None when the config is usable."""
  if mode not in MODES:
    raise ConfigError(f"--mode={mode!r} is not allowed: one of {', '.join(MODES)}.")
  from research.models import registry as model_registry
  from research.diffusion import samplers

  _positive_int(config, "seed", zero_ok=True)
  # data
  name = config.data.name
  if not isinstance(name, str) or not name:
    _fail("data.name", name, "a toy dataset (" + ", ".join(TOY_DATA) + ") or an image dataset name")
  _positive_int(config, "data.batch_size")
  _positive_int(config, "data.dim")
  _positive_int(config, "data.num_modes")
  _positive_float(config, "data.std")
  _positive_float(config, "data.radius")
  if name == "checkerboard" and config.data.dim != 2:
    _fail("data.dim", config.data.dim, "2 for the checkerboard")
  # model
  _choice(config, "model.name", tuple(model_registry.available()))
  _positive_int(config, "model.hidden")
  _positive_int(config, "model.depth")
  _choice(config, "model.time_embedding", ("sinusoidal", "fourier"))
  _unit_interval(config, "model.dropout")
  _choice(config, "model.attention_impl", ATTENTION)
  if config.model.name == "unet":
    _positive_int(config, "model.ch")
    _positive_int(config, "model.num_res_blocks")
    _positive_int(config, "model.num_heads")
    mult = config.model.ch_mult
    if (not isinstance(mult, (tuple, list)) or not mult
        or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult)):
      _fail("model.ch_mult", mult, "a non-empty tuple of integers >= 1")
    res = config.model.attn_resolutions
    if (not isinstance(res, (tuple, list))
        or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in res)):
      _fail("model.attn_resolutions", res, "a tuple of resolutions in pixels (integers >= 1)")
    if res:
      bad = [config.model.ch * m for m in mult if (config.model.ch * m) % config.model.num_heads]
      if bad:
        _fail("model.num_heads", config.model.num_heads,
              f"a divisor of every attention width (model.ch * model.ch_mult = "
              f"{[config.model.ch * m for m in mult]}; {bad} do not divide)")
  # objective
  _choice(config, "objective", OBJECTIVES)
  _choice(config, "diffusion.sde", SDES)
  from research.diffusion.schedules import SCHEDULES
  _choice(config, "diffusion.schedule", SCHEDULES)
  _choice(config, "diffusion.loss", LOSSES)
  _choice(config, "diffusion.prediction", PREDICTIONS)
  _choice(config, "diffusion.weighting", ("uniform", "likelihood"))
  _unit_interval(config, "diffusion.p_uncond")
  _positive_float(config, "diffusion.beta_min")
  _positive_float(config, "diffusion.beta_max")
  if config.diffusion.beta_max <= config.diffusion.beta_min:
    _fail("diffusion.beta_max", config.diffusion.beta_max,
          f"a number > diffusion.beta_min={config.diffusion.beta_min}")
  if config.diffusion.sde == "ve":
    _positive_float(config, "diffusion.sigma_min")
    _positive_float(config, "diffusion.sigma_max")
    if config.diffusion.sigma_max <= config.diffusion.sigma_min:
      _fail("diffusion.sigma_max", config.diffusion.sigma_max,
            f"a number > diffusion.sigma_min={config.diffusion.sigma_min}")
  if config.diffusion.loss == "edm" and config.diffusion.prediction != "eps":
    _fail("diffusion.prediction", config.diffusion.prediction,
          "'eps' (the default) with diffusion.loss='edm', which trains its own preconditioned "
          "parameterisation")
  if config.diffusion.p_uncond > 0 and not config.data.conditional:
    _fail("diffusion.p_uncond", config.diffusion.p_uncond,
          "0 unless data.conditional=True (label dropout needs labels)")
  if config.objective == "flow":
    from research.flows.models import KINDS as FLOW_KINDS
    _choice(config, "flow.kind", FLOW_KINDS)
    _positive_int(config, "flow.num_layers")
    _positive_int(config, "flow.hidden")
    _positive_int(config, "flow.num_scales")
    _positive_int(config, "flow.depth")
    _positive_float(config, "flow.scale_bound")
    if not isinstance(config.flow.remat, bool):
      _fail("flow.remat", config.flow.remat, "True or False")
  # optimisation
  _positive_float(config, "optim.learning_rate")
  _choice(config, "optim.schedule", ("cosine", "constant"))
  _positive_int(config, "optim.warmup_steps", zero_ok=True)
  _positive_float(config, "optim.weight_decay", zero_ok=True)
  _positive_float(config, "optim.grad_clip", zero_ok=True)
  _unit_interval(config, "optim.b1")
  _unit_interval(config, "optim.b2")
  _unit_interval(config, "optim.ema_decay")
  # loop
  _positive_int(config, "train.steps")
  _positive_int(config, "train.log_every")
  _positive_int(config, "train.ckpt_every")
  _positive_int(config, "train.keep_ckpts")
  # sampling
  if config.objective != "flow":
    _choice(config, "sample.sampler", tuple(samplers.available()))
  _positive_int(config, "sample.steps")
  _positive_int(config, "sample.num_samples")
  _positive_int(config, "sample.batch_size")
  options = parse_options(config.sample.options)
  extra = parse_extra(config.sample.extra, tuple(samplers.available()))
  _check_sampler_options(config, options, extra)
  _choice(config, "guidance.kind", ("none", "cfg", "classifier"))
  if config.guidance.kind == "cfg" and not config.data.conditional:
    _fail("guidance.kind", config.guidance.kind,
          "'none' or 'classifier' unless data.conditional=True (CFG needs a conditional model)")
  if config.guidance.kind == "cfg" and config.diffusion.p_uncond <= 0:
    _fail("diffusion.p_uncond", config.diffusion.p_uncond,
          "> 0 with guidance.kind='cfg' (the unconditional model is trained by label dropout)")
  _positive_int(config, "eval.num_reference")
  _positive_int(config, "eval.num_projections")
  w = config.eval.get("inception_weights", "")
  if not isinstance(w, str) or (w and not os.path.isfile(os.path.expanduser(w))):
    _fail("eval.inception_weights", w,
          '"" (off) or an existing .npz made by experiments/convert_inception_weights.py')
  # guidance (experiments/guided.py; research/diffusion/guidance.py)
  g = config.guidance
  if g.kind != "none":
    scales = g.scales
    if (not isinstance(scales, (tuple, list)) or not scales
        or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0
               for s in scales)):
      _fail("guidance.scales", scales, "a non-empty tuple of numbers >= 0")
    if config.objective != "diffusion":
      _fail("guidance.kind", g.kind, "'none' unless objective='diffusion'")
    if name == "swissroll":
      _fail("guidance.kind", g.kind, "'none' for data.name='swissroll' (it has no labels)")
    _positive_int(config, "guidance.samples_per_class")
  if g.kind == "classifier":
    if name not in TOY_DATA:
      _fail("guidance.kind", g.kind, "'classifier' only for vector (toy) data: the "
            "noise-conditional classifier (research/models/noise_classifier.py) takes [B, D]")
    _positive_int(config, "guidance.classifier_steps")
    _positive_int(config, "guidance.classifier_hidden")
    _positive_int(config, "guidance.classifier_depth")
    _positive_float(config, "guidance.classifier_learning_rate")
    _choice(config, "guidance.classifier_base", ("unconditional", "conditional"))
    if (g.classifier_base == "unconditional" and config.data.conditional
        and config.diffusion.p_uncond <= 0):
      _fail("guidance.classifier_base", g.classifier_base,
            "'conditional' when diffusion.p_uncond=0 (the null label of a conditional model "
            "is only trained by label dropout)")
  if mode == "sweep" and config.objective == "flow":
    raise ConfigError("--mode=sweep compares samplers and step counts; objective='flow' samples "
                      "by one inverse pass and has neither (allowed: objective 'diffusion' or "
                      "'flow_matching').")
  if mode == "evaluate":
    from experiments import evaluate
    evaluate.likelihood_settings(config)
