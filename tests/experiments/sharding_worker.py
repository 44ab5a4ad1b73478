"""A subprocess for tests/experiments/test_sharding.py: one JAX process with the device count
its environment sets (XLA_FLAGS=--xla_force_host_platform_device_count=N), optionally one of
several processes (--coordinator_address/--num_processes/--process_id, CPU collectives).

  python tests/experiments/sharding_worker.py OUT.json JOB [JOB ...]

JOB is a JSON object:
  {"kind": "train", "config": "configs/quickstart.py:tiny", "workdir": DIR,
   "overrides": {"train.steps": 50, ...}, "name": "qs"}
      trains (resuming), then records the train losses, the final params (gathered), the
      compiled step's input shardings of the batch and of the params
  {"kind": "attention", "name": "attn"}
      the UNet's attention under the mesh vs the op without one, and the HLO's all-gathers
Process 0 writes OUT.json: {name: result}.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _initialize(argv):
  from experiments.main import initialize_distributed
  args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
  rest = [a for a in argv if not a.startswith("--")]
  if "coordinator_address" in args:
    initialize_distributed(args["coordinator_address"], int(args["num_processes"]),
                           int(args["process_id"]))
  return rest


def _config(path_arg: str, overrides: dict):
  from experiments.options import load_config
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return load_config(path_arg, overrides, root)


def _train(job):
  import jax
  import numpy as np
  from experiments import builders
  from experiments import data as data_lib
  from experiments import mesh as mesh_lib
  from experiments import state as state_lib
  from experiments import workdir as wd
  from experiments.train import train

  config = _config(job["config"], job.get("overrides", {}))
  state = train(config, job["workdir"])
  losses = {str(r["step"]): r["loss"] for r in wd.read_metrics(job["workdir"])
            if r.get("split") == "train"}
  params = {jax.tree_util.keystr(k): mesh_lib.gather(v).tolist()
            for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  # The compiled step: how its batch and its params are laid out.
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  mesh = mesh_lib.mesh_of(state)
  _, schedule = state_lib.optimizer(config)
  batch = next(data_lib.train_batches(config, spec, 0, mesh))
  step = state_lib.make_train_step(objective, schedule, state, mesh)
  with mesh_lib.use(mesh):
    compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
  args_sh = compiled.input_shardings[0]
  state_sh, batch_sh = args_sh[0], args_sh[1]
  param_specs = sorted({str(tuple(s.spec)) for s in jax.tree.leaves(state_sh.params)})
  return {"losses": losses, "params": params,
          "batch_spec": {k: str(tuple(v.spec)) for k, v in batch_sh.items() if v is not None},
          "param_specs": param_specs, "num_devices": jax.device_count(),
          "num_processes": jax.process_count(),
          "info": [r for r in wd.read_metrics(job["workdir"]) if r.get("split") == "info"]}


def _attention(job):
  """The UNet's attention layer (our Pallas kernel) under the mesh vs without one."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from research.models.layers import MultiHeadAttention

  n = jax.device_count()
  mesh = jax.make_mesh((n, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  layer = MultiHeadAttention(num_heads=2, attention_impl=job.get("impl", "pallas"))
  x = jax.random.normal(jax.random.PRNGKey(0), (2 * n, 4, 4, 16))  # a 4x4 UNet feature map
  params = layer.init(jax.random.PRNGKey(1), x)
  apply = jax.jit(layer.apply)
  plain = np.asarray(apply(params, x))
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  ps = jax.device_put(params, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    sharded_fn = jax.jit(layer.apply)
    sharded = sharded_fn(ps, xs)
    hlo = sharded_fn.lower(ps, xs).compile().as_text()
  return {"max_abs_diff": float(np.abs(np.asarray(sharded) - plain).max()),
          "scale": float(np.abs(plain).max()), "all_gathers": hlo.count("all-gather"),
          "out_spec": str(tuple(sharded.sharding.spec)), "num_devices": n}


def main(argv):
  rest = _initialize(argv)
  out, jobs = rest[0], [json.loads(j) for j in rest[1:]]
  import jax
  results = {}
  for job in jobs:
    fn = {"train": _train, "attention": _attention}[job["kind"]]
    t0 = time.perf_counter()
    results[job.get("name", job["kind"])] = fn(job)
    print(f"{job.get('name', job['kind'])}: {time.perf_counter() - t0:.1f}s", flush=True)
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv[1:])
