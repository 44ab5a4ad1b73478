"""The `mosaic` implementation: our Hopper kernels in Pallas' Mosaic GPU backend.

mosaic.py's forward (TMA, wgmma, warp specialisation) with mosaic_backward.py's dQ and
dK/dV kernels (head dims > 128 take the Triton backward), through flash.mosaic_attention
with default tiles. bfloat16 / float16; a compute capability 9.x GPU, or any backend with
interpret=True (Pallas' GPU interpreter).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kernels.attention import flash
from kernels.attention.interface import (HALF_DTYPES, AttentionSpec, Implementation,
                                         register_implementation)


def _is_hopper() -> bool:
  try:
    devs = jax.devices("cuda")
  except RuntimeError:
    return False
  return bool(devs) and str(getattr(devs[0], "compute_capability", "")).startswith("9.")


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
  reason = flash.unsupported_head_dim(spec.head_dim)
  if reason is not None:
    return reason
  if jnp.dtype(spec.dtype) not in HALF_DTYPES:
    return f"the Mosaic GPU kernel takes bfloat16 or float16, not {jnp.dtype(spec.dtype)}."
  if not spec.interpret and (spec.backend != "gpu" or not _is_hopper()):
    return ("the Mosaic GPU kernel uses Hopper's TMA and wgmma and needs a compute "
            f"capability 9.x GPU (the default backend is {spec.backend!r}); pass "
            "interpret=True (Pallas' GPU interpreter) or use implementation='pallas'.")
  return None


def fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  return flash.mosaic_attention(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
                                interpret=interpret)


IMPLEMENTATION = register_implementation(Implementation("mosaic", fn, unsupported_reason))
