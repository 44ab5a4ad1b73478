"""Hopper forward kernel in Pallas' Mosaic GPU backend (TMA + wgmma, warp-specialised).

The Triton-lowered forward (forward.py) tops out near 0.6-0.7x cuDNN at D = 128 on an H200
(NOTES.md, runs 1-2): Triton does not expose the Hopper machinery cuDNN's kernels are built
on. This kernel is written in Pallas' Mosaic GPU dialect, following the FlashAttention-3
schedule that JAX's own example (jax.experimental.pallas.ops.gpu.attention_mgpu) and
tokamax use:

- one CTA per (query head, 2 * block_q query rows, batch) with three warpgroups: two compute
  warpgroups, each owning block_q query rows, and one memory warpgroup that streams key and
  value tiles into a ring of `num_stages` shared-memory slots with TMA;
- q k^T and p v run on wgmma (tensor cores, operands in shared memory / registers);
- a "schedule barrier" makes the two compute warpgroups ping-pong: one does its softmax
  while the other's matmuls occupy the tensor cores.

What is ours (semantics shared with forward.py, reference.py): bottom-right aligned causal
masks for T != S, the static key length of the op's padding, GQA/MQA head mapping, rows
with nothing to attend to (output 0, lse = +inf), and the same residuals as the Triton
forward (output, base-2 log-sum-exp of the scaled logits), so the Triton backward kernels
(backward.py) serve as its backward unchanged. Loop structure as forward.py: key tiles that
need no mask, then the masked ones (causal diagonal, key padding), then -- when the other
warpgroup still needs tiles -- an epilogue that only releases the pipeline slots.

Masked logits use a finite MASK_VALUE and masked probabilities are zeroed (with
bottom-right alignment and key padding a row can be fully masked within a tile).

Testing without a GPU: Pallas' GPU interpreter (jax >= 0.10) simulates the warpgroups,
barriers, TMA copies and shared memory on the CPU and checks that every barrier phase is
observed; it has no wgmma with a transposed operand and no `pl.run_state`, so under
`interpret=True` the two matmuls are plain dots on the shared-memory tiles (and the
tiled/swizzled layouts and register-layout hints are dropped). The pipeline, the barrier
protocol, the loop ranges and the masks are the GPU's; the wgmma calls themselves are
checked by lowering the kernel for CUDA on the CPU (tests), and numerically only on a GPU.

Inputs come padded from the op: T to a multiple of 2 * block_q, S to a multiple of
block_kv, D to a multiple of 64. Each warpgroup multiplies its query tile by
scale * log2(e) in shared memory after loading it, so logits come out of the first wgmma
in base-2 units (no separate pass over q before the kernel).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.attention import _common as c

try:  # Mosaic GPU Pallas exists in every jax we support, but keep CPU-only installs importable.
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

_COMPUTE_WGS = 2
_WG_AXIS = "wg"


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
  """Tiles of the Mosaic GPU forward.

  Attributes:
    block_q: query rows per compute warpgroup (a CTA covers 2 * block_q rows); multiple of 64.
    block_kv: keys per pipeline step; multiple of 64.
    num_stages: shared-memory ring slots for key/value tiles (>= 2).
    in_place: p v accumulates onto the rescaled output accumulator inside wgmma
      (FlashAttention-3, `pl.run_state`); False: into a fresh accumulator that is then
      added (`acc * alpha + pv`), 64 more registers per thread at D = 128. The GPU
      interpreter runs neither (it has no wgmma with transposed operands and no
      run_state): it computes the same products with plain dots, see `mosaic_forward`.
  """
  block_q: int = 64
  block_kv: int = 128
  num_stages: int = 2
  in_place: bool = True

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      v = getattr(self, name)
      if v <= 0 or v % 64:
        raise ValueError(f"MosaicBlockSizes.{name}={v}; allowed: a positive multiple of 64.")
    if self.num_stages < 2:
      raise ValueError(f"MosaicBlockSizes.num_stages={self.num_stages}; allowed: >= 2.")

  @property
  def q_multiple(self) -> int:
    return 2 * self.block_q

  def shared_memory_bytes(self, head_dim: int, itemsize: int = 2) -> int:
    q = _COMPUTE_WGS * self.block_q * head_dim * itemsize
    kv = 2 * self.num_stages * self.block_kv * head_dim * itemsize
    # + 4 KiB: barriers and Mosaic's own scratch (2.1-2.7 KiB counted by its lowering for the
    # default tiles; an under-estimate let a 229,888-byte candidate through that needed 232,568).
    return q + kv + _COMPUTE_WGS * self.block_q * 4 + 4096

  def fits(self, head_dim: int) -> bool:
    """Within a Hopper CTA's shared memory, and in_place=False only up to head dim 128 (its
    second float32 accumulator); what tile searches filter their candidates by."""
    return (self.shared_memory_bytes(head_dim) <= MAX_SHARED_MEMORY_BYTES
            and (self.in_place or head_dim <= 128))


# Hopper defaults by padded head dim. D <= 128: FlashAttention-3's 128-row CTA (2 x 64) with
# 128-key tiles and 2 stages (160 KiB of shared memory at D = 128); D = 256 halves the key tile
# to stay within the 227 KiB an H100/H200 CTA may use (192 KiB).
_HOPPER_TABLE = {
    64: MosaicBlockSizes(block_q=64, block_kv=128, num_stages=2),
    128: MosaicBlockSizes(block_q=64, block_kv=128, num_stages=2),
    256: MosaicBlockSizes(block_q=64, block_kv=64, num_stages=2),
}
# Shape-keyed exceptions at head dim 64, from the tile search of GPU run 5 (H100, bf16,
# B*T = 16384, H*D = 2048; NOTES.md). At D = 128 the table above won or was within 1.5% on
# every row measured (T = 512, 1024, 4096; both causal modes); D = 256 has one legal tile.
#  - Short queries (T <= 512, T % 256 == 0, so no extra query padding): 2 x 128-row
#    warpgroups with 64-key tiles, 298 vs 275 TFLOP/s non-causal and 175 vs 159 causal at
#    T = 512 (fewer, fuller CTAs; half the masked keys per diagonal tile). At T = 4096 they
#    lose (413 vs 423, 365 vs 373).
#  - Long non-causal (S >= 1024, S % 256 == 0, so no extra key padding): 256-key tiles,
#    436 vs 423 at T = 4096 and 360 vs 345 at T = 1024. Causal at T = 4096: 359 vs 373.
_D64_SHORT = MosaicBlockSizes(block_q=128, block_kv=64, num_stages=2)
_D64_LONG_NONCAUSAL = MosaicBlockSizes(block_q=64, block_kv=256, num_stages=2)
MAX_SHARED_MEMORY_BYTES = 227 * 1024


def default_mosaic_block_sizes(head_dim: int, causal: bool = False,
                               seq_len: int | None = None,
                               kv_len: int | None = None) -> MosaicBlockSizes:
  """Hopper forward tiles, chosen by (padded head dim, causal, query and key lengths).

  Args:
    head_dim: the head dim (padded to 64, 128 or 256 here).
    causal: causal masking.
    seq_len, kv_len: query and key lengths; None means long (T = S = 4096, the tuning shape).
  """
  for d in sorted(_HOPPER_TABLE):
    if head_dim <= d:
      if d == 64 and seq_len is not None and seq_len <= 512 and seq_len % 256 == 0:
        return _D64_SHORT
      if (d == 64 and not causal and kv_len is not None and kv_len >= 1024
          and kv_len % 256 == 0):
        return _D64_LONG_NONCAUSAL
      return _HOPPER_TABLE[d]
  raise ValueError(f"head_dim={head_dim}; the Mosaic GPU kernel supports head dims up to 256.")


def padded_head_dim(d: int) -> int:
  """Mosaic's wgmma tiles need D % 64 == 0: 40 -> 64, 72/96 -> 128, 160 -> 256."""
  return max(64, 1 << (d - 1).bit_length())


