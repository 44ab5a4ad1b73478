"""A tiny name -> object registry shared by models, samplers and attention implementations.

Registries raise on duplicate names, and an unknown name fails with a message that lists
the valid ones (DESIGN.md, "Conventions"). It lives at the bottom of the import graph, in
kernels/, which imports nothing above it; the model and sampler registries import it from
here, and its former module re-exports it for older imports.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, List, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps names to objects. `kind` names the registry in error messages."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: Dict[str, T] = {}

  def register(self, name: str, obj: T | None = None) -> Any:
    """`reg.register("name", obj)` or as a decorator `@reg.register("name")`."""
    def _add(o: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is already registered; names must be unique.")
      self._items[name] = o
      return o
    if obj is not None:
      return _add(obj)
    return _add

  def get(self, name: str) -> T:
    if name not in self._items:
      raise KeyError(
          f"Unknown {self.kind} {name!r}. Valid {self.kind}s: {', '.join(sorted(self._items))}.")
    return self._items[name]

  def names(self) -> List[str]:
    return sorted(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items
