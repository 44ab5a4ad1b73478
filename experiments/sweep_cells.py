"""The cells of config.sweep: training variants x per-family option grids x step counts or NFE
budgets x guidance scales x seeds.

  parse_grid("ddim: eta=0|0.5, grid=uniform|quadratic; heun: S_churn=0|10")
  variants(config)   (sampler, options) in config order: the grid products, then sweep.cells
  train_variants(config)   (text, run name, config) of each sweep.train entry: the config with
                     that entry's overrides (e.g. "diffusion.prediction=eps"), trained in
                     WORKDIR/runs/<run name>/
  cells(config)      every cell {sampler, options, steps, nfe_budget, seed}, plus
                     guidance_scale (sweep.guidance_scales) and train (sweep.train) when set
  check(config, objective)   validate's checks of every cell (before anything compiles)
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from experiments.options import ConfigError, parse_options
from research.diffusion import samplers as samplers_lib

ADAPTIVE_MAX_STEPS = 4096  # ode_adaptive's max_steps in a sweep (its NFE is what it spends)


def _parse_values(text: str) -> List[Any]:
  return [parse_options(f"v={v.strip()}", "sweep.grid")["v"] for v in text.split("|")]


def parse_grid(text: str) -> Dict[str, List[Dict[str, Any]]]:
  """"ddim: eta=0|0.5, grid=uniform|quadratic; heun: S_churn=0|10" -> per sampler the
  product of its option values as a list of option dicts."""
  out: Dict[str, List[Dict[str, Any]]] = {}
  for part in (text or "").split(";"):
    part = part.strip()
    if not part:
      continue
    if ":" not in part:
      raise ConfigError(f"config.sweep.grid: {part!r} must look like 'sampler: key=v1|v2, ...'.")
    name, _, body = part.partition(":")
    keys, values = [], []
    for item in body.split(","):
      item = item.strip()
      if not item:
        continue
      if "=" not in item:
        raise ConfigError(f"config.sweep.grid: {item!r} in {name.strip()!r} must look like "
                          "key=v1|v2.")
      k, _, v = item.partition("=")
      keys.append(k.strip())
      values.append(_parse_values(v))
    out.setdefault(name.strip(), []).extend(
        dict(zip(keys, combo)) for combo in itertools.product(*values))
  return out


def _parse_cell(text: str) -> Tuple[str, Dict[str, Any]]:
  name, _, body = text.partition(":")
  return name.strip(), parse_options(body, "sweep.cells")


def variants(config) -> List[Tuple[str, Dict[str, Any]]]:
  """(sampler, options) of every family variant, in config order (grid, then explicit cells)."""
  grid = parse_grid(config.sweep.grid)
  unknown = sorted(set(grid) - set(config.sweep.samplers))
  if unknown:
    raise ConfigError(f"config.sweep.grid names {unknown}, which are not in "
                      f"config.sweep.samplers={tuple(config.sweep.samplers)}.")
  out = []
  for name in config.sweep.samplers:
    for opts in grid.get(name, [{}]):
      out.append((name, {"denoise": bool(config.sample.denoise), **opts}))
  for text in config.sweep.cells:
    name, opts = _parse_cell(text)
    out.append((name, {"denoise": bool(config.sample.denoise), **opts}))
  return out


def _step_counts(config, name: str, options: Dict[str, Any]) -> List[Tuple[int, Optional[int]]]:
  """(steps, budget) pairs of one variant: NFE budgets if sweep.nfe, else sweep.steps."""
  if samplers_lib.expected_nfe(name, 1, **options) is None:  # adaptive: one run, its own NFE
    return [(ADAPTIVE_MAX_STEPS, None)]
  if config.sweep.nfe:
    out = []
    for budget in config.sweep.nfe:
      steps = samplers_lib.steps_for_nfe(name, int(budget), **options)
      if steps is not None:
        out.append((steps, int(budget)))
    return out
  return [(int(s), None) for s in config.sweep.steps]


def run_name(text: str) -> str:
  """The WORKDIR/runs/ directory name of a training variant: "diffusion.prediction='eps',
  diffusion.loss='eps'" -> "diffusion.prediction=eps+diffusion.loss=eps" (quotes and spaces
  dropped, other characters outside [A-Za-z0-9._=+-] as "_")."""
  name = re.sub(r"[\s'\"]+", "", text).replace(",", "+")
  return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name) or "base"


def train_variants(config) -> List[Tuple[str, str, Any]]:
  """(text, run name, config with the overrides) of each sweep.train entry, in order.

  An entry is "a.b=v, c.d=w" (values as Python literals, else strings); the sweep fields are
  kept, so each variant is sampled with the same grid."""
  entries = config.sweep.train
  if isinstance(entries, str) or not isinstance(entries, (tuple, list)):
    raise ConfigError(f"config.sweep.train={entries!r} is not allowed: a tuple of override "
                      "strings, e.g. (\"diffusion.prediction='eps'\", \"diffusion.prediction='v'\")"
                      " (one item needs the comma).")
  out, names = [], set()
  for text in entries:
    overrides = parse_options(str(text), "sweep.train")
    if not overrides:
      raise ConfigError(f"config.sweep.train: entry {text!r} has no 'field=value' overrides.")
    sub = copy.deepcopy(config)
    with sub.unlocked():
      for key, value in overrides.items():
        node, (*path, last) = sub, key.split(".")
        for part in path:
          node = node[part] if part in node else None
          if node is None:
            break
        if node is None or not hasattr(node, "keys") or last not in node:
          raise ConfigError(f"config.sweep.train: entry {text!r} overrides {key!r}, which is not "
                            "a config field.")
        if key.startswith("sweep."):
          raise ConfigError(f"config.sweep.train: entry {text!r} overrides {key!r}; a training "
                            "variant may not change the sweep itself.")
        node[last] = value
      sub.sweep.train = ()
    name = run_name(str(text))
    if name in names:
      raise ConfigError(f"config.sweep.train: two entries share the run directory {name!r}.")
    names.add(name)
    out.append((str(text), name, sub))
  return out


def cells(config) -> List[Dict[str, Any]]:
  """Every cell of config.sweep, in order (training variant outermost, seed innermost)."""
  trains = [t for t, _, _ in train_variants(config)] if config.sweep.train else [None]
  scales = tuple(config.sweep.guidance_scales) or (None,)
  out = []
  for train in trains:
    for name, options in variants(config):
      for steps, budget in _step_counts(config, name, options):
        for w in scales:
          for seed in config.sweep.seeds:
            cell = {"sampler": name, "options": dict(sorted(options.items())),
                    "steps": int(steps), "nfe_budget": budget, "seed": int(seed)}
            if w is not None:
              cell["guidance_scale"] = float(w)
            if train is not None:
              cell["train"] = train
            out.append(cell)
  return out


def check(config, objective) -> None:
  """validate's sweep checks: names, options and steps of every cell, before anything runs."""
  if config.sweep.score not in ("model", "exact"):
    raise ConfigError(f"config.sweep.score={config.sweep.score!r} is not allowed: 'model' or "
                      "'exact' (the true score of a toy Gaussian mixture).")
  if not config.sweep.seeds or any(isinstance(s, bool) or not isinstance(s, int)
                                   for s in config.sweep.seeds):
    raise ConfigError(f"config.sweep.seeds={tuple(config.sweep.seeds)!r} is not allowed: a "
                      "non-empty tuple of integers.")
  for b in config.sweep.nfe:
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
      raise ConfigError(f"config.sweep.nfe={tuple(config.sweep.nfe)!r} is not allowed: "
                        "positive integers (NFE budgets), or () to use sweep.steps.")
  scales = config.sweep.guidance_scales
  if (isinstance(scales, str) or not isinstance(scales, (tuple, list))
      or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0
             for w in scales)):
    raise ConfigError(f"config.sweep.guidance_scales={scales!r} is not allowed: a tuple of "
                      "numbers >= 0 (CFG weights w: 0 unconditional, 1 conditional), or ().")
  if scales:
    if config.sweep.score != "model":
      raise ConfigError("config.sweep.guidance_scales needs sweep.score='model' (a trained "
                        "conditional model); the exact score is not guided.")
    if not config.data.conditional:
      raise ConfigError("config.sweep.guidance_scales needs a class-conditional model "
                        "(data.conditional=True), or ().")
    if config.diffusion.p_uncond <= 0:
      raise ConfigError(f"config.sweep.guidance_scales needs diffusion.p_uncond > 0 (got "
                        f"{config.diffusion.p_uncond}): the unconditional model is trained by "
                        "label dropout.")
  if config.sweep.train and config.sweep.score != "model":
    raise ConfigError("config.sweep.train needs sweep.score='model' (each variant is trained, "
                      "then sampled); the exact score needs no training.")
  all_cells = cells(config)
  if not all_cells:
    raise ConfigError("config.sweep has no cells: every NFE budget is below one step of "
                      "every sampler (raise config.sweep.nfe).")
  for c in {(c["sampler"], json.dumps(c["options"]), c["steps"]): c for c in all_cells}.values():
    try:
      objective.check_options({"sampler": c["sampler"], **c["options"]}, c["steps"])
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.sweep: cell {c['sampler']} {c['options']} steps={c['steps']}"
                        f" is not allowed: {e}") from None
