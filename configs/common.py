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
