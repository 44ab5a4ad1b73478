r"""Attention benchmark: our Pallas kernel vs JAX's bundled Pallas kernel vs cuDNN vs XLA.

The FlashAttention sweep: B*T = 16k tokens, H*D = 2048, T from 512 to 16k, D in {64, 128},
causal or not, forward and forward+backward, bf16. TFLOP/s follow the convention of
shared/anchors/attention_h200.md: forward = 4*B*H*T*T*D (halved when causal), forward+
backward = 3.5 x forward; the time is the median of `--iters` jitted, host-timed calls, each
ended by block_until_ready, after a compile + warm-up call. Memory is the compiled
executable's temporary buffer size (memory_analysis().temp_size_in_bytes).

Every (implementation, shape) cell is run in its own try/except: a failure becomes an error
cell in the table and the JSON, never a crash.

  python experiments/benchmarks/attention.py --out /tmp/attn.json            # GPU sweep
  python experiments/benchmarks/attention.py --smoke --out /tmp/smoke.json   # tiny, CPU ok
  python experiments/benchmarks/attention.py --long                          # T=32768 memory
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make the repo root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp

from kernels.attention import (BlockSizes, MosaicBackwardBlockSizes, MosaicBlockSizes,
                               dot_product_attention, mosaic_attention, pallas_attention)

# ours: the Triton-lowered Pallas kernels; ours_mosaic: the Hopper (Mosaic GPU) kernels
# (implementation="mosaic", compute capability 9.x only: Mosaic forward, Mosaic backward up to
# head dim 128). ours_mosaic_tbwd (not in the default list): the Mosaic forward with the
# Triton backward, the combination of GPU run 3. ours_triton: our Triton-language kernels through
# jax-triton (implementation="triton"; block_sizes: BlockSizes).
IMPLS = ("ours", "ours_mosaic", "bundled_pallas", "cudnn", "xla")
EXTRA_IMPLS = ("ours_mosaic_tbwd", "ours_triton")
_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


def log(*args):
  print(*args, flush=True)


# --- Implementations under test ---------------------------------------------------------------


def make_attention(impl: str, *, causal: bool, interpret: bool,
                   block_sizes: Optional[BlockSizes | MosaicBlockSizes] = None,
                   backward_block_sizes: Optional[MosaicBackwardBlockSizes] = None) -> Callable:
  """(q, k, v) -> out for one implementation; layout [B, T, H, D].

  block_sizes: BlockSizes for "ours", MosaicBlockSizes (forward tiles) for "ours_mosaic".
  backward_block_sizes: MosaicBackwardBlockSizes for "ours_mosaic" (None: the defaults).
  """
  if backward_block_sizes is not None and impl != "ours_mosaic":
    raise ValueError(f"backward_block_sizes is for impl='ours_mosaic', not {impl!r}.")
  if impl == "ours_mosaic_tbwd":
    return functools.partial(mosaic_attention, causal=causal, mosaic_block_sizes=block_sizes,
                             backward="triton", interpret=interpret)
  if impl == "ours_mosaic":
    if block_sizes is None and backward_block_sizes is None:  # the op: clear error off Hopper
      return functools.partial(dot_product_attention, causal=causal, implementation="mosaic",
                               interpret=interpret)
    return functools.partial(mosaic_attention, causal=causal, mosaic_block_sizes=block_sizes,
                             mosaic_backward_block_sizes=backward_block_sizes,
                             interpret=interpret)
  if impl == "ours_triton":
    if block_sizes is not None:
      from kernels.attention.triton_attention import triton_attention  # needs triton
      return functools.partial(triton_attention, causal=causal, block_sizes=block_sizes,
                               interpret=interpret)
    return functools.partial(dot_product_attention, causal=causal, implementation="triton",
                             interpret=interpret)
  if impl == "ours":
    if block_sizes is not None:
      return functools.partial(pallas_attention, causal=causal, block_sizes=block_sizes,
                               interpret=interpret)
    return functools.partial(dot_product_attention, causal=causal, implementation="pallas",
                             interpret=interpret)
  if impl == "bundled_pallas":
    from jax.experimental.pallas.ops.gpu import attention as bundled

    def bundled_fn(q, k, v):
      return bundled.mha(q, k, v, segment_ids=None, sm_scale=1.0 / math.sqrt(q.shape[-1]),
                         causal=causal, interpret=interpret)
    return bundled_fn
  if impl in ("cudnn", "xla"):
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation=impl)
  raise ValueError(f"impl={impl!r}; allowed: {', '.join(IMPLS + EXTRA_IMPLS)}.")


def make_pass(attn: Callable, which: str) -> Callable:
  """'fwd': (q, k, v) -> out.  'fwd_bwd': (q, k, v, do) -> (dq, dk, dv) (includes forward)."""
  if which == "fwd":
    return attn
  if which == "fwd_bwd":
    def fwd_bwd(q, k, v, do):
      return jax.vjp(attn, q, k, v)[1](do)
    return fwd_bwd
  raise ValueError(f"pass={which!r}; allowed: 'fwd', 'fwd_bwd'.")


# --- Measurement ------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
  impl: str
  seq_len: int
  head_dim: int
  causal: bool
  which: str
  batch: int
  heads: int
  dtype: str
  ms: Optional[float] = None
  tflops: Optional[float] = None
  temp_mib: Optional[float] = None
  compile_s: Optional[float] = None
  error: Optional[str] = None
  note: Optional[str] = None


def attention_flops(batch, heads, seq_len, head_dim, causal, which) -> float:
  fwd = 4.0 * batch * heads * seq_len * seq_len * head_dim
  if causal:
    fwd /= 2
  return fwd * (3.5 if which == "fwd_bwd" else 1.0)


def _short_error(e: BaseException) -> str:
  msg = f"{type(e).__name__}: {e}".replace("\n", " ")
  return msg[:300]


def measure(cell: Cell, fn: Callable, args, *, iters: int, run: bool = True,
            max_temp_bytes: Optional[float] = None) -> Cell:
  """Compiles fn, records temp memory, then times `iters` calls (median). Never raises."""
  try:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    cell.compile_s = time.perf_counter() - t0
    try:
      mem = compiled.memory_analysis()
      if mem is not None and getattr(mem, "temp_size_in_bytes", None) is not None:
        cell.temp_mib = mem.temp_size_in_bytes / 2**20
    except Exception as e:  # memory analysis is best effort on some backends
      cell.note = f"memory_analysis: {_short_error(e)}"
    if max_temp_bytes is not None and cell.temp_mib is not None and (
        cell.temp_mib * 2**20 > max_temp_bytes):
      cell.note = f"not run: needs {cell.temp_mib / 1024:.1f} GiB of temporaries"
      return cell
    if not run:
      return cell
    # Warm-up: at least 3 calls and ~0.2 s of device work, so that clocks have ramped up
    # after the compile's idle gap. Each sample then enqueues `reps` calls back to back
    # (>= ~10 ms of work) and syncs once: host dispatch and sync latency are amortised
    # instead of being added to every ~1 ms call.
    t0 = time.perf_counter()
    n = 0
    while n < 3 or time.perf_counter() - t0 < 0.2:
      jax.block_until_ready(compiled(*args))
      n += 1
    reps = max(1, math.ceil(0.01 / ((time.perf_counter() - t0) / n)))
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      for _ in range(reps):  # one stream: the last result is ready after all the others
        out = compiled(*args)
      jax.block_until_ready(out)
      times.append((time.perf_counter() - t0) / reps)
      del out
    cell.ms = 1e3 * statistics.median(times)
    spread = f"ms min/max {1e3 * min(times):.3f}/{1e3 * max(times):.3f} x{reps}"
    cell.note = f"{cell.note}; {spread}" if cell.note else spread
    cell.tflops = attention_flops(cell.batch, cell.heads, cell.seq_len, cell.head_dim,
                                  cell.causal, cell.which) / (cell.ms * 1e-3) / 1e12
  except Exception as e:  # one failing implementation must not stop the sweep
    cell.error = _short_error(e)
    tb = traceback.extract_tb(e.__traceback__)
    if tb:
      cell.note = f"at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}"
  return cell


def make_inputs(batch, seq_len, heads, head_dim, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (batch, seq_len, heads, head_dim)
  return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in ks)


def run_cell(impl, seq_len, head_dim, causal, which, *, tokens, hidden, dtype_name, iters,
             interpret, batch=None, block_sizes=None, backward_block_sizes=None, run=True,
             max_temp_bytes=None, label=None) -> Cell:
  batch = batch or max(1, tokens // seq_len)
  heads = hidden // head_dim
  cell = Cell(label or impl, seq_len, head_dim, causal, which, batch, heads, dtype_name)
  try:
    q, k, v, do = make_inputs(batch, seq_len, heads, head_dim, _DTYPES[dtype_name])
    attn = make_attention(impl, causal=causal, interpret=interpret, block_sizes=block_sizes,
                          backward_block_sizes=backward_block_sizes)
    fn = make_pass(attn, which)
    args = (q, k, v) if which == "fwd" else (q, k, v, do)
  except Exception as e:
    cell.error = _short_error(e)
    return cell
  out = measure(cell, fn, args, iters=iters, run=run, max_temp_bytes=max_temp_bytes)
  del q, k, v, do
  return out


# --- Reporting --------------------------------------------------------------------------------


def _fmt(cell: Cell, field: str = "tflops") -> str:
  if cell.error:
    return f"error: {cell.error[:60]}"
  value = getattr(cell, field)
  if value is None:
    return cell.note or "-"
  if field == "tflops":
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"
  return f"{value:.1f}"


def describe(cell: Cell) -> str:
  """One log line per cell."""
  head = (f"T={cell.seq_len:5d} D={cell.head_dim:3d} causal={cell.causal!s:5} "
          f"{cell.which:7s} {cell.impl:15s}")
  if cell.error:
    return f"{head} ERROR {cell.error[:160]} {cell.note or ''}"
  return (f"{head} {_fmt(cell):>6s} TFLOP/s {_fmt(cell, 'ms'):>8s} ms  temp "
          f"{_fmt(cell, 'temp_mib')} MiB  compile {cell.compile_s or 0:.1f}s {cell.note or ''}")


def markdown_table(cells: list[Cell], field: str = "tflops") -> str:
  """One row per (T, D, causal, pass), one column per implementation."""
  impls = list(dict.fromkeys(c.impl for c in cells))
  keys = list(dict.fromkeys((c.seq_len, c.head_dim, c.causal, c.which) for c in cells))
  by = {(c.seq_len, c.head_dim, c.causal, c.which, c.impl): c for c in cells}
  lines = ["| T | D | causal | pass | " + " | ".join(impls) + " |",
           "|---|---|---|---|" + "---|" * len(impls)]
  for key in keys:
    row = [str(key[0]), str(key[1]), str(key[2]), key[3]]
    row += [_fmt(by[key + (i,)], field) if key + (i,) in by else "-" for i in impls]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=str)


def write_results(path: str, payload: dict, table: str) -> None:
  """payload as JSON at `path` and the markdown table beside it (same name, .md)."""
  write_json(path, payload)
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(table + "\n")
  log(f"wrote {path}")


def environment() -> dict:
  dev = jax.devices()[0]
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(dev, "device_kind", str(dev)), "python": sys.version.split()[0]}


# --- Sweeps -----------------------------------------------------------------------------------


def sweep(seq_lens, head_dims, causals, passes, impls, *, tokens, hidden, dtype_name, iters,
          interpret, block_sizes_for=None, deadline=None, on_cell=None,
          label_for=None) -> list[Cell]:
  """Runs every cell; `block_sizes_for(D, causal)` optionally overrides ours' tiles and
  `label_for` renames implementations in the results (e.g. ours -> ours_tuned)."""
  cells = []
  for t in seq_lens:
    for d in head_dims:
      for causal in causals:
        for which in passes:
          for impl in impls:
            if deadline is not None and time.time() > deadline:
              log(f"  [time budget exhausted: skipping T={t} D={d} causal={causal} {which} {impl}]")
              continue
            bs = block_sizes_for(d, causal) if (block_sizes_for and impl == "ours") else None
            c = run_cell(impl, t, d, causal, which, tokens=tokens, hidden=hidden,
                         dtype_name=dtype_name, iters=iters, interpret=interpret,
                         block_sizes=bs, label=label_for.get(impl) if label_for else None)
            cells.append(c)
            log("  " + describe(c))
            if on_cell:
              on_cell(cells)
  return cells


def long_sequence_rows(impls, *, seq_len=32768, head_dim=128, hidden=2048, dtype_name="bf16",
                       iters=3, interpret=False, causal=False, cell_fn=None) -> list[Cell]:
  """Batch 1 at T=32768, forward+backward: compiled temporaries (linear vs quadratic in T);
  implementations whose temporaries exceed ~85% of device memory are compiled, not run.
  `cell_fn` is the run_cell to use (another benchmark's implementations; default ours)."""
  cell_fn = cell_fn or run_cell
  limit = None
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
      limit = 0.85 * stats["bytes_limit"]
  except Exception:
    pass
  cells = []
  for impl in impls:
    c = cell_fn(impl, seq_len, head_dim, causal, "fwd_bwd", tokens=seq_len, hidden=hidden,
                dtype_name=dtype_name, iters=iters, interpret=interpret, batch=1,
                max_temp_bytes=limit)
    cells.append(c)
    log("  long " + describe(c))
  return cells


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on CPU, interpret)")
  p.add_argument("--long", action="store_true", help="also T=32768, B=1 memory rows")
  p.add_argument("--out", default=None, help="JSON output path (a .md table is written beside)")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--seq_lens", default="512,1024,2048,4096,8192,16384")
  p.add_argument("--head_dims", default="64,128")
  p.add_argument("--causal", default="false,true")
  p.add_argument("--passes", default="fwd,fwd_bwd")
  p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
  p.add_argument("--tokens", type=int, default=16384, help="B*T")
  p.add_argument("--hidden", type=int, default=2048, help="H*D")
  p.add_argument("--iters", type=int, default=20)
  args = p.parse_args(argv)

  interpret = jax.default_backend() == "cpu"
  if args.smoke:
    args.seq_lens, args.head_dims, args.tokens, args.hidden, args.iters = "128", "64", 128, 128, 3
  seq_lens = [int(x) for x in args.seq_lens.split(",")]
  head_dims = [int(x) for x in args.head_dims.split(",")]
  causals = [x.strip().lower() == "true" for x in args.causal.split(",")]
  passes = args.passes.split(",")
  impls = args.impls.split(",")
  env = environment()
  log(f"attention benchmark on {env}; interpret={interpret}")
  cells = sweep(seq_lens, head_dims, causals, passes, impls, tokens=args.tokens,
                hidden=args.hidden, dtype_name=args.dtype, iters=args.iters,
                interpret=interpret)
  table = markdown_table(cells)
  log("\nTFLOP/s (" + env["device"] + ", " + args.dtype + ")\n" + table)
  log("\nCompiled temporary memory, MiB\n" + markdown_table(cells, "temp_mib"))
  long_cells = []
  if args.long:
    long_cells = long_sequence_rows(impls, seq_len=256 if args.smoke else 32768,
                                    hidden=args.hidden, dtype_name=args.dtype,
                                    interpret=interpret)
  if args.out:
    write_results(args.out, {"env": env, "args": vars(args),
                             "cells": [dataclasses.asdict(c) for c in cells],
                             "long": [dataclasses.asdict(c) for c in long_cells]}, table)


if __name__ == "__main__":
  main()
