"""A DDPM++-style UNet score network for images [B, H, W, C].

Structure (Song et al. 2021, "DDPM++"; Ho et al. 2020): a 3x3 input conv; per resolution
level `num_res_blocks` residual blocks (GroupNorm -> SiLU -> conv, the time/class embedding
added between the two convs, skip connection rescaled by 1/sqrt(2)), self-attention at the
resolutions in `attn_resolutions`, then a strided-conv downsample; a middle
ResBlock-Attention-ResBlock; the mirror-image upsampling path with (num_res_blocks + 1) blocks
per level fed by concatenated skips; GroupNorm -> SiLU -> a zero-initialised 3x3 output conv,
so the untrained network predicts 0 (the eps-prediction loss then starts at ~1).

Attention is research.models.layers.MultiHeadAttention, whose core is
kernels.attention.dot_product_attention (layout [B, T, H, D]) with the module's
`attention_impl`, so the Pallas kernel is used on GPU and XLA on CPU.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.layers import MultiHeadAttention, TimeEmbedding
from research.models.registry import register_model

_ZERO = nn.initializers.zeros


def _num_groups(channels: int, max_groups: int = 32) -> int:
  """The largest group count <= max_groups that divides `channels` with >= 2 channels each
  (GroupNorm over 1-channel groups is InstanceNorm, which throws away colour statistics)."""
  for g in range(min(max_groups, channels // 2), 0, -1):
    if channels % g == 0:
      return g
  return 1


class GroupNorm(nn.Module):
  """GroupNorm over [B, H, W, C] (as flax.linen.GroupNorm, eps 1e-6, per-channel scale/bias).

  Written with per-channel spatial means followed by a per-group mean of those, because XLA
  on CPU reduces over (H, W, C/G) of a 5-D reshape about 6x slower than over (H, W); two
  passes (mean, then mean squared deviation) keep the variance accurate in float32.
  """
  num_groups: int
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    b, c, g = x.shape[0], x.shape[-1], self.num_groups
    dtype, x = x.dtype, x.astype(jnp.float32)  # statistics in float32 also for bf16 inputs
    if c % g:
      raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups.")
    axes = tuple(range(1, x.ndim - 1))

    def group_mean(v):  # [B, C] per-channel statistic -> [B, C] mean over each channel's group
      return jnp.repeat(v.reshape(b, g, c // g).mean(-1), c // g, axis=-1)

    mean = group_mean(jnp.mean(x, axes))
    d = x - mean.reshape(b, *(1,) * len(axes), c)
    var = group_mean(jnp.mean(d * d, axes))
    inv = jax.lax.rsqrt(var + self.epsilon).reshape(b, *(1,) * len(axes), c)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return (d * inv * scale + bias).astype(dtype)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv, + Dense(emb), GroupNorm-SiLU-Dropout-Conv(zero init), skip / sqrt(2).

  x [B, H, W, C], emb [B, E] or None -> [B, H, W, out_ch].
  """
  out_ch: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = nn.silu(GroupNorm(num_groups=_num_groups(x.shape[-1]))(x))
    h = nn.Conv(self.out_ch, (3, 3))(h)
    if emb is not None:  # None: no conditioning (e.g. the clean-image classifier)
      h = h + nn.Dense(self.out_ch)(nn.silu(emb))[:, None, None, :]
    h = nn.silu(GroupNorm(num_groups=_num_groups(self.out_ch))(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=_ZERO)(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1))(x)
    return (x + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
  """GroupNorm -> multi-head self-attention over the H*W positions -> residual, / sqrt(2).

  The attention is layers.MultiHeadAttention (its core is kernels.attention's op, with
  `attention_impl`), its output projection zero-initialised so the block starts as identity.
  """
  num_heads: int = 4
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_heads:
      raise ValueError(f"unet: channels {c} at {x.shape[1]}px are not divisible by "
                       f"num_heads={self.num_heads}; choose num_heads dividing every width.")
    h = GroupNorm(num_groups=_num_groups(c))(x)
    h = MultiHeadAttention(num_heads=self.num_heads, attention_impl=self.attention_impl,
                           zero_init_output=True)(h)
    return (x + h) / math.sqrt(2.0)


class Downsample(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2))(x)


