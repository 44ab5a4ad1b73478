"""Config -> library objects: the one place that reads the config layout of models and objectives.

  build_model(config, spec)       the network named by config.model.name (MODELS table)
  build_sde(config)               the SDE of config.diffusion
  build_objective(config, spec, workdir=None)   the objective named by config.objective
                                  (OBJECTIVES table); a latent objective loads stage 1 from
                                  the workdir (without one: an untrained stand-in, for checks)
  describe(config)                a one-line name of the model, for logs

Latent diffusion (objective = latent_diffusion) is a two-stage job: `has_autoencoder_stage`
says so; `build_autoencoder` / `autoencoder_objective` build stage 1 from config.latent;
stage 1 leaves AUTOENCODER_PARAMS and AUTOENCODER_INFO (scale factor, step, reconstruction
metrics) in `autoencoder_dir`, and TOKENIZER_FILE in the workdir holds the vocabulary.

Everything above this floor sees the objective through its protocol (research/objective.py)
and asks it what it can do; nothing above branches on config.objective.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
from absl import logging

from experiments import workdir as wd
from experiments.data import DataSpec
from experiments.options import CheckpointError, ConfigError
from research.diffusion import sde as sde_lib
from research.diffusion.latent import LatentDiffusionObjective
from research.diffusion.objective import DiffusionObjective
from research.flows import cnf as cnf_lib
from research.flows import flow_matching
from research.flows import objective as flow_objective
from research.models import get_model
from research.models.precision import MixedPrecision
from research.models.autoencoder import AutoencoderKL, AutoencoderObjective, FrozenAutoencoder
from research.models.text import TextEncoder, Tokenizer

AUTOENCODER_DIR = "autoencoder"                    # WORKDIR/autoencoder: stage 1
AUTOENCODER_PARAMS = "autoencoder_params.msgpack"  # the frozen (EMA) params of stage 1
AUTOENCODER_INFO = "latent.json"                   # scale factor, step, reconstruction metrics
TOKENIZER_FILE = "tokenizer.json"                  # WORKDIR/tokenizer.json: the vocabulary


def _num_classes(config, spec: DataSpec) -> int:
  return int(spec.num_classes) if config.data.conditional else 0


def _mlp(config, spec: DataSpec):
  m = config.model
  return get_model("mlp", hidden=m.hidden, depth=m.depth, time_embedding=m.time_embedding,
                   num_classes=_num_classes(config, spec), dropout=m.dropout)


def _unet(config, spec: DataSpec, context_dim: int = 0):
  m = config.model
  extra = {}
  if context_dim:
    extra = dict(context_dim=int(context_dim),
                 transformer_resolutions=tuple(m.transformer_resolutions),
                 transformer_depth=int(m.transformer_depth),
                 pooled_context=bool(m.pooled_context),
                 transformer_position_embedding=bool(m.transformer_position_embedding))
  return get_model("unet", ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                   attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
                   dropout=m.dropout, time_embedding=m.time_embedding,
                   num_classes=_num_classes(config, spec), attention_impl=m.attention_impl,
                   remat=bool(m.remat), **extra)


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
  return sde_lib.get_sde(df.sde, sigma_min=df.sigma_min, sigma_max=df.sigma_max)  # ve, edm


def _diffusion(config, spec: DataSpec, workdir=None):
  df = config.diffusion
  opts = ()
  if df.loss == "dsm":
    opts = (("weighting", df.weighting),)
  elif df.loss == "edm":  # EDM's preconditioning and log-normal training sigmas
    opts = (("sigma_data", float(df.sigma_data)), ("p_mean", float(df.p_mean)),
            ("p_std", float(df.p_std)))
  return DiffusionObjective(
      model=build_model(config, spec), sde=build_sde(config), loss_name=df.loss,
      prediction=df.prediction, loss_options=opts, conditional=config.data.conditional,
      p_uncond=df.p_uncond, num_classes=spec.num_classes, data_shape=tuple(spec.dims))


def _flow(config, spec: DataSpec, workdir=None):
  f = config.flow
  if config.train.compute_dtype != "float32":  # log-determinants need float32
    raise ConfigError(f"config.train.compute_dtype={config.train.compute_dtype!r} is not "
                      "allowed with objective='flow' (coupling log-determinants need float32); "
                      "use 'float32'.")
  return flow_objective.make_objective(
      f.kind, tuple(spec.dims), image=(spec.kind == "image"), num_layers=int(f.num_layers),
      hidden=int(f.hidden), depth=int(f.depth), num_scales=int(f.num_scales),
      scale_bound=float(f.scale_bound), num_classes=_num_classes(config, spec),
      remat=bool(f.remat), actnorm={"auto": None, "on": True, "off": False}[f.actnorm],
      num_bins=int(f.num_bins), tail_bound=float(f.tail_bound))


def _flow_matching(config, spec: DataSpec, workdir=None):
  return flow_matching.FlowMatchingObjective(
      model=build_model(config, spec), data_shape=tuple(spec.dims),
      dequantize=(spec.kind == "image"), num_classes=_num_classes(config, spec))


def _cnf(config, spec: DataSpec, workdir=None):
  """FFJORD: the config.model velocity network trained by maximum likelihood (config.cnf)."""
  if spec.kind != "toy":
    raise ConfigError(f"config.objective='cnf' is not allowed for data.name="
                      f"{config.data.name!r}: it takes vector (toy) data (a maximum-likelihood "
                      "CNF on images solves an ODE with D-dimensional probes every training "
                      "step; use objective='flow_matching' there).")
  if config.train.compute_dtype != "float32":  # the log-density integral needs float32
    raise ConfigError(f"config.train.compute_dtype={config.train.compute_dtype!r} is not "
                      "allowed with objective='cnf' (its divergence integral needs float32); "
                      "use 'float32'.")
  fields = ("solver", "steps", "rtol", "atol", "max_steps", "adjoint", "probe", "num_probes",
            "kinetic_weight", "jacobian_weight")
  try:
    settings = cnf_lib.CNFSettings(**{k: config.cnf[k] for k in fields})
  except ValueError as e:
    raise ConfigError(f"config.cnf.{e}") from None
  return cnf_lib.CNFObjective(model=build_model(config, spec), data_shape=tuple(spec.dims),
                              num_classes=_num_classes(config, spec), settings=settings)


# --- latent diffusion ------------------------------------------------------------------------


def has_autoencoder_stage(config) -> bool:
  """Whether training starts with stage 1 (the autoencoder of a latent diffusion job)."""
  return objective_name(config) == "latent_diffusion"


def build_autoencoder(config, out_channels: int = 3) -> AutoencoderKL:
  la = config.latent
  return AutoencoderKL(ch=int(la.ch), ch_mult=tuple(la.ch_mult),
                       num_res_blocks=int(la.num_res_blocks), z_channels=int(la.z_channels),
                       out_channels=int(out_channels), num_heads=int(la.num_heads),
                       attention_impl=config.model.attention_impl)


def autoencoder_objective(config, spec: DataSpec, perceptual_fn=None) -> AutoencoderObjective:
  """Stage 1: L1/L2 + kl_weight KL (+ perceptual_weight * perceptual_fn) on the images."""
  la = config.latent
  model = build_autoencoder(config, out_channels=int(spec.dims[-1]))
  return AutoencoderObjective(model=model, reconstruction=la.reconstruction,
                              kl_weight=float(la.kl_weight),
                              perceptual_weight=float(la.perceptual_weight),
                              perceptual_fn=perceptual_fn, data_shape=tuple(spec.dims))


def autoencoder_dir(config, workdir: str) -> str:
  """Where stage 1 lives: latent.autoencoder_workdir, or WORKDIR/autoencoder."""
  given = config.latent.autoencoder_workdir
  return os.path.expanduser(given) if given else os.path.join(workdir, AUTOENCODER_DIR)


def autoencoder_info(config, workdir: str) -> Optional[Dict[str, Any]]:
  """The finished stage 1's record (scale_factor, step, reconstruction metrics), or None."""
  d = autoencoder_dir(config, workdir)
  info = wd.read_json(os.path.join(d, AUTOENCODER_INFO))
  if info is None or not os.path.exists(os.path.join(d, AUTOENCODER_PARAMS)):
    return None
  return info


