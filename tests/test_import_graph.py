"""The module import graph: no circle anywhere, and every import goes downward.

Built with `ast` from the source (function-local imports included), so it holds for what the
code says, not for what one run happened to import. Layers, lowest first:

  kernels/      imports nothing of ours
  research/     kernels only (the library; never experiments/ or configs/)
  configs/      configs only
  experiments/  anything below, in floors (EXPERIMENT_FLOORS): a module imports only from
                lower floors; benchmarks/ sit on top.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "research", "configs", "experiments")
LAYER = {"kernels": 0, "research": 1, "configs": 1, "experiments": 2}
ALLOWED = {"kernels": {"kernels"}, "research": {"kernels", "research"},
           "configs": {"configs"}, "experiments": set(PACKAGES)}

# experiments/ floor by floor; a module imports only modules of lower floors.
EXPERIMENT_FLOORS = [
    {"options", "plotting", "convert_inception_weights"},
    {"mesh", "workdir", "sweep_cells"},
    {"data", "summaries"},
    {"builders", "state", "image_metrics"},
    {"validate", "latent", "sample", "reflow"},
    {"train", "evaluate", "guided"},
    {"sweep"},                      # training sweeps train runs; guidance cells sample guided
    {"report"},
    {"main"},
]


def _modules() -> Dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      rel = path.relative_to(ROOT).with_suffix("")
      parts = list(rel.parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _resolve(name: str, modules) -> str | None:
  """The longest prefix of dotted `name` that is one of our modules."""
  parts = name.split(".")
  while parts:
    cand = ".".join(parts)
    if cand in modules:
      return cand
    parts = parts[:-1]
  return None


def _imports(module: str, path: pathlib.Path, modules) -> Set[str]:
  tree = ast.parse(path.read_text(), filename=str(path))
  is_pkg = path.name == "__init__.py"
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        here = module.split(".") if is_pkg else module.split(".")[:-1]
        here = here[:len(here) - (node.level - 1)]
        base = ".".join(here + ([base] if base else []))
      # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
               for a in node.names]
    else:
      continue
    for n in names:
      target = _resolve(n, modules)
      if target is not None and target != module:
        out.add(target)
  return out


@pytest.fixture(scope="module")
def graph():
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph) -> List[List[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circle(graph):
  assert _cycles(graph) == []


def test_packages_import_only_downward(graph):
  bad = [(m, t) for m, ts in graph.items() for t in ts
         if t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
  assert bad == [], "upward imports (module, imported): " + repr(bad)


def _floor(module: str) -> float:
  parts = module.split(".")
  if len(parts) == 1:  # the experiments package itself
    return -1
  if parts[1] == "benchmarks":
    return len(EXPERIMENT_FLOORS)
  for i, floor in enumerate(EXPERIMENT_FLOORS):
    if parts[1] in floor:
      return i
  raise AssertionError(f"experiments module {module!r} has no floor in EXPERIMENT_FLOORS; "
                       "place it there.")


def test_experiments_import_only_lower_floors(graph):
  bad = []
  for m, ts in graph.items():
    if not m.startswith("experiments.") or m.startswith("experiments.benchmarks"):
      continue
    for t in ts:
      if t.startswith("experiments.") and _floor(t) >= _floor(m):
        bad.append((m, t))
  assert bad == [], "same-floor or upward imports in experiments/: " + repr(bad)


def test_the_graph_is_not_empty(graph):
  """Guards the test itself: it sees the edges it should."""
  assert "kernels.attention" in graph["research.models.layers"]
  assert "experiments.data" in graph["experiments.builders"]
