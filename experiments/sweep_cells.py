"""The cells of config.sweep: per-family option grids x step counts or NFE budgets x seeds.

  parse_grid("ddim: eta=0|0.5, grid=uniform|quadratic; heun: S_churn=0|10")
  variants(config)   (sampler, options) in config order: the grid products, then sweep.cells
  cells(config)      every cell {sampler, options, steps, nfe_budget, seed}
  check(config, objective)   validate's checks of every cell (before anything compiles)
"""
from __future__ import annotations

import itertools
import json
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


def cells(config) -> List[Dict[str, Any]]:
  """Every cell of config.sweep, in order."""
  out = []
  for name, options in variants(config):
    for steps, budget in _step_counts(config, name, options):
      for seed in config.sweep.seeds:
        out.append({"sampler": name, "options": dict(sorted(options.items())),
                    "steps": int(steps), "nfe_budget": budget, "seed": int(seed)})
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
