"""Config -> library objects. The only place that knows both the config layout and the library."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp

from experiments import validate as validate_lib
from research.data import toy
from research.models import get_model


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the rest of the run needs to know about the data."""
  dims: Tuple[int, ...]          # shape of one example
  num_classes: int               # 0 when unlabelled
  toy: Optional[Any] = None      # the research.data.toy distribution, for toy data
  kind: str = "toy"              # "toy" | "image"


def build_toy(config):
  d = config.data
  kw = {}
  if d.name == "ring":
    kw = dict(num_modes=d.num_modes, radius=d.radius, std=d.std, dim=d.dim)
  elif d.name == "grid":
    kw = dict(std=d.std, dim=d.dim)
  return toy.get_dataset(d.name, **kw)


def build_data_spec(config) -> DataSpec:
  if config.data.name in validate_lib.TOY_DATA:
    ds = build_toy(config)
    return DataSpec(dims=(ds.dim,), num_classes=int(getattr(ds, "num_classes", 0)), toy=ds)
  from experiments import image_data  # image pipeline (TFDS builders); imported lazily
  return image_data.data_spec(config)


def train_batches(config, spec: DataSpec, start_step: int) -> Iterator[dict]:
  """Batches for steps start_step, start_step+1, ...; batch i depends only on (seed, i).

  That makes a resumed run see exactly the batches an uninterrupted run would have seen.
  """
  if spec.kind == "toy":
    data_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    n = config.data.batch_size

    @jax.jit
    def make(step):
      x, labels = spec.toy.sample(jax.random.fold_in(data_rng, step), n)
      batch = {"x": x}
      if labels is not None:
        batch["label"] = labels
      return batch

    step = start_step
    while True:
      yield make(step)
      step += 1
  else:
    from experiments import image_data
    yield from image_data.train_batches(config, spec, start_step)


def build_model(config, spec: DataSpec):
  m = config.model
  num_classes = spec.num_classes if config.data.conditional else 0
  if m.name == "mlp":
    return get_model("mlp", hidden=m.hidden, depth=m.depth, time_embedding=m.time_embedding,
                     num_classes=num_classes, dropout=m.dropout)
  if m.name == "unet":
    return get_model("unet", ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                     attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
                     dropout=m.dropout, time_embedding=m.time_embedding,
                     num_classes=num_classes, attention_impl=m.attention_impl)
  return get_model(m.name)


def build_sde(config):
  from research.diffusion import sde as sde_lib
  df = config.diffusion
  if df.sde in ("vp", "subvp"):
    schedule = None if df.get("schedule", "linear") == "linear" else df.schedule
    return sde_lib.get_sde(df.sde, beta_min=df.beta_min, beta_max=df.beta_max,
                           schedule=schedule)
  return sde_lib.get_sde(df.sde, sigma_min=df.sigma_min, sigma_max=df.sigma_max)


def build_objective(config, spec: DataSpec):
  if config.objective == "diffusion":
    from research.diffusion.objective import DiffusionObjective
    df = config.diffusion
    opts = (("weighting", df.weighting),) if df.loss == "dsm" else ()
    return DiffusionObjective(
        model=build_model(config, spec), sde=build_sde(config), loss_name=df.loss,
        prediction=df.prediction, loss_options=opts, conditional=config.data.conditional,
        p_uncond=df.p_uncond, num_classes=spec.num_classes)
  if config.objective == "flow":
    from research.flows import objective as flow_objective
    return flow_objective.from_config(config, spec)
  if config.objective == "flow_matching":
    from research.flows import flow_matching
    return flow_matching.from_config(config, spec, model=build_model(config, spec))
  raise validate_lib.ConfigError(
      f"config.objective={config.objective!r} is not allowed: one of {validate_lib.OBJECTIVES}.")
