"""Data-parallel scaling of the train step: steps/s and compiled per-device memory vs devices.

For each model (the quickstart MLP, the digits UNet) and each device count (1, 2, 4, 8), one
subprocess with that many devices builds the run's mesh (experiments/mesh.py), the sharded
state and the jitted step exactly as --mode=train does, compiles it ahead of time
(compiled.memory_analysis(): arguments + temporaries + outputs per device) and times
--steps steps after a warm-up, best of --repeats. The global batch is the config's, fixed
across device counts (strong scaling), so per-device rows shrink as devices grow.

On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N splits the same cores into N
"devices": the table then shows the partitioning overhead, not a speed-up. On a GPU/TPU host
the device counts are real (pass --devices up to the host's count; the subprocesses see the
first N devices through --xla_force_host_platform_device_count only on CPU, elsewhere via
CUDA_VISIBLE_DEVICES / the platform's own device list).

  python -m experiments.benchmarks.scaling                  # both models, 1/2/4/8 devices
  python -m experiments.benchmarks.scaling --smoke          # tiny configs, seconds each
Writes results/scaling.{md,json} (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {  # name -> (config, variant, overrides)
    "quickstart MLP": ("configs/quickstart.py", None, {}),
    "digits UNet": ("configs/images/digits_ddpm.py", None, {}),
}


def worker(model: str, smoke: bool, steps: int, repeats: int) -> Dict[str, Any]:
  """One device count (this process's): compile, measure memory, time the step."""
  import jax
  from experiments import builders
  from experiments import data as data_lib
  from experiments import mesh as mesh_lib
  from experiments import state as state_lib

  from experiments.options import load_config
  path, variant, overrides = MODELS[model]
  variant = "tiny" if smoke else variant
  config = load_config(path + (f":{variant}" if variant else ""), overrides, ROOT)
  spec = data_lib.build_data_spec(config)
  objective = builders.build_objective(config, spec)
  mesh = mesh_lib.build_mesh(config)
  mesh_lib.check_batch(config, mesh)
  state = state_lib.create_state(config, objective, spec, jax.random.PRNGKey(0), mesh)
  _, schedule = state_lib.optimizer(config)
  step = state_lib.make_train_step(objective, schedule, state, mesh)
  batches = data_lib.train_batches(config, spec, 0, mesh)
  batch = next(batches)
  rng = jax.device_put(jax.random.PRNGKey(1), mesh_lib.replicated(mesh))
  with mesh_lib.use(mesh):
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    data = [next(batches) for _ in range(steps)]
    state, m = compiled(state, batch, rng)  # warm-up
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      for b in data:
        state, m = compiled(state, b, rng)
      jax.block_until_ready((state, m))
      best = min(best, time.perf_counter() - t0)
  mem_bytes = {k: int(getattr(mem, k, 0) or 0) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
      "alias_size_in_bytes")} if mem is not None else {}
  per_device = (mem_bytes.get("argument_size_in_bytes", 0) + mem_bytes.get(
      "output_size_in_bytes", 0) + mem_bytes.get("temp_size_in_bytes", 0)
                - mem_bytes.get("alias_size_in_bytes", 0))
  return {"model": model, "devices": jax.device_count(), "platform": jax.default_backend(),
          "global_batch": int(config.data.batch_size),
          "per_device_batch": int(config.data.batch_size) // jax.device_count(),
          "steps_per_sec": steps / best, "compile_seconds": compile_s,
          "per_device_bytes": int(per_device), "memory": mem_bytes,
          "loss": float(m["loss"])}


def _spawn(model: str, devices: int, args) -> Dict[str, Any]:
  env = dict(os.environ)
  if env.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  else:  # a GPU host: the first `devices` GPUs
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, "-m", "experiments.benchmarks.scaling", "--worker", model,
         "--steps", str(args.steps), "--repeats", str(args.repeats)] + (
             ["--smoke"] if args.smoke else [])
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
  if out.returncode:
    raise RuntimeError(f"{model} on {devices} devices failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def to_markdown(result: Dict[str, Any]) -> str:
  lines = [f"Train-step scaling ({result['platform']}, {result['host']}; global batch fixed, "
           f"best of {result['repeats']} x {result['steps']} steps; memory = compiled "
           "arguments + outputs + temporaries - aliased, per device)", "",
           "| model | devices | batch / device | steps/s | vs 1 device | MiB / device | "
           "compile s |", "|---|---|---|---|---|---|---|"]
  for model in result["models"]:
    rows = [r for r in result["rows"] if r["model"] == model]
    base = next((r for r in rows if r["devices"] == 1), rows[0])
    for r in rows:
      lines.append(f"| {model} | {r['devices']} | {r['per_device_batch']} | "
                   f"{r['steps_per_sec']:.1f} | {r['steps_per_sec'] / base['steps_per_sec']:.2f}x"
                   f" | {r['per_device_bytes'] / 2**20:.1f} | {r['compile_seconds']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " +
                 ", ".join(MODELS))
  p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--smoke", action="store_true", help="the configs' :tiny variants")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--out", default=os.path.join(RESULTS_DIR, "scaling"),
                 help="output path prefix; writes <out>.md and <out>.json")
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.smoke, args.steps, args.repeats)))
    return
  models = [m.strip() for m in args.models.split(",")]
  for m in models:
    if m not in MODELS:
      p.error(f"--models: {m!r} is not one of {', '.join(MODELS)}")
  devices = [int(d) for d in args.devices.split(",")]
  rows: List[Dict[str, Any]] = []
  for model in models:
    for n in devices:
      print(f"{model}: {n} device(s) ...", file=sys.stderr, flush=True)
      rows.append(_spawn(model, n, args))
  result = {"rows": rows, "models": models, "steps": args.steps, "repeats": args.repeats,
            "platform": rows[0]["platform"], "host": platform.node(), "smoke": args.smoke,
            "cpu_count": os.cpu_count()}
  if args.smoke and args.out == os.path.join(RESULTS_DIR, "scaling"):
    args.out = os.path.join(RESULTS_DIR, "scaling_smoke")
  md = to_markdown(result)
  print(md)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(md)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
