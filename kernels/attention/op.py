"""The attention op: one public entry that checks the call and dispatches it to a backend.

    dot_product_attention(q, k, v, *, causal=False, kv_lengths=None, scale=None,
                          implementation="auto", interpret=None) -> [B, T, H, D]

Implementations (registry `IMPLEMENTATIONS`, names listed by `available_implementations()`),
one adapter module each in backends/, which this module imports and so registers:
  pallas  our blocked online-softmax kernels (forward.py, backward.py) under a custom_vjp
          (flash.py); GPU through Pallas' Triton lowering, or anywhere with interpret=True.
  xla     dense softmax(q k^T) v with float32 logits (reference.py); runs everywhere.
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPU, bf16/fp16.
  mosaic  Hopper kernels in Pallas' Mosaic GPU backend (mosaic.py forward, mosaic_backward.py
          dQ and dK/dV: TMA, wgmma, warp specialisation; head dims > 128 take the pallas
          backward); bf16/fp16; anywhere with interpret=True (Pallas' GPU interpreter).
  triton  jax-triton kernels (backends/triton.py); needs the jax-triton package and refuses
          until its kernels are written.
  pallas_tpu  the same algorithm in Pallas' Mosaic TPU backend (tpu.py: forward, dQ, dK/dV
          kernels, kv_lengths by scalar prefetch); float32 / bfloat16, head dims <= 256; a
          TPU, or anywhere with interpret=True (Pallas' TPU interpreter).
"auto" (`_auto`) picks mosaic on a Hopper GPU (compute capability 9.x) for bf16/fp16 with
head dims <= 128 -- the case GPU runs 3-4 measured on an H100, where it matched or beat
pallas on every row (forward+backward with the Mosaic backward 1.08-1.36x the Triton one at
T >= 2048; T = 512, D = 64 causal: 156 vs 157 TFLOP/s for pallas) -- pallas on other GPUs
and inputs (falling back to xla for inputs the kernel does not take), pallas_tpu on a TPU
when both T and S are at least TPU_MIN_SEQ_LEN (dense XLA below: its T x S logits are small
there; the threshold is a placeholder until a TPU run times both, NOTES.md "TPU"), and xla
on CPU: the interpreters run the kernels correctly but far slower than XLA.
Masking semantics are documented in reference.py (causal is bottom-right aligned).

The shared vocabulary (AttentionSpec, Implementation, the registry, input validation) is
defined in interface.py and the kernels' own entries (pallas_attention, mosaic_attention)
in flash.py; both are re-exported here, where callers have always found them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention import mosaic_backward as mosaic_bwd
from kernels.attention.backends import mosaic as mosaic_backend
from kernels.attention.backends import pallas as pallas_backend
from kernels.attention.backends import pallas_tpu as pallas_tpu_backend
from kernels.attention.flash import MAX_HEAD_DIM, mosaic_attention, pallas_attention
from kernels.attention.interface import (IMPLEMENTATIONS, AttentionSpec, Implementation,
                                         available_implementations, register_implementation,
                                         validate_inputs)

__all__ = [
    "IMPLEMENTATIONS", "MAX_HEAD_DIM", "AttentionSpec", "Implementation",
    "available_implementations", "dot_product_attention", "mosaic_attention",
    "pallas_attention", "register_implementation", "TPU_MIN_SEQ_LEN",
]

# "auto" on a TPU takes pallas_tpu when min(T, S) >= this, xla below (not yet measured: at
# T = S = 1024 dense logits are 4 MiB per head in float32, so XLA's attention still fits and
# fuses well; the TPU benchmark, experiments/benchmarks/attention_tpu.py, will set it).
TPU_MIN_SEQ_LEN = 1024


def _auto(spec: AttentionSpec) -> str:
  if spec.backend == "tpu":
    if (min(spec.q_len, spec.kv_len) >= TPU_MIN_SEQ_LEN
        and pallas_tpu_backend.unsupported_reason(spec) is None):
      return "pallas_tpu"
    return "xla"
  if spec.backend != "gpu":
    return "xla"
  if (spec.head_dim <= mosaic_bwd.MAX_HEAD_DIM and not spec.interpret
      and mosaic_backend.unsupported_reason(spec) is None):
    return "mosaic"  # Hopper, bf16/fp16, D <= 128: measured (GPU runs 3-4)
  if pallas_backend.unsupported_reason(spec) is None:
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
    TypeError: q/k/v not arrays, or causal not a bool (a string such as 'no' is refused,
      not read as true).
    ValueError: bad shapes/dtypes (wrong rank, a zero-size axis, mismatched batch or head
      dims, H not a multiple of Hkv), kv_lengths of the wrong shape or dtype or (when
      concrete) outside [0, S], an unknown implementation, or one that cannot run this
      call here (the message says why).
  """
  validate_inputs(q, k, v, kv_lengths, causal)
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