def mosaic_forward(q: jax.Array, k: jax.Array, v: jax.Array,
                   kv_lengths: jax.Array | None = None, *, scale: float, causal: bool,
                   causal_offset: int, static_kv_len: int | None,
                   block_sizes: MosaicBlockSizes, interpret: bool):
  """Runs the Mosaic GPU forward on padded, pre-scaled inputs.

  Args:
    q: [B, Tp, H, Dp]; k, v: [B, Sp, Hkv, Dp]. bf16 or fp16; Tp % (2 * block_q) == 0,
      Sp % block_kv == 0, Dp % 64 == 0.
    kv_lengths: [B] int32 in [0, S] or None; keys j >= kv_lengths[b] are masked (each CTA
      reads its example's length from global memory; tiles past it are never loaded).
    causal, causal_offset: query r sees key j iff j <= r + causal_offset.
    static_kv_len: the true S when Sp > S and kv_lengths is None (padding keys are
      masked), else None.
    scale: softmax scale; each warpgroup multiplies its query tile by scale * log2(e) in
      shared memory (rounded to q's dtype), so logits leave wgmma in base-2 units.
    block_sizes: tiles (see MosaicBlockSizes).
    interpret: run in Pallas' GPU interpret mode (CPU; simulates warpgroups, barriers, TMA).

  Returns:
    out [B, Tp, H, Dp] in q's dtype, lse [B, H, Tp] float32 (base 2; +inf for empty rows).
  """
  if plgpu is None:  # pragma: no cover
    raise ValueError("this jax has no Pallas Mosaic GPU backend (jax.experimental.pallas."
                     "mosaic_gpu); use implementation='pallas'.")
  b, tp, h, dp = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  dtype = q.dtype
  groups = h // hkv
  bq, bkv, stages = block_sizes.block_q, block_sizes.block_kv, block_sizes.num_stages
  if not block_sizes.in_place and dp > 128:
    raise ValueError(f"MosaicBlockSizes(in_place=False) at head dim {dp}: the second float32 "
                     f"accumulator does not fit the register budget; use in_place=True.")
  if tp % (2 * bq) or sp % bkv or dp % 64:
    raise ValueError(f"mosaic_forward needs Tp % {2 * bq} == 0, Sp % {bkv} == 0, Dp % 64 == 0;"
                     f" got q {q.shape}, k {k.shape}.")
  num_kv_blocks = sp // bkv
  num_q_tiles = tp // (2 * bq)
  stages = min(stages, num_kv_blocks)
  # Register-layout hints (WGMMA fragments) matter to the Mosaic GPU compiler only; the GPU
  # interpreter has no rule for them and computes the same values without.
  if interpret:
    layout_cast = lambda x, layout: x
    iota = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)
  else:
    layout_cast = plgpu.layout_cast
    iota = lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim,
                                                     layout=plgpu.Layout.WGMMA)
  # (q_start, rows) -> (n_full, n_end): key tiles [0, n_full) need no mask, [n_full, n_end)
  # do, later ones are never visible to these rows (shared with forward.py).
  has_kv_lengths = kv_lengths is not None

  def kernel(kvlen_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
    smem, buffer_barriers, consumed_barriers, schedule_barrier = scoped
    q_smem2, k_smem, v_smem, lse_smem2 = smem
    k_barriers, v_barriers, q_barriers = buffer_barriers
    k_consumed, v_consumed = consumed_barriers
    batch, head, wg, kv_len, ranges, cta_q_start, cta_steps = query_cta(
        kvlen_ref if has_kv_lengths else None, static_kv_len, bq=bq, bkv=bkv,
        num_kv_blocks=num_kv_blocks, num_q_tiles=num_q_tiles, causal=causal,
        causal_offset=causal_offset)

    def schedule_barrier_sync():
      plgpu.barrier_arrive(schedule_barrier)
      plgpu.barrier_wait(schedule_barrier)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem = q_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      q_start = cta_q_start + wg * bq
      n_full, n_end = ranges(q_start, bq)

      plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, bq), head], q_smem,
                              q_barriers.at[wg])
      plgpu.barrier_wait(q_barriers.at[wg])
      scale_in_smem(q_smem, scale * c.LOG2E, interpret)

      row_layout = plgpu.Layout.WGMMA.reduce(1)
      m_i = layout_cast(jnp.full((bq,), c.MASK_VALUE, jnp.float32), row_layout)
      l_i = layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
      acc = layout_cast(jnp.full((bq, dp), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(n_end > 0)
      def _():
        plgpu.barrier_wait(k_barriers.at[0])

      pl.when(wg == 1)(schedule_barrier_sync)

      def kv_step(step, carry, masked: bool):
        acc, m_i, l_i = carry
        slot = lax.rem(step, jnp.array(stages, step.dtype))

        if interpret:
          s = c.dot(q_smem[...], k_smem[slot], 1, 1)
          schedule_barrier_sync()
        else:
          def compute_qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            schedule_barrier_sync()
            return acc_ref[...]

          s = pl.run_scoped(compute_qk, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(k_consumed.at[slot])
        if masked:
          mask = c.tile_mask(q_start, step * bkv, bq, bkv, causal=causal,
                             causal_offset=causal_offset, kv_len=kv_len, iota=iota)
          s = jnp.where(mask, s, c.MASK_VALUE)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        m_sub = m_new
        if masked:
          # A row masked everywhere so far has m_new == MASK_VALUE: subtract 0 instead, so
          # its masked logits give exp2(MASK_VALUE) = 0 (elsewhere s - m_new is ~MASK_VALUE
          # on masked keys, also 0). A per-row select, not a per-element one on p.
          m_sub = jnp.where(m_new == c.MASK_VALUE, 0.0, m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_sub, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        p_lo = p.astype(dtype)
        if block_sizes.in_place:
          # Rescale during the softmax, before the tensor cores are ours (as JAX's example:
          # this ordering matters for speed); wgmma then accumulates p v onto it in place.
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        acc, l_i, m_new, p_lo, alpha = lax.optimization_barrier((acc, l_i, m_new, p_lo, alpha))
        plgpu.barrier_arrive(schedule_barrier)  # softmax done
        plgpu.barrier_wait(v_barriers.at[slot])
        plgpu.barrier_wait(schedule_barrier)  # the tensor cores are ours

        def wait_next_k():
          nxt = step + 1

          @pl.when(nxt < n_end)
          def _():
            plgpu.barrier_wait(k_barriers.at[lax.rem(nxt, jnp.array(stages, step.dtype))])

        if interpret:
          pv = c.dot(p_lo, v_smem[slot], 1, 0)
          acc = acc + pv if block_sizes.in_place else (
              acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv)
          wait_next_k()
        elif block_sizes.in_place:
          def compute_pv_in_place(acc_ref):
            plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])
            wait_next_k()  # overlaps the wgmma

          acc = pl.run_state(compute_pv_in_place)(plgpu.ACC.init(acc))
        else:
          def compute_pv(pv_ref):
            plgpu.wgmma(pv_ref, p_lo, v_smem.at[slot])
            wait_next_k()  # overlaps the wgmma
            return pv_ref[...]

          pv = pl.run_scoped(compute_pv, plgpu.ACC((bq, dp), jnp.float32))
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
        plgpu.barrier_arrive(v_consumed.at[slot])
        return acc, m_new, l_i

      def release_step(step, _):
        # Tiles only the other warpgroup needs: free the slot, keep the ping-pong in step.
        # (Waiting for the loads keeps every barrier phase observed by every warpgroup that
        # waits on it, which Pallas' GPU interpreter checks; on the GPU the tile is there.)
        # Same barrier order as kv_step, so the partner's softmax is not delayed by a load.
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        plgpu.barrier_wait(k_barriers.at[slot])
        schedule_barrier_sync()
        plgpu.barrier_arrive(k_consumed.at[slot])
        plgpu.barrier_arrive(schedule_barrier)
        plgpu.barrier_wait(v_barriers.at[slot])
        plgpu.barrier_wait(schedule_barrier)
        plgpu.barrier_arrive(v_consumed.at[slot])

      carry = (acc, m_i, l_i)
      carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
      if causal or kv_len is not None:
        carry = lax.fori_loop(n_full, n_end, functools.partial(kv_step, masked=True), carry)
      acc, m_i, l_i = carry
      lax.fori_loop(n_end, cta_steps, release_step, None)
      pl.when(wg == 0)(schedule_barrier_sync)

      empty = l_i == 0.0
      l_safe = jnp.where(empty, 1.0, l_i)
      q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
      lse_smem[...] = jnp.where(empty, jnp.inf, m_i + jnp.log2(l_safe))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(q_start, bq), head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_start, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      stream_kv_tiles(cta_steps, stages, batch=batch, head=head, groups=groups, block_kv=bkv,
                      k_ref=k_ref, v_ref=v_ref, k_ring=k_smem, v_ring=v_smem,
                      k_loaded=k_barriers, v_loaded=v_barriers, k_consumed=k_consumed,
                      v_consumed=v_consumed)

  def entry(*refs):
    kvlen_ref, (q_ref, k_ref, v_ref, out_ref, lse_ref) = (
        (refs[0], refs[1:]) if has_kv_lengths else (None, refs))
    # Tiled + 128-byte-swizzled shared memory is what TMA and wgmma want; the interpreter
    # (plain loads, no wgmma) takes the logical layout.
    transforms = () if interpret else (plgpu.TilingTransform((8, 64)),
                                       plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((_COMPUTE_WGS, bq, dp), dtype, transforms=transforms),
        plgpu.SMEM((stages, bkv, dp), dtype, transforms=transforms),
        plgpu.SMEM((stages, bkv, dp), dtype, transforms=transforms),
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),
    ]
    pl.run_scoped(
        lambda *args: kernel(kvlen_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, args),
        scratch,
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=_COMPUTE_WGS)),
        (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
        collective_axes=_WG_AXIS,
    )

  kwargs = {}
  if interpret:
    kwargs["interpret"] = interpret_params()
  elif causal:
    _refuse_miscompiling_ptxas()
  out, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      grid=(h, num_q_tiles, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=_COMPUTE_WGS + 1,
      thread_name=_WG_AXIS,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kwargs,
  )(*((kv_lengths,) if has_kv_lengths else ()), q, k, v)
  return out, lse


