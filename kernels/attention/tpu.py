"""Flash attention on TPU: our blocked online-softmax kernels in Pallas' Mosaic TPU backend.

    tpu_attention(q, k, v, *, causal, kv_lengths, scale, block_sizes, interpret) -> [B, T, H, D]

The same algorithm as the GPU kernels (forward.py, backward.py): base-2 online softmax with
the scale applied to the float32 logits, the base-2 log-sum-exp saved for the backward, a
dK/dV kernel that owns a key tile and a dQ kernel that owns a query tile (no atomics), rows
with no key to attend to giving zeros and zero gradients (lse = +inf makes P = 0). What
differs is how a TPU runs it:

* Grids, not loops. A TPU core walks its grid sequentially and Pallas pipelines the block
  DMAs (HBM -> VMEM, double-buffered) across grid steps, so the streamed operand is a grid
  axis marked "arbitrary" and the accumulators live in VMEM scratch: forward and dQ grid
  (B, H, query tiles, key tiles), dK/dV grid (B, Hkv, key tiles, G, query tiles), where the
  G query heads that share a kv head (GQA / MQA) are summed in the dK/dV accumulators.
* Skipped tiles are not loaded. kv_lengths is a scalar-prefetch operand (in SMEM before
  the grid starts), so the index maps can see it: a key tile past a row's causal end or its
  kv length maps to the block of the last tile that is needed, which is already in VMEM, so
  the pipeline issues no DMA for it, and `pl.when` skips its compute. The dK/dV kernel
  does the same with the query tiles above a key tile's causal start and with key tiles
  past kv_length (which write zeros and load nothing new). The one exception is the first
  step of an example (the previous step belonged to another example): it needs a block of
  its own even when its tile is skipped (block 0 for kv_length 0). Each visited tile takes
  one of two compute branches: no mask, or the causal / kv-length mask.
* Layout [B, T, H, D] without a transpose. q is viewed (a free reshape) as [B, T, H * Dp]
  with D padded to Dp, a multiple of 128 lanes, so the block (tile, Dp) at column block h
  is head h and every block is (8, 128)-aligned; k, v likewise with Hkv. The LSE and delta
  rows are stored [B, H, 1, T]: lane-major (8x less HBM than a [.., T, 1] column, which
  TPU tiling pads to 128 lanes), used as rows by the dK/dV kernel's transposed tile
  S^T = K Q^T and transposed once per query tile where a column is needed.
* T and S are padded to the tiles (padded keys are masked by the kv length, which is S when
  kv_lengths is None; padded query rows have dO = 0 and add nothing to dK, dV).

`interpret=True` runs the kernels in Pallas' TPU interpreter (`interpret_params`): a
simulation of the TPU's memories, DMAs and semaphores on the CPU, with uninitialised VMEM
filled with NaN and out-of-bounds reads raising; `races_found()` reports its race detector.
Whether the kernels pass Pallas' Mosaic TPU lowering is checked on a CPU by
`jax.export.export(..., platforms=["tpu"])` (tests/kernels/test_attention_tpu.py); Mosaic's
own compiler passes (in libtpu) and the speed need a TPU (experiments/benchmarks/
attention_tpu.py, NOTES.md).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention import _common as c
from kernels.attention.interface import validate_inputs

MAX_HEAD_DIM = 256
LANES = 128  # TPU vector register: 8 sublanes x 128 lanes (32-bit)
SUBLANES = 8
TPU_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# --- tiles -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
  """Rows of queries / keys per tile of the three TPU kernels.

  Every tile must be a multiple of 8 (sublanes). On a TPU, use multiples of 128: query tiles
  are the lane dimension of the LSE / delta rows and of the dK/dV kernel's S^T tile, key
  tiles that of S (the defaults are). Smaller multiples of 8 run in the interpreter, where
  tests use them to span several tiles with tiny shapes. `fit` shrinks tiles that exceed
  the sequence.

  Attributes:
    block_q, block_k: forward: resident query tile, streamed key tile.
    block_q_dkv, block_k_dkv: dK/dV kernel: streamed query tile, resident key tile.
    block_q_dq, block_k_dq: dQ kernel: resident query tile, streamed key tile.
  """
  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, int) or v < SUBLANES or v % SUBLANES:
        raise ValueError(f"TpuBlockSizes.{f.name}={v!r}; allowed: a multiple of "
                         f"{SUBLANES} (on a TPU, of {LANES}).")

  def fit(self, q_len: int, kv_len: int) -> "TpuBlockSizes":
    """Caps every tile at its sequence length rounded up to 128 x a power of two, so a
    40-query problem runs one 128-row tile rather than padding to a 512-row one, and tiles
    that are all 128 x powers of two stay so (the padded length, a multiple of every tile,
    is then a multiple of the largest: T = 700 with 1024- and 512-row tiles pads to 1024)."""
    qcap, kcap = _pow2_lanes(q_len), _pow2_lanes(kv_len)
    return TpuBlockSizes(
        block_q=min(self.block_q, qcap), block_k=min(self.block_k, kcap),
        block_q_dkv=min(self.block_q_dkv, qcap), block_k_dkv=min(self.block_k_dkv, kcap),
        block_q_dq=min(self.block_q_dq, qcap), block_k_dq=min(self.block_k_dq, kcap))

  @property
  def q_multiple(self) -> int:
    return math.lcm(self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def kv_multiple(self) -> int:
    return math.lcm(self.block_k, self.block_k_dkv, self.block_k_dq)


# Per-generation defaults, keyed by a substring of `device_kind` ("TPU v4", "TPU v5 lite",
# "TPU v5", "TPU v6 lite"). None is tuned yet (no TPU has run these kernels, NOTES.md "TPU").
# The resident tile sets the arithmetic intensity: a resident tile of n rows does about n
# flops per byte of the streamed tiles it loads, and a chip is compute-bound above its
# peak bf16 flops / HBM bandwidth: ~220 on v4 (275 TFLOP/s, 1.2 TB/s), ~240 on v5e (197,
# 0.82), ~170 on v5p (459, 2.8), ~560 on v6e (918, 1.6). So 512-row resident tiles, and
# 1024 on v6e. VMEM: the largest kernel (dK/dV, Dp = 256, float32) holds four float32
# block_k x block_q temporaries (S^T, P^T, dP^T, dS^T: 1 MiB each at 512 x 512), two float32
# block_k x Dp accumulators and double-buffered q, dO, k, v tiles, ~10 MiB; v6e's
# 1024-row tiles about twice that.
_V6 = TpuBlockSizes(block_q=1024, block_k=512, block_q_dkv=512, block_k_dkv=1024,
                    block_q_dq=1024, block_k_dq=512)
_GENERATION_DEFAULTS = {"v4": TpuBlockSizes(), "v5 lite": TpuBlockSizes(),
                        "v5e": TpuBlockSizes(), "v5": TpuBlockSizes(), "v6": _V6}
_FALLBACK_DEFAULT = TpuBlockSizes()


def default_tpu_block_sizes(device_kind: str | None = None) -> TpuBlockSizes:
  """Default tiles for a TPU generation (`device_kind` as jax reports it, e.g. "TPU v5 lite";
  None: the default device's, or the generic default off a TPU)."""
  if device_kind is None:
    dev = jax.devices()[0]
    device_kind = dev.device_kind if dev.platform == "tpu" else ""
  kind = device_kind.lower()
  for key in sorted(_GENERATION_DEFAULTS, key=len, reverse=True):  # "v5 lite" before "v5"
    if key in kind:
      return _GENERATION_DEFAULTS[key]
  return _FALLBACK_DEFAULT


# --- interpreter -------------------------------------------------------------------------------


def interpret_params(detect_races: bool = False) -> pltpu.InterpretParams:
  """Pallas' TPU interpreter: VMEM / SMEM / HBM and DMAs simulated on the CPU, uninitialised
  memory NaN, out-of-bounds reads raising; optionally its race detector (`races_found`)."""
  return pltpu.InterpretParams(detect_races=detect_races, uninitialized_memory="nan",
                               out_of_bounds_reads="raise")


def races_found() -> bool:
  """Whether the TPU interpreter's race detector reported a race in its last run."""
  # jax 0.10 has no public accessor for the detector's state; it is the module global
  # `races` of the interpreter (None before any run with detect_races=True).
  for name in ("jax._src.pallas.mosaic.interpret.interpret_pallas_call",
               "jax._src.pallas.mosaic.interpret"):
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    if hasattr(module, "races"):
      return bool(module.races is not None and module.races.races_found)
  raise RuntimeError(f"jax {jax.__version__}: the TPU interpreter's race state was not found "
                     "(looked for `races` in jax._src.pallas.mosaic.interpret).")


InterpretArg = Union[bool, pltpu.InterpretParams]


def _interpret(interpret: InterpretArg):
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  return interpret_params() if interpret else False


# --- shared pieces -----------------------------------------------------------------------------


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pow2_lanes(n: int) -> int:
  """The smallest 128 x 2^k >= n."""
  return LANES * (1 << max(-(-n // LANES) - 1, 0).bit_length())


def _dot(a, b, contract_a: int, contract_b: int):
  """2-D matmul with float32 accumulation; float32 operands at HIGHEST precision (the MXU's
  multi-pass float32, not one bf16 pass), bf16 operands as they are."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _rows_to_lanes(row):
  """(1, n) -> (n, 128): each row value replicated along the lanes (as the accumulator
  statistics are kept), by a broadcast and an (8, 128)-aligned transpose when n % 128 == 0."""
  return jnp.transpose(jnp.broadcast_to(row, (LANES, row.shape[-1])))


def _lanes_to_row(x):
  """(n, 128) lane-replicated -> (1, n), the inverse of `_rows_to_lanes`."""
  return jnp.transpose(x)[:1, :]


def kv_block_index(q_tile, k_tile, kv_len, *, block_q: int, block_k: int, num_k_blocks: int,
                   num_q_blocks: int, causal: bool, causal_offset: int):
  """The key block that grid step (q_tile, k_tile) loads (forward, dQ kernels).

  Tiles the query tile needs are loaded as they are; a tile past its causal end or its kv
  length maps to the last tile it needs, the block already in VMEM from the previous step,
  so no DMA is issued for it. A query tile that needs no key at all (kv length 0, or the
  first rows of causal T > S; with a causal mask these come first) maps to the block the
  last query tile of the previous head ended on, which is the previous step's block
  whenever the previous step is of the same example."""
  ranges = functools.partial(c.kv_block_ranges, block_q=block_q, block_k=block_k,
                             num_k_blocks=num_k_blocks, causal=causal,
                             causal_offset=causal_offset, kv_len=kv_len)
  _, n_end = ranges(q_tile * block_q)
  _, n_end_last = ranges((num_q_blocks - 1) * block_q)
  return jnp.where(n_end > 0, jnp.minimum(k_tile, n_end - 1), jnp.maximum(n_end_last - 1, 0))


def q_block_index(k_tile, q_tile, kv_len, *, block_q: int, block_k: int, num_q_blocks: int,
                  causal: bool, causal_offset: int):
  """(query block, skipped) that grid step (k_tile, q_tile) of the dK/dV kernel loads.

  Query tiles above the key tile's causal start map to its first visited tile (loaded once,
  then used); when the key tile is past kv_length, every step maps to the last query block
  of the last head, which the previous key tile left in VMEM. Returns the block index and
  a 0/1 flag "this key tile is skipped" (the caller then also pins the head)."""
  lo, _ = c.q_block_ranges(k_tile * block_k, block_k, block_q, num_q_blocks, causal=causal,
                           causal_offset=causal_offset, kv_len=kv_len)
  skipped = lo >= num_q_blocks
  idx = jnp.where(skipped, num_q_blocks - 1, jnp.maximum(q_tile, lo))
  return idx, skipped


def _semantics(*kinds):
  return pltpu.CompilerParams(dimension_semantics=kinds)


# --- forward -----------------------------------------------------------------------------------


def _forward_kernel(kvl_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                    scale: float, causal: bool, causal_offset: int, block_q: int,
                    block_k: int, num_k_blocks: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  kv_len = kvl_ref[b]
  q_start, k_start = i * block_q, j * block_k
  n_full, n_end = c.kv_block_ranges(q_start, block_q, block_k, num_k_blocks, causal=causal,
                                    causal_offset=causal_offset, kv_len=kv_len)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, c.MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step(masked: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = _dot(q, k, 1, 1) * (scale * c.LOG2E)  # [block_q, block_k] base-2 logits
    if masked:
      mask = c.tile_mask(q_start, k_start, block_q, block_k, causal=causal,
                         causal_offset=causal_offset, kv_len=kv_len)
      s = jnp.where(mask, s, c.MASK_VALUE)
    m_prev = m_sc[...]  # [block_q, 128], every lane the same
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new[:, :1])
    if masked:  # a row masked everywhere so far has m_new == MASK_VALUE and p == 1
      p = jnp.where(mask, p, 0.0)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v, 1, 0)
    m_sc[...] = m_new

  pl.when(j < n_full)(lambda: step(False))
  pl.when(jnp.logical_and(j >= n_full, j < n_end))(lambda: step(True))

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0  # nothing to attend to: output 0, lse = +inf (P = 0 in the backward)
    o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l)[:, :1]).astype(o_ref.dtype)
    lse = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log2(jnp.where(empty, 1.0, l)))
    lse_ref[...] = _lanes_to_row(lse)


def _query_major_maps(bq, bk, nq, nk, groups, causal, causal_offset):
  """Index maps of the grids (B, H, query tiles i, key tiles j) of the forward and dQ kernels:
  the query tile (and output), the key/value tile (kv_block_index: a skipped tile maps to the
  block already resident, so no copy is issued) of the head's kv group, and the per-row
  residual (LSE, delta) row [B, H, 1, T]."""
  kv_index = functools.partial(kv_block_index, block_q=bq, block_k=bk, num_k_blocks=nk,
                               num_q_blocks=nq, causal=causal, causal_offset=causal_offset)

  def q_map(bi, hi, i, j, kvl):
    return bi, i, hi

  def kv_map(bi, hi, i, j, kvl):
    return bi, kv_index(i, j, kvl[bi]), lax.div(hi, groups)

  def row_map(bi, hi, i, j, kvl):
    return bi, hi, 0, i

  return q_map, kv_map, row_map


def _forward(q, k, v, kv_lengths, *, scale, causal, causal_offset, block_sizes, heads,
             kv_heads, head_dim, interpret):
  """q [B, Tp, H*Dp], k, v [B, Sp, Hkv*Dp], kv_lengths [B] int32 ->
  out [B, Tp, H*Dp], lse [B, H, 1, Tp] float32 (base 2)."""
  b, tp, _ = q.shape
  sp = k.shape[1]
  groups = heads // kv_heads
  bq, bk, dp = block_sizes.block_q, block_sizes.block_k, head_dim
  nq, nk = tp // bq, sp // bk
  q_map, kv_map, lse_map = _query_major_maps(bq, bk, nq, nk, groups, causal, causal_offset)

  kernel = functools.partial(_forward_kernel, scale=scale, causal=causal,
                             causal_offset=causal_offset, block_q=bq, block_k=bk,
                             num_k_blocks=nk)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, heads, nq, nk),
      in_specs=[pl.BlockSpec((None, bq, dp), q_map),
                pl.BlockSpec((None, bk, dp), kv_map),
                pl.BlockSpec((None, bk, dp), kv_map)],
      out_specs=[pl.BlockSpec((None, bq, dp), q_map),
                 pl.BlockSpec((None, None, 1, bq), lse_map)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),  # running max m (base 2)
                      pltpu.VMEM((bq, LANES), jnp.float32),  # running sum l
                      pltpu.VMEM((bq, dp), jnp.float32)])  # output accumulator
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, heads, 1, tp), jnp.float32)],
      compiler_params=_semantics("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="tpu_flash_attention_forward",
  )(kv_lengths, q, k, v)


# --- dQ ----------------------------------------------------------------------------------------


def _dq_kernel(kvl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, lse_sc,
               delta_sc, dq_sc, *, scale: float, causal: bool, causal_offset: int,
               block_q: int, block_k: int, num_k_blocks: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  kv_len = kvl_ref[b]
  q_start, k_start = i * block_q, j * block_k
  n_full, n_end = c.kv_block_ranges(q_start, block_q, block_k, num_k_blocks, causal=causal,
                                    causal_offset=causal_offset, kv_len=kv_len)

  @pl.when(j == 0)
  def _init():
    lse_sc[...] = _rows_to_lanes(lse_ref[...])  # columns for this query tile, once
    delta_sc[...] = _rows_to_lanes(delta_ref[...])
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def step(masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = _dot(q, k, 1, 1) * (scale * c.LOG2E)
    if masked:
      mask = c.tile_mask(q_start, k_start, block_q, block_k, causal=causal,
                         causal_offset=causal_offset, kv_len=kv_len)
      s = jnp.where(mask, s, c.MASK_VALUE)
    p = jnp.exp2(s - lse_sc[:, :1])  # masked: exp2(MASK_VALUE - lse) = 0; empty: lse = inf
    dp = _dot(do, v, 1, 1)
    ds = p * (dp - delta_sc[:, :1])
    dq_sc[...] += _dot(ds.astype(k.dtype), k, 1, 0)

  pl.when(j < n_full)(lambda: step(False))
  pl.when(jnp.logical_and(j >= n_full, j < n_end))(lambda: step(True))

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse, delta, kv_lengths, *, scale, causal, causal_offset, block_sizes,
        heads, kv_heads, head_dim, interpret):
  b, tp, _ = q.shape
  sp = k.shape[1]
  groups = heads // kv_heads
  bq, bk, dp = block_sizes.block_q_dq, block_sizes.block_k_dq, head_dim
  nq, nk = tp // bq, sp // bk
  q_map, kv_map, row_map = _query_major_maps(bq, bk, nq, nk, groups, causal, causal_offset)

  kernel = functools.partial(_dq_kernel, scale=scale, causal=causal,
                             causal_offset=causal_offset, block_q=bq, block_k=bk,
                             num_k_blocks=nk)
  q_spec = pl.BlockSpec((None, bq, dp), q_map)
  kv_spec = pl.BlockSpec((None, bk, dp), kv_map)
  row_spec = pl.BlockSpec((None, None, 1, bq), row_map)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, heads, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),  # lse, lane-replicated
                      pltpu.VMEM((bq, LANES), jnp.float32),  # delta, lane-replicated
                      pltpu.VMEM((bq, dp), jnp.float32)])  # dQ accumulator
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_semantics("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="tpu_flash_attention_dq",
  )(kv_lengths, q, k, v, do, lse, delta)


# --- dK, dV ------------------------------------------------------------------------------------


def _dkdv_kernel(kvl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 dk_sc, dv_sc, *, scale: float, causal: bool, causal_offset: int, groups: int,
                 block_q: int, block_k: int, num_q_blocks: int):
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  kv_len = kvl_ref[b]
  q_start, k_start = i * block_q, j * block_k
  lo, mid = c.q_block_ranges(k_start, block_k, block_q, num_q_blocks, causal=causal,
                             causal_offset=causal_offset, kv_len=kv_len)

  @pl.when(jnp.logical_and(g == 0, i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def step(masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    # Transposed tile S^T = K Q^T [block_k, block_q]: the LSE and delta rows broadcast
    # along it as stored, and P^T, dS^T are the left operands of dV += P^T dO, dK += dS^T Q.
    st = _dot(k, q, 1, 1) * (scale * c.LOG2E)
    if masked:
      mask = c.tile_mask(q_start, k_start, block_q, block_k, causal=causal,
                         causal_offset=causal_offset, kv_len=kv_len, keys_first=True)
      st = jnp.where(mask, st, c.MASK_VALUE)
    pt = jnp.exp2(st - lse_ref[...])
    dv_sc[...] += _dot(pt.astype(do.dtype), do, 1, 0)
    dpt = _dot(v, do, 1, 1)
    dst = pt * (dpt - delta_ref[...])
    dk_sc[...] += _dot(dst.astype(q.dtype), q, 1, 0)

  pl.when(jnp.logical_and(i >= lo, i < mid))(lambda: step(True))
  pl.when(i >= mid)(lambda: step(False))

  @pl.when(jnp.logical_and(g == groups - 1, i == num_q_blocks - 1))
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkdv(q, k, v, do, lse, delta, kv_lengths, *, scale, causal, causal_offset, block_sizes,
          heads, kv_heads, head_dim, interpret):
  b, tp, _ = q.shape
  sp = k.shape[1]
  groups = heads // kv_heads
  bq, bk, dp = block_sizes.block_q_dkv, block_sizes.block_k_dkv, head_dim
  nq, nk = tp // bq, sp // bk
  q_index = functools.partial(q_block_index, block_q=bq, block_k=bk, num_q_blocks=nq,
                              causal=causal, causal_offset=causal_offset)
  # A skipped key tile (past kv_length) reloads neither its own k, v (clamped to the last
  # key tile in use) nor any query tile (pinned to the last one of the last head).
  last_k = lambda kvl: jnp.maximum(c.cdiv_nonneg(kvl, bk) - 1, 0)

  def q_map(bi, hk, j, g, i, kvl):
    idx, skipped = q_index(j, i, kvl[bi])
    return bi, idx, hk * groups + jnp.where(skipped, groups - 1, g)

  def row_map(bi, hk, j, g, i, kvl):
    idx, skipped = q_index(j, i, kvl[bi])
    return bi, hk * groups + jnp.where(skipped, groups - 1, g), 0, idx

  def kv_map(bi, hk, j, g, i, kvl):
    return bi, jnp.minimum(j, last_k(kvl[bi])), hk

  def out_map(bi, hk, j, g, i, kvl):
    return bi, j, hk

  kernel = functools.partial(_dkdv_kernel, scale=scale, causal=causal,
                             causal_offset=causal_offset, groups=groups, block_q=bq,
                             block_k=bk, num_q_blocks=nq)
  q_spec = pl.BlockSpec((None, bq, dp), q_map)
  row_spec = pl.BlockSpec((None, None, 1, bq), row_map)
  kv_spec = pl.BlockSpec((None, bk, dp), kv_map)
  out_spec = pl.BlockSpec((None, bk, dp), out_map)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, kv_heads, nk, groups, nq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=[out_spec, out_spec],
      scratch_shapes=[pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dp), jnp.float32)])
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_semantics("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
      interpret=interpret,
      name="tpu_flash_attention_dkdv",
  )(kv_lengths, q, k, v, do, lse, delta)


# --- custom_vjp --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
  causal: bool
  scale: float
  block_sizes: TpuBlockSizes  # before `fit`
  interpret: object  # False or a pltpu.InterpretParams (hashable)


def _plan(cfg: _Config, t: int, s: int, d: int):
  bs = cfg.block_sizes.fit(t, s)
  return bs, _round_up(t, bs.q_multiple), _round_up(s, bs.kv_multiple), _round_up(d, LANES)


def _pad_flat(x, length: int, dp: int):
  """[B, L, H, D] -> [B, length, H * dp] (zero padding, then a free reshape)."""
  b, l, h, d = x.shape
  if (l, d) != (length, dp):
    x = jnp.pad(x, [(0, 0), (0, length - l), (0, 0), (0, dp - d)])
  return x.reshape(b, length, h * dp)


def _unflat(x, length: int, heads: int, d: int):
  b, lp, _ = x.shape
  return x.reshape(b, lp, heads, -1)[:, :length, :, :d]


@functools.lru_cache(maxsize=256)
def _make_attention(cfg: _Config, q_shape: tuple, k_shape: tuple):
  """custom_vjp function of (q, k, v, kv_lengths [B] int32) for one static configuration."""
  _, t, h, d = q_shape
  _, s, hkv, _ = k_shape
  bs, tp, sp, dp = _plan(cfg, t, s, d)
  kw = dict(scale=cfg.scale, causal=cfg.causal, causal_offset=s - t, block_sizes=bs,
            heads=h, kv_heads=hkv, head_dim=dp, interpret=cfg.interpret)

  @jax.custom_vjp
  def attn(q, k, v, kv_lengths):
    return fwd(q, k, v, kv_lengths)[0]

  def fwd(q, k, v, kv_lengths):
    qp, kp, vp = _pad_flat(q, tp, dp), _pad_flat(k, sp, dp), _pad_flat(v, sp, dp)
    out_p, lse = _forward(qp, kp, vp, kv_lengths, **kw)
    return _unflat(out_p, t, h, d), (qp, kp, vp, kv_lengths, out_p, lse)

  def bwd(res, dout):
    qp, kp, vp, kv_lengths, out_p, lse = res
    # Padded query rows have dO = 0, so delta = 0 and dS = 0 there: they add nothing.
    dout_p = _pad_flat(dout.astype(qp.dtype), tp, dp)
    b = qp.shape[0]
    delta = jnp.sum(out_p.astype(jnp.float32).reshape(b, tp, h, dp)
                    * dout_p.astype(jnp.float32).reshape(b, tp, h, dp), axis=-1)
    delta = jnp.transpose(delta, (0, 2, 1))[:, :, None, :]  # [B, H, 1, Tp]
    dq = _dq(qp, kp, vp, dout_p, lse, delta, kv_lengths, **kw)
    dk, dv = _dkdv(qp, kp, vp, dout_p, lse, delta, kv_lengths, **kw)
    kv_ct = jnp.zeros(kv_lengths.shape, jax.dtypes.float0)
    return (_unflat(dq, t, h, d), _unflat(dk, s, hkv, d), _unflat(dv, s, hkv, d), kv_ct)

  attn.defvjp(fwd, bwd)
  return attn


def unsupported_reason(head_dim: int, dtype) -> Optional[str]:
  """Shape / dtype limits of the TPU kernels as an `unsupported_reason` sentence."""
  if head_dim > MAX_HEAD_DIM:
    return f"head_dim={head_dim} exceeds the TPU kernel's maximum of {MAX_HEAD_DIM}."
  if jnp.dtype(dtype) not in TPU_DTYPES:
    return f"the TPU kernel takes float32 or bfloat16, not {jnp.dtype(dtype)}."
  return None


def tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                  kv_lengths: jax.Array | None = None, scale: float | None = None,
                  block_sizes: TpuBlockSizes | None = None,
                  interpret: InterpretArg = False) -> jax.Array:
  """Flash attention with the Mosaic TPU kernels (semantics of reference.py).

  Args:
    q: [B, T, H, D]; k, v: [B, S, Hkv, D], H a multiple of Hkv; float32 or bfloat16,
      D <= 256.
    causal: bottom-right aligned causal mask (key j visible to query i iff j <= i + S - T).
    kv_lengths: optional [B] ints (clipped to [0, S]); keys j >= kv_lengths[b] are ignored.
    scale: logit scale, default 1 / sqrt(D).
    block_sizes: tiles (None: `default_tpu_block_sizes()` for the default device).
    interpret: False (Mosaic on a TPU), True (Pallas' TPU interpreter, `interpret_params()`)
      or a `pltpu.InterpretParams`.

  Returns:
    [B, T, H, D] in q's dtype; differentiable in q, k, v (custom_vjp).
  """
  validate_inputs(q, k, v, kv_lengths, causal)
  reason = unsupported_reason(q.shape[-1], q.dtype)
  if reason is not None:
    raise ValueError(reason)
  b, _, _, d = q.shape
  s = k.shape[1]
  scale = float(1.0 / d ** 0.5 if scale is None else scale)
  if block_sizes is None:
    block_sizes = default_tpu_block_sizes()
  cfg = _Config(causal=bool(causal), scale=scale, block_sizes=block_sizes,
                interpret=_interpret(interpret))
  if kv_lengths is None:  # the kv length also masks the padded keys S..Sp
    kv_lengths = jnp.full((b,), s, jnp.int32)
  else:
    kv_lengths = jnp.clip(jnp.asarray(kv_lengths).astype(jnp.int32), 0, s)
  return _make_attention(cfg, tuple(q.shape), tuple(k.shape))(q, k, v, kv_lengths)
