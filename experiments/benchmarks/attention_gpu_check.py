r"""One-shot GPU check of the flash-attention kernel (issue 5): correctness, sweep, memory, tuning.

Made to run once, unattended, on one H100/H200 within a fixed wall budget, and to survive
any single failure: every case runs in its own try/except and prints a one-line summary of
the traceback, results are written after every section, and sections that no longer fit
the time budget are skipped (and say so). Output under --out:
  gpu_check.json      everything measured (cells, errors, correctness numbers, tuning)
  gpu_check.md        the tables
  gpu_check_log.txt   the full log (stdout may be truncated by whoever runs this)

Sections, in priority order:
  1. smoke        compile + run our forward and backward on tiny shapes (fails fast, clearly)
  2. correctness  bf16 and fp16 (and one fp32) forward + dq/dk/dv vs a float32 reference
                  (matmul precision "highest") on fresh random inputs, all the odd shapes
  3. sweep        B*T=16k, H*D=2048, T in {2048, 4096, 8192} (+ --extra: 512, 1024, 16384),
                  D in {64, 128}, causal both, fwd and fwd+bwd: ours, JAX's bundled Pallas
                  kernel, cuDNN, XLA, in this one process; checks against issue 5's targets
  4. long         T=32768, B=1, H=16, D=128, fwd+bwd: compiled temporaries of each impl
  5. tune         block sizes / warps / stages per (D, causal) at T=4096, then the main
                  sweep rows again for ours with the best tiles ("ours_tuned")

  python experiments/benchmarks/attention_gpu_check.py --out /tmp/gpu_check [--extra]

--mode run2 is the short second run (about 240 s on an H200, compiles included; default
--budget_s 225): smoke; fp32 + bf16 correctness on three odd shapes (+ bf16 small tiles);
the main sweep rows (T in {2048, 4096, 8192}, D in {64, 128}, causal both) for ours,
bundled Pallas and cuDNN (XLA's numbers are in run 1); then, if time remains, tuning of
the D = 128 rows only and those rows again with the best tiles. Run 1's numbers for ours
(--compare, default results/attention_gpu_h200_run1.json) are added as columns
"ours_run1" / "ours_tuned_run1" so the tables show the change.

  python experiments/benchmarks/attention_gpu_check.py --mode run2 --out /tmp/gpu_check2

--mode run3 (default --budget_s 480) checks and times the Mosaic GPU (Hopper) forward
(kernels/attention/mosaic.py, implementation "mosaic", column "ours_mosaic"), which no GPU
has run yet: smoke (both accumulation variants); bf16 + fp16 correctness of ours_mosaic on
the odd shapes without kv_lengths and a benchmark-like one, plus ours (Triton) bf16; the
main sweep rows for ours, ours_mosaic, bundled Pallas and cuDNN (the timing now amortises
host overhead over >= 10 ms per sample and reports the spread); Mosaic tiles at T=4096
(block_q, block_kv, stages, in-place accumulation) at D = 128 and 64; T = 32768 memory
for ours, ours_mosaic, cuDNN, XLA; then T = 512, 1024, 16384 rows while time remains.

  python experiments/benchmarks/attention_gpu_check.py --mode run3 --out $OUT

--mode run4 (default --budget_s 330) checks and times the Mosaic GPU backward
(kernels/attention/mosaic_backward.py; ours_mosaic is now Mosaic forward + Mosaic backward,
ours_mosaic_tbwd the run-3 combination with the Triton backward) and the forward's in-kernel
query scaling: smoke; bf16 correctness on the odd shapes (+ fp16 on one, + D = 256 with the
default tiles, whose backward is the Triton one); the main sweep for ours_mosaic,
ours_mosaic_tbwd, bundled Pallas and cuDNN; T = 32768 memory; then T = 512 / 1024 rows
(with ours) while time remains.

  python experiments/benchmarks/attention_gpu_check.py --mode run4 --out $OUT

Run 4 ran out of its budget at T = 8192, D = 128; the rows it did not reach (about 3-4
minutes with compiles):

  python experiments/benchmarks/attention_gpu_check.py --mode run4 --budget_s 240 \
      --skip smoke,correctness,long --seq_lens 8192,512,1024 --out $OUT

Run 5 (after the Mosaic tile search, attention_mosaic_tune.py) used run4's sections with
--impls (the sweep's implementations), --head_dims, and --cases (a subset of the
correctness cases, e.g. the ones that exercise the shape-keyed Mosaic tiles):

  python experiments/benchmarks/attention_gpu_check.py --mode run4 --budget_s 330 --skip smoke \
      --cases odd_gqa_causal_kvlen,short_d64_causal_gqa_kvlen,bench_like_d64_kvlen,\
bench_like_d128_causal --impls ours_mosaic,bundled_pallas,cudnn \
      --seq_lens 8192,1024,512,4096,2048 --out $OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

T_START = time.time()  # before the jax import: the budget and the log's clock include it

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

from experiments.benchmarks import attention as bench
from kernels.attention import BlockSizes, dot_product_attention, mha_reference
from kernels.attention import MosaicBlockSizes, mosaic_attention, pallas_attention
from kernels.attention import testing
from kernels.attention.block_sizes import default_block_sizes

# Correctness cases, name: (B, T, S, H, Hkv, D, causal, kv_lengths, scale)
CASES = {
    "odd_gqa_causal_kvlen": (2, 77, 130, 8, 2, 40, True, (0, 97), None),
    "odd_mha_noncausal_scale": (1, 77, 130, 2, 2, 72, False, None, 0.3),
    "causal_t_gt_s_mqa": (2, 100, 37, 2, 1, 96, True, (37, 20), None),
    "causal_t_lt_s_d256": (1, 300, 700, 4, 2, 256, True, (650,), None),
    "bench_like_d128_causal": (2, 1024, 1024, 16, 16, 128, True, None, None),
    "bench_like_d64_kvlen": (2, 1024, 1024, 8, 8, 64, False, (1024, 333), None),
    # T = 512, D = 64: the Mosaic forward's short-query tiles (2 x 128 rows, run 5)
    "short_d64_causal_gqa_kvlen": (2, 512, 512, 8, 2, 64, True, (512, 300), None),
}
SMALL_TILES = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                         block_q_dq=32, block_k_dq=16)


class _Tee:
  """Copies stdout to the log file so a truncated console still leaves the whole record."""

  def __init__(self, path):
    self._f = open(path, "a", buffering=1)
    self._stdout = sys.stdout

  def write(self, s):
    self._stdout.write(s)
    self._f.write(s)

  def flush(self):
    self._stdout.flush()
    self._f.flush()


def log(*args):
  print(f"[{time.time() - T_START:6.1f}s]", *args, flush=True)


def summarize_exception(e: BaseException) -> str:
  frames = traceback.extract_tb(e.__traceback__)
  ours = [f for f in frames if "kernels/attention" in f.filename or "benchmarks" in f.filename]
  where = ours[-1] if ours else (frames[-1] if frames else None)
  loc = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
  msg = f"{type(e).__name__}: {e}".replace("\n", " | ")
  return msg[:600] + loc


# --- Command line and the state the sections share --------------------------------------------


def mode_flags(mode: str) -> tuple[bool, bool, bool]:
  """(run2, run3, run4); run3 is also true for run4, which is run3's sections with other cases."""
  return mode == "run2", mode in ("run3", "run4"), mode == "run4"


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, with the mode's defaults and section changes applied (budget, skip, extra)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--mode", default="full", choices=("full", "run2", "run3", "run4"),
                 help="full: everything (~8 min); run2: short second run (~4 min); run3: the "
                      "Mosaic GPU forward (~8 min), see above")
  p.add_argument("--budget_s", type=float, default=None,
                 help="wall-clock budget for the whole script; later sections are skipped "
                      "(default 450 for full, 225 for run2)")
  p.add_argument("--compare", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results", "attention_gpu_h200_run1.json"),
                 help="an earlier gpu_check.json whose 'ours' cells become extra columns "
                      "(run2 mode; '' for none)")
  p.add_argument("--extra", action="store_true", help="also T=512, 1024, 16384 sweep rows")
  p.add_argument("--seq_lens", default="",
                 help="comma list of T for the sweep instead of 2048,4096,8192 (then no extra "
                      "rows), e.g. the rows an earlier run did not reach")
  p.add_argument("--head_dims", default="64,128", help="comma list of sweep head dims")
  p.add_argument("--impls", default="",
                 help="comma list overriding the mode's sweep implementations")
  p.add_argument("--cases", default="",
                 help="comma list: only these correctness cases (names without 'mosaic_')")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--skip", default="", help="comma list of sections to skip")
  p.add_argument("--dry_run", action="store_true",
                 help="tiny sizes in interpret mode: checks this script's plumbing on a CPU")
  args = p.parse_args(argv)
  run2, run3, run4 = mode_flags(args.mode)
  if args.budget_s is None:
    args.budget_s = 225.0 if run2 else (330.0 if run4 else (480.0 if run3 else 450.0))
  if run3:  # the Triton tile tuning of runs 1-2 is replaced by the Mosaic tile section
    args.skip = ",".join(filter(None, [args.skip, "tune"]))
  if run4:  # run 3 measured nothing there (out of time); tiles stay the defaults
    args.skip = ",".join(filter(None, [args.skip, "mosaic_tune"]))
  if run2:  # what run 1 already answered (memory at T=32768, XLA, extra T) is not re-run
    args.extra = False
    args.skip = ",".join(filter(None, [args.skip, "long"]))
  if run3 and args.extra is False and not args.seq_lens:
    args.extra = True  # run3 ends with the T = 512 / 1024 / 16384 rows while time remains
  return args


