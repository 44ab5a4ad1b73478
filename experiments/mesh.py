"""The device mesh of a run and how arrays are laid out on it.

  mesh = build_mesh(config)             axes ("data", "fsdp") from config.mesh (-1 fills)
  batch_sharding(mesh)                  a batch's leading axis split over both axes
  state_shardings(state, mesh)          params, EMA and optimizer state: replicated over
                                        "data", each array's largest divisible dim over "fsdp"
  check_batch(config, mesh)             a ConfigError before any compile when the global batch
                                        does not split over the devices

Both axes carry the batch (data parallelism; "fsdp" additionally shards the state, as in
ZeRO-3 / FSDP). Axes are Auto (XLA's partitioner propagates shardings from the jitted step's
in/out shardings); kernels that XLA cannot partition run per shard under `jax.shard_map`
(research/models/layers.py). Works on jax 0.10 and 0.11: jax.make_mesh, jax.set_mesh,
NamedSharding, PartitionSpec.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.options import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = AXES
# Arrays smaller than this stay replicated under fsdp (sharding them costs more than it saves).
MIN_FSDP_SIZE = 1024


def mesh_shape(config, num_devices: int) -> Tuple[int, int]:
  """(data, fsdp) sizes; one of them may be -1 (the remaining devices)."""
  sizes = [config.mesh.data, config.mesh.fsdp]
  for name, v in zip(AXES, sizes):
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      raise ConfigError(f"config.mesh.{name}={v!r} is not allowed: an integer >= 1, or -1 for "
                        "the remaining devices.")
  if sizes.count(-1) > 1:
    raise ConfigError("config.mesh: at most one of data, fsdp may be -1.")
  known = math.prod(v for v in sizes if v != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}) does not fit "
                        f"{num_devices} devices: the fixed size must divide the device count.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh (data={config.mesh.data}, fsdp={config.mesh.fsdp}) needs "
                      f"{math.prod(sizes)} devices; {num_devices} are visible (use -1 to fill).")
  return tuple(sizes)


def build_mesh(config) -> jax.sharding.Mesh:
  shape = mesh_shape(config, jax.device_count())
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(shape, AXES, axis_types=auto)


def batch_size(mesh) -> int:
  """How many ways a batch is split: the product of the batch axes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(config, mesh) -> None:
  n = batch_size(mesh)
  if config.data.batch_size % n:
    raise ConfigError(f"config.data.batch_size={config.data.batch_size} is not allowed on "
                      f"{jax.device_count()} devices (mesh data x fsdp = "
                      f"{mesh.shape['data']} x {mesh.shape['fsdp']}): a multiple of {n}.")


def _leaf_sharding(x, mesh) -> NamedSharding:
  fsdp = mesh.shape["fsdp"]
  shape = getattr(x, "shape", ())
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return replicated(mesh)
  dims = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in dims:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(state: Any, mesh) -> Any:
  """A pytree like `state` of NamedShardings (the fsdp rule in the module docstring)."""
  return jax.tree.map(lambda x: _leaf_sharding(x, mesh), state)


def mesh_of(tree: Any):
  """The mesh the arrays of `tree` live on (the first NamedSharding found), else None."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def use(mesh):
  """`with use(mesh):` sets it for the library's sharding helpers (no-op for None)."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def gather(x) -> np.ndarray:
  """A (possibly multi-process, batch-sharded) array as one host numpy array on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(mesh) -> dict:
  """What the info row of metrics.jsonl records about the devices."""
  return {"num_devices": jax.device_count(), "num_processes": jax.process_count(),
          "mesh_data": int(mesh.shape["data"]), "mesh_fsdp": int(mesh.shape["fsdp"]),
          "platform": jax.default_backend()}
