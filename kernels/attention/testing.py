"""How an attention implementation is checked: fresh random inputs against the float32 reference.

The CPU tests (tests/kernels) and the GPU check (experiments/benchmarks/attention_gpu_check.py)
compare the same way, through these helpers:

  random_inputs(seed, b, t, s, h, hkv, d, dtype) -> q, k, v, dout
      standard normal draws made in float32 and rounded to `dtype`; k and v have `hkv` heads
      (GQA / MQA when hkv < h)
  as_kv_lengths(kv_lengths) -> None or an int32 [B] array (from a tuple such as (0, 97))
  fwd_bwd(attn, q, k, v, dout) -> (out, dq, dk, dv)
  reference_fwd_bwd(q, k, v, dout, *, causal, kv_lengths, scale) -> (out, dq, dk, dv)
      `mha_reference` in float32 on the same rounded inputs, matmul precision "highest"
  rel_error(x, ref) -> max|x - ref| / max|ref| (float64), and rel_errors for all four arrays

Nothing here asserts: callers pick their tolerances (2e-2 for bf16/fp16 is the usual one).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention.reference import mha_reference

LABELS = ("out", "dq", "dk", "dv")  # what fwd_bwd and reference_fwd_bwd return, in order


def random_inputs(seed: int, b: int, t: int, s: int, h: int, hkv: int, d: int, dtype):
  """q, dout [b, t, h, d] and k, v [b, s, hkv, d]: N(0, 1) in float32, then cast to dtype."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype)
  dout = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
  return q, k, v, dout


def as_kv_lengths(kv_lengths) -> jax.Array | None:
  """None stays None; a sequence of per-example lengths becomes an int32 [B] array."""
  return None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)


def fwd_bwd(attn: Callable, q, k, v, dout) -> tuple:
  """(out, dq, dk, dv) of attn(q, k, v), the gradients for the cotangent dout."""
  out, vjp = jax.vjp(attn, q, k, v)
  return (out,) + tuple(vjp(dout))


def reference_fwd_bwd(q, k, v, dout, *, causal: bool = False, kv_lengths=None,
                      scale: float | None = None, compiler_options: dict | None = None) -> tuple:
  """fwd_bwd of the float32 reference on the inputs cast to float32, jitted (with
  `compiler_options`) at matmul precision "highest" (no TF32 on a GPU; a no-op on CPU)."""
  ref = functools.partial(mha_reference, causal=causal, kv_lengths=kv_lengths, scale=scale)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
  with jax.default_matmul_precision("highest"):
    return jax.jit(functools.partial(fwd_bwd, ref), compiler_options=compiler_options)(*f32)


def rel_error(x, ref) -> float:
  """max|x - ref| / max|ref|, in float64 (the denominator floored at 1e-30)."""
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def rel_errors(got, want) -> dict[str, float]:
  """{"out": .., "dq": .., "dk": .., "dv": ..}: rel_error of each fwd_bwd array."""
  return {label: rel_error(x, r) for label, x, r in zip(LABELS, got, want)}