class Check:
  """One run of this script: the flags, the clock, the sweep settings and what was measured.

  Each section below reads these and appends to its own list; `save` rewrites gpu_check.json
  with everything so far, so a crash or a kill still leaves the finished sections behind.
  """

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.run2, self.run3, self.run4 = mode_flags(args.mode)
    self.dry = args.dry_run
    self.interp = self.dry  # the real run never interprets
    self.deadline = T_START + args.budget_s
    self.skip = set(filter(None, args.skip.split(",")))
    self.results = {"sections": {}}
    self.env = {}
    self.smoke, self.corr, self.cells, self.long_cells, self.mosaic_tune = [], [], [], [], []
    self.tuned = {}
    # Sweep settings, shared by the sweep, the tile searches and the long-sequence rows.
    impls = [i for i in bench.IMPLS if not ((self.run2 or self.run3) and i == "xla")
             and not (i == "ours_mosaic" and not self.run3)]
    if self.run4:
      impls = ["ours_mosaic", "ours_mosaic_tbwd", "bundled_pallas", "cudnn"]
    if args.impls:
      impls = args.impls.split(",")
    self.impls = impls
    self.head_dims = [int(x) for x in args.head_dims.split(",")]
    self.kw = dict(tokens=16384, hidden=2048, dtype_name="bf16", iters=args.iters,
                   interpret=self.interp)
    self.main_ts, self.tune_t, self.long_t = (2048, 4096, 8192), 4096, 32768
    if args.seq_lens:
      self.main_ts = tuple(int(x) for x in args.seq_lens.split(","))
    if self.dry:
      self.kw.update(tokens=256, hidden=128, iters=2)
      self.main_ts, self.tune_t, self.long_t = (128,), 128, 256

  def save(self):
    with open(os.path.join(self.args.out, "gpu_check.json"), "w") as f:
      json.dump(self.results, f, indent=1, default=str)

  def save_cells(self):
    self.results["sections"]["sweep"] = [dataclasses.asdict(x) for x in self.cells]
    self.save()

  def time_left(self) -> float:
    return self.deadline - time.time()


