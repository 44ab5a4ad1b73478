"""Our flash attention written in the Triton language (for the `triton` implementation).

Four kernels, FlashAttention-2 style, on the op's layout [B, T, H, D] without any padding:
rows past T / S and head-dim lanes past D are masked loads and stores, so the caller passes
the arrays as they are.

  attn_fwd     grid (cdiv(T, BLOCK_M), B * H): one query tile resident, key tiles streamed;
               online softmax in base 2, float32 accumulation; writes the output and the
               base-2 log-sum-exp of the scaled logits (LSE [B, H, T]; +inf for a row with
               nothing to attend to, whose output is 0).
  attn_delta   grid (cdiv(T, BLOCK_M), B * H): delta = rowsum(O * dO) in float32.
  attn_dkdv    grid (cdiv(S, BLOCK_N), B * Hkv): one key tile resident; loops over the query
               heads of its GQA group and the query tiles that can see it, so dK and dV are
               written once per key tile (no atomics).
  attn_dq      grid (cdiv(T, BLOCK_M), B * H): one query tile resident, key tiles streamed.

Every kernel splits its loop into tiles that need no mask (no iota compare, no select) and
tiles that do (the causal diagonal, the kv-length edge, the last partial tile); tiles that
are entirely masked are never loaded. Causal masking is bottom-right aligned: query r sees
key j iff j <= r + OFFSET with OFFSET = S - T. `KVLEN` [B] int32 holds each example's number
of valid keys (S where the caller has none).

The kernels here are plain Python; `jit_kernels()` wraps them with `triton.jit` (for
jax-triton on a GPU and for compiling on any machine) and `interpreted_kernels()` with
Triton's interpreter, which runs them on a CPU over numpy memory (the CPU tests; only in a
process that imported triton with TRITON_INTERPRET=1, where the `@triton.jit` helper below
is interpreted too). This module imports `triton`, so only import it where it is installed.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Finite, as in the Pallas kernels (_common.MASK_VALUE): masked - masked is 0, not NaN.
# (Module-level values a Triton kernel reads must be constexprs.)
MASK_VALUE = tl.constexpr(-2.3819763e38)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _key_tiles(pid_m, kv_len, T: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
  """(n_full, n_end) for query tile pid_m: key tiles [0, n_full) need no mask, tiles
  [n_full, n_end) do, tiles from n_end on are never loaded (past the kv length or causal)."""
  end = kv_len
  full = kv_len
  if CAUSAL:
    end = tl.minimum(end, pid_m * BLOCK_M + BLOCK_M + (S - T))
    full = tl.minimum(full, pid_m * BLOCK_M + (S - T) + 1)
  end = tl.maximum(end, 0)
  n_end = tl.cdiv(end, BLOCK_N)
  n_full = tl.minimum(tl.maximum(full, 0) // BLOCK_N, n_end)
  return n_full, n_end


@triton.jit
def _kv_tile(k_base, v_base, kb, offs_n, offs_d, kv_len, HKV: tl.constexpr, D: tl.constexpr,
             MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
  """Key and value tile kb [BLOCK_N, BLOCK_D] (rows past kv_len read as 0 when MASKED), its
  key indices and their validity."""
  cols = kb * BLOCK_N + offs_n
  kv_off = cols[:, None] * (HKV * D) + offs_d[None, :]
  col_ok = cols < kv_len
  ld = (offs_d < D)[None, :]
  if MASKED:
    ld = col_ok[:, None] & ld
  k = tl.load(k_base + kv_off, mask=ld, other=0.0)
  v = tl.load(v_base + kv_off, mask=ld, other=0.0)
  return k, v, cols, col_ok


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, kv_len, qk_scale,
              T: tl.constexpr, S: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
  """One online-softmax step of the forward over key tile kb (MASKED: kv length / causal)."""
  k, v, cols, col_ok = _kv_tile(k_base, v_base, kb, offs_n, offs_d, kv_len, HKV, D, MASKED,
                                BLOCK_N)
  s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
  if MASKED:
    mask = col_ok[None, :]
    if CAUSAL:
      mask = mask & (cols[None, :] <= offs_m[:, None] + (S - T))
    s = tl.where(mask, s, MASK_VALUE)
  m_new = tl.maximum(m_i, tl.max(s, 1))
  alpha = tl.exp2(m_i - m_new)
  p = tl.exp2(s - m_new[:, None])
  if MASKED:
    # A row masked everywhere so far has m_new == MASK_VALUE and exp2(0) == 1 on masked keys.
    p = tl.where(mask, p, 0.0)
  l_i = l_i * alpha + tl.sum(p, 1)
  acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
  return acc, m_new, l_i


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, kv_len,
             qk_scale, T: tl.constexpr, S: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
             CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr):
  """dQ accumulated over key tile kb (unscaled; the kernel multiplies by SCALE once)."""
  k, v, cols, col_ok = _kv_tile(k_base, v_base, kb, offs_n, offs_d, kv_len, HKV, D, MASKED,
                                BLOCK_N)
  s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
  p = tl.exp2(s - lse[:, None])
  if MASKED:
    mask = col_ok[None, :]
    if CAUSAL:
      mask = mask & (cols[None, :] <= offs_m[:, None] + (S - T))
    p = tl.where(mask, p, 0.0)
  dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
  ds = p * (dp - delta[:, None])
  return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mb, offs_m, offs_n, offs_d,
               col_ok, qk_scale, T: tl.constexpr, S: tl.constexpr, H: tl.constexpr,
               D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
  """dK, dV accumulated over query tile mb of one head (unscaled dK)."""
  rows = mb * BLOCK_M + offs_m
  row_ok = rows < T
  q_off = rows[:, None] * (H * D) + offs_d[None, :]
  ld = row_ok[:, None] & (offs_d < D)[None, :]
  q = tl.load(q_base + q_off, mask=ld, other=0.0)
  do = tl.load(do_base + q_off, mask=ld, other=0.0)
  lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
  delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
  s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
  p = tl.exp2(s - lse[:, None])  # lse = +inf (empty or padded row) gives p = 0
  if MASKED:
    mask = col_ok[None, :]
    if CAUSAL:
      mask = mask & (offs_n[None, :] <= rows[:, None] + (S - T))
    p = tl.where(mask, p, 0.0)
  dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
  dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
  ds = p * (dp - delta[:, None])
  dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
  return dk, dv


def attn_fwd(Q, K, V, KVLEN, O, LSE,
             T: tl.constexpr, S: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr,
             D: tl.constexpr, SCALE: tl.constexpr, CAUSAL: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             PRECISION: tl.constexpr):
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // H
  h = bh % H
  hk = h // (H // HKV)
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_n = tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, BLOCK_D)
  d_ok = offs_d < D
  q = tl.load(Q + b * T * H * D + offs_m[:, None] * (H * D) + h * D + offs_d[None, :],
              mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)
  k_base = K + b * S * HKV * D + hk * D
  v_base = V + b * S * HKV * D + hk * D
  kv_len = tl.load(KVLEN + b)
  qk_scale = SCALE * LOG2E
  n_full, n_end = _key_tiles(pid_m, kv_len, T, S, CAUSAL, BLOCK_M, BLOCK_N)

  acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
  m_i = tl.full([BLOCK_M], MASK_VALUE, dtype=tl.float32)
  l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
  for kb in range(0, n_full):
    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d,
                              kv_len, qk_scale, T, S, HKV, D, CAUSAL, False, BLOCK_N, PRECISION)
  for kb in range(n_full, n_end):
    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d,
                              kv_len, qk_scale, T, S, HKV, D, CAUSAL, True, BLOCK_N, PRECISION)

  empty = l_i == 0.0
  out = acc / tl.where(empty, 1.0, l_i)[:, None]
  tl.store(O + b * T * H * D + offs_m[:, None] * (H * D) + h * D + offs_d[None, :],
           out.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & d_ok[None, :])
  lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
  tl.store(LSE + (b * H + h) * T + offs_m, lse, mask=offs_m < T)


def attn_delta(O, DO, DELTA, T: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // H
  h = bh % H
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, BLOCK_D)
  off = b * T * H * D + offs_m[:, None] * (H * D) + h * D + offs_d[None, :]
  ok = (offs_m[:, None] < T) & (offs_d[None, :] < D)
  o = tl.load(O + off, mask=ok, other=0.0).to(tl.float32)
  do = tl.load(DO + off, mask=ok, other=0.0).to(tl.float32)
  tl.store(DELTA + (b * H + h) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


def attn_dkdv(Q, K, V, DO, LSE, DELTA, KVLEN, DK, DV,
              T: tl.constexpr, S: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr,
              D: tl.constexpr, SCALE: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
  pid_n = tl.program_id(0)
  bhk = tl.program_id(1)
  b = bhk // HKV
  hk = bhk % HKV
  GROUPS: tl.constexpr = H // HKV
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_m = tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, BLOCK_D)
  d_ok = offs_d < D
  kv_len = tl.load(KVLEN + b)
  col_ok = offs_n < kv_len
  kv_off = b * S * HKV * D + offs_n[:, None] * (HKV * D) + hk * D + offs_d[None, :]
  k = tl.load(K + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
  v = tl.load(V + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
  qk_scale = SCALE * LOG2E
  n_m = tl.cdiv(T, BLOCK_M)
  # Query tiles that see this key tile at all, and the first one that needs no mask.
  # A key tile that reaches past the last valid key (or past S) is masked for every query
  # tile; a key tile entirely past the kv length is skipped.
  whole = pid_n * BLOCK_N + BLOCK_N <= kv_len
  seen = pid_n * BLOCK_N < kv_len
  if CAUSAL:
    m_start = tl.minimum(tl.maximum(pid_n * BLOCK_N - (S - T), 0) // BLOCK_M, n_m)
    m_split = tl.minimum(
        tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - (S - T), 0), BLOCK_M), n_m)
    m_split = tl.where(whole, m_split, n_m)
    m_start = tl.where(seen, m_start, n_m)
  else:
    m_split = tl.where(whole, 0, n_m)
    m_start = tl.where(seen, 0, n_m)

  dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
  dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
  for g in range(0, GROUPS):
    h = hk * GROUPS + g
    q_base = Q + b * T * H * D + h * D
    do_base = DO + b * T * H * D + h * D
    row_base = (b * H + h) * T
    for mb in range(m_start, m_split):
      dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, mb,
                          offs_m, offs_n, offs_d, col_ok, qk_scale, T, S, H, D, CAUSAL, True,
                          BLOCK_M, PRECISION)
    for mb in range(m_split, n_m):
      dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, mb,
                          offs_m, offs_n, offs_d, col_ok, qk_scale, T, S, H, D, CAUSAL, False,
                          BLOCK_M, PRECISION)

  out_off = b * S * HKV * D + offs_n[:, None] * (HKV * D) + hk * D + offs_d[None, :]
  out_ok = (offs_n[:, None] < S) & d_ok[None, :]
  tl.store(DK + out_off, (dk * SCALE).to(DK.dtype.element_ty), mask=out_ok)
  tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_ok)


def attn_dq(Q, K, V, DO, LSE, DELTA, KVLEN, DQ,
            T: tl.constexpr, S: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr,
            D: tl.constexpr, SCALE: tl.constexpr, CAUSAL: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            PRECISION: tl.constexpr):
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // H
  h = bh % H
  hk = h // (H // HKV)
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_n = tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, BLOCK_D)
  d_ok = offs_d < D
  row_ok = offs_m < T
  q_off = b * T * H * D + offs_m[:, None] * (H * D) + h * D + offs_d[None, :]
  q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
  do = tl.load(DO + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
  lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=row_ok, other=float("inf"))
  delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=row_ok, other=0.0)
  k_base = K + b * S * HKV * D + hk * D
  v_base = V + b * S * HKV * D + hk * D
  kv_len = tl.load(KVLEN + b)
  qk_scale = SCALE * LOG2E
  n_full, n_end = _key_tiles(pid_m, kv_len, T, S, CAUSAL, BLOCK_M, BLOCK_N)

  dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
  for kb in range(0, n_full):
    dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, kv_len,
                  qk_scale, T, S, HKV, D, CAUSAL, False, BLOCK_N, PRECISION)
  for kb in range(n_full, n_end):
    dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, kv_len,
                  qk_scale, T, S, HKV, D, CAUSAL, True, BLOCK_N, PRECISION)
  tl.store(DQ + q_off, (dq * SCALE).to(DQ.dtype.element_ty),
           mask=row_ok[:, None] & d_ok[None, :])


KERNELS = {f.__name__: f for f in (attn_fwd, attn_delta, attn_dkdv, attn_dq)}


@functools.lru_cache(maxsize=None)
def jit_kernels() -> dict:
  """The kernels as `triton.JITFunction`s (what jax_triton.triton_call and triton.compile take)."""
  return {name: triton.jit(f) for name, f in KERNELS.items()}


@functools.lru_cache(maxsize=None)
def interpreted_kernels() -> dict:
  """The kernels under Triton's interpreter (in a TRITON_INTERPRET=1 process only:
  triton_interpreter.py)."""
  return {name: InterpretedFunction(f) for name, f in KERNELS.items()}
