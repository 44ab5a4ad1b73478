"""What the op and its backends agree on: the checked inputs, the call, the implementation table.

  validate_inputs(q, k, v, kv_lengths, causal)
                                         shape / dtype / causal / kv_lengths checks, a
                                         TypeError or ValueError naming the argument (the op
                                         and the kernels' own entries in flash.py call it)
  AttentionSpec                          static facts about one call
  Implementation                         a backend: fn + unsupported_reason(spec)
  IMPLEMENTATIONS                        the registry the adapters in backends/ register into

This module sits below both op.py (which dispatches through the table) and the adapters in
backends/ (which fill it), so neither needs to import the other's module to find it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

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


def validate_inputs(q, k, v, kv_lengths, causal=False) -> None:
  """Checks one attention call up front; the message names the argument and what is allowed.

  q [B, T, H, D], k = v [B, S, Hkv, D] (H a multiple of Hkv, no zero-size axis) share a float
  dtype; causal is a Python or numpy bool; kv_lengths is None or an integer array of shape
  [B] whose values, when concrete (not traced), lie in [0, S]. Raises TypeError for a
  non-array q/k/v or a non-bool causal, ValueError otherwise.
  """
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a bool (True or False), got {causal!r} "
                    f"({type(causal).__name__}).")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}.")
  for name, x, layout in (("q", q, "[B, T, H, D]"), ("k", k, "[B, S, Hkv, D]"),
                          ("v", v, "[B, S, Hkv, D]")):
    if x.ndim != 4:
      raise ValueError(f"{name} must be 4-D {layout}; got shape {tuple(x.shape)} (q, k, v "
                       f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}).")
  b, t, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}.")
  for name, x in (("q", q), ("k", k)):
    if 0 in x.shape:
      raise ValueError(f"empty attention: {name} has a zero-size axis, shape {tuple(x.shape)} "
                       "(every axis of q, k, v must be >= 1).")
  if k.shape[0] != b:
    raise ValueError(f"k/v batch size must match q: q {q.shape}, k {k.shape} "
                     f"({k.shape[0]} != {b}).")
  if k.shape[3] != d:
    raise ValueError(f"k/v head dim must match q: q {q.shape}, k {k.shape} "
                     f"({k.shape[3]} != {d}).")
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hkv}) (GQA/MQA).")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  if q.dtype not in FLOAT_DTYPES:
    raise ValueError(f"q/k/v dtype {q.dtype} not supported; allowed: float32, bfloat16, "
                     "float16.")
  if kv_lengths is not None:
    kl = kv_lengths if hasattr(kv_lengths, "dtype") else np.asarray(kv_lengths)
    if tuple(kl.shape) != (b,) or not jnp.issubdtype(kl.dtype, jnp.integer):
      raise ValueError(f"kv_lengths must be an integer array of shape [B]=({b},); got "
                       f"shape {tuple(kl.shape)} dtype {kl.dtype}.")
    if not isinstance(kl, jax.core.Tracer):  # values known now: check them (not when traced)
      vals = np.asarray(kl)
      s = k.shape[1]
      bad = np.flatnonzero((vals < 0) | (vals > s))
      if bad.size:
        raise ValueError(f"kv_lengths must lie in [0, S={s}] (S: the key length); got "
                         f"{vals[bad].tolist()} at batch index {bad.tolist()}.")