def frozen_autoencoder(config, spec: DataSpec, workdir: Optional[str]) -> FrozenAutoencoder:
  """Stage 1 as stage 2 uses it: the saved params and scale factor (workdir None: no params,
  scale 1, enough to check a config; nothing is computed)."""
  model = build_autoencoder(config, out_channels=int(spec.dims[-1]))
  sample_posterior = bool(config.latent.sample_posterior)
  if workdir is None:
    return FrozenAutoencoder(model, None, 1.0, sample_posterior)
  info = autoencoder_info(config, workdir)
  d = autoencoder_dir(config, workdir)
  if info is None:
    raise CheckpointError(
        f"No finished stage 1 (autoencoder) in {d}: run --mode=train with this --workdir "
        "(it trains the autoencoder first), or point --config.latent.autoencoder_workdir at a "
        "finished one.")
  x = jax.ShapeDtypeStruct((1, *spec.dims), np.float32)
  template = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)["params"], x)
  params = wd.load_tree(os.path.join(d, AUTOENCODER_PARAMS), template)
  return FrozenAutoencoder(model, params, float(info["scale_factor"]), sample_posterior)


def tokenizer(config, spec: DataSpec, workdir: Optional[str]) -> Optional[Tokenizer]:
  """The workdir's saved vocabulary (WORKDIR/tokenizer.json) if any, else the data's."""
  path = None if workdir is None else os.path.join(workdir, TOKENIZER_FILE)
  if path and os.path.exists(path):
    with open(path) as f:
      saved = Tokenizer.from_json(f.read())
    if spec.tokenizer is not None and saved != spec.tokenizer:
      logging.warning("%s differs from the vocabulary of %s's captions; using the saved one.",
                      path, config.data.name)
    return saved
  return spec.tokenizer


