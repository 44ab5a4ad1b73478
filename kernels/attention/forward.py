"""Pallas forward kernel: blocked online softmax in base 2 (FlashAttention-2 style).

Grid (query tiles, batch, query heads). Each program keeps one query tile resident, with the
softmax scale and log2(e) folded into it once, and streams key/value tiles: first the tiles
that need no mask (no iota, no select), then the diagonal / kv-length tiles that do; tiles
that are entirely masked are never loaded. Accumulation is float32; the kernel writes the
output and the base-2 log-sum-exp of the scaled logits, which the backward reuses.

Inputs are already padded by the op (T, S to tile multiples; D to a power of two >= 16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.attention import _common as c
from kernels.attention.block_sizes import BlockSizes


def _forward_kernel(*refs, scale: float, causal: bool, causal_offset: int,
                    static_kv_len: int | None, has_kv_lengths: bool, block_q: int,
                    block_k: int, num_k_blocks: int, num_q_tiles: int):
  if has_kv_lengths:
    kvlen_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    kv_len = kvlen_ref[...]  # int32 scalar: valid keys of this example.
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    kv_len = static_kv_len  # None (no key padding) or the true S before padding.

  q_start = c.query_tile(pl.program_id(0), num_q_tiles, causal) * block_q
  q = q_ref[...]
  # Fold scale * log2(e) into q once: logits come out of the dot in base-2 units.
  q = (q.astype(jnp.float32) * (scale * c.LOG2E)).astype(q.dtype)
  d = q.shape[-1]

  def body(kb, carry, masked: bool):
    acc, m_prev, l_prev = carry
    k_start = kb * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s = c.dot(q, k, 1, 1)  # [block_q, block_k] float32, base-2 logits
    if masked:
      mask = c.tile_mask(q_start, k_start, block_q, block_k, causal=causal,
                         causal_offset=causal_offset, kv_len=kv_len)
      s = jnp.where(mask, s, c.MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if masked:
      # A row masked everywhere so far has m_new == MASK_VALUE and p == 1 on masked keys.
      p = jnp.where(mask, p, 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + c.dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_new, l_new

  n_full, n_end = c.kv_block_ranges(q_start, block_q, block_k, num_k_blocks, causal=causal,
                                    causal_offset=causal_offset, kv_len=kv_len)
  carry = (jnp.zeros((block_q, d), jnp.float32),
           jnp.full((block_q,), c.MASK_VALUE, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  carry = c.fori(0, n_full, functools.partial(body, masked=False), carry)
  if causal or kv_len is not None:
    carry = c.fori(n_full, n_end, functools.partial(body, masked=True), carry)
  acc, m, l = carry

  empty = l == 0.0  # no key to attend to: output 0, and lse = +inf makes p = 0 in backward
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def flash_forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array | None, *,
                  scale: float, causal: bool, causal_offset: int, static_kv_len: int | None,
                  block_sizes: BlockSizes, interpret: bool):
  """Runs the forward kernel on padded inputs.

  Args:
    q: [B, Tp, H, Dp]; k, v: [B, Sp, Hkv, Dp]; Tp % block_q == 0, Sp % block_k == 0.
    kv_lengths: [B] int32 (already clipped to the true S) or None.
    scale: softmax scale (natural-log units).
    causal, causal_offset: query r sees key j iff j <= r + causal_offset.
    static_kv_len: true S when Sp > S and kv_lengths is None, else None.
    block_sizes: tiles already fitted to the problem.

  Returns:
    out [B, Tp, H, Dp] in q's dtype, lse [B, H, Tp] float32 (base 2, of the scaled logits).
  """
  b, tp, h, dp = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  groups = h // hkv
  bq, bk = block_sizes.block_q, block_sizes.block_k
  kernel = functools.partial(
      _forward_kernel, scale=scale, causal=causal, causal_offset=causal_offset,
      static_kv_len=static_kv_len, has_kv_lengths=kv_lengths is not None, block_q=bq,
      block_k=bk, num_k_blocks=sp // bk, num_q_tiles=tp // bq)
  nq = tp // bq
  qt = functools.partial(c.query_tile, num_q_tiles=nq, heavy_first=causal)
  in_specs = [
      pl.BlockSpec((None, bq, None, dp), lambda i, bi, hi: (bi, qt(i), hi, 0)),
      pl.BlockSpec((None, sp, None, dp), lambda i, bi, hi: (bi, 0, hi // groups, 0)),
      pl.BlockSpec((None, sp, None, dp), lambda i, bi, hi: (bi, 0, hi // groups, 0)),
  ]
  args = [q, k, v]
  if kv_lengths is not None:
    in_specs.insert(0, pl.BlockSpec((None,), lambda i, bi, hi: (bi,)))
    args.insert(0, kv_lengths)
  out, lse = pl.pallas_call(
      kernel,
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, bq, None, dp), lambda i, bi, hi: (bi, qt(i), hi, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qt(i))),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      compiler_params=c.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name="flash_attention_forward",
  )(*args)
  return out, lse
