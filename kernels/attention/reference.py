"""Plain attention with every masking option: the float32 ground truth for tests and the
`xla` implementation of the op.

Semantics shared by every implementation (layout [B, T, H, D] as jax.nn.dot_product_attention):
  * q [B, T, H, D], k and v [B, S, Hkv, D], H a multiple of Hkv (GQA; Hkv == 1 is MQA);
    query head h reads kv head h // (H // Hkv).
  * causal: query i may attend key j iff j <= i + (S - T), i.e. the causal diagonal is
    aligned to the bottom-right corner. With T == S this is the usual lower triangle; with
    T < S (decoding with a cache) the last query sees every key; with T > S the first T - S
    queries see nothing.
  * kv_lengths [B] (int): keys j >= kv_lengths[b] are padding for example b.
  * A query row with no key to attend to returns zeros (and zero gradients), never NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_len: int, kv_len: int, *, causal: bool,
                   kv_lengths: jax.Array | None = None) -> jax.Array:
  """Boolean mask of allowed (query, key) pairs: [1 or B, 1, T, S] (broadcasts over heads)."""
  qi = jnp.arange(q_len)[:, None]
  kj = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((q_len, kv_len), dtype=bool)
  if causal:
    mask = kj <= qi + (kv_len - q_len)
  mask = mask[None, None]
  if kv_lengths is not None:
    valid = jnp.arange(kv_len)[None, :] < jnp.asarray(kv_lengths)[:, None]  # [B, S]
    mask = jnp.logical_and(mask, valid[:, None, None, :])
  return mask


def mha_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                  kv_lengths: jax.Array | None = None, scale: float | None = None,
                  compute_dtype=jnp.float32) -> jax.Array:
  """Attention computed densely: softmax(scale * q k^T + mask) v.

  Args:
    q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H % Hkv == 0.
    causal: bottom-right aligned causal mask (see the module docstring).
    kv_lengths: optional [B] ints, number of valid keys per example.
    scale: logit scale, default 1 / sqrt(D).
    compute_dtype: dtype of the logits, softmax and accumulation (float32 for a reference).

  Returns:
    [B, T, H, D] in q's dtype; rows with no valid key are zero.
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  scale = (1.0 / d ** 0.5) if scale is None else scale
  # Grouped heads without materialising repeated k/v: q [B, T, Hkv, G, D].
  qg = q.reshape(b, t, hkv, h // hkv, d).astype(compute_dtype)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(compute_dtype),
                      preferred_element_type=compute_dtype) * scale
  mask = attention_mask(t, s, causal=causal, kv_lengths=kv_lengths)[:, :, None]  # [.,1,1,T,S]
  # A finite fill keeps fully masked rows NaN-free (their softmax is uniform, then zeroed by
  # `any_valid`), and the where() keeps their gradient exactly zero.
  logits = jnp.where(mask, logits, jnp.finfo(compute_dtype).min)
  probs = jax.nn.softmax(logits, axis=-1)
  any_valid = jnp.any(mask, axis=-1, keepdims=True)
  probs = jnp.where(any_valid, probs, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(compute_dtype),
                   preferred_element_type=compute_dtype).reshape(b, t, h, d)
  return out.astype(q.dtype)
