"""The `xla` implementation: dense softmax(q k^T) v with float32 logits (reference.py), the
float32 ground truth of the tests; runs on every backend and takes every input the op does."""
from __future__ import annotations

from typing import Optional

from kernels.attention import reference
from kernels.attention.interface import AttentionSpec, Implementation, register_implementation


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
  del spec
  return None


def fn(q, k, v, *, causal, kv_lengths, scale, interpret):
  del interpret
  return reference.mha_reference(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale)


IMPLEMENTATION = register_implementation(Implementation("xla", fn, unsupported_reason))
