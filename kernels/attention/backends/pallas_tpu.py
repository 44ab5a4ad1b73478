"""The `pallas_tpu` implementation: our flash kernels in Pallas' Mosaic TPU backend (tpu.py).

tpu.tpu_attention's forward, dQ and dK/dV kernels under their custom_vjp, with the default
tiles of the default device's TPU generation. float32 / bfloat16, head dims up to 256; a TPU
backend, or any backend with interpret=True (Pallas' TPU interpreter: exact, slow).
"""
from __future__ import annotations

from typing import Optional

from kernels.attention import tpu
from kernels.attention.interface import AttentionSpec, Implementation, register_implementation


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
  reason = tpu.unsupported_reason(spec.head_dim, spec.dtype)
  if reason is not None:
    return reason
  if not spec.interpret and spec.backend != "tpu":
    return (f"the kernel is lowered through Pallas' Mosaic TPU backend, which needs a TPU, "
            f"but the default backend is {spec.backend!r}; pass interpret=True (Pallas' TPU "
            f"interpreter: slow, exact) or use implementation='xla'.")
  return None


def fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  return tpu.tpu_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
                           interpret=interpret)


IMPLEMENTATION = register_implementation(Implementation("pallas_tpu", fn, unsupported_reason))
