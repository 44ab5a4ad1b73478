"""Hopper backward kernels in Pallas' Mosaic GPU backend: dQ and dK/dV (TMA + wgmma).

Run 3 (NOTES.md, H100) put the Mosaic forward at 0.98x cuDNN at D = 128 while forward +
backward stayed at 0.64-0.69x: the Triton backward (backward.py) runs at ~300 TFLOP/s where
cuDNN's runs at ~500. These two kernels move the backward onto the same Hopper machinery as
the forward (mosaic.py): one memory warpgroup streams tiles into a shared-memory ring with
TMA, two compute warpgroups run every matmul on wgmma. The math is FlashAttention-2's
backward with separate dQ and dK/dV kernels (as JAX's attention_mgpu example and
backward.py), each with its own tiles:

- dQ kernel: one CTA per (head, 2 * block_q query rows, batch); each compute warpgroup owns
  block_q rows (Q, dO, lse, delta loaded once) and walks the key tiles the memory warpgroup
  streams: S = Q K^T, P = exp2(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
- dK/dV kernel: one CTA per (kv head, 2 * block_kv keys, batch); each compute warpgroup owns
  block_kv keys (K, V loaded once) and walks the query tiles of every query head of its GQA
  group (so dK/dV need no per-query-head copy and no reduction afterwards):
  S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
  dK += dS^T Q.

Our semantics as in the other kernels: bottom-right causal offset, kv_lengths (read per
CTA; key tiles / query tiles nobody needs are never loaded), static key padding, GQA/MQA,
empty rows (lse = +inf gives P = 0). Loop structure as backward.py: tiles with no mask,
tiles with a mask, and -- where the CTA's two warpgroups need different tiles -- steps that
only release the pipeline slot.

Scaling: the dQ kernel multiplies its query tile by scale * log2(e) in shared memory, as
the forward does (the same rounding, so S matches the forward's lse); the dK/dV kernel
multiplies its key tile instead (the query tiles stream past both warpgroups). S then comes
out of wgmma in base-2 units; dQ = dS K * scale, dK = dS^T Q * scale.

Testing without a GPU: as mosaic.py, Pallas' GPU interpreter runs the pipeline, barriers,
TMA and masks with plain dots in place of wgmma; the wgmma path is lowered for CUDA on the
CPU in the tests.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.attention import _common as c
from kernels.attention import mosaic as fwd

plgpu = fwd.plgpu
_COMPUTE_WGS = 2
_WG_AXIS = "wg"


@dataclasses.dataclass(frozen=True)
class MosaicBackwardBlockSizes:
  """Tiles of the Mosaic GPU backward.

  Attributes:
    block_q: dQ kernel: query rows per compute warpgroup (a CTA covers 2 * block_q);
      dK/dV kernel: query rows per pipeline step. Multiple of 64.
    block_kv: dK/dV kernel: keys per compute warpgroup (a CTA covers 2 * block_kv); dQ
      kernel: keys per pipeline step. Multiple of 64.
    num_stages: shared-memory ring slots (>= 2).
  """
  block_q: int = 64
  block_kv: int = 64
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      v = getattr(self, name)
      if v <= 0 or v % 64:
        raise ValueError(f"MosaicBackwardBlockSizes.{name}={v}; allowed: a positive "
                         f"multiple of 64.")
    if self.num_stages < 2:
      raise ValueError(f"MosaicBackwardBlockSizes.num_stages={self.num_stages}; allowed: >= 2.")

  @property
  def q_multiple(self) -> int:
    return 2 * self.block_q

  @property
  def kv_multiple(self) -> int:
    return 2 * self.block_kv

  def shared_memory_bytes(self, head_dim: int, itemsize: int = 2) -> int:
    """The larger of the two kernels' shared memory (+ 4 KiB for barriers and Mosaic's own)."""
    bq, bkv, st, d = self.block_q, self.block_kv, self.num_stages, head_dim
    dq = 2 * _COMPUTE_WGS * bq * d * itemsize + 2 * _COMPUTE_WGS * bq * 4 \
        + 2 * st * bkv * d * itemsize
    dkv = 2 * _COMPUTE_WGS * bkv * d * itemsize + 2 * st * bq * d * itemsize + 2 * st * bq * 4
    return max(dq, dkv) + 4096

  def accumulator_registers(self, head_dim: int) -> int:
    """float32 tile registers per thread of a compute warpgroup (128 threads), the larger
    kernel's: dK/dV holds dK, dV [block_kv, D] and S^T, dP^T [block_kv, block_q]; dQ holds
    dQ [block_q, D] and S, dP [block_q, block_kv]."""
    bq, bkv = self.block_q, self.block_kv
    return max(2 * bkv * head_dim + 2 * bkv * bq, bq * head_dim + 2 * bq * bkv) // 128

  def check_fits(self, head_dim: int):
    """Clear errors for tiles that cannot compile (shared memory) or would not fit the
    232 registers a compute-warpgroup thread gets (the default tiles use 192 at D = 128; the
    rest goes to addresses, bf16 copies and the row vectors)."""
    smem = self.shared_memory_bytes(head_dim)
    if smem > fwd.MAX_SHARED_MEMORY_BYTES:
      raise ValueError(f"{self} at head dim {head_dim} needs {smem} bytes of shared memory; a "
                       f"Hopper CTA has {fwd.MAX_SHARED_MEMORY_BYTES}. Use smaller tiles or "
                       f"fewer stages.")
    regs = self.accumulator_registers(head_dim)
    if regs > MAX_ACCUMULATOR_REGISTERS:
      raise ValueError(f"{self} at head dim {head_dim} needs {regs} float32 accumulator "
                       f"registers per thread; allowed: <= {MAX_ACCUMULATOR_REGISTERS} "
                       f"(e.g. block_q = block_kv = 64).")


# Two float32 accumulators (dK and dV, or dQ and the S/dP tiles) per compute warpgroup: at a
# padded head dim of 256 they no longer fit the 232 registers a thread may hold.
MAX_HEAD_DIM = 128
MAX_ACCUMULATOR_REGISTERS = 192


def _layouts(interpret: bool):
  """(layout_cast, iota, load_vector(ref, reduce_dim)) for the GPU or its interpreter."""
  if interpret:
    return ((lambda x, layout: x),
            (lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)),
            (lambda ref, dim: ref[...]))
  return (plgpu.layout_cast,
          (lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim,
                                                     layout=plgpu.Layout.WGMMA)),
          (lambda ref, dim: plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(dim))))


def _tma(src, dst, barrier):
  plgpu.copy_gmem_to_smem(src, dst, barrier)


def mosaic_backward(q, k, v, out, dout, lse, kv_lengths=None, *, scale: float, causal: bool,
                    causal_offset: int, static_kv_len: int | None,
                    block_sizes: MosaicBackwardBlockSizes, interpret: bool):
  """dQ, dK, dV from padded inputs.

  Args:
    q: [B, Tp, H, Dp]; k, v: [B, Sp, Hkv, Dp]; out, dout: [B, Tp, H, Dp]; lse: [B, H, Tp] float32 base-2 (+inf
      for empty rows). bf16 or fp16; Tp % (2 * block_q) == 0, Sp % (2 * block_kv) == 0,
      Dp in {64, 128}. Padded query rows must have dout == 0.
    kv_lengths, causal, causal_offset, static_kv_len: as mosaic.mosaic_forward.
    scale: the softmax scale.

  Returns:
    dq [B, Tp, H, Dp], dk, dv [B, Sp, Hkv, Dp] in q's dtype.
  """
  if plgpu is None:  # pragma: no cover
    raise ValueError("this jax has no Pallas Mosaic GPU backend; use the Triton backward.")
  b, tp, h, dp = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  bq, bkv = block_sizes.block_q, block_sizes.block_kv
  if tp % (2 * bq) or sp % (2 * bkv) or dp % 64 or dp > MAX_HEAD_DIM:
    raise ValueError(f"mosaic_backward needs Tp % {2 * bq} == 0, Sp % {2 * bkv} == 0 and a "
                     f"head dim of 64 or 128; got q {q.shape}, k {k.shape}.")
  block_sizes.check_fits(dp)
  if not interpret and causal:
    fwd._refuse_miscompiling_ptxas()
  # delta = rowsum(out * dout): one fused XLA pass over out and dout.
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
  kw = dict(causal=causal, causal_offset=causal_offset, static_kv_len=static_kv_len,
            block_sizes=block_sizes, interpret=interpret)
  dq = _dq(q, k, v, dout, lse, delta, kv_lengths, scale=scale, **kw)
  dk, dv = _dkv(q, k, v, dout, lse, delta, kv_lengths, scale=scale, **kw)
  return dq, dk, dv


def _call(entry, out_type, grid, grid_names, interpret, args):
  kwargs = {"interpret": fwd.interpret_params()} if interpret else {}
  return plgpu.kernel(
      entry, out_type=out_type, grid=grid, grid_names=grid_names,
      num_threads=_COMPUTE_WGS + 1, thread_name=_WG_AXIS,
      compiler_params=plgpu.CompilerParams(approx_math=True), **kwargs)(*args)


def _smem_transforms(interpret):
  return () if interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _dq(q, k, v, dout, lse, delta, kv_lengths, *, scale, causal, causal_offset,
        static_kv_len, block_sizes, interpret):
  b, tp, h, dp = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  dtype, groups = q.dtype, h // hkv
  bq, bkv = block_sizes.block_q, block_sizes.block_kv
  num_kv_blocks, num_q_tiles = sp // bkv, tp // (2 * bq)
  stages = min(block_sizes.num_stages, num_kv_blocks)
  layout_cast, iota, load_vec = _layouts(interpret)
  has_kv_lengths = kv_lengths is not None

  def kernel(kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, scoped):
    smem, own_barriers, ring_barriers, consumed = scoped
    q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem = smem
    q_bar, do_bar, lse_bar, delta_bar = own_barriers
    k_bar, v_bar = ring_barriers
    k_consumed, v_consumed = consumed
    batch, head, wg, kv_len, ranges, cta_q_start, cta_steps = fwd.query_cta(
        kvlen_ref if has_kv_lengths else None, static_kv_len, bq=bq, bkv=bkv,
        num_kv_blocks=num_kv_blocks, num_q_tiles=num_q_tiles, causal=causal,
        causal_offset=causal_offset)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q_start = cta_q_start + wg * bq
      n_full, n_end = ranges(q_start, bq)
      rows = (batch, pl.ds(q_start, bq), head)
      vec = (batch, head, pl.ds(q_start, bq))
      _tma(q_ref.at[rows], q_smem, q_bar.at[wg])
      _tma(do_ref.at[rows], do_smem, do_bar.at[wg])
      _tma(lse_ref.at[vec], lse_smem2.at[wg], lse_bar.at[wg])
      _tma(delta_ref.at[vec], delta_smem2.at[wg], delta_bar.at[wg])
      for bar in own_barriers:
        plgpu.barrier_wait(bar.at[wg])
      fwd.scale_in_smem(q_smem, scale * c.LOG2E, interpret)
      lse_row = load_vec(lse_smem2.at[wg], 1)
      delta_row = load_vec(delta_smem2.at[wg], 1)
      acc = layout_cast(jnp.full((bq, dp), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def step(i, acc, masked: bool):
        slot = lax.rem(i, jnp.array(stages, i.dtype))
        plgpu.barrier_wait(k_bar.at[slot])
        if interpret:
          s = c.dot(q_smem[...], k_smem[slot], 1, 1)
        else:
          def qk(ref):
            plgpu.wgmma(ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            return ref[...]
          s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        p = jnp.exp2(s - lax.broadcast_in_dim(lse_row, s.shape, [0]))
        if masked:
          mask = c.tile_mask(q_start, i * bkv, bq, bkv, causal=causal,
                             causal_offset=causal_offset, kv_len=kv_len, iota=iota)
          p = jnp.where(mask, p, 0.0)
        plgpu.barrier_wait(v_bar.at[slot])
        if interpret:
          dpv = c.dot(do_smem[...], v_smem[slot], 1, 1)
        else:
          def dov(ref):
            plgpu.wgmma(ref, do_smem, v_smem.at[slot].transpose((1, 0)))
            return ref[...]
          dpv = pl.run_scoped(dov, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(v_consumed.at[slot])
        ds = (p * (dpv - lax.broadcast_in_dim(delta_row, s.shape, [0]))).astype(dtype)
        if interpret:
          acc = acc + c.dot(ds, k_smem[slot], 1, 0)
        else:
          def dsk(ref):
            plgpu.wgmma(ref, ds, k_smem.at[slot])
          acc = pl.run_state(dsk)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(k_consumed.at[slot])
        return acc

      def release(i, _):
        slot = lax.rem(i, jnp.array(stages, i.dtype))
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_arrive(v_consumed.at[slot])
        plgpu.barrier_arrive(k_consumed.at[slot])

      acc = lax.fori_loop(0, n_full, functools.partial(step, masked=False), acc)
      if causal or kv_len is not None:
        acc = lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), acc)
      lax.fori_loop(n_end, cta_steps, release, None)
      q_smem[...] = (acc * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      fwd.stream_kv_tiles(cta_steps, stages, batch=batch, head=head, groups=groups,
                          block_kv=bkv, k_ref=k_ref, v_ref=v_ref, k_ring=k_smem, v_ring=v_smem,
                          k_loaded=k_bar, v_loaded=v_bar, k_consumed=k_consumed,
                          v_consumed=v_consumed)

  def entry(*refs):
    kvlen_ref, rest = (refs[0], refs[1:]) if has_kv_lengths else (None, refs)
    tr = _smem_transforms(interpret)
    smem = [plgpu.SMEM((_COMPUTE_WGS, bq, dp), dtype, transforms=tr),
            plgpu.SMEM((_COMPUTE_WGS, bq, dp), dtype, transforms=tr),
            plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),
            plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),
            plgpu.SMEM((stages, bkv, dp), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, dp), dtype, transforms=tr)]
    pl.run_scoped(
        lambda *scoped: kernel(kvlen_ref, *rest, scoped),
        smem,
        (plgpu.Barrier(num_barriers=_COMPUTE_WGS),) * 4,
        (plgpu.Barrier(num_barriers=stages),) * 2,
        (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2,
        collective_axes=_WG_AXIS)

  args = (*((kv_lengths,) if has_kv_lengths else ()), q, k, v, dout, lse, delta)
  return _call(entry, jax.ShapeDtypeStruct(q.shape, dtype), (h, num_q_tiles, b),
               ("heads", "q_seq", "batch"), interpret, args)


def _dkv(q, k, v, dout, lse, delta, kv_lengths, *, scale, causal, causal_offset, static_kv_len,
         block_sizes, interpret):
  b, tp, h, dp = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  dtype, groups = q.dtype, h // hkv
  bq, bkv = block_sizes.block_q, block_sizes.block_kv
  num_q_blocks, num_kv_tiles = tp // bq, sp // (2 * bkv)
  layout_cast, iota, load_vec = _layouts(interpret)
  has_kv_lengths = kv_lengths is not None
  stages = min(block_sizes.num_stages, groups * num_q_blocks)  # the most steps a CTA has

  def kernel(kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
             scoped):
    smem, own_barriers, ring_barriers, consumed = scoped
    k_smem2, v_smem2, q_ring, do_ring, lse_ring, delta_ring = smem
    k_bar, v_bar = own_barriers
    q_bar, do_bar, lse_bar, delta_bar = ring_barriers
    q_consumed, do_consumed, lse_consumed, delta_consumed = consumed
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    kv_len = kvlen_ref[batch] if has_kv_lengths else static_kv_len
    ranges = lambda k_start: c.q_block_ranges(
        k_start, bkv, bq, num_q_blocks, causal=causal, causal_offset=causal_offset,
        kv_len=kv_len)
    wg = lax.axis_index(_WG_AXIS)
    cta_k_start = lax.axis_index("kv_seq") * (2 * bkv)
    # The first warpgroup holds the earlier keys, which the earlier query tiles see.
    cta_lo, _ = ranges(cta_k_start)
    per_head = num_q_blocks - cta_lo
    num_steps = groups * per_head

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      k_start = cta_k_start + wg * bkv
      lo, mid = ranges(k_start)
      keys = (batch, pl.ds(k_start, bkv), kv_head)
      _tma(k_ref.at[keys], k_smem, k_bar.at[wg])
      _tma(v_ref.at[keys], v_smem, v_bar.at[wg])
      plgpu.barrier_wait(k_bar.at[wg])
      plgpu.barrier_wait(v_bar.at[wg])
      fwd.scale_in_smem(k_smem, scale * c.LOG2E, interpret)
      zeros = lambda: layout_cast(jnp.full((bkv, dp), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def slot_of(g, qi):
        i = g * per_head + (qi - cta_lo)
        return lax.rem(i, jnp.array(stages, i.dtype))

      def step(qi, carry, g, masked: bool):
        dk_acc, dv_acc = carry
        slot = slot_of(g, qi)
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(lse_bar.at[slot])
        if interpret:
          st = c.dot(k_smem[...], q_ring[slot], 1, 1)
        else:
          def kq(ref):
            plgpu.wgmma(ref, k_smem, q_ring.at[slot].transpose((1, 0)))
            return ref[...]
          st = pl.run_scoped(kq, plgpu.ACC((bkv, bq), jnp.float32))
        lse_col = load_vec(lse_ring.at[slot], 0)
        plgpu.barrier_arrive(lse_consumed.at[slot])
        pt = jnp.exp2(st - lax.broadcast_in_dim(lse_col, st.shape, [1]))
        if masked:
          mask = c.tile_mask(qi * bq, k_start, bq, bkv, causal=causal,
                             causal_offset=causal_offset, kv_len=kv_len, keys_first=True,
                             iota=iota)
          pt = jnp.where(mask, pt, 0.0)
        pt_lo = pt.astype(dtype)
        plgpu.barrier_wait(do_bar.at[slot])
        if interpret:
          dv_acc = dv_acc + c.dot(pt_lo, do_ring[slot], 1, 0)
          dpt = c.dot(v_smem[...], do_ring[slot], 1, 1)
        else:
          def pv(refs):
            # Both wgmmas in one block: one wait for the pair (as JAX's example).
            dv_ref, dpt_ref = refs
            plgpu.wgmma(dv_ref, pt_lo, do_ring.at[slot])
            plgpu.wgmma(dpt_ref, v_smem, do_ring.at[slot].transpose((1, 0)))
          dpt0 = layout_cast(jnp.full((bkv, bq), 0.0, jnp.float32), plgpu.Layout.WGMMA)
          dv_acc, dpt = pl.run_state(pv)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(dpt0)))
        plgpu.barrier_arrive(do_consumed.at[slot])
        plgpu.barrier_wait(delta_bar.at[slot])
        delta_col = load_vec(delta_ring.at[slot], 0)
        plgpu.barrier_arrive(delta_consumed.at[slot])
        dst = (pt * (dpt - lax.broadcast_in_dim(delta_col, st.shape, [1]))).astype(dtype)
        if interpret:
          dk_acc = dk_acc + c.dot(dst, q_ring[slot], 1, 0)
        else:
          def dsq(ref):
            plgpu.wgmma(ref, dst, q_ring.at[slot])
          dk_acc = pl.run_state(dsq)(plgpu.ACC.init(dk_acc))
        plgpu.barrier_arrive(q_consumed.at[slot])
        return dk_acc, dv_acc

      def release(qi, _, g):
        slot = slot_of(g, qi)
        for bar in ring_barriers:
          plgpu.barrier_wait(bar.at[slot])
        for bar in consumed:
          plgpu.barrier_arrive(bar.at[slot])

      def head_loop(g, carry):
        lax.fori_loop(cta_lo, lo, functools.partial(release, g=g), None)
        if causal or kv_len is not None:
          carry = lax.fori_loop(lo, mid, functools.partial(step, g=g, masked=True), carry)
        return lax.fori_loop(mid, num_q_blocks, functools.partial(step, g=g, masked=False),
                             carry)

      dk_acc, dv_acc = lax.fori_loop(0, groups, head_loop, (zeros(), zeros()))
      k_smem[...] = (dk_acc * scale).astype(dtype)
      v_smem[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      safe = jnp.maximum(per_head, 1)

      def where(i):  # step -> (query head, first row)
        g = lax.div(i, safe)
        qi = cta_lo + (i - g * safe)
        return kv_head * groups + g, qi * bq

      def rows(ref, ring, bar):
        def issue(i, slot):
          qh, r0 = where(i)
          _tma(ref.at[batch, pl.ds(r0, bq), qh], ring.at[slot], bar.at[slot])
        return issue

      def vec(ref, ring, bar):
        def issue(i, slot):
          qh, r0 = where(i)
          _tma(ref.at[batch, qh, pl.ds(r0, bq)], ring.at[slot], bar.at[slot])
        return issue

      fwd.stream_tiles(num_steps, stages, [
          (rows(q_ref, q_ring, q_bar), q_consumed),
          (vec(lse_ref, lse_ring, lse_bar), lse_consumed),
          (rows(do_ref, do_ring, do_bar), do_consumed),
          (vec(delta_ref, delta_ring, delta_bar), delta_consumed)])

  def entry(*refs):
    kvlen_ref, rest = (refs[0], refs[1:]) if has_kv_lengths else (None, refs)
    tr = _smem_transforms(interpret)
    smem = [plgpu.SMEM((_COMPUTE_WGS, bkv, dp), dtype, transforms=tr),
            plgpu.SMEM((_COMPUTE_WGS, bkv, dp), dtype, transforms=tr),
            plgpu.SMEM((stages, bq, dp), dtype, transforms=tr),
            plgpu.SMEM((stages, bq, dp), dtype, transforms=tr),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.float32)]
    pl.run_scoped(
        lambda *scoped: kernel(kvlen_ref, *rest, scoped),
        smem,
        (plgpu.Barrier(num_barriers=_COMPUTE_WGS),) * 2,
        (plgpu.Barrier(num_barriers=stages),) * 4,
        (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 4,
        collective_axes=_WG_AXIS)

  args = (*((kv_lengths,) if has_kv_lengths else ()), q, k, v, dout, lse, delta)
  kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
  return _call(entry, [kv_type, kv_type], (hkv, num_kv_tiles, b),
               ("heads", "kv_seq", "batch"), interpret, args)
