r"""Tile search for the Mosaic GPU (Hopper) attention kernels (issue 5, GPU run 5).

Times `ours_mosaic` (Mosaic forward + Mosaic backward) with candidate tiles, per sequence
length, padded head dim and causal mode, in one process and within a wall budget:
  fwd_bwd  MosaicBackwardBlockSizes (block_q, block_kv, num_stages) on forward + backward,
           with the default forward tiles (first: it may use half the budget)
  fwd      MosaicBlockSizes (block_q, block_kv, num_stages, in_place) on the forward pass
and, if time remains, D = 256 (default tiles; the backward there is the Triton one) beside
JAX's bundled Pallas kernel and cuDNN. Candidates that cannot fit shared memory
or the register budget are left out before compiling. Shapes as in the sweep: bf16,
B*T = 16384, H*D = 2048. Output under --out: mosaic_tune.json, mosaic_tune.md (one table per
pass, the best tiles per row, and the default's share of the best).

  python experiments/benchmarks/attention_mosaic_tune.py --out $OUT --budget_s 200
  python experiments/benchmarks/attention_mosaic_tune.py --out /tmp/t --dry_run   # CPU plumbing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

T_START = time.time()

# Forward candidates: FlashAttention-3's 2 x 64-row CTA with 64/128/256-key tiles and 2-4
# stages, 128-row warpgroups, and the accumulate-then-add variant (in_place=False).
FWD_CANDIDATES = [(64, 128, 2, True), (64, 128, 3, True), (64, 64, 3, True), (64, 64, 4, True),
                  (64, 128, 2, False), (64, 256, 2, True), (128, 64, 2, True),
                  (128, 128, 2, True)]
# Backward candidates (block_q, block_kv, num_stages); the register budget leaves only
# 64 x 64 at D = 128, so there the search is over pipeline depth.
BWD_CANDIDATES = [(64, 64, 2), (64, 64, 3), (64, 64, 4), (128, 64, 2), (128, 64, 3)]


def log(*args):
  print(f"[{time.time() - T_START:6.1f}s]", *args, flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--budget_s", type=float, default=200.0)
  p.add_argument("--seq_lens", default="4096,1024", help="forward search lengths, in order")
  p.add_argument("--bwd_seq_lens", default="4096", help="backward search lengths, in order")
  p.add_argument("--head_dims", default="128,64")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--dry_run", action="store_true",
                 help="tiny sizes in the GPU interpreter (CPU): checks the plumbing only")
  args = p.parse_args(argv)
  deadline = T_START + args.budget_s
  os.makedirs(args.out, exist_ok=True)

  import jax  # after argparse: --help stays fast
  from experiments.benchmarks import attention as bench
  from kernels.attention import MosaicBackwardBlockSizes, MosaicBlockSizes
  from kernels.attention import mosaic as mk

  env = bench.environment()
  log(f"environment: {env}")
  kw = dict(tokens=16384, hidden=2048, dtype_name="bf16", iters=args.iters,
            interpret=args.dry_run)
  fwd_ts = [int(x) for x in args.seq_lens.split(",") if x]
  bwd_ts = [int(x) for x in args.bwd_seq_lens.split(",") if x]
  dims = [int(x) for x in args.head_dims.split(",") if x]
  fwd_cands, bwd_cands = FWD_CANDIDATES, BWD_CANDIDATES
  if args.dry_run:
    kw.update(tokens=256, hidden=128, iters=1)
    fwd_ts, bwd_ts, dims = [128], [128], [64]
    fwd_cands, bwd_cands = fwd_cands[:2], bwd_cands[:1]
  rows = []
  results = {"env": env, "args": vars(args), "rows": rows}

  def save():
    with open(os.path.join(args.out, "mosaic_tune.json"), "w") as f:
      json.dump(results, f, indent=1, default=str)

  def record(cell, t, d, causal, which, cand, default):
    rows.append({"T": t, "D": d, "causal": causal, "pass": which, "cand": cand,
                 "default": default, "tflops": cell.tflops, "ms": cell.ms,
                 "error": cell.error, "note": cell.note})
    log(f"  {which:7s} T={t} D={d} causal={causal!s:5} {cand}{' (default)' if default else ''}: "
        + (f"{cell.tflops:.0f} TFLOP/s" if cell.tflops else f"ERROR {cell.error}"))
    save()

  log("=== backward tiles (MosaicBackwardBlockSizes: block_q, block_kv, num_stages) ===")
  for t in bwd_ts:
    for d in dims:
      for causal in (False, True):
        for bq, bkv, st in bwd_cands:
          if time.time() > deadline - 0.5 * args.budget_s:
            break
          mbb = MosaicBackwardBlockSizes(bq, bkv, st)
          try:
            mbb.check_fits(d)
          except ValueError:
            continue
          c = bench.run_cell("ours_mosaic", t, d, causal, "fwd_bwd", backward_block_sizes=mbb,
                             **kw)
          record(c, t, d, causal, "fwd_bwd", [bq, bkv, st], mbb == MosaicBackwardBlockSizes())

  log("=== forward tiles (MosaicBlockSizes: block_q, block_kv, num_stages, in_place) ===")
  for t in fwd_ts:
    for d in dims:
      for causal in (False, True):
        default = mk.default_mosaic_block_sizes(d, causal, t, t)  # what the op would pick
        for bq, bkv, st, in_place in fwd_cands:
          if time.time() > deadline - 25:
            break
          mbs = MosaicBlockSizes(bq, bkv, st, in_place)
          if not mbs.fits(d) or 2 * bq > t:
            continue
          c = bench.run_cell("ours_mosaic", t, d, causal, "fwd", block_sizes=mbs, **kw)
          record(c, t, d, causal, "fwd", [bq, bkv, st, in_place], mbs == default)

  d256 = []
  if not args.dry_run and time.time() < deadline - 20:
    log("=== D = 256 (default Mosaic tiles; Triton backward) beside bundled Pallas and cuDNN ===")
    for causal in (False, True):
      for which in ("fwd", "fwd_bwd"):
        for impl in ("ours_mosaic", "bundled_pallas", "cudnn"):
          if time.time() > deadline - 5:
            break
          c = bench.run_cell(impl, 4096, 256, causal, which, **kw)
          d256.append(c)
          log("  " + bench.describe(c))
    results["d256"] = [dataclasses.asdict(c) for c in d256]
    save()

  # --- report ----------------------------------------------------------------------------
  lines = [f"# Mosaic tile search on {env.get('device')} (jax {env.get('jax')})", "",
           "bf16, B*T = 16384, H*D = 2048; TFLOP/s of ours_mosaic per candidate.", ""]
  best = {}
  for which, head in (("fwd", "block_q, block_kv, stages, in_place"),
                      ("fwd_bwd", "backward block_q, block_kv, stages")):
    sel = [r for r in rows if r["pass"] == which]
    if not sel:
      continue
    cands = list(dict.fromkeys(tuple(r["cand"]) for r in sel))
    keys = list(dict.fromkeys((r["T"], r["D"], r["causal"]) for r in sel))
    by = {(r["T"], r["D"], r["causal"], tuple(r["cand"])): r for r in sel}
    lines += [f"## {which} ({head})", "",
              "| T | D | causal | " + " | ".join(str(c) for c in cands)
              + " | best | default / best |", "|---|---|---|" + "---|" * (len(cands) + 2)]
    for key in keys:
      cells = [by.get(key + (c,)) for c in cands]
      vals = ["-" if r is None else (f"{r['tflops']:.0f}" + ("*" if r["default"] else "")
                                     if r["tflops"] else "err") for r in cells]
      ok = [r for r in cells if r is not None and r["tflops"]]
      if not ok:
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(vals) + " | - | - |")
        continue
      top = max(ok, key=lambda r: r["tflops"])
      dflt = [r for r in ok if r["default"]]
      share = f"{dflt[0]['tflops'] / top['tflops']:.3f}" if dflt else "-"
      best[f"{which} T={key[0]} D={key[1]} causal={key[2]}"] = top["cand"]
      lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(vals)
                   + f" | {tuple(top['cand'])} | {share} |")
    lines += ["", "(* = the current default)", ""]
  results["best"] = best
  if d256:
    lines += ["## D = 256, T = 4096", "", bench.markdown_table(d256), ""]
  save()
  report = "\n".join(lines)
  with open(os.path.join(args.out, "mosaic_tune.md"), "w") as f:
    f.write(report + "\n")
  log("\n" + report)
  log(f"done in {time.time() - T_START:.0f}s; wrote {args.out}")


if __name__ == "__main__":
  main()
