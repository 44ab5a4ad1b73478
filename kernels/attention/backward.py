"""Pallas backward kernels: delta preprocessing, dK/dV, dQ (no atomics).

With P = softmax(scale * Q K^T) (masked), O = P V and dO given:
  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) with delta = rowsum(dO * O),
  dQ = scale * dS K,  dK = scale * dS^T Q.
P is recomputed from the saved base-2 log-sum-exp: P = exp2(log2(e) * scale * q.k - lse).

Two kernels instead of one fused kernel with atomic dQ updates: the dK/dV kernel owns a key
tile (and, for GQA, accumulates over the query heads of its kv head in registers) and streams
query tiles; the dQ kernel owns a query tile and streams key tiles. Each has its own tile
sizes in BlockSizes. Inputs are padded by the op, as for the forward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.attention import _common as c
from kernels.attention.block_sizes import BlockSizes


# --- delta = rowsum(dO * O) --------------------------------------------------------------------


def _delta_kernel(o_ref, do_ref, delta_ref):
  o = o_ref[...].astype(jnp.float32)
  do = do_ref[...].astype(jnp.float32)
  delta_ref[...] = jnp.sum(o * do, axis=1)


def flash_delta(out: jax.Array, dout: jax.Array, *, block_q: int, interpret: bool):
  """delta [B, H, Tp] float32 from out, dout [B, Tp, H, Dp]."""
  b, tp, h, dp = out.shape
  return pl.pallas_call(
      _delta_kernel,
      grid=(tp // block_q, b, h),
      in_specs=[pl.BlockSpec((None, block_q, None, dp), lambda i, bi, hi: (bi, i, hi, 0)),
                pl.BlockSpec((None, block_q, None, dp), lambda i, bi, hi: (bi, i, hi, 0))],
      out_specs=pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i)),
      out_shape=jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
      compiler_params=c.compiler_params(4, 1),
      interpret=interpret,
      name="flash_attention_delta",
  )(out, dout)


# --- dK, dV ----------------------------------------------------------------------------------


def _dkdv_kernel(*refs, scale: float, causal: bool, causal_offset: int,
                 static_kv_len: int | None, has_kv_lengths: bool, groups: int, block_q: int,
                 block_k: int, num_q_blocks: int):
  if has_kv_lengths:
    kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    kv_len = kvlen_ref[...]
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    kv_len = static_kv_len

  k_start = pl.program_id(0) * block_k
  k = k_ref[...]
  v = v_ref[...]
  # Scale folded into the resident tile (here k, loaded once) rather than into each
  # streamed q tile: q.(c k) == (c q).k.
  ks = (k.astype(jnp.float32) * (scale * c.LOG2E)).astype(k.dtype)
  d = k.shape[-1]

  def load_rows(g, q_start):
    rows = pl.ds(q_start, block_q)
    if groups == 1:  # head axis squeezed by the BlockSpec
      return q_ref[rows, :], do_ref[rows, :], lse_ref[rows], delta_ref[rows]
    return q_ref[rows, g, :], do_ref[rows, g, :], lse_ref[g, rows], delta_ref[g, rows]

  def body(qb, carry, g, masked: bool):
    dk, dv = carry
    q_start = qb * block_q
    q, do, lse, delta = load_rows(g, q_start)
    # Transposed formulation (as in the FlashAttention-2 Triton tutorial): S^T = K Q^T comes
    # out of the MMA as [block_k, block_q], so P^T and dS^T are already the left operands of
    # dV += P^T dO and dK += dS^T Q. Only tiles loaded from memory (q, dO) are transposed,
    # which Triton does while staging them in shared memory, never a register tile.
    st = c.dot(ks, q, 1, 1)  # [block_k, block_q] base-2 logits
    if masked:
      mask = c.tile_mask(q_start, k_start, block_q, block_k, causal=causal,
                         causal_offset=causal_offset, kv_len=kv_len, keys_first=True)
      st = jnp.where(mask, st, c.MASK_VALUE)
    pt = jnp.exp2(st - lse[None, :])
    if masked:
      pt = jnp.where(mask, pt, 0.0)
    dv = dv + c.dot(pt.astype(do.dtype), do, 1, 0)
    dpt = c.dot(v, do, 1, 1)  # [block_k, block_q]
    dst = pt * (dpt - delta[None, :])
    dk = dk + c.dot(dst.astype(q.dtype), q, 1, 0)
    return dk, dv

  lo, mid = c.q_block_ranges(k_start, block_k, block_q, num_q_blocks, causal=causal,
                             causal_offset=causal_offset, kv_len=kv_len)

  def one_head(g, carry):
    if causal or kv_len is not None:
      carry = c.fori(lo, mid, functools.partial(body, g=g, masked=True), carry)
    return c.fori(mid, num_q_blocks, functools.partial(body, g=g, masked=False), carry)

  carry = (jnp.zeros((block_k, d), jnp.float32), jnp.zeros((block_k, d), jnp.float32))
  if groups == 1:
    carry = one_head(0, carry)
  else:
    carry = lax.fori_loop(0, groups, one_head, carry)
  dk, dv = carry
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_dkdv(q, k, v, dout, lse, delta, kv_lengths, *, scale: float, causal: bool,
               causal_offset: int, static_kv_len: int | None, block_sizes: BlockSizes,
               interpret: bool):
  """dK, dV [B, Sp, Hkv, Dp] from padded inputs (shapes as in forward.flash_forward)."""
  b, tp, h, dp = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  groups = h // hkv
  bq, bk = block_sizes.block_q_dkv, block_sizes.block_k_dkv
  kernel = functools.partial(
      _dkdv_kernel, scale=scale, causal=causal, causal_offset=causal_offset,
      static_kv_len=static_kv_len, has_kv_lengths=kv_lengths is not None, groups=groups,
      block_q=bq, block_k=bk, num_q_blocks=tp // bq)
  if groups == 1:
    row_spec = pl.BlockSpec((None, tp, None, dp), lambda j, bi, hi: (bi, 0, hi, 0))
    stat_spec = pl.BlockSpec((None, None, tp), lambda j, bi, hi: (bi, hi, 0))
  else:
    # All query heads of kv head hi: head block of size `groups` at block index hi.
    row_spec = pl.BlockSpec((None, tp, groups, dp), lambda j, bi, hi: (bi, 0, hi, 0))
    stat_spec = pl.BlockSpec((None, groups, tp), lambda j, bi, hi: (bi, hi, 0))
  kv_spec = pl.BlockSpec((None, bk, None, dp), lambda j, bi, hi: (bi, j, hi, 0))
  in_specs = [row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec]
  args = [q, k, v, dout, lse, delta]
  if kv_lengths is not None:
    in_specs.insert(0, pl.BlockSpec((None,), lambda j, bi, hi: (bi,)))
    args.insert(0, kv_lengths)
  dk, dv = pl.pallas_call(
      kernel,
      grid=(sp // bk, b, hkv),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=c.compiler_params(block_sizes.num_warps_dkv, block_sizes.num_stages_dkv),
      interpret=interpret,
      name="flash_attention_dkdv",
  )(*args)
  return dk, dv


# --- dQ --------------------------------------------------------------------------------------


def _dq_kernel(*refs, scale: float, causal: bool, causal_offset: int,
               static_kv_len: int | None, has_kv_lengths: bool, block_q: int, block_k: int,
               num_k_blocks: int, num_q_tiles: int):
  if has_kv_lengths:
    kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    kv_len = kvlen_ref[...]
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    kv_len = static_kv_len

  q_start = c.query_tile(pl.program_id(0), num_q_tiles, causal) * block_q
  q = q_ref[...]
  qs = (q.astype(jnp.float32) * (scale * c.LOG2E)).astype(q.dtype)
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]

  def body(kb, dq, masked: bool):
    k_start = kb * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s = c.dot(qs, k, 1, 1)
    if masked:
      mask = c.tile_mask(q_start, k_start, block_q, block_k, causal=causal,
                         causal_offset=causal_offset, kv_len=kv_len)
      s = jnp.where(mask, s, c.MASK_VALUE)
    p = jnp.exp2(s - lse[:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)
    dp = c.dot(do, v, 1, 1)
    ds = p * (dp - delta[:, None])
    return dq + c.dot(ds.astype(k.dtype), k, 1, 0)

  n_full, n_end = c.kv_block_ranges(q_start, block_q, block_k, num_k_blocks, causal=causal,
                                    causal_offset=causal_offset, kv_len=kv_len)
  dq = jnp.zeros(q.shape, jnp.float32)
  dq = c.fori(0, n_full, functools.partial(body, masked=False), dq)
  if causal or kv_len is not None:
    dq = c.fori(n_full, n_end, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def flash_dq(q, k, v, dout, lse, delta, kv_lengths, *, scale: float, causal: bool,
             causal_offset: int, static_kv_len: int | None, block_sizes: BlockSizes,
             interpret: bool):
  """dQ [B, Tp, H, Dp] from padded inputs (shapes as in forward.flash_forward)."""
  b, tp, h, dp = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  groups = h // hkv
  bq, bk = block_sizes.block_q_dq, block_sizes.block_k_dq
  kernel = functools.partial(
      _dq_kernel, scale=scale, causal=causal, causal_offset=causal_offset,
      static_kv_len=static_kv_len, has_kv_lengths=kv_lengths is not None, block_q=bq,
      block_k=bk, num_k_blocks=sp // bk, num_q_tiles=tp // bq)
  qt = functools.partial(c.query_tile, num_q_tiles=tp // bq, heavy_first=causal)
  row_spec = pl.BlockSpec((None, bq, None, dp), lambda i, bi, hi: (bi, qt(i), hi, 0))
  kv_spec = pl.BlockSpec((None, sp, None, dp), lambda i, bi, hi: (bi, 0, hi // groups, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qt(i)))
  in_specs = [row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec]
  args = [q, k, v, dout, lse, delta]
  if kv_lengths is not None:
    in_specs.insert(0, pl.BlockSpec((None,), lambda i, bi, hi: (bi,)))
    args.insert(0, kv_lengths)
  return pl.pallas_call(
      kernel,
      grid=(tp // bq, b, h),
      in_specs=in_specs,
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=c.compiler_params(block_sizes.num_warps_dq, block_sizes.num_stages_dq),
      interpret=interpret,
      name="flash_attention_dq",
  )(*args)