def query_cta(kvlen_ref, static_kv_len, *, bq, bkv, num_kv_blocks, num_q_tiles, causal,
              causal_offset):
  """What a query-tiled CTA (forward, dQ kernel) knows about itself, inside the kernel.

  Returns (batch, head, wg, kv_len, ranges, cta_q_start, cta_steps): kv_len is None (no key
  mask), the static true S, or this example's length loaded from `kvlen_ref`;
  `ranges(q_start, rows)` the (unmasked, masked) key-tile ranges of a row block; cta_steps
  the key tiles the memory warpgroup streams, the union of both compute warpgroups' needs
  (the second one holds the later rows, which see at least as many keys). Causal grids visit
  query tiles heaviest first.
  """
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  kv_len = kvlen_ref[batch] if kvlen_ref is not None else static_kv_len
  ranges = lambda q_start, rows: c.kv_block_ranges(
      q_start, rows, bkv, num_kv_blocks, causal=causal, causal_offset=causal_offset,
      kv_len=kv_len)
  tile = c.query_tile(lax.axis_index("q_seq"), num_q_tiles, causal)
  cta_q_start = tile * (2 * bq)
  _, cta_steps = ranges(cta_q_start, 2 * bq)
  return batch, head, lax.axis_index(_WG_AXIS), kv_len, ranges, cta_q_start, cta_steps


