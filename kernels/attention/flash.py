"""Our flash attention without dispatch: padding, tile plan and the custom_vjp around the kernels.

    pallas_attention(q, k, v, *, causal, kv_lengths, scale, block_sizes, interpret)
        forward.py + backward.py (Pallas' Triton lowering on a GPU, its interpreter anywhere)
    mosaic_attention(q, k, v, *, ..., mosaic_block_sizes, backward, mosaic_backward_block_sizes)
        mosaic.py forward + mosaic_backward.py or backward.py gradients (Hopper; interpreter)

Both check their inputs (interface.validate_inputs), take the default scale 1 / sqrt(D), clip
kv_lengths to [0, S] and call one cached `jax.custom_vjp` function per static configuration
(`_PallasConfig` + true T, S, D). That function pads T and S to multiples of every kernel's
tiles and D to the kernels' head dim (`_plan`), so the kernels only ever see in-bounds
tiles; the forward saves the padded inputs, output and LSE for the backward, and the
results are sliced back to the true sizes. The backend adapters (backends/pallas.py,
backends/mosaic.py) call these two functions; benchmarks call them to pass explicit tiles.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from kernels.attention import backward as bwd_kernels
from kernels.attention import forward as fwd_kernels
from kernels.attention import mosaic as mosaic_kernels
from kernels.attention import mosaic_backward as mosaic_bwd
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.interface import HALF_DTYPES, validate_inputs

MAX_HEAD_DIM = 256


def unsupported_head_dim(head_dim: int) -> Optional[str]:
  """The kernels' one shape limit, as an `unsupported_reason` sentence (None: supported)."""
  if head_dim > MAX_HEAD_DIM:
    return f"head_dim={head_dim} exceeds the kernel's maximum of {MAX_HEAD_DIM}."
  return None


@dataclasses.dataclass(frozen=True)
class _PallasConfig:
  causal: bool
  scale: float
  block_sizes: Optional[BlockSizes]  # None: per-backend default
  interpret: bool
  forward: str = "triton"  # or "mosaic" (mosaic.py)
  mosaic_block_sizes: Optional[mosaic_kernels.MosaicBlockSizes] = None
  backward: str = "triton"  # or "mosaic" (mosaic_backward.py; head dims <= 128)
  # Set (by mosaic_attention) whenever backward == "mosaic".
  mosaic_backward_block_sizes: Optional[mosaic_bwd.MosaicBackwardBlockSizes] = None