# --- Correctness checks ------------------------------------------------------------------------


def check_case(b, t, s, h, hkv, d, causal, kvl, scale, dtype, seed, *, interpret,
               block_sizes=None, mosaic=None, backward="auto"):
  """Forward + gradients of ours vs the float32 reference: (ok, errs, finite, tol).

  mosaic: None (ours, Triton), True (ours_mosaic, default tiles) or MosaicBlockSizes;
  backward: mosaic_attention's backward ("auto", "mosaic", "triton")."""
  q, k, v, do = testing.random_inputs(seed, b, t, s, h, hkv, d, dtype)
  kvl_arr = testing.as_kv_lengths(kvl)
  if mosaic is not None:
    ours = functools.partial(mosaic_attention, causal=causal, kv_lengths=kvl_arr,
                             scale=scale, backward=backward, interpret=interpret,
                             mosaic_block_sizes=None if mosaic is True else mosaic)
  else:
    ours = functools.partial(pallas_attention, causal=causal, kv_lengths=kvl_arr,
                             scale=scale, block_sizes=block_sizes, interpret=interpret)
  if interpret and mosaic is not None:
    # Dry run on a CPU: Pallas' GPU interpreter inside one jit with the backward can
    # deadlock its simulated warpgroups (NOTES.md); op by op it runs.
    got = jax.block_until_ready(testing.fwd_bwd(ours, q, k, v, do))
  else:
    got = jax.block_until_ready(jax.jit(functools.partial(testing.fwd_bwd, ours))(q, k, v, do))
  want = testing.reference_fwd_bwd(q, k, v, do, causal=causal, kv_lengths=kvl_arr,
                                   scale=scale)
  errs = testing.rel_errors(got, want)
  finite = all(bool(np.all(np.isfinite(np.asarray(x, np.float32)))) for x in got)
  tol = 2e-2 if dtype in (jnp.bfloat16, jnp.float16) else 1e-4
  ok = finite and all(e < tol for e in errs.values())
  return ok, errs, finite, tol


