"""The model registry: `register_model(name)` decorates a Linen module class; `get_model(name, **kw)`.

Every score/velocity network is called as `model.apply(variables, x [B,*dims], t [B],
labels=None|[B] int, train=bool)` and returns an array shaped like x.
"""
from __future__ import annotations

import dataclasses

from research.registry import Registry

MODELS: Registry = Registry("model")


def register_model(name: str):
  return MODELS.register(name)


def available() -> list:
  _import_all()
  return MODELS.names()


def _import_all():
  # Importing the modules registers them; optional families fail soft only on ImportError of
  # themselves (e.g. a module not written yet), never on errors inside them.
  import importlib
  for mod in ("research.models.mlp", "research.models.unet"):
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:
      if e.name != mod:
        raise


def get_model(name: str, **kwargs):
  """Builds a registered model; unknown keyword arguments fail naming the allowed ones."""
  _import_all()
  cls = MODELS.get(name)
  fields = {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
  bad = sorted(set(kwargs) - fields)
  if bad:
    raise ValueError(f"model {name!r} got unknown options {bad}; allowed: {sorted(fields)}.")
  return cls(**kwargs)