def _padded_head_dim(d: int) -> int:
  # Triton tensors must have power-of-two sizes and dots need >= 16: 40 -> 64, 72/96 -> 128.
  return max(16, 1 << (d - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad_to(x: jax.Array, length: int, dim_size: int) -> jax.Array:
  pads = [(0, 0), (0, length - x.shape[1]), (0, 0), (0, dim_size - x.shape[3])]
  if all(p == (0, 0) for p in pads):
    return x
  return jnp.pad(x, pads)


def _plan(cfg: _PallasConfig, q_shape, k_shape, dtype):
  """(backward/Triton tiles, Mosaic tiles or None, padded T, padded S, padded D)."""
  _, t, _, d = q_shape
  s = k_shape[1]
  mosaic = cfg.forward == "mosaic"
  dp = mosaic_kernels.padded_head_dim(d) if mosaic else _padded_head_dim(d)
  bs = cfg.block_sizes
  if bs is None:
    bs = default_block_sizes("cpu" if cfg.interpret else "gpu", dp, cfg.causal, dtype)
  bs = bs.fit(t, s)
  q_mult, kv_mult = bs.q_multiple, bs.kv_multiple
  mbs = None
  if mosaic:  # Mosaic tiles are multiples of 64, the backward's powers of two
    mbs = cfg.mosaic_block_sizes or mosaic_kernels.default_mosaic_block_sizes(
        dp, cfg.causal, t, s)
    q_mult = math.lcm(q_mult, mbs.q_multiple)
    kv_mult = math.lcm(kv_mult, mbs.block_kv)
  if cfg.backward == "mosaic":
    mbb = cfg.mosaic_backward_block_sizes
    q_mult = math.lcm(q_mult, mbb.q_multiple)
    kv_mult = math.lcm(kv_mult, mbb.kv_multiple)
  return bs, mbs, _round_up(t, q_mult), _round_up(s, kv_mult), dp


def _static_kwargs(cfg: _PallasConfig, t: int, s: int, sp: int, has_kv_lengths: bool, bs):
  return dict(scale=cfg.scale, causal=cfg.causal, causal_offset=s - t,
              static_kv_len=(s if (sp > s and not has_kv_lengths) else None),
              block_sizes=bs, interpret=cfg.interpret)


@functools.lru_cache(maxsize=256)
def _make_pallas_attention(cfg: _PallasConfig, t: int, s: int, d: int):
  """custom_vjp function for one static configuration (true T, S, D are closed over)."""

  @jax.custom_vjp
  def attn(q, k, v, kv_lengths):
    return fwd(q, k, v, kv_lengths)[0]

  def fwd(q, k, v, kv_lengths):
    bs, mbs, tp, sp, dp = _plan(cfg, q.shape, k.shape, q.dtype)
    qp, kp, vp = _pad_to(q, tp, dp), _pad_to(k, sp, dp), _pad_to(v, sp, dp)
    kw = _static_kwargs(cfg, t, s, sp, kv_lengths is not None, bs)
    if mbs is not None:
      out_p, lse = mosaic_kernels.mosaic_forward(
          qp, kp, vp, kv_lengths, scale=cfg.scale, causal=cfg.causal,
          causal_offset=kw["causal_offset"], static_kv_len=kw["static_kv_len"],
          block_sizes=mbs, interpret=cfg.interpret)
    else:
      out_p, lse = fwd_kernels.flash_forward(qp, kp, vp, kv_lengths, **kw)
    return out_p[:, :t, :, :d], (qp, kp, vp, kv_lengths, out_p, lse)

  def bwd(res, dout):
    qp, kp, vp, kv_lengths, out_p, lse = res
    bs, _, tp, sp, dp = _plan(cfg, (qp.shape[0], t, qp.shape[2], d),
                              (kp.shape[0], s, kp.shape[2], d), qp.dtype)
    kw = _static_kwargs(cfg, t, s, sp, kv_lengths is not None, bs)
    # Padded query rows have dout == 0, hence delta == 0 and dS == 0: they add nothing.
    dout_p = _pad_to(dout.astype(out_p.dtype), tp, dp)
    kv_ct = None if kv_lengths is None else jnp.zeros(kv_lengths.shape, jax.dtypes.float0)
    if cfg.backward == "mosaic":
      dq, dk, dv = mosaic_bwd.mosaic_backward(
          qp, kp, vp, out_p, dout_p, lse, kv_lengths, scale=cfg.scale, causal=cfg.causal,
          causal_offset=kw["causal_offset"], static_kv_len=kw["static_kv_len"],
          block_sizes=cfg.mosaic_backward_block_sizes, interpret=cfg.interpret)
      return dq[:, :t, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d], kv_ct
    delta = bwd_kernels.flash_delta(out_p, dout_p, block_q=bs.block_q_dq,
                                    interpret=cfg.interpret)
    dk, dv = bwd_kernels.flash_dkdv(qp, kp, vp, dout_p, lse, delta, kv_lengths, **kw)
    dq = bwd_kernels.flash_dq(qp, kp, vp, dout_p, lse, delta, kv_lengths, **kw)
    return dq[:, :t, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d], kv_ct

  attn.defvjp(fwd, bwd)
  return attn


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     kv_lengths: jax.Array | None = None, scale: float | None = None,
                     block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
  """Our Pallas flash attention (forward + custom backward), without dispatch.

  Same arguments and semantics as `dot_product_attention`, plus explicit `block_sizes`
  (None: the per-backend default, see block_sizes.py). Inputs are padded internally to tile
  multiples and a power-of-two head dim, so any T, S and D <= 256 work.
  """
  return _flash_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
                          block_sizes=block_sizes, interpret=interpret, kernel="Pallas")


def _flash_attention(q, k, v, *, causal, kv_lengths, scale, block_sizes, interpret, kernel,
                     **cfg_extra):
  """Shared entry of pallas_attention / mosaic_attention: checks, default scale, kv_lengths
  clipped to [0, S], then the cached custom_vjp function for this static configuration."""
  validate_inputs(q, k, v, kv_lengths)
  t, s, d = q.shape[1], k.shape[1], q.shape[3]
  if d > MAX_HEAD_DIM:
    raise ValueError(f"head_dim={d}; the {kernel} kernel supports head dims up to "
                     f"{MAX_HEAD_DIM}.")
  scale = float(1.0 / d ** 0.5 if scale is None else scale)
  cfg = _PallasConfig(causal=bool(causal), scale=scale, block_sizes=block_sizes,
                      interpret=bool(interpret), **cfg_extra)
  if kv_lengths is not None:
    kv_lengths = jnp.clip(jnp.asarray(kv_lengths).astype(jnp.int32), 0, s)
  return _make_pallas_attention(cfg, t, s, d)(q, k, v, kv_lengths)


def mosaic_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     kv_lengths: jax.Array | None = None, scale: float | None = None,
                     block_sizes: BlockSizes | None = None,
                     mosaic_block_sizes: mosaic_kernels.MosaicBlockSizes | None = None,
                     backward: str = "auto",
                     mosaic_backward_block_sizes: (
                         mosaic_bwd.MosaicBackwardBlockSizes | None) = None,
                     interpret: bool = False) -> jax.Array:
  """Attention with the Mosaic GPU (Hopper) kernels.

  Same arguments and semantics as `pallas_attention`; bf16/fp16 only. The forward is
  mosaic.py's; `backward` picks the gradient kernels: "mosaic" (mosaic_backward.py, head
  dims <= 128), "triton" (backward.py, tiles `block_sizes`), or "auto" (mosaic up to head
  dim 128, triton above). `mosaic_block_sizes` / `mosaic_backward_block_sizes` are the
  Mosaic tiles (None: defaults). `interpret=True` runs the Mosaic kernels in Pallas' GPU
  interpreter (see mosaic.py for what it checks) and the Triton ones in the Pallas one.
  """
  if jnp.dtype(q.dtype) not in HALF_DTYPES:
    raise ValueError(f"dtype {q.dtype}: the Mosaic GPU kernel takes bfloat16 or float16.")
  if backward not in ("auto", "mosaic", "triton"):
    raise ValueError(f"backward={backward!r}; allowed: 'auto', 'mosaic', 'triton'.")
  dp = mosaic_kernels.padded_head_dim(q.shape[-1])
  if backward == "auto":
    backward = "mosaic" if dp <= mosaic_bwd.MAX_HEAD_DIM else "triton"
  elif backward == "mosaic" and dp > mosaic_bwd.MAX_HEAD_DIM:
    raise ValueError(f"backward='mosaic' at head_dim={q.shape[-1]}: the Mosaic backward "
                     f"supports head dims up to {mosaic_bwd.MAX_HEAD_DIM}; use 'triton'.")
  if backward == "mosaic":  # resolved once here; refuse tiles that cannot compile up front
    mosaic_backward_block_sizes = (mosaic_backward_block_sizes
                                   or mosaic_bwd.MosaicBackwardBlockSizes())
    mosaic_backward_block_sizes.check_fits(dp)
  return _flash_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
                          block_sizes=block_sizes, interpret=interpret, kernel="Mosaic GPU",
                          forward="mosaic", mosaic_block_sizes=mosaic_block_sizes,
                          backward=backward,
                          mosaic_backward_block_sizes=mosaic_backward_block_sizes)