def _record_case(records: list, label: str, case: tuple, dtype, *, err_format: str,
                 with_tol: bool, **kwargs):
  """Runs check_case, appends its record and logs one PASS / FAIL line; never raises."""
  try:
    ok, errs, finite, tol = check_case(*case, dtype, **kwargs)
    record = {"case": label, "ok": ok, "errs": errs, "finite": finite}
    if with_tol:
      record["tol"] = tol
    records.append(record)
    log(f"{'PASS' if ok else 'FAIL'} {label}: " +
        " ".join(f"{k}={v:{err_format}}" for k, v in errs.items()) + f" finite={finite}"
        + (f" tol={tol}" if with_tol else ""))
  except Exception as e:
    records.append({"case": label, "ok": False, "error": summarize_exception(e)})
    log(f"FAIL {label}: {summarize_exception(e)}")


# --- Sections, in the order main runs them ------------------------------------------------------


def environment(run: Check):
  """0. What this process runs on (JSON "env")."""
  env = bench.environment()
  env["compiler_params_cls"] = [n for n in ("CompilerParams", "TritonCompilerParams")
                                if hasattr(plgpu, n)]
  try:
    import jax.experimental.pallas.ops.gpu.attention  # noqa: F401  (import check only)
    env["bundled_pallas_import"] = "ok"
  except Exception as e:
    env["bundled_pallas_import"] = summarize_exception(e)
  run.env = run.results["env"] = env
  log(f"environment: {env}")
  log(f"devices: {jax.devices()}")
  run.save()
  if jax.default_backend() != "gpu":
    log("WARNING: default backend is not a GPU; this script is meant for one.")


def smoke(run: Check):
  """1. Compile and run our kernels on tiny shapes (fails fast, clearly)."""
  run.results["sections"]["smoke"] = run.smoke
  if "smoke" in run.skip:
    return
  log("=== 1. smoke: compile and run our kernels on tiny shapes ===")
  # Both loop kinds (unmasked only / unmasked + masked) and both common head dims; D=40
  # and D=256 come in the correctness section.
  smoke_runs = [(64, True, None), (128, False, None)]
  if run.run3:
    smoke_runs = [(64, True, MosaicBlockSizes()), (128, False, MosaicBlockSizes()),
                  (128, True, MosaicBlockSizes(in_place=False))] + smoke_runs
  if run.run4:  # Mosaic forward + Mosaic backward, default tiles
    smoke_runs = [(64, True, True), (128, False, True)]
  for d, causal, mbs in smoke_runs:
    what = "ours" if not mbs else ("ours_mosaic" + ("" if mbs is True else f" {mbs}"))
    _record_case(run.smoke, f"smoke {what} D={d} causal={causal}",
                 (1, 256, 256, 2, 2, d, causal, None, None), jnp.bfloat16, err_format=".1e",
                 with_tol=False, seed=d, mosaic=mbs, interpret=run.interp)
  run.save()


def correctness_plan(run: Check):
  """The correctness section's cases (mode-dependent, with 'mosaic_' copies for run3/run4),
  its (case, dtype, BlockSizes or None) runs, and its share of the budget."""
  cases = dict(CASES)
  if run.dry:  # interpret mode: only the small shapes
    cases = {n: c for n, c in cases.items() if not n.startswith(("bench", "causal_t_lt", "short"))}
  runs = [(n, dt, None) for n in cases for dt in (jnp.bfloat16, jnp.float16)]
  runs += [("odd_gqa_causal_kvlen", jnp.float32, None),
           ("odd_gqa_causal_kvlen", jnp.bfloat16, SMALL_TILES)]
  # Share of the budget the correctness section may use before the sweep.
  corr_share = 0.45
  if run.run2:  # fp32 (now full-precision dots) and bf16 on the three odd shapes + small tiles
    odd = ("odd_gqa_causal_kvlen", "odd_mha_noncausal_scale", "causal_t_gt_s_mqa")
    runs = [(n, dt, None) for n in odd for dt in (jnp.float32, jnp.bfloat16)]
    runs += [("odd_gqa_causal_kvlen", jnp.bfloat16, SMALL_TILES)]
    corr_share = 0.35
  mosaic_cases = {}
  if run.run3:  # ours_mosaic on every odd shape (kv_lengths included)
    mosaic_cases = {"mosaic_" + n: c for n, c in cases.items()}
    if run.dry:
      mosaic_cases = {n: c for n, c in mosaic_cases.items() if "bench" not in n and "d256" not in n}
    cases.update(mosaic_cases)
    runs = [(n, dt, None) for n in mosaic_cases for dt in (jnp.bfloat16, jnp.float16)]
    runs += [("odd_gqa_causal_kvlen", jnp.bfloat16, None),
             ("bench_like_d128_causal", jnp.bfloat16, None)]
    corr_share = 0.3
    if run.run4:  # bf16 everywhere (fp16 on one); D = 256 with its own default tiles
      runs = [(n, jnp.bfloat16, None) for n in mosaic_cases]
      runs.insert(1, ("mosaic_odd_gqa_causal_kvlen", jnp.float16, None))
  if run.args.cases:
    keep = set(run.args.cases.split(","))
    runs = [r for r in runs if r[0].removeprefix("mosaic_") in keep]
  return cases, set(mosaic_cases), runs, corr_share


