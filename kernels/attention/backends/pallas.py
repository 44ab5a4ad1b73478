"""The `pallas` implementation: our blocked online-softmax kernels (forward.py, backward.py)
under flash.py's custom_vjp, lowered through Pallas' Triton backend on a GPU, or run on any
backend by Pallas' interpreter (interpret=True: exact, slow)."""
from __future__ import annotations

from typing import Optional

from kernels.attention import flash
from kernels.attention.interface import AttentionSpec, Implementation, register_implementation


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
  reason = flash.unsupported_head_dim(spec.head_dim)
  if reason is not None:
    return reason
  if not spec.interpret and spec.backend != "gpu":
    return (f"the kernel is lowered through Pallas' Triton backend, which needs a GPU, but "
            f"the default backend is {spec.backend!r}; pass interpret=True (slow, exact) or "
            f"use implementation='xla'.")
  return None


def fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  return flash.pallas_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
                                interpret=interpret)


IMPLEMENTATION = register_implementation(Implementation("pallas", fn, unsupported_reason))
