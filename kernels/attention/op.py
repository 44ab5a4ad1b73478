"""The attention op: one entry point, an implementation registry, a custom_vjp Pallas path.

    dot_product_attention(q, k, v, *, causal=False, kv_lengths=None, scale=None,
                          implementation="auto", interpret=None) -> [B, T, H, D]

Implementations (registry `IMPLEMENTATIONS`, names listed by `available_implementations()`):
  pallas  our blocked online-softmax kernels (forward.py, backward.py) under a custom_vjp;
          GPU through Pallas' Triton lowering, or anywhere with interpret=True.
  xla     dense softmax(q k^T) v with float32 logits (reference.py); runs everywhere.
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPU, bf16/fp16.
  mosaic  Hopper kernels in Pallas' Mosaic GPU backend (mosaic.py forward, mosaic_backward.py
          dQ and dK/dV: TMA, wgmma, warp specialisation; head dims > 128 take the pallas
          backward); bf16/fp16; anywhere with interpret=True (Pallas' GPU interpreter).
  triton  jax-triton kernels (triton_backend.py); needs the jax-triton package.
"auto" picks mosaic on a Hopper GPU (compute capability 9.x) for bf16/fp16 with head dims
<= 128 -- the case GPU runs 3-4 measured on an H100, where it matched or beat pallas on every
row (forward+backward with the Mosaic backward 1.08-1.36x the Triton one at T >= 2048; T =
512, D = 64 causal: 156 vs 157 TFLOP/s for pallas) -- pallas on other GPUs and inputs
(falling back to xla for inputs the kernel does not take), and xla on CPU/TPU: the
interpreter runs the kernels correctly but far slower than XLA.
Masking semantics are documented in reference.py (causal is bottom-right aligned).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from kernels.attention import backward as bwd_kernels
from kernels.attention import forward as fwd_kernels
from kernels.attention import mosaic as mosaic_kernels
from kernels.attention import mosaic_backward as mosaic_bwd
from kernels.attention import reference
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.registry import Registry

MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # mosaic, cudnn


# --- Problem description passed to every implementation's support check -----------------------


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Static facts about one call, for `Implementation.unsupported_reason`."""
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: jnp.dtype
  causal: bool
  has_kv_lengths: bool
  interpret: bool
  backend: str


@dataclasses.dataclass(frozen=True)
class Implementation:
  """fn(q, k, v, *, causal, kv_lengths, scale, interpret) -> out; `unsupported_reason(spec)`
  returns None when fn can run this call, else a sentence saying why not."""
  name: str
  fn: Callable
  unsupported_reason: Callable[[AttentionSpec], Optional[str]]


IMPLEMENTATIONS: Registry[Implementation] = Registry("attention implementation")


def register_implementation(impl: Implementation) -> Implementation:
  return IMPLEMENTATIONS.register(impl.name, impl)


def available_implementations() -> list[str]:
  return IMPLEMENTATIONS.names()


# --- Pallas: padding + custom_vjp -------------------------------------------------------------


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
  _validate(q, k, v, kv_lengths)
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
  if jnp.dtype(q.dtype) not in _HALF_DTYPES:
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


# --- Validation -------------------------------------------------------------------------------


def _validate(q, k, v, kv_lengths):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D] / [B, S, Hkv, D]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}.")
  b, t, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}.")
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k/v batch and head dim must match q: q {q.shape}, k {k.shape}.")
  hkv = k.shape[2]
  if hkv == 0 or h % hkv:
    raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hkv}) (GQA/MQA).")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  if q.dtype not in [jnp.dtype(x) for x in _FLOAT_DTYPES]:
    raise ValueError(f"dtype {q.dtype} not supported; allowed: float32, bfloat16, float16.")
  if t == 0 or k.shape[1] == 0 or d == 0:
    raise ValueError(f"empty attention: q {q.shape}, k {k.shape}.")
  if kv_lengths is not None:
    kl = jnp.asarray(kv_lengths)
    if kl.shape != (b,) or not jnp.issubdtype(kl.dtype, jnp.integer):
      raise ValueError(f"kv_lengths must be an integer array of shape [B]=({b},); got "
                       f"shape {kl.shape} dtype {kl.dtype}.")


# --- Registered implementations ---------------------------------------------------------------


def _has_cuda() -> bool:
  try:
    return len(jax.devices("cuda")) > 0
  except RuntimeError:
    return False


def _pallas_reason(spec: AttentionSpec) -> Optional[str]:
  if spec.head_dim > MAX_HEAD_DIM:
    return f"head_dim={spec.head_dim} exceeds the kernel's maximum of {MAX_HEAD_DIM}."
  if not spec.interpret and spec.backend != "gpu":
    return (f"the kernel is lowered through Pallas' Triton backend, which needs a GPU, but "
            f"the default backend is {spec.backend!r}; pass interpret=True (slow, exact) or "
            f"use implementation='xla'.")
  return None


def _pallas_fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  return pallas_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
                          interpret=interpret)


def _xla_fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  del interpret
  return reference.mha_reference(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale)


def _is_hopper() -> bool:
  try:
    devs = jax.devices("cuda")
  except RuntimeError:
    return False
  return bool(devs) and str(getattr(devs[0], "compute_capability", "")).startswith("9.")