def correctness(run: Check):
  """2. bf16 / fp16 / fp32 forward + dq/dk/dv vs the float32 reference, then dispatch."""
  run.results["sections"]["correctness"] = run.corr
  cases, mosaic_names, runs, corr_share = correctness_plan(run)
  if "correctness" in run.skip:
    return
  log("=== 2. correctness vs float32 reference (rel err = max|x-ref|/max|ref|) ===")
  for i, (name, dtype, bs) in enumerate(runs):
    if run.time_left() < (1 - corr_share) * run.args.budget_s:  # keep most for the sweep
      log(f"SKIP correctness {name} ({jnp.dtype(dtype).name}): time budget")
      continue
    label = f"{name} {jnp.dtype(dtype).name}" + (" small_tiles" if bs else "")
    # True: the per-head-dim default tiles (run 3 passed MosaicBlockSizes() here, whose
    # block_kv = 128 does not fit shared memory at D = 256).
    mbs = True if name in mosaic_names else None
    _record_case(run.corr, label, cases[name], dtype, err_format=".2e", with_tol=True,
                 seed=100 + i, block_sizes=bs, mosaic=mbs, interpret=run.interp)
  dispatch_check(run)
  n_ok = sum(bool(c.get("ok")) for c in run.corr)
  log(f"correctness: {n_ok}/{len(run.corr)} passed")
  run.save()


def dispatch_check(run: Check):
  """"auto" must pick pallas on a GPU; cuDNN agrees with the reference. (Passed in run 1
  and independent of tiles and precision: not repeated in run2 / run3 / run4.)"""
  if run.run2 or run.run3:
    return
  interp = run.interp
  try:
    q, k, v, _ = testing.random_inputs(1, 2, 512, 512, 4, 4, 64, jnp.bfloat16)
    auto = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True,
                                                         interpret=interp))(q, k, v)
    ours = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True,
                                                         implementation="pallas",
                                                         interpret=interp))(q, k, v)
    same = bool(jnp.array_equal(auto, ours))
    run.corr.append({"case": "auto == pallas on GPU", "ok": same})
    log(f"{'PASS' if same else 'FAIL'} auto dispatch picks pallas: identical={same}")
    cud = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True,
                                                        implementation="cudnn"))(q, k, v)
    with jax.default_matmul_precision("highest"):
      ref = mha_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                          v.astype(jnp.float32), causal=True)
    rel = testing.rel_error
    run.corr.append({"case": "cudnn vs reference", "ok": rel(cud, ref) < 2e-2,
                     "errs": {"out": rel(cud, ref)}})
    log(f"INFO cudnn vs reference rel={rel(cud, ref):.2e}; ours vs reference "
        f"rel={rel(ours, ref):.2e}")
  except Exception as e:
    run.corr.append({"case": "dispatch", "ok": False, "error": summarize_exception(e)})
    log(f"FAIL dispatch check: {summarize_exception(e)}")


def sweep(run: Check):
  """3. The main rows: B*T=16k, H*D=2048, T in main_ts, every implementation."""
  if "sweep" in run.skip:
    return
  sweep_reserve = 10 if run.run2 else 60  # seconds kept for later sections
  log("=== 3. sweep: B*T=16384, H*D=2048, bf16; TFLOP/s (fwd=4BHT^2D, /2 causal; fwd_bwd=3.5x) ===")
  for t in run.main_ts:
    run.cells += bench.sweep([t], run.head_dims, [False, True], ["fwd", "fwd_bwd"], run.impls,
                             deadline=run.deadline - sweep_reserve, **run.kw)
    run.save_cells()
  log("\n" + bench.markdown_table(run.cells))


MOSAIC_TILE_CANDIDATES = (
    MosaicBlockSizes(64, 128, 2), MosaicBlockSizes(64, 128, 2, in_place=False),
    MosaicBlockSizes(64, 64, 3), MosaicBlockSizes(64, 64, 4), MosaicBlockSizes(64, 128, 3),
    MosaicBlockSizes(128, 64, 2), MosaicBlockSizes(64, 256, 2))


