"""Shared Flax Linen layers: time embeddings (used by every score network) and attention."""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from research import sharding


TIME_EMBEDDINGS = ("sinusoidal", "fourier", "linear")


def sinusoidal_embedding(t: jnp.ndarray, dim: int, max_period: float = 10_000.0,
                         scale: float = 1000.0) -> jnp.ndarray:
  """Transformer-style features of a continuous time t [B] -> [B, dim].

  t lives on the SDE's axis (roughly [0, 1]); `scale` maps it to the DDPM step range so the
  frequencies match a 1000-step model.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  args = (scale * t.astype(jnp.float32))[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class FourierEmbedding(nn.Module):
  """Random Fourier features of t [B] -> [B, dim] (score_sde's GaussianFourierProjection)."""
  dim: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.dim // 2,))
    w = jnp.asarray(w)  # fixed features: the optimizer sees it, but it is stop-gradiented
    import jax
    w = jax.lax.stop_gradient(w)
    args = t.astype(jnp.float32)[:, None] * w[None, :] * 2 * jnp.pi
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeEmbedding(nn.Module):
  """Time features followed by a 2-layer MLP: t [B] -> [B, dim]."""
  dim: int
  kind: str = "sinusoidal"  # one of TIME_EMBEDDINGS

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    if self.kind == "sinusoidal":
      h = sinusoidal_embedding(t, self.dim)
    elif self.kind == "fourier":
      h = FourierEmbedding(self.dim)(t)
    elif self.kind == "linear":
      # t itself: the field is then as smooth in t as in x (FFJORD's concatenated time), so an
      # adaptive ODE solver is not held back by the 1000-step sinusoid's fast oscillations.
      h = jnp.broadcast_to(t.astype(jnp.float32)[:, None], (t.shape[0], self.dim))
    else:
      raise ValueError(f"time embedding kind={self.kind!r}; allowed: "
                       + ", ".join(map(repr, TIME_EMBEDDINGS)) + ".")
    h = nn.Dense(self.dim)(h)
    h = nn.silu(h)
    return nn.Dense(self.dim)(h)


# --- Attention -------------------------------------------------------------------------------
# (the attention layer that calls kernels.attention.dot_product_attention goes below)


class MultiHeadAttention(nn.Module):
  """Multi-head attention (with GQA/MQA) whose core is `kernels.attention.dot_product_attention`.

  Takes x [B, *positions, C] (tokens [B, L, C] or feature maps [B, H, W, C]; positions are
  flattened into one sequence) and an optional context [B, *positions', Cc] for
  cross-attention; self-attention when context is None. Returns [B, *positions, out_features].

  Attributes:
    num_heads: query heads.
    head_dim: per-head width; default C // num_heads.
    num_kv_heads: key/value heads (a divisor of num_heads); default num_heads.
    out_features: output width; default C.
    causal: bottom-right aligned causal mask (see kernels/attention/reference.py).
    attention_impl: "auto" or a registered implementation ("pallas", "xla", "cudnn", ...),
      normally taken from the config's `attention_impl` field.
    dtype: computation dtype of the projections and the attention (None: input dtype).
    zero_init_output: zero the output projection so a residual block starts as identity.
  """
  num_heads: int
  head_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  out_features: Optional[int] = None
  causal: bool = False
  attention_impl: str = "auto"
  use_bias: bool = True
  dtype: Any = None
  zero_init_output: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: Optional[jnp.ndarray] = None,
               kv_lengths: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    # Imported here so that importing the time embeddings does not pull in Pallas.
    from kernels.attention import available_implementations, dot_product_attention
    allowed = ("auto", *available_implementations())
    if self.attention_impl not in allowed:
      raise ValueError(f"attention_impl={self.attention_impl!r}; allowed: "
                       + ", ".join(repr(a) for a in allowed) + ".")
    kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    if kv_heads < 1 or self.num_heads % kv_heads:
      raise ValueError(f"num_kv_heads={kv_heads} must divide num_heads={self.num_heads}.")
    b, channels = x.shape[0], x.shape[-1]
    positions = x.shape[1:-1]
    head_dim = self.head_dim or channels // self.num_heads
    out_features = self.out_features or channels
    context = x if context is None else context

    tokens = x.reshape(b, -1, channels)
    ctx_tokens = context.reshape(b, -1, context.shape[-1])
    dense = functools.partial(nn.DenseGeneral, use_bias=self.use_bias, dtype=self.dtype)
    q = dense((self.num_heads, head_dim), name="query")(tokens)
    k = dense((kv_heads, head_dim), name="key")(ctx_tokens)
    v = dense((kv_heads, head_dim), name="value")(ctx_tokens)
    # Under a mesh (research.sharding) the op runs per batch shard: XLA cannot partition a
    # pallas_call, and shard_map never gathers the batch onto one device.
    attend = functools.partial(dot_product_attention, causal=self.causal,
                               implementation=self.attention_impl)
    if kv_lengths is None:
      h = sharding.per_shard(lambda q, k, v: attend(q, k, v), b, 3)(q, k, v)
    else:
      h = sharding.per_shard(lambda q, k, v, kl: attend(q, k, v, kv_lengths=kl), b, 4)(
          q, k, v, jnp.asarray(kv_lengths, jnp.int32))
    init = nn.initializers.zeros if self.zero_init_output else nn.initializers.lecun_normal()
    y = nn.DenseGeneral(out_features, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                        kernel_init=init, name="out")(h)
    return y.reshape(b, *positions, out_features)


class SelfAttention(MultiHeadAttention):
  """MultiHeadAttention used without a context: queries, keys and values all come from x."""