def _latent(config, spec: DataSpec, workdir=None):
  la, df = config.latent, config.diffusion
  if spec.kind != "image":
    raise ConfigError(f"config.objective='latent_diffusion' is not allowed for "
                      f"data.name={config.data.name!r}: it needs image data.")
  text = la.conditioning == "text"
  if text and spec.tokenizer is None:
    raise ConfigError("config.data.captions=False is not allowed with latent.conditioning="
                      "'text': the text encoder needs the captions (set data.captions=True, "
                      "or latent.conditioning='label').")
  if text and config.data.conditional:
    raise ConfigError("config.data.conditional=True is not allowed with latent.conditioning="
                      "'text': the condition is the caption (set latent.conditioning='label' "
                      "to condition on class labels).")
  if not text and not config.data.conditional:
    raise ConfigError("config.data.conditional=False is not allowed with latent.conditioning="
                      "'label': label conditioning needs the class labels.")
  opts = (("weighting", df.weighting),) if df.loss == "dsm" else ()
  kw: Dict[str, Any] = {}
  if text:
    tok = tokenizer(config, spec, workdir)
    kw = dict(tokenizer=tok, text_encoder=TextEncoder(
        vocab_size=tok.vocab_size, max_len=int(spec.caption_length), width=int(la.text_width),
        depth=int(la.text_depth), num_heads=int(la.text_heads),
        attention_impl=config.model.attention_impl))
  unet = _unet(config, spec, context_dim=int(la.text_width) if text else 0)
  try:
    return LatentDiffusionObjective(
        autoencoder=frozen_autoencoder(config, spec, workdir), unet=unet, sde=build_sde(config),
        conditioning=la.conditioning, num_classes=0 if text else int(spec.num_classes),
        p_uncond=float(df.p_uncond), loss_name=df.loss, prediction=df.prediction,
        loss_options=opts, data_shape=tuple(spec.dims), **kw)
  except ValueError as e:
    raise ConfigError(f"config.latent / config.model do not fit together: {e}") from None


# config.objective -> builder(config, spec, workdir) of the objective.
OBJECTIVES: Dict[str, Callable] = {"diffusion": _diffusion, "flow": _flow,
                                   "flow_matching": _flow_matching, "cnf": _cnf,
                                   "latent_diffusion": _latent}


def objective_name(config) -> str:
  name = config.objective
  if name not in OBJECTIVES:
    raise ConfigError(f"config.objective={name!r} is not allowed: one of "
                      + ", ".join(repr(n) for n in OBJECTIVES) + ".")
  return name


def build_objective(config, spec: DataSpec, workdir: Optional[str] = None):
  """The objective of config; `workdir` lets a latent objective load its trained stage 1."""
  return OBJECTIVES[objective_name(config)](config, spec, workdir)


def describe(config) -> str:
  """'mlp (diffusion)', 'realnvp flow (flow)', ...: what is trained, for logs."""
  name = objective_name(config)
  model = f"{config.flow.kind} flow" if name == "flow" else config.model.name
  if name == "latent_diffusion":
    model = f"{config.model.name} on autoencoder latents ({config.latent.conditioning})"
  return f"{model} ({name})"