def mosaic_tiles(run: Check):
  """3b (run3). Mosaic forward tiles at T=tune_t, D = 128 and 64, both masks."""
  if not run.run3 or "mosaic_tune" in run.skip:
    return
  log(f"=== 3b. Mosaic forward tiles at T={run.tune_t} (bf16) ===")
  run.results["sections"]["mosaic_tune"] = run.mosaic_tune
  cands = MOSAIC_TILE_CANDIDATES[:2] if run.dry else MOSAIC_TILE_CANDIDATES
  for d in (128, 64):
    for causal in (False, True):
      for mbs in cands:
        if run.time_left() < 150:
          break
        if not mbs.fits(d):
          continue
        c = bench.run_cell("ours_mosaic", run.tune_t, d, causal, "fwd", block_sizes=mbs,
                           **run.kw)
        run.mosaic_tune.append({"d": d, "causal": causal, "cand": dataclasses.asdict(mbs),
                                "tflops": c.tflops, "error": c.error, "note": c.note})
        log(f"  mosaic tune D={d} causal={causal} {mbs}: "
            + (f"{c.tflops:.0f} TFLOP/s" if c.tflops else f"ERROR {c.error}"))
      run.save()


def long_sequence(run: Check):
  """4. T=long_t, B=1, H=16, D=128, fwd+bwd: compiled temporaries of each implementation."""
  if "long" in run.skip:
    return
  if run.time_left() <= 45:
    log("SKIP long: time budget")
    return
  long_impls = run.impls + (["xla"] if run.run3 else [])
  if run.run4:  # XLA's T = 32768 compile fails on an 80 GB card (run 3); ours + cuDNN beside it
    long_impls = ["ours_mosaic", "cudnn"]
  log(f"=== 4. long: T={run.long_t}, B=1, H=16, D=128, fwd+bwd (compiled temporaries) ===")
  run.long_cells = bench.long_sequence_rows(long_impls, seq_len=run.long_t, head_dim=128,
                                            hidden=2048, dtype_name="bf16", iters=3,
                                            interpret=run.interp)
  run.results["sections"]["long"] = [dataclasses.asdict(x) for x in run.long_cells]
  run.save()


# (block_q, block_k, num_warps, num_stages)
TUNE_FWD_CANDIDATES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                       (128, 32, 4, 4), (64, 128, 4, 3)]
# (bq_dkv, bk_dkv, warps_dkv, stages_dkv, bq_dq, bk_dq, warps_dq, stages_dq)
TUNE_BWD_CANDIDATES = [(32, 128, 4, 3, 128, 32, 4, 3), (32, 128, 8, 2, 128, 32, 8, 2),
                       (64, 64, 4, 3, 64, 64, 4, 3), (64, 128, 8, 2, 128, 64, 8, 2),
                       (16, 128, 4, 4, 128, 16, 4, 4), (32, 64, 4, 3, 64, 32, 4, 3)]
# run2: around run 1's winners, D = 128 only (the rows that miss the targets)
RUN2_FWD_CANDIDATES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                       (64, 128, 4, 3), (128, 64, 8, 4)]
RUN2_BWD_CANDIDATES = [(64, 64, 4, 3, 64, 64, 4, 3), (64, 64, 4, 2, 64, 64, 4, 2),
                       (64, 64, 4, 4, 64, 64, 4, 4), (32, 64, 4, 3, 64, 32, 4, 3),
                       (64, 128, 8, 3, 128, 64, 8, 3), (32, 128, 8, 3, 64, 64, 4, 3),
                       (64, 64, 4, 3, 128, 64, 8, 3), (64, 128, 8, 2, 64, 64, 4, 3)]


def _best_tiles(run: Check, tune_log: list, d: int, causal: bool, fwd_cands, bwd_cands,
                reserve: float) -> BlockSizes:
  """Forward tiles first, then backward tiles on the best forward ones: the best BlockSizes
  (the defaults where nothing ran)."""
  base = default_block_sizes("gpu", d, causal)
  best_f = (None, base)
  for bq, bk, w, st in fwd_cands:
    if run.time_left() < reserve:
      break
    bs = dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=w, num_stages=st)
    c = bench.run_cell("ours", run.tune_t, d, causal, "fwd", block_sizes=bs, **run.kw)
    tune_log.append({"d": d, "causal": causal, "pass": "fwd", "cand": [bq, bk, w, st],
                     "tflops": c.tflops, "error": c.error})
    log(f"  tune fwd D={d} causal={causal} (bq,bk,warps,stages)={(bq, bk, w, st)}: "
        + (f"{c.tflops:.0f} TFLOP/s" if c.tflops else f"ERROR {c.error}"))
    if c.tflops and (best_f[0] is None or c.tflops > best_f[0]):
      best_f = (c.tflops, bs)
  best_b = (None, best_f[1])
  for cand in bwd_cands:
    if run.time_left() < reserve:
      break
    bqd, bkd, wd, sd, bqq, bkq, wq, sq = cand
    bs = dataclasses.replace(best_f[1], block_q_dkv=bqd, block_k_dkv=bkd, block_q_dq=bqq,
                             block_k_dq=bkq, num_warps_dkv=wd, num_stages_dkv=sd,
                             num_warps_dq=wq, num_stages_dq=sq)
    c = bench.run_cell("ours", run.tune_t, d, causal, "fwd_bwd", block_sizes=bs, **run.kw)
    tune_log.append({"d": d, "causal": causal, "pass": "fwd_bwd",
                     "cand": list(cand), "tflops": c.tflops, "error": c.error})
    log(f"  tune bwd D={d} causal={causal} (bq_dkv,bk_dkv,w_dkv,st_dkv,bq_dq,bk_dq,"
        f"w_dq,st_dq)={cand}: "
        + (f"{c.tflops:.0f} TFLOP/s" if c.tflops else f"ERROR {c.error}"))
    if c.tflops and (best_b[0] is None or c.tflops > best_b[0]):
      best_b = (c.tflops, bs)
  return best_b[1]


