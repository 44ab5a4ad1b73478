"""Shared Flax Linen layers: time embeddings (used by every score network) and attention."""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


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
  kind: str = "sinusoidal"  # "sinusoidal" | "fourier"

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    if self.kind == "sinusoidal":
      h = sinusoidal_embedding(t, self.dim)
    elif self.kind == "fourier":
      h = FourierEmbedding(self.dim)(t)
    else:
      raise ValueError(f"time embedding kind={self.kind!r}; allowed: 'sinusoidal', 'fourier'.")
    h = nn.Dense(self.dim)(h)
    h = nn.silu(h)
    return nn.Dense(self.dim)(h)


# --- Attention -------------------------------------------------------------------------------
# (the attention layer that calls kernels.attention.dot_product_attention goes below)
