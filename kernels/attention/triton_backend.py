"""The `triton` implementation slot: kernels written in Triton and called through jax-triton.

jax-triton is an optional dependency that none of our machines has (CPU boxes, and the GPU
hosts' jax 0.11.2 images), and the Triton-language kernels are not written yet (issue 4
lists this backend as later work). Until both exist, `unsupported_reason` always returns a
sentence and the op turns it into a clear ValueError when implementation="triton" is
requested, so `triton_attention` is never reached. The import of jax_triton stays lazy so
that importing the op never requires it.
"""
from __future__ import annotations

import importlib.util
from typing import Optional


def jax_triton_available() -> bool:
  return importlib.util.find_spec("jax_triton") is not None


def unsupported_reason(spec) -> Optional[str]:
  if not jax_triton_available():
    return ("it needs the optional 'jax-triton' package (pip install jax-triton) and an "
            "NVIDIA GPU; use implementation='pallas' for our kernel through Pallas' own "
            "Triton lowering.")
  if spec.backend != "gpu":
    return f"Triton kernels need a GPU; the default backend is {spec.backend!r}."
  return ("jax-triton is installed, but this backend's Triton-language kernels are not "
          "written yet; use implementation='pallas', which runs the same algorithm through "
          "Pallas' Triton lowering.")


def triton_attention(q, k, v, *, causal, kv_lengths, scale):
  """Dispatch target of the `triton` implementation (guarded by `unsupported_reason`)."""
  del q, k, v, causal, kv_lengths, scale
  raise ValueError("implementation='triton' cannot run: " + (unsupported_reason(
      type("Spec", (), {"backend": "gpu"})()) or ""))
