"""What the op and its backends agree on: the checked inputs, the call, the implementation table.

  validate_inputs(q, k, v, kv_lengths)   shape / dtype / kv_lengths checks, ValueError naming
                                          the argument (the op and the kernels' own entries in
                                          flash.py call it)
  AttentionSpec                          static facts about one call
  Implementation                         a backend: fn + unsupported_reason(spec)
  IMPLEMENTATIONS                        the registry the adapters in backends/ register into

This module sits below both op.py (which dispatches through the table) and the adapters in
backends/ (which fill it), so neither needs to import the other's module to find it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp

from kernels.registry import Registry

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # mosaic, cudnn


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


def validate_inputs(q, k, v, kv_lengths) -> None:
  """Raises ValueError unless q [B, T, H, D], k = v [B, S, Hkv, D] (H a multiple of Hkv)
  share a float dtype and kv_lengths is None or an integer array of shape [B]."""
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
  if q.dtype not in FLOAT_DTYPES:
    raise ValueError(f"dtype {q.dtype} not supported; allowed: float32, bfloat16, float16.")
  if t == 0 or k.shape[1] == 0 or d == 0:
    raise ValueError(f"empty attention: q {q.shape}, k {k.shape}.")
  if kv_lengths is not None:
    kl = jnp.asarray(kv_lengths)
    if kl.shape != (b,) or not jnp.issubdtype(kl.dtype, jnp.integer):
      raise ValueError(f"kv_lengths must be an integer array of shape [B]=({b},); got "
                       f"shape {kl.shape} dtype {kl.dtype}.")