def stream_tiles(num_steps, stages: int, loads):
  """Memory warpgroup: stream `num_steps` tiles through a ring of `stages` slots (the
  forward's K/V tiles, the dQ kernel's K/V tiles, the dK/dV kernel's Q/dO/lse/delta tiles).

  `loads` is a list of (issue(step, slot), consumed barrier ring): a slot is refilled once
  both compute warpgroups have released it; at the end the last releases are observed too
  (the GPU interpreter checks that every barrier phase is waited for).
  """
  def issue_all(step, slot):
    for issue, _ in loads:
      issue(step, slot)

  for i in range(stages):
    pl.when(i < num_steps)(functools.partial(issue_all, i, i))

  @pl.loop(0, jnp.maximum(num_steps - stages, 0))
  def _(i):
    slot = lax.rem(i, jnp.array(stages, i.dtype))
    for issue, consumed in loads:
      plgpu.barrier_wait(consumed.at[slot])
      issue(i + stages, slot)

  @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
  def _(i):
    slot = lax.rem(i, jnp.array(stages, i.dtype))
    for _, consumed in loads:
      plgpu.barrier_wait(consumed.at[slot])


def stream_kv_tiles(num_steps, stages: int, *, batch, head, groups: int, block_kv: int,
                    k_ref, v_ref, k_ring, v_ring, k_loaded, v_loaded, k_consumed, v_consumed):
  """Memory warpgroup of the forward and of the dQ kernel: through `stream_tiles`, TMA copies
  of the K and V tiles (`block_kv` keys per step) of the kv head that query head `head`
  reads (`groups` query heads per kv head) into the `k_ring` / `v_ring` slots, each copy
  arriving on that slot's `k_loaded` / `v_loaded` barrier."""
  kv_head = lax.div(head, jnp.array(groups, head.dtype))
  src = lambda step: (batch, pl.ds(step * block_kv, block_kv), kv_head)
  stream_tiles(num_steps, stages, [
      (lambda step, slot: plgpu.copy_gmem_to_smem(k_ref.at[src(step)], k_ring.at[slot],
                                                  k_loaded.at[slot]), k_consumed),
      (lambda step, slot: plgpu.copy_gmem_to_smem(v_ref.at[src(step)], v_ring.at[slot],
                                                  v_loaded.at[slot]), v_consumed)])


