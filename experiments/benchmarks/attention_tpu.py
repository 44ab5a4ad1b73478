r"""TPU attention benchmark: our Mosaic TPU kernel vs JAX's bundled TPU kernels vs XLA.

Implementations (layout [B, T, H, D] at the call, as the op sees it):
  ours_tpu        implementation="pallas_tpu" (kernels/attention/tpu.py), default tiles of
                  the chip's generation (tpu.default_tpu_block_sizes)
  bundled_flash   jax.experimental.pallas.ops.tpu.flash_attention ([B, H, T, D]: the two
                  transposes our layout needs are inside the timed function)
  splash          jax.experimental.pallas.ops.tpu.splash_attention, make_splash_mha with a
                  CausalMask / FullMask per head, 512-row tiles (min(512, T)), vmapped over
                  the batch, q pre-scaled (splash takes no scale); transposes timed too
  xla             jax.nn.dot_product_attention(implementation="xla")
Before timing, each implementation's output and gradients are compared with the float32
reference at T = 128 (`check_against_reference`, logged and stored in the JSON). The sweep,
the FLOP convention (forward 4*B*H*T*T*D, halved when causal; forward+backward
3.5 x forward), the timing (median of `--iters` host-timed samples after a warm-up) and the
table / JSON are those of experiments/benchmarks/attention.py, whose helpers this reuses.

  python experiments/benchmarks/attention_tpu.py --out /tmp/attn_tpu.json       # a TPU host
  python experiments/benchmarks/attention_tpu.py --long --out /tmp/attn_tpu.json  # + T=32k
  python experiments/benchmarks/attention_tpu.py --smoke --out /tmp/smoke.json  # CPU plumbing

Off a TPU it refuses unless --smoke, which runs tiny shapes in Pallas' TPU interpreter (its
times measure the interpreter, not a kernel).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repo root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as bundled
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from experiments.benchmarks.attention import (_DTYPES, Cell, _short_error, describe,
                                              environment, log, make_inputs, make_pass,
                                              long_sequence_rows, markdown_table, measure,
                                              write_results)
from kernels.attention import dot_product_attention, tpu
from kernels.attention.testing import fwd_bwd, reference_fwd_bwd, rel_errors

IMPLS = ("ours_tpu", "bundled_flash", "splash", "xla")


def _bhtd(x):
  return jnp.transpose(x, (0, 2, 1, 3))


def make_attention(impl: str, *, causal: bool, seq_len: int, heads: int,
                   interpret: bool) -> Callable:
  """(q, k, v) -> out, [B, T, H, D], for one implementation (self-attention, T == S)."""
  if impl == "ours_tpu":
    return functools.partial(dot_product_attention, causal=causal, implementation="pallas_tpu",
                             interpret=interpret)
  if impl == "bundled_flash":
    def bundled_fn(q, k, v):
      out = bundled.flash_attention(_bhtd(q), _bhtd(k), _bhtd(v), causal=causal,
                                    sm_scale=q.shape[-1] ** -0.5)
      return _bhtd(out)
    return bundled_fn
  if impl == "splash":
    t = seq_len
    per_head = splash.CausalMask((t, t)) if causal else splash.FullMask((t, t))
    blk = min(512, t)
    tiles = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk,
                              block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
                              block_q_dq=blk, block_kv_dq=blk)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([per_head] * heads), block_sizes=tiles,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)

    def splash_fn(q, k, v):
      qs = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
      return _bhtd(jax.vmap(kernel)(_bhtd(qs), _bhtd(k), _bhtd(v)))
    return splash_fn
  if impl == "xla":
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation="xla")
  raise ValueError(f"impl={impl!r}; allowed: {', '.join(IMPLS)}.")


def run_cell(impl, seq_len, head_dim, causal, which, *, tokens, hidden, dtype_name, iters,
             interpret, batch=None, max_temp_bytes=None) -> Cell:
  batch = batch or max(1, tokens // seq_len)
  heads = hidden // head_dim
  cell = Cell(impl, seq_len, head_dim, causal, which, batch, heads, dtype_name)
  try:
    q, k, v, do = make_inputs(batch, seq_len, heads, head_dim, _DTYPES[dtype_name])
    fn = make_pass(make_attention(impl, causal=causal, seq_len=seq_len, heads=heads,
                                  interpret=interpret), which)
    args = (q, k, v) if which == "fwd" else (q, k, v, do)
  except Exception as e:
    cell.error = _short_error(e)
    return cell
  if interpret and impl == "bundled_flash":  # it has no interpret argument: the global switch
    with pltpu.force_tpu_interpret_mode(tpu.interpret_params()):
      return measure(cell, fn, args, iters=iters, max_temp_bytes=max_temp_bytes)
  return measure(cell, fn, args, iters=iters, max_temp_bytes=max_temp_bytes)


def check_against_reference(impls, *, seq_len, head_dim, heads, causal, dtype_name,
                            interpret) -> dict:
  """Max relative error of each implementation's output and q/k/v gradients against the
  float32 reference on one small input: the wrappers (layout, scale, masks) compute the
  same attention before they are timed. Returns {impl: {"out": .., "dq": .., ...}}."""
  q, k, v, do = make_inputs(1, seq_len, heads, head_dim, _DTYPES[dtype_name])
  want = reference_fwd_bwd(q, k, v, do, causal=causal)
  errors = {}
  for impl in impls:
    attn = make_attention(impl, causal=causal, seq_len=seq_len, heads=heads,
                          interpret=interpret)
    try:
      if interpret and impl == "bundled_flash":
        with pltpu.force_tpu_interpret_mode(tpu.interpret_params()):
          got = jax.jit(functools.partial(fwd_bwd, attn))(q, k, v, do)
      else:
        got = jax.jit(functools.partial(fwd_bwd, attn))(q, k, v, do)
      errors[impl] = rel_errors(got, want)
    except Exception as e:  # reported, never fatal
      errors[impl] = {"error": _short_error(e)}
    log(f"  check T={seq_len} D={head_dim} causal={causal} {impl:15s} {errors[impl]}")
  return errors


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes in Pallas' TPU interpreter (runs on CPU; times meaningless)")
  p.add_argument("--long", action="store_true", help="also T=32768, B=1 forward+backward")
  p.add_argument("--out", default=None, help="JSON output path (a .md table is written beside)")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--seq_lens", default="512,1024,2048,4096,8192,16384")
  p.add_argument("--head_dims", default="64,128")
  p.add_argument("--causal", default="false,true")
  p.add_argument("--passes", default="fwd,fwd_bwd")
  p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
  p.add_argument("--tokens", type=int, default=16384, help="B*T")
  p.add_argument("--hidden", type=int, default=2048, help="H*D")
  p.add_argument("--iters", type=int, default=20)
  args = p.parse_args(argv)

  backend = jax.default_backend()
  if backend != "tpu" and not args.smoke:
    sys.exit(f"attention_tpu.py times TPU kernels and needs a TPU; the default backend is "
             f"{backend!r} (run with --smoke for a tiny run in Pallas' TPU interpreter).")
  interpret = backend != "tpu"
  if args.smoke:
    args.seq_lens, args.head_dims, args.tokens, args.hidden, args.iters = "128", "64", 128, 128, 2
  impls = args.impls.split(",")
  for impl in impls:
    if impl not in IMPLS:
      sys.exit(f"--impls: {impl!r} is not one of {', '.join(IMPLS)}.")
  env = environment()
  env["tpu_block_sizes"] = dataclasses.asdict(tpu.default_tpu_block_sizes())
  log(f"TPU attention benchmark on {env}; interpret={interpret}")
  checks = {str(causal): check_against_reference(
      impls, seq_len=128, head_dim=64, heads=2, causal=causal, dtype_name=args.dtype,
      interpret=interpret) for causal in (False, True)}
  cells = []
  for t in (int(x) for x in args.seq_lens.split(",")):
    for d in (int(x) for x in args.head_dims.split(",")):
      for causal in (x.strip().lower() == "true" for x in args.causal.split(",")):
        for which in args.passes.split(","):
          for impl in impls:
            c = run_cell(impl, t, d, causal, which, tokens=args.tokens, hidden=args.hidden,
                         dtype_name=args.dtype, iters=args.iters, interpret=interpret)
            cells.append(c)
            log("  " + describe(c))
  table = markdown_table(cells)
  log("\nTFLOP/s (" + env["device"] + ", " + args.dtype + ")\n" + table)
  log("\nCompiled temporary memory, MiB\n" + markdown_table(cells, "temp_mib"))
  long_cells = []
  if args.long:
    long_cells = long_sequence_rows(impls, seq_len=256 if args.smoke else 32768,
                                    head_dim=64 if args.smoke else 128, hidden=args.hidden,
                                    dtype_name=args.dtype, interpret=interpret, cell_fn=run_cell)
  if args.out:
    write_results(args.out, {"env": env, "args": vars(args), "time": time.time(),
                             "checks": checks, "cells": [dataclasses.asdict(c) for c in cells],
                             "long": [dataclasses.asdict(c) for c in long_cells]}, table)


if __name__ == "__main__":
  main()
