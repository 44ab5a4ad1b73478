"""The `triton` implementation: our kernels written in the Triton language (triton_lang.py),
called through jax-triton's `triton_call` under triton_attention.py's custom_vjp.

On a GPU it needs the optional `triton` and `jax-triton` packages (pip install
"genjax-research[triton]"); with interpret=True the same kernels run in Triton's
interpreter on any backend (needs only `triton`; slow, exact). Only the presence of the
packages is checked here, never an import, so importing the op never needs them; the
kernel module is imported on the first call.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import jax.numpy as jnp

from kernels.attention.interface import AttentionSpec, Implementation, register_implementation

MAX_HEAD_DIM = 256  # = triton_attention.MAX_HEAD_DIM (not imported: that module needs triton)
_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _installed(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def jax_triton_available() -> bool:
  return _installed("jax_triton") and _installed("triton")


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
  if spec.head_dim > MAX_HEAD_DIM:
    return f"head_dim={spec.head_dim} exceeds the Triton kernel's maximum of {MAX_HEAD_DIM}."
  if jnp.dtype(spec.dtype) not in _DTYPES:
    return f"dtype {jnp.dtype(spec.dtype)}; the Triton kernel takes float16, bfloat16 or float32."
  if spec.interpret:
    if not _installed("triton"):
      return ("interpret=True runs the Triton kernels in Triton's interpreter, which needs "
              "the optional 'triton' package (pip install triton).")
    return None
  if not jax_triton_available():
    return ("it needs the optional 'triton' and 'jax-triton' packages (pip install "
            "'genjax-research[triton]') and an NVIDIA GPU; use implementation='pallas' for "
            "our kernel through Pallas' own Triton lowering.")
  if spec.backend != "gpu":
    return (f"Triton kernels need a GPU, but the default backend is {spec.backend!r}; pass "
            f"interpret=True (Triton's interpreter: slow, exact) or use implementation='xla'.")
  return None


def fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  from kernels.attention import triton_attention  # imports triton
  return triton_attention.triton_attention(q, k, v, causal=causal, kv_lengths=kv_lengths,
                                           scale=scale, interpret=interpret)


IMPLEMENTATION = register_implementation(Implementation("triton", fn, unsupported_reason))