def tune(run: Check):
  """5 (full, run2). Triton tiles per (D, causal) at T=tune_t, then 5b: the main sweep rows
  for ours again with the best tiles ("ours_tuned")."""
  if "tune" in run.skip:
    return
  log(f"=== 5. tune at T={run.tune_t} (bf16): forward tiles, then backward tiles ===")
  fwd_cands, bwd_cands = TUNE_FWD_CANDIDATES, TUNE_BWD_CANDIDATES
  tune_dims, tune_reserve = (128, 64), 40
  if run.run2:
    fwd_cands, bwd_cands = RUN2_FWD_CANDIDATES, RUN2_BWD_CANDIDATES
    tune_dims, tune_reserve = (128,), 15
  if run.dry:
    fwd_cands, bwd_cands = fwd_cands[:2], bwd_cands[:2]
  tune_log = []
  run.results["sections"]["tune"] = tune_log
  for d in tune_dims:
    for causal in (False, True):
      run.tuned[(d, causal)] = _best_tiles(run, tune_log, d, causal, fwd_cands, bwd_cands,
                                           tune_reserve)
      log(f"  best D={d} causal={causal}: {run.tuned[(d, causal)]}")
      run.save()
  run.results["tuned_block_sizes"] = {f"D={d} causal={c}": dataclasses.asdict(bs)
                                      for (d, c), bs in run.tuned.items()}
  run.save()
  if run.tuned and run.time_left() > (12 if run.run2 else 60):
    log("=== 5b. main sweep rows for ours with the tuned tiles ===")
    for t in run.main_ts:
      run.cells += bench.sweep([t], list(tune_dims), [False, True], ["fwd", "fwd_bwd"],
                               ["ours"], block_sizes_for=lambda d, c: run.tuned.get((d, c)),
                               label_for={"ours": "ours_tuned"},
                               deadline=run.deadline - (3 if run.run2 else 45), **run.kw)
      run.save_cells()


def extra_rows(run: Check):
  """6 (--extra; run3 and run4 by default). T in {512, 1024, 16384} while time remains."""
  if not run.args.extra or "sweep" in run.skip:
    return
  log("=== 6. extra sweep rows: T in {512, 1024, 16384} ===")
  for t in ((256,) if run.dry else ((512, 1024) if run.run4 else (512, 1024, 16384))):
    run.cells += bench.sweep([t], [64, 128], [False, True], ["fwd", "fwd_bwd"],
                             run.impls + (["ours"] if run.run4 else []),
                             deadline=run.deadline - 15, **run.kw)
    run.save_cells()


SECTIONS = (smoke, correctness, sweep, mosaic_tiles, long_sequence, tune, extra_rows)


# --- Report ------------------------------------------------------------------------------------


