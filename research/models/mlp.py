"""A time-conditioned residual MLP score network for vector data."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from research.models.layers import TimeEmbedding
from research.models.registry import register_model


@register_model("mlp")
class MLP(nn.Module):
  """x [B, D], t [B] (, labels [B]) -> [B, D].

  Residual blocks of (LayerNorm, SiLU, Dense) with the time (and class) embedding added to
  every block. With num_classes > 0, label index `num_classes` is the null (unconditional)
  token, so one network serves classifier-free guidance; labels=None means unconditional.
  """
  hidden: int = 256       # width of every block
  depth: int = 4          # number of residual blocks
  time_embedding: str = "sinusoidal"  # "sinusoidal" | "fourier"
  num_classes: int = 0    # 0: unconditional
  dropout: float = 0.0
  out_dim: Optional[int] = None  # defaults to the input dimension

  @nn.compact
  def __call__(self, x, t, labels=None, train: bool = False):
    if x.ndim != 2:
      raise ValueError(f"mlp expects x of shape [B, D], got {x.shape}.")
    # In the input's dtype, so a bfloat16 forward pass (models.precision) stays bfloat16.
    emb = TimeEmbedding(self.hidden, self.time_embedding)(t).astype(x.dtype)
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, self.hidden)(labels)
    h = nn.Dense(self.hidden)(x)
    for _ in range(self.depth):
      r = nn.LayerNorm()(h)
      r = nn.silu(r + nn.Dense(self.hidden)(nn.silu(emb)))
      r = nn.Dense(self.hidden)(r)
      r = nn.silu(r)
      r = nn.Dropout(self.dropout, deterministic=not train)(r)
      r = nn.Dense(self.hidden)(r)
      h = h + r
    h = nn.silu(nn.LayerNorm()(h))
    return nn.Dense(self.out_dim or x.shape[-1])(h)
