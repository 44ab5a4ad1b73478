"""Pieces shared by the Pallas forward and backward kernels: version shims, the mask value,
loop-range arithmetic for causal / kv-length masking.

The kernels never use masked loads: the op pads T, S and D to tile multiples before the
pallas_call, so every load and store is a plain in-bounds `ref[...]`, which lowers the same
way through Triton (GPU, jax 0.10 / 0.11) and through the interpreter (CPU).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)

# Finite, so that (mask - mask) is 0 rather than NaN for a row whose keys are all masked
# so far; such rows are zeroed explicitly (p = where(mask, p, 0)).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# The Triton compiler-parameter class was renamed (TritonCompilerParams -> CompilerParams)
# between jax versions; resolve whichever this jax has at import time.
_COMPILER_PARAMS_CLS = (getattr(plgpu, "CompilerParams", None)
                        or getattr(plgpu, "TritonCompilerParams", None))


def compiler_params(num_warps: int, num_stages: int):
  if _COMPILER_PARAMS_CLS is None:  # Pallas without a Triton backend: interpret only.
    return None
  return _COMPILER_PARAMS_CLS(num_warps=num_warps, num_stages=num_stages)


def dot(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
  """2-D matmul contracting a's dim `contract_a` with b's `contract_b`, float32 accumulation.

  lax.dot_general with explicit contracting dims lowers to one tt.dot (with an in-register
  transpose) in Triton, and `pl.dot` no longer exists in jax 0.11.

  Precision: Pallas' Triton lowering maps precision None / DEFAULT / HIGH on float32
  operands to TF32 tensor cores (10-bit mantissa: ~6e-4 relative error, measured on the
  H200 in run 1) and HIGHEST to `inputPrecision = ieee` (jax 0.10 and 0.11 alike). So
  float32 operands ask for HIGHEST; bf16/fp16 operands keep precision None, which lowers
  to the plain bf16/fp16 MMA exactly as before.
  """
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


# Scalar integer helpers that work on Python ints (static shapes) and traced int32 scalars
# (program ids, loaded kv lengths). Triton-lowered Pallas has no floor-division for signed
# traced ints, so callers clamp to >= 0 first and lax.div (truncation) is then exact.


def is_static(*xs) -> bool:
  return all(isinstance(x, int) for x in xs)


def smax(a, b):
  return max(a, b) if is_static(a, b) else jnp.maximum(a, b)


def smin(a, b):
  return min(a, b) if is_static(a, b) else jnp.minimum(a, b)


def floordiv_nonneg(x, d: int):
  """floor(max(x, 0) / d) for positive static d."""
  x = smax(x, 0)
  return x // d if is_static(x) else lax.div(x, d)


def cdiv_nonneg(x, d: int):
  """ceil(max(x, 0) / d) for positive static d."""
  x = smax(x, 0)
  return -(-x // d) if is_static(x) else lax.div(x + (d - 1), d)


def _indicator(x):
  """1 if x > 0 else 0, for ints or traced int32 scalars."""
  return smin(smax(x, 0), 1)


def fori(lo, hi, body, carry):
  """lax.fori_loop that also accepts an empty static range (and skips it)."""
  if is_static(lo, hi) and hi <= lo:
    return carry
  return lax.fori_loop(lo, hi, body, carry)


def kv_block_ranges(q_start, block_q: int, block_k: int, num_k_blocks: int, *, causal: bool,
                    causal_offset: int, kv_len):
  """Key-block ranges for a query tile [q_start, q_start + block_q).

  Returns (n_full, n_end): key blocks [0, n_full) need no mask at all, [n_full, n_end) need
  the causal and/or kv-length mask, blocks >= n_end are entirely masked and skipped.
  Query row r sees key j iff j <= r + causal_offset (when causal) and j < kv_len.
  """
  n_full, n_end = num_k_blocks, num_k_blocks
  if causal:
    # Keys <= q_start + offset are visible to every row of the tile; keys up to
    # q_start + block_q - 1 + offset to at least one row.
    n_full = floordiv_nonneg(q_start + causal_offset + 1, block_k)
    n_end = cdiv_nonneg(q_start + block_q + causal_offset, block_k)
  if kv_len is not None:
    n_full = smin(n_full, floordiv_nonneg(kv_len, block_k))
    n_end = smin(n_end, cdiv_nonneg(kv_len, block_k))
  n_end = smin(smax(n_end, 0), num_k_blocks)
  n_full = smin(smax(n_full, 0), n_end)
  return n_full, n_end


def q_block_ranges(k_start, block_k: int, block_q: int, num_q_blocks: int, *, causal: bool,
                   causal_offset: int, kv_len):
  """Query-block ranges for a key tile [k_start, k_start + block_k) (dK/dV kernel).

  Returns (lo, n_mask_end): query blocks [lo, n_mask_end) need a mask, blocks
  [n_mask_end, num_q_blocks) need none, blocks < lo see none of the tile and are skipped.
  If the tile reaches past kv_len every visited block needs the mask; if it starts at or
  after kv_len nothing is visited.
  """
  lo, mid = 0, 0
  if causal:
    # Row r sees key j iff r >= j - offset: the first row seeing any key of the tile is
    # k_start - offset, the first row seeing all of them k_start + block_k - 1 - offset.
    lo = floordiv_nonneg(k_start - causal_offset, block_q)
    mid = cdiv_nonneg(k_start + block_k - 1 - causal_offset, block_q)
  lo = smin(lo, num_q_blocks)
  mid = smin(smax(mid, lo), num_q_blocks)
  if kv_len is not None:
    # Integer arithmetic instead of jnp.where on scalars: Triton's lowering of a scalar
    # select feeding a loop bound produced an i1 loop counter (jax 0.10).
    partial = _indicator(k_start + block_k - kv_len)  # 1 iff the tile reaches past kv_len
    empty = _indicator(k_start - kv_len + 1)  # 1 iff the tile starts at or after kv_len
    mid = mid + (num_q_blocks - mid) * partial
    lo = lo + (num_q_blocks - lo) * empty
  return lo, mid


def tile_mask(q_start, k_start, block_q: int, block_k: int, *, causal: bool,
              causal_offset: int, kv_len, keys_first: bool = False, iota=None):
  """Boolean mask of allowed (query, key) pairs for one tile.

  [block_q, block_k] by default; [block_k, block_q] with `keys_first` (the dK/dV kernel
  works on the transposed tile S^T = K Q^T). `iota(shape, dim)` makes the int32 index
  arrays (default lax.broadcasted_iota; the Mosaic GPU kernel passes one with a register
  layout).
  """
  if iota is None:
    iota = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)
  shape = (block_k, block_q) if keys_first else (block_q, block_k)
  q_axis, k_axis = (1, 0) if keys_first else (0, 1)
  rows = q_start + iota(shape, q_axis)
  cols = k_start + iota(shape, k_axis)
  mask = None
  if causal:
    mask = cols <= rows + causal_offset
  if kv_len is not None:
    kv_mask = cols < kv_len
    mask = kv_mask if mask is None else jnp.logical_and(mask, kv_mask)
  return mask


def query_tile(pid, num_q_tiles: int, heavy_first: bool):
  """Query tile handled by grid index `pid` (an int or a traced program id / index-map arg).

  With a causal mask the work of a query tile grows with its index. Triton launches grid
  axis 0 fastest, so visiting the tiles of each head last-to-first starts the heavy
  programs first and leaves light ones for the final, partially filled wave (as
  FlashAttention-3's scheduler does). Used identically in the kernel and its BlockSpecs.
  """
  return (num_q_tiles - 1 - pid) if heavy_first else pid