def _mosaic_reason(spec: AttentionSpec) -> Optional[str]:
  if spec.head_dim > MAX_HEAD_DIM:
    return f"head_dim={spec.head_dim} exceeds the kernel's maximum of {MAX_HEAD_DIM}."
  if jnp.dtype(spec.dtype) not in _HALF_DTYPES:
    return f"the Mosaic GPU kernel takes bfloat16 or float16, not {jnp.dtype(spec.dtype)}."
  if not spec.interpret and (spec.backend != "gpu" or not _is_hopper()):
    return ("the Mosaic GPU kernel uses Hopper's TMA and wgmma and needs a compute "
            f"capability 9.x GPU (the default backend is {spec.backend!r}); pass "
            "interpret=True (Pallas' GPU interpreter) or use implementation='pallas'.")
  return None


def _mosaic_fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  return mosaic_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
                          interpret=interpret)


def _cudnn_reason(spec: AttentionSpec) -> Optional[str]:
  if spec.backend != "gpu" or not _has_cuda():
    return f"cuDNN attention needs an NVIDIA GPU; the default backend is {spec.backend!r}."
  if jnp.dtype(spec.dtype) not in _HALF_DTYPES:
    return f"cuDNN flash attention takes bfloat16 or float16, not {jnp.dtype(spec.dtype)}."
  if spec.head_dim % 8 or spec.head_dim > 128:
    return f"cuDNN flash attention needs head_dim a multiple of 8 and <= 128; got {spec.head_dim}."
  if spec.causal and spec.q_len != spec.kv_len:
    return ("cuDNN's causal mask is top-left aligned; this op's causal mask is bottom-right "
            f"aligned, so T != S (T={spec.q_len}, S={spec.kv_len}) is refused.")
  return None


def _cudnn_fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  del interpret
  b, t = q.shape[:2]
  q_lens = None if kv_lengths is None else jnp.full((b,), t, jnp.int32)
  out = jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=causal, query_seq_lengths=q_lens,
      key_value_seq_lengths=kv_lengths, implementation="cudnn")
  if kv_lengths is not None:  # rows with nothing to attend to are zero in this op
    out = jnp.where((kv_lengths > 0)[:, None, None, None], out, 0).astype(out.dtype)
  return out


def _triton_reason(spec: AttentionSpec) -> Optional[str]:
  from kernels.attention import triton_backend
  return triton_backend.unsupported_reason(spec)


def _triton_fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  from kernels.attention import triton_backend
  del interpret
  return triton_backend.triton_attention(q, k, v, causal=causal, kv_lengths=kv_lengths,
                                         scale=scale)


register_implementation(Implementation("pallas", _pallas_fn, _pallas_reason))
register_implementation(Implementation("xla", _xla_fn, lambda spec: None))
register_implementation(Implementation("cudnn", _cudnn_fn, _cudnn_reason))
register_implementation(Implementation("mosaic", _mosaic_fn, _mosaic_reason))
register_implementation(Implementation("triton", _triton_fn, _triton_reason))


# --- Dispatch ---------------------------------------------------------------------------------


def _auto(spec: AttentionSpec) -> str:
  if spec.backend != "gpu":
    return "xla"
  if (spec.head_dim <= mosaic_bwd.MAX_HEAD_DIM and not spec.interpret
      and _mosaic_reason(spec) is None):
    return "mosaic"  # Hopper, bf16/fp16, D <= 128: measured (GPU runs 3-4)
  if _pallas_reason(spec) is None:
    return "pallas"
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                          kv_lengths: jax.Array | None = None, scale: float | None = None,
                          implementation: str = "auto",
                          interpret: bool | None = None) -> jax.Array:
  """Scaled dot-product attention, layout [B, T, H, D] (as jax.nn.dot_product_attention).

  Args:
    q: [B, T, H, D] queries; k, v: [B, S, Hkv, D] with H a multiple of Hkv (GQA / MQA).
      float32, bfloat16 or float16.
    causal: query i attends key j iff j <= i + (S - T) (bottom-right aligned; the usual
      lower triangle when T == S).
    kv_lengths: optional [B] ints; keys j >= kv_lengths[b] are ignored. A row with nothing
      to attend to returns zeros (and zero gradients).
    scale: logit scale; default 1 / sqrt(D).
    implementation: "auto" or one of `available_implementations()`.
    interpret: Pallas interpret mode; None means "interpret when the default backend is CPU".

  Returns:
    [B, T, H, D] in q's dtype.

  Raises:
    ValueError: bad shapes/dtypes, an unknown implementation, or one that cannot run this
      call here (the message says why).
  """
  _validate(q, k, v, kv_lengths)
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  b, t, h, d = q.shape
  spec = AttentionSpec(batch=b, q_len=t, kv_len=k.shape[1], num_heads=h, num_kv_heads=k.shape[2],
                       head_dim=d, dtype=q.dtype, causal=bool(causal),
                       has_kv_lengths=kv_lengths is not None, interpret=bool(interpret),
                       backend=backend)
  name = _auto(spec) if implementation == "auto" else implementation
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; allowed: 'auto', "
                     + ", ".join(repr(n) for n in available_implementations()) + ".")
  impl = IMPLEMENTATIONS.get(name)
  reason = impl.unsupported_reason(spec)
  if reason is not None:
    raise ValueError(f"implementation={name!r} cannot run this call: {reason}")
  if kv_lengths is not None:
    kv_lengths = jnp.asarray(kv_lengths)
  return impl.fn(q, k, v, causal=bool(causal), kv_lengths=kv_lengths, scale=scale,
                 interpret=bool(interpret))
