r"""GPU run 6 (issue 22): the jax-triton backend, checked and timed beside Mosaic and cuDNN.

One unattended script for a lent NVIDIA GPU, within a wall budget (default 480 s), every
case in its own try/except, results written after every section:

  0. env          jax / jaxlib / triton / jax_triton versions; whether jax_triton imports
                  and one tiny triton_call runs (what NOTES.md records as "works together")
  1. correctness  implementation="triton" vs the float32 reference (outputs and dq/dk/dv,
                  fresh random inputs) on the odd cases of attention_gpu_check.py (odd T/S/D,
                  GQA, causal T != S, kv_lengths with an empty row, D = 256), bf16 + fp16,
                  and fp32 on one; the same tolerances as the other GPU implementations
  2. sweep        the README's table shapes (B*T = 16k, H*D = 2048, bf16, T in 2048 / 4096 /
                  8192, D in 64 / 128 / 256, causal both, fwd and fwd+bwd) for ours_triton,
                  ours_mosaic, ours (Pallas-Triton) and cuDNN in this one process
  3. long         T = 32768, B = 1, H = 16, D = 128 fwd+bwd: compiled temporaries (linear in T)

  python experiments/benchmarks/attention_gpu_run6.py --out $OUT [--budget_s 480]

The device has no jax-triton: carry the wheels (jax_triton 0.3.1; triton is there) and put
them on PYTHONPATH first (see the device tool's README). `--dry_run` runs tiny shapes in
interpret mode on a CPU (the plumbing only; it needs `triton`, not jax_triton).
Output under --out: run6.json, run6.md, run6_log.txt.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

T_START = time.time()

import jax
import jax.numpy as jnp

from experiments.benchmarks import attention as bench
from experiments.benchmarks import attention_gpu_check as gpu_check
from kernels.attention import dot_product_attention, testing


def log(*args):
  print(f"[{time.time() - T_START:6.1f}s]", *args, flush=True)


def versions() -> dict:
  out = {}
  for pkg in ("jax", "jaxlib", "triton", "jax-triton", "jax-cuda12-plugin"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  try:
    import jax_triton  # noqa: F401
    out["jax_triton_import"] = "ok"
  except Exception as e:  # noqa: BLE001 - recorded, the sections then show the failure
    out["jax_triton_import"] = gpu_check.summarize_exception(e)
  return out


def check(name, case, dtype, seed, interpret) -> dict:
  b, t, s, h, hkv, d, causal, kvl, scale = case
  q, k, v, do = testing.random_inputs(seed, b, t, s, h, hkv, d, dtype)
  kvl = testing.as_kv_lengths(kvl)

  def ours(q, k, v):
    return dot_product_attention(q, k, v, causal=causal, kv_lengths=kvl, scale=scale,
                                 implementation="triton", interpret=interpret)
  got = jax.block_until_ready(jax.jit(lambda *a: testing.fwd_bwd(ours, *a))(q, k, v, do))
  want = testing.reference_fwd_bwd(q, k, v, do, causal=causal, kv_lengths=kvl, scale=scale)
  errs = testing.rel_errors(got, want)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  return {"case": f"{name} {jnp.dtype(dtype).name}", "errs": errs, "tol": tol,
          "ok": all(e < tol for e in errs.values())}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--budget_s", type=float, default=480.0)
  p.add_argument("--seq_lens", default="2048,4096,8192")
  p.add_argument("--head_dims", default="64,128,256")
  p.add_argument("--impls", default="ours_triton,ours_mosaic,ours,cudnn")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--skip", default="", help="comma list of sections to skip")
  p.add_argument("--dry_run", action="store_true")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  sys.stdout = gpu_check._Tee(os.path.join(args.out, "run6_log.txt"))  # pylint: disable=protected-access
  deadline = T_START + args.budget_s
  skip = set(filter(None, args.skip.split(",")))
  interp = args.dry_run
  results = {"env": {**bench.environment(), **versions()}, "sections": {}}
  path = os.path.join(args.out, "run6.json")
  log(f"env: {results['env']}")
  bench.write_json(path, results)

  if "correctness" not in skip:
    log("=== 1. correctness of implementation='triton' vs the float32 reference ===")
    corr = results["sections"]["correctness"] = []
    cases = dict(gpu_check.CASES)
    if interp:
      cases = {n: c for n, c in cases.items() if n.startswith(("odd", "causal_t_gt"))}
    runs = [(n, dt) for n in cases for dt in (jnp.bfloat16, jnp.float16)]
    runs.insert(0, ("odd_gqa_causal_kvlen", jnp.float32))
    for i, (name, dtype) in enumerate(runs):
      if time.time() > deadline - 0.6 * args.budget_s:
        log(f"SKIP {name}: time budget")
        continue
      try:
        r = check(name, cases[name], dtype, 600 + i, interp)
      except Exception as e:  # noqa: BLE001
        r = {"case": f"{name} {jnp.dtype(dtype).name}", "ok": False,
             "error": gpu_check.summarize_exception(e)}
      corr.append(r)
      log(("PASS " if r["ok"] else "FAIL ") + r["case"] + " "
          + (" ".join(f"{k}={v:.2e}" for k, v in r["errs"].items()) if "errs" in r
             else r["error"]))
      bench.write_json(path, results)

  cells = []
  kw = dict(tokens=16384, hidden=2048, dtype_name="bf16", iters=args.iters, interpret=interp)
  seq_lens = [int(x) for x in args.seq_lens.split(",")]
  head_dims = [int(x) for x in args.head_dims.split(",")]
  if interp:
    kw.update(tokens=128, hidden=64, iters=1)
    seq_lens, head_dims = [64], [32]
  if "sweep" not in skip:
    log("=== 2. sweep: B*T=16384, H*D=2048, bf16; TFLOP/s ===")
    for t in seq_lens:
      cells += bench.sweep([t], head_dims, [False, True], ["fwd", "fwd_bwd"],
                           args.impls.split(","), deadline=deadline - 45, **kw)
      results["sections"]["sweep"] = [dataclasses.asdict(c) for c in cells]
      bench.write_json(path, results)
    table = bench.markdown_table(cells)
    log("\n" + table)
    with open(os.path.join(args.out, "run6.md"), "w") as f:
      f.write(table + "\n")

  if "long" not in skip and time.time() < deadline - 30:
    log("=== 3. long: T=32768, B=1, H=16, D=128 fwd+bwd temporaries ===")
    long_cells = bench.long_sequence_rows(["ours_triton", "ours_mosaic", "cudnn"],
                                          seq_len=256 if interp else 32768, head_dim=128,
                                          hidden=2048, dtype_name="bf16", iters=3,
                                          interpret=interp)
    results["sections"]["long"] = [dataclasses.asdict(c) for c in long_cells]
    for c in long_cells:
      log(bench.describe(c))
  bench.write_json(path, results)
  log(f"done in {time.time() - T_START:.0f} s; {path}")


if __name__ == "__main__":
  main()
