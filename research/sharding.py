"""Batch sharding inside the library, read from the mesh the caller has set (jax.set_mesh).

The experiment runner builds a mesh with axes ("data", "fsdp"), both of which split the
batch (experiments/mesh.py). Library code never builds or names a mesh of its own; it asks

  batch_axes(batch)     the mesh axes that split a leading batch axis of this size ((): none)
  constrain_batch(x)    x laid out over those axes (identity without a mesh)
  per_shard(fn, batch)  fn run per batch shard under jax.shard_map (identity without a mesh)

so that code XLA cannot partition (a pallas_call) runs on each device's rows and never
gathers the batch onto one device, and sampling loops keep their batch split.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def batch_axes(batch: int) -> Tuple[str, ...]:
  """Axes of the current mesh among BATCH_AXES (size > 1) whose product divides `batch`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  shape = dict(mesh.shape)
  axes = tuple(a for a in BATCH_AXES if shape.get(a, 1) > 1)
  if not axes or batch % math.prod(shape[a] for a in axes):
    return ()
  return axes


def constrain_batch(x: jax.Array) -> jax.Array:
  axes = batch_axes(x.shape[0])
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))


def per_shard(fn: Callable, batch: int, num_args: int) -> Callable:
  """fn(*args) with every arg (and the result) split on its leading axis over the batch axes."""
  axes = batch_axes(batch)
  if not axes:
    return fn
  spec = P(axes)
  return jax.shard_map(fn, in_specs=(spec,) * num_args, out_specs=spec, check_vma=False)
