"""The `triton` implementation slot: kernels written in Triton and called through jax-triton.

jax-triton is an optional dependency that none of our machines has (CPU boxes, and the GPU
hosts' jax 0.11.2 images), and the Triton-language kernels are not written yet (issue 4
lists this backend as later work). Until both exist, `unsupported_reason` always returns a
sentence and the op turns it into a clear ValueError when implementation="triton" is
requested, so `fn` is never reached (called directly, it raises the same sentence). Only
the presence of jax_triton is checked, never imported, so importing the op never needs it.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from kernels.attention.interface import AttentionSpec, Implementation, register_implementation


def jax_triton_available() -> bool:
  return importlib.util.find_spec("jax_triton") is not None


def _reason(backend: str) -> str:
  if not jax_triton_available():
    return ("it needs the optional 'jax-triton' package (pip install jax-triton) and an "
            "NVIDIA GPU; use implementation='pallas' for our kernel through Pallas' own "
            "Triton lowering.")
  if backend != "gpu":
    return f"Triton kernels need a GPU; the default backend is {backend!r}."
  return ("jax-triton is installed, but this backend's Triton-language kernels are not "
          "written yet; use implementation='pallas', which runs the same algorithm through "
          "Pallas' Triton lowering.")


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
  return _reason(spec.backend)


def fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  """Dispatch target of the `triton` implementation (guarded by `unsupported_reason`)."""
  del q, k, v, causal, kv_lengths, scale, interpret
  raise ValueError("implementation='triton' cannot run: " + _reason("gpu"))


IMPLEMENTATION = register_implementation(Implementation("triton", fn, unsupported_reason))
