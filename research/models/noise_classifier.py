"""A noise-conditional classifier for vector data: p(y | x_t, t), for classifier guidance.

Not in the model registry on purpose: registered models are score networks returning an
array shaped like x (research.models.registry), while this returns logits [B, K]. Image
classifiers live in research/models/classifier.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from research.models.layers import TimeEmbedding


class NoiseConditionalClassifier(nn.Module):
  """x [B, D], t [B] -> logits [B, num_classes].

  Residual blocks of (LayerNorm, SiLU, Dense) with the time embedding added to every block,
  as the MLP score network, so the decision boundary can widen as the noise grows. Every
  op acts per example (LayerNorm, not BatchNorm), which classifier guidance relies on to
  take per-example input gradients from one gradient of the batch sum.
  """
  num_classes: int
  hidden: int = 128                  # width of every block
  depth: int = 3                     # number of residual blocks
  time_embedding: str = "sinusoidal"  # "sinusoidal" | "fourier"

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    del train  # no dropout / batch statistics
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}.")
    if x.ndim != 2:
      raise ValueError(f"noise classifier expects x of shape [B, D], got {x.shape}.")
    emb = nn.silu(TimeEmbedding(self.hidden, self.time_embedding)(t))
    h = nn.Dense(self.hidden)(x)
    for _ in range(self.depth):
      r = nn.silu(nn.LayerNorm()(h) + nn.Dense(self.hidden)(emb))
      r = nn.Dense(self.hidden)(r)
      h = h + nn.Dense(self.hidden)(nn.silu(r))
    h = nn.silu(nn.LayerNorm()(h))
    # Zero-initialised head: the classifier starts at the uniform posterior, so an
    # untrained classifier adds no guidance.
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)(h).astype(jnp.float32)