def report(run: Check) -> str:
  """gpu_check.md: the correctness table, the sweep tables and targets, memory, tiles."""
  env, cells = run.env, run.cells
  lines = [f"# Attention GPU check on {env.get('device')} (jax {env.get('jax')})", ""]
  if run.smoke or run.corr:
    lines += ["## Correctness (max relative error vs float32 reference)", "",
              "| case | ok | out | dq | dk | dv | note |", "|---|---|---|---|---|---|---|"]
    for c in run.smoke + run.corr:
      e = c.get("errs", {})
      lines.append(f"| {c['case']} | {'PASS' if c.get('ok') else 'FAIL'} | " +
                   " | ".join(f"{e[k]:.1e}" if k in e else "-" for k in ("out", "dq", "dk", "dv"))
                   + f" | {c.get('error', '')[:120]} |")
  compare = run.args.compare
  earlier = load_earlier(compare) if (run.run2 and compare and cells) else []
  if earlier:
    log(f"comparison columns from {compare}: {len(earlier)} cells")
  if cells:
    lines += ["", "## TFLOP/s (bf16, B*T=16384, H*D=2048)", "",
              bench.markdown_table(cells + earlier)]
    lines += ["", "## Compiled temporary memory (MiB)", "",
              bench.markdown_table(cells, "temp_mib")]
    lines += ["", "## Issue 5 targets", ""] + targets(cells)
  if run.long_cells:
    lines += ["", f"## T={run.long_t}, B=1, H=16, D=128, fwd+bwd", "",
              "| impl | temp MiB | ms | note |", "|---|---|---|---|"]
    for c in run.long_cells:
      lines.append(f"| {c.impl} | {bench._fmt(c, 'temp_mib')} | {bench._fmt(c, 'ms')} | "
                   f"{(c.error or c.note or '')[:120]} |")
  if run.mosaic_tune:
    lines += ["", f"## Mosaic forward tiles, T={run.tune_t}, bf16 (TFLOP/s)", "",
              "| D | causal | block_q | block_kv | stages | in_place | TFLOP/s | note |",
              "|---|---|---|---|---|---|---|---|"]
    for m in run.mosaic_tune:
      cd = m["cand"]
      val = f"{m['tflops']:.0f}" if m["tflops"] else "error"
      lines.append(f"| {m['d']} | {m['causal']} | {cd['block_q']} | {cd['block_kv']} | "
                   f"{cd['num_stages']} | {cd['in_place']} | {val} | "
                   f"{(m['error'] or m['note'] or '')[:100]} |")
  if run.tuned:
    lines += ["", f"## Tuned BlockSizes (T={run.tune_t})", ""]
    lines += [f"- D={d} causal={c}: `{bs}`" for (d, c), bs in run.tuned.items()]
  return "\n".join(lines)


def load_earlier(path: str) -> list:
  """Sweep cells of ours from an earlier gpu_check.json, renamed '<impl>_run1' (only the
  rows this run also measured are shown, by markdown_table's row keys)."""
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    log(f"no comparison columns: {e}")
    return []
  out = []
  fields = {f.name for f in dataclasses.fields(bench.Cell)}
  for c in old.get("sections", {}).get("sweep", []):
    if c.get("impl") in ("ours", "ours_tuned"):
      c = {k: v for k, v in c.items() if k in fields}
      c["impl"] = c["impl"] + "_run1"
      out.append(bench.Cell(**c))
  return out


def targets(cells) -> list[str]:
  """Issue 5's acceptance checks, per sweep row, from the measured cells."""
  by = {(c.seq_len, c.head_dim, c.causal, c.which, c.impl): c for c in cells}
  out = ["| T | D | causal | pass | ours | best ours / bundled | best ours / cudnn | target | met |",
         "|---|---|---|---|---|---|---|---|---|"]
  keys = sorted({(c.seq_len, c.head_dim, c.causal, c.which) for c in cells})
  for key in keys:
    mine = [by.get(key + (n,)) for n in ("ours", "ours_tuned", "ours_mosaic",
                                         "ours_mosaic_tbwd")]
    mine = [c.tflops for c in mine if c is not None and c.tflops]
    bundled, cudnn = by.get(key + ("bundled_pallas",)), by.get(key + ("cudnn",))
    if not mine:
      out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | error | - | - | - | no |")
      continue
    best = max(mine)
    rb = best / bundled.tflops if bundled is not None and bundled.tflops else None
    rc = best / cudnn.tflops if cudnn is not None and cudnn.tflops else None
    t, d, _, which = key
    if which == "fwd":
      need_b, need_c = 1.0, (0.8 if (t >= 4096 and d == 128) else None)
    else:
      need_b, need_c = 2.0, (0.7 if t >= 4096 else None)
    if rb is None or (need_c is not None and rc is None):
      met = "n/a (no baseline)"
    else:
      met = "yes" if rb >= need_b and (need_c is None or rc >= need_c) else "NO"
    target = f">= {need_b}x bundled" + (f", >= {need_c}x cudnn" if need_c else "")
    out.append(f"| {t} | {d} | {key[2]} | {which} | {best:.3g} | "
               f"{'-' if rb is None else f'{rb:.2f}'} | {'-' if rc is None else f'{rc:.2f}'} | "
               f"{target} | {met} |")
  return out


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  sys.stdout = _Tee(os.path.join(args.out, "gpu_check_log.txt"))
  run = Check(args)
  environment(run)
  for section in SECTIONS:
    section(run)
  text = report(run)
  with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
    f.write(text + "\n")
  log("\n" + text)
  log(f"done in {time.time() - T_START:.0f}s; wrote {args.out}")


if __name__ == "__main__":
  try:
    main()
  except Exception as e:  # the last line of defence: still say what happened
    print(f"FATAL: {summarize_exception(e)}", flush=True)
    traceback.print_exc()
    sys.exit(1)
