"""Helpers for config files: `parse_arg` turns "variant=small,runlocal" into a ConfigDict."""
from __future__ import annotations

import ml_collections


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses `--config file.py:a=1,b,c=x` (big_vision style).

  A bare name `b` sets b=True; values are converted to the type of the default.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in str(arg).split(","):
    item = item.strip()
    if not item:
      continue
    key, _, val = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} unknown; allowed: {sorted(defaults)}.")
    if not _:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = val.lower() in ("1", "true", "yes")
    else:
      out[key] = type(defaults[key])(val) if defaults[key] is not None else val
  return out


def override(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """Sets dotted fields in place, as --config.a.b=v does: override(c, **{"train.steps": 5}).

  Unknown fields raise KeyError naming them (no typos silently ignored). Returns `config`.
  """
  with config.unlocked():
    for key, value in fields.items():
      node = config
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      if last not in node:
        raise KeyError(f"config has no field {key!r}.")
      node[last] = value
  return config


def use_edm(c: ml_collections.ConfigDict, *, sigma_data: float) -> ml_collections.ConfigDict:
  """EDM's recipe (Karras et al. 2022) on a config, in place: the process sigma(t) = t on
  [0.002, 80] (diffusion.sde="edm"), its preconditioned loss with log-normal training sigmas
  (ln sigma ~ N(-1.2, 1.2^2)) for data of std `sigma_data`, and its Heun sampler with 18
  steps on the sigma^(1/7) grid (the CIFAR-10 setting). Returns `c`."""
  c.diffusion.sde = "edm"
  c.diffusion.sigma_min = 0.002
  c.diffusion.sigma_max = 80.0
  c.diffusion.loss = "edm"
  c.diffusion.prediction = "eps"     # ignored by the edm loss (its own parameterisation)
  c.diffusion.sigma_data = float(sigma_data)
  c.diffusion.p_mean = -1.2
  c.diffusion.p_std = 1.2
  c.sample.sampler = "heun"
  c.sample.steps = 18
  c.sample.options = "grid='edm', rho=7.0"
  return c