class Upsample(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    return nn.Conv(c, (3, 3))(x)


@register_model("unet")
class UNet(nn.Module):
  """x [B, H, W, C], t [B] (, labels [B]) -> [B, H, W, C].

  With num_classes > 0, a learned class embedding is added to the time embedding; label index
  `num_classes` is the null (unconditional) token, so one network serves classifier-free
  guidance, and labels=None means unconditional (as in research.models.mlp).
  H and W must be divisible by 2**(len(ch_mult) - 1).
  """
  ch: int = 64                              # base channels
  ch_mult: Sequence[int] = (1, 2, 2)        # channel multiplier per resolution level
  num_res_blocks: int = 2                   # residual blocks per level (down path)
  attn_resolutions: Sequence[int] = (8,)    # resolutions (px, the height) with self-attention
  num_heads: int = 4                        # attention heads
  dropout: float = 0.0                      # dropout inside residual blocks
  time_embedding: str = "sinusoidal"        # "sinusoidal" | "fourier"
  num_classes: int = 0                      # 0: unconditional
  attention_impl: str = "auto"              # kernels.attention implementation
  remat: bool = False                       # recompute each block in the backward pass

  def _check(self, x):
    if x.ndim != 4:
      raise ValueError(f"unet expects x of shape [B, H, W, C], got {x.shape}.")
    if not self.ch_mult or any(int(m) < 1 for m in self.ch_mult):
      raise ValueError(f"unet: ch_mult={tuple(self.ch_mult)} must be non-empty positive ints.")
    if self.num_res_blocks < 1:
      raise ValueError(f"unet: num_res_blocks={self.num_res_blocks} must be >= 1.")
    f = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"unet: image size {x.shape[1:3]} must be divisible by {f} "
                       f"(2**(len(ch_mult)-1) with ch_mult={tuple(self.ch_mult)}).")
    levels = tuple(x.shape[1] // 2**i for i in range(len(self.ch_mult)))
    missing = sorted(set(self.attn_resolutions) - set(levels))
    if missing:  # otherwise those attention layers would silently not exist
      raise ValueError(f"unet: attn_resolutions={tuple(self.attn_resolutions)} has {missing}, "
                       f"which this UNet never reaches; its resolutions are {levels} px "
                       f"(model.attn_resolutions must be a subset).")

  @nn.compact
  def __call__(self, x, t, labels=None, train: bool = False):
    self._check(x)
    emb_dim = 4 * self.ch
    # In the input's dtype, so a bfloat16 forward pass (models.precision) stays bfloat16.
    emb = TimeEmbedding(emb_dim, self.time_embedding)(t).astype(x.dtype)
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim)(labels)
    attn = set(int(r) for r in self.attn_resolutions)
    # Rematerialised blocks keep only their inputs for the backward pass. They are named as
    # the plain blocks would be, so remat on or off gives the same parameter tree.
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock
    count = {"res": 0, "attn": 0}

    def res_block(*args):
      count["res"] += 1
      return res_cls(*args, name=f"ResBlock_{count['res'] - 1}")

    def attn_block(*args):
      count["attn"] += 1
      return attn_cls(*args, name=f"AttnBlock_{count['attn'] - 1}")

    h = nn.Conv(self.ch, (3, 3))(x)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(self.ch * mult, self.dropout)(h, emb, train)
        if h.shape[1] in attn:
          h = attn_block(self.num_heads, self.attention_impl)(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample()(h)
        skips.append(h)

    h = res_block(h.shape[-1], self.dropout)(h, emb, train)
    h = attn_block(self.num_heads, self.attention_impl)(h)
    h = res_block(h.shape[-1], self.dropout)(h, emb, train)

    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = res_block(self.ch * self.ch_mult[level], self.dropout)(
            jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
        if h.shape[1] in attn:
          h = attn_block(self.num_heads, self.attention_impl)(h)
      if level != 0:
        h = Upsample()(h)
    assert not skips, "every skip connection is consumed exactly once"

    h = nn.silu(GroupNorm(num_groups=_num_groups(h.shape[-1]))(h))
    return nn.Conv(x.shape[-1], (3, 3), kernel_init=_ZERO)(h)


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