def _refuse_miscompiling_ptxas():
  """JAX's example refuses causal masks on CUDA runtimes 12.8.0 <= v < 12.9.1 (a ptxas
  miscompilation); this kernel builds its mask the same way."""
  try:
    from jax._src.lib import cuda_versions
  except ImportError:  # pragma: no cover
    return
  get_version = getattr(cuda_versions, "cuda_runtime_get_version", None)
  if get_version is None:  # a CPU-only jaxlib (cross-lowering in tests)
    return
  version = get_version()
  if 12080 <= version < 12091:
    raise ValueError(f"causal=True with the Mosaic GPU kernel on CUDA runtime {version}: "
                     "ptxas 12.8.0-12.9.0 miscompiles this mask (see JAX's attention_mgpu); "
                     "use implementation='pallas' or CUDA >= 12.9.1.")


def interpret_params():
  """Pallas' GPU interpreter (simulated warpgroups, barriers and TMA on the CPU), with its
  race detector on (a shared-memory tile read while a TMA copy or another warpgroup may
  still write it is reported; see `races_found`) and uninitialised memory filled with NaN."""
  # jax 0.10 has no public alias for the GPU interpreter parameters.
  from jax._src.pallas.mosaic_gpu.interpret import params as gpu_interpret
  return gpu_interpret.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")


def races_found() -> bool:
  """Whether the GPU interpreter's race detector has reported a race in this process."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  return bool(interpret_pallas_call.get_races().races_found)


def scale_in_smem(ref, factor: float, interpret: bool):
  """ref[...] *= factor in shared memory, rounded to ref's dtype, then made visible to wgmma.

  The query (forward, dQ) or key (dK/dV) tile a warpgroup owns, multiplied once after its
  TMA load instead of a separate XLA pass over the whole array before the kernel."""
  if interpret:
    x = ref[...]
  else:
    x = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)
  ref[...] = (x.astype(jnp.float32) * factor).astype(ref.dtype)
  plgpu.commit_smem()
