"""Config -> library objects: the one place that reads the config layout of models and objectives.

  build_model(config, spec)       the network named by config.model.name (MODELS table)
  build_sde(config)               the SDE of config.diffusion
  build_objective(config, spec)   the objective named by config.objective (OBJECTIVES table)
  describe(config)                a one-line name of the model, for logs

Everything above this floor sees the objective through its protocol (research/objective.py)
and asks it what it can do; nothing above branches on config.objective.
"""
from __future__ import annotations

from typing import Callable, Dict

from experiments.data import DataSpec
from experiments.options import ConfigError
from research.diffusion import sde as sde_lib
from research.diffusion.objective import DiffusionObjective
from research.flows import flow_matching
from research.flows import objective as flow_objective
from research.models import get_model
from research.models.precision import MixedPrecision


def _num_classes(config, spec: DataSpec) -> int:
  return int(spec.num_classes) if config.data.conditional else 0


def _mlp(config, spec: DataSpec):
  m = config.model
  return get_model("mlp", hidden=m.hidden, depth=m.depth, time_embedding=m.time_embedding,
                   num_classes=_num_classes(config, spec), dropout=m.dropout)


def _unet(config, spec: DataSpec):
  m = config.model
  return get_model("unet", ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                   attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
                   dropout=m.dropout, time_embedding=m.time_embedding,
                   num_classes=_num_classes(config, spec), attention_impl=m.attention_impl,
                   remat=bool(m.remat))


# config.model.name -> builder(config, spec) of the network.
MODELS: Dict[str, Callable] = {"mlp": _mlp, "unet": _unet}


def build_model(config, spec: DataSpec):
  """The network of config.model, computed in config.train.compute_dtype (float32 params)."""
  name = config.model.name
  model = MODELS[name](config, spec) if name in MODELS else get_model(name)
  if config.train.compute_dtype != "float32":
    model = MixedPrecision(model, config.train.compute_dtype)
  return model


def build_sde(config):
  df = config.diffusion
  if df.sde in ("vp", "subvp"):
    schedule = None if df.get("schedule", "linear") == "linear" else df.schedule
    return sde_lib.get_sde(df.sde, beta_min=df.beta_min, beta_max=df.beta_max,
                           schedule=schedule)
  return sde_lib.get_sde(df.sde, sigma_min=df.sigma_min, sigma_max=df.sigma_max)


def _diffusion(config, spec: DataSpec):
  df = config.diffusion
  opts = (("weighting", df.weighting),) if df.loss == "dsm" else ()
  return DiffusionObjective(
      model=build_model(config, spec), sde=build_sde(config), loss_name=df.loss,
      prediction=df.prediction, loss_options=opts, conditional=config.data.conditional,
      p_uncond=df.p_uncond, num_classes=spec.num_classes, data_shape=tuple(spec.dims))


def _flow(config, spec: DataSpec):
  f = config.flow
  if config.train.compute_dtype != "float32":  # log-determinants need float32
    raise ConfigError(f"config.train.compute_dtype={config.train.compute_dtype!r} is not "
                      "allowed with objective='flow' (coupling log-determinants need float32); "
                      "use 'float32'.")
  return flow_objective.make_objective(
      f.kind, tuple(spec.dims), image=(spec.kind == "image"), num_layers=int(f.num_layers),
      hidden=int(f.hidden), depth=int(f.depth), num_scales=int(f.num_scales),
      scale_bound=float(f.scale_bound), num_classes=_num_classes(config, spec),
      remat=bool(f.remat))


def _flow_matching(config, spec: DataSpec):
  return flow_matching.FlowMatchingObjective(
      model=build_model(config, spec), data_shape=tuple(spec.dims),
      dequantize=(spec.kind == "image"), num_classes=_num_classes(config, spec))


# config.objective -> builder(config, spec) of the objective.
OBJECTIVES: Dict[str, Callable] = {"diffusion": _diffusion, "flow": _flow,
                                   "flow_matching": _flow_matching}


def objective_name(config) -> str:
  name = config.objective
  if name not in OBJECTIVES:
    raise ConfigError(f"config.objective={name!r} is not allowed: one of "
                      + ", ".join(repr(n) for n in OBJECTIVES) + ".")
  return name


def build_objective(config, spec: DataSpec):
  return OBJECTIVES[objective_name(config)](config, spec)


def describe(config) -> str:
  """'mlp (diffusion)', 'realnvp flow (flow)', ...: what is trained, for logs."""
  name = objective_name(config)
  model = f"{config.flow.kind} flow" if name == "flow" else config.model.name
  return f"{model} ({name})"
