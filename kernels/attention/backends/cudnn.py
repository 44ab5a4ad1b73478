"""The `cudnn` implementation: jax.nn.dot_product_attention(implementation="cudnn").

NVIDIA GPUs only, bfloat16 / float16, head dims a multiple of 8 up to 128. cuDNN's causal
mask is top-left aligned while this op's is bottom-right aligned, so causal calls with
T != S are refused; rows with no key to attend to are zeroed, as the op's semantics require
(reference.py).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kernels.attention.interface import (HALF_DTYPES, AttentionSpec, Implementation,
                                         register_implementation)


def _has_cuda() -> bool:
  try:
    return len(jax.devices("cuda")) > 0
  except RuntimeError:
    return False


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
  if spec.backend != "gpu" or not _has_cuda():
    return f"cuDNN attention needs an NVIDIA GPU; the default backend is {spec.backend!r}."
  if jnp.dtype(spec.dtype) not in HALF_DTYPES:
    return f"cuDNN flash attention takes bfloat16 or float16, not {jnp.dtype(spec.dtype)}."
  if spec.head_dim % 8 or spec.head_dim > 128:
    return f"cuDNN flash attention needs head_dim a multiple of 8 and <= 128; got {spec.head_dim}."
  if spec.causal and spec.q_len != spec.kv_len:
    return ("cuDNN's causal mask is top-left aligned; this op's causal mask is bottom-right "
            f"aligned, so T != S (T={spec.q_len}, S={spec.kv_len}) is refused.")
  return None


def fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  del interpret
  b, t = q.shape[:2]
  q_lens = None if kv_lengths is None else jnp.full((b,), t, jnp.int32)
  out = jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=causal, query_seq_lengths=q_lens,
      key_value_seq_lengths=kv_lengths, implementation="cudnn")
  if kv_lengths is not None:  # rows with nothing to attend to are zero in this op
    out = jnp.where((kv_lengths > 0)[:, None, None, None], out, 0).astype(out.dtype)
  return out


IMPLEMENTATION = register_implementation(Implementation("cudnn", fn, unsupported_reason))
