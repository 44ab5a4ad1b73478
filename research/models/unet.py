"""A DDPM++-style UNet score network for images [B, H, W, C].

Structure (Song et al. 2021, "DDPM++"; Ho et al. 2020): a 3x3 input conv; per resolution
level `num_res_blocks` residual blocks (GroupNorm -> SiLU -> conv, the time/class embedding
added between the two convs, skip connection rescaled by 1/sqrt(2)), self-attention at the
resolutions in `attn_resolutions`, then a strided-conv downsample; a middle
ResBlock-Attention-ResBlock; the mirror-image upsampling path with (num_res_blocks + 1) blocks
per level fed by concatenated skips; GroupNorm -> SiLU -> a zero-initialised 3x3 output conv,
so the untrained network predicts 0 (the eps-prediction loss then starts at ~1).

Text conditioning (latent diffusion, Rombach et al. 2022): with context_dim > 0 the same
network gains Stable Diffusion's SpatialTransformer blocks (GroupNorm, proj in, per block
self-attention, cross-attention to `context`, gated-GELU feed-forward, each pre-LayerNorm
with a residual, then a zero-initialised proj out and the outer residual) after every
ResBlock at the resolutions in `transformer_resolutions`, and one in place of the middle
self-attention. Cross-attention gets kv_lengths = context_lengths, so padding tokens are
never attended to; context=None (or length 0) is the null condition. With the defaults
(context_dim=0) nothing of this exists and the network is exactly the unconditional/class
UNet.

Attention is research.models.layers.MultiHeadAttention, whose core is
kernels.attention.dot_product_attention (layout [B, T, H, D]) with the module's
`attention_impl`, so the Pallas kernel is used on GPU and XLA on CPU.
"""
from __future__ import annotations

import functools
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


class TransformerBlock(nn.Module):
  """SD's BasicTransformerBlock on tokens x [B, N, C] with context [B, S, Cc]:

    x = x + SelfAttn(LN(x));  x = x + CrossAttn(LN(x), context, kv_lengths);
    x = x + W2 (a * GELU(g)) with (a, g) = W1 LN(x) split in two (GEGLU, 4C hidden).
  """
  num_heads: int = 4
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, context, context_lengths):
    c = x.shape[-1]
    attn = functools.partial(MultiHeadAttention, num_heads=self.num_heads,
                             attention_impl=self.attention_impl)
    x = x + attn(name="self_attn")(nn.LayerNorm(name="ln_self")(x))
    x = x + attn(name="cross_attn")(nn.LayerNorm(name="ln_cross")(x), context=context,
                                    kv_lengths=context_lengths)
    a, gate = jnp.split(nn.Dense(8 * c, name="ff_in")(nn.LayerNorm(name="ln_ff")(x)), 2, -1)
    return x + nn.Dense(c, name="ff_out")(a * nn.gelu(gate, approximate=False))


def position_embedding_2d(hh: int, ww: int, c: int, dtype=jnp.float32):
  """Fixed 2-D sinusoidal embedding [hh * ww, c] (row-major tokens): the first c/2 channels
  encode the row, the rest the column, each as sin/cos at c/4 geometric frequencies (as
  MAE/ViT's 2-D sin-cos table); the position is measured in fractions of the grid, so every
  resolution spans the same range. c must be divisible by 4."""
  if c % 4:
    raise ValueError(f"unet: position embedding needs channels divisible by 4, got {c}.")
  quarter = c // 4
  freqs = math.pi * 2.0 ** jnp.arange(quarter, dtype=jnp.float32) / 2.0

  def axis(n):  # [n, c/2]
    pos = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
    arg = pos[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1)

  rows = jnp.broadcast_to(axis(hh)[:, None, :], (hh, ww, 2 * quarter))
  cols = jnp.broadcast_to(axis(ww)[None, :, :], (hh, ww, 2 * quarter))
  return jnp.concatenate([rows, cols], -1).reshape(hh * ww, c).astype(dtype)


class SpatialTransformer(nn.Module):
  """GroupNorm -> proj in -> `depth` TransformerBlocks over the H*W positions -> proj out
  (zero-initialised, so the block starts as the identity) -> + x. [B, H, W, C] -> same.

  With position_embedding, a fixed 2-D sin-cos table (position_embedding_2d) is added to the
  tokens after proj in: the queries then know where they are, so a caption's "top left" can
  be attended to from the top-left tokens only (convolutions with zero padding alone give
  a small latent grid little sense of absolute position)."""
  num_heads: int = 4
  depth: int = 1
  attention_impl: str = "auto"
  position_embedding: bool = False

  @nn.compact
  def __call__(self, x, context, context_lengths):
    b, hh, ww, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"unet: channels {c} at {hh}px are not divisible by "
                       f"num_heads={self.num_heads}; choose num_heads dividing every width.")
    h = nn.Dense(c, name="proj_in")(GroupNorm(num_groups=_num_groups(c))(x))
    h = h.reshape(b, hh * ww, c)
    if self.position_embedding:
      h = h + position_embedding_2d(hh, ww, c, h.dtype)[None]
    for i in range(self.depth):
      h = TransformerBlock(self.num_heads, self.attention_impl, name=f"block_{i}")(
          h, context, context_lengths)
    h = nn.Dense(c, kernel_init=_ZERO, name="proj_out")(h)
    return x + h.reshape(b, hh, ww, c)


class Downsample(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2))(x)


def downsampling_trunk(x, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                       dropout: float, emb, train: bool):
  """3x3 conv to `ch`, then per level `num_res_blocks` ResBlocks of ch * mult channels with a
  Downsample between levels: the trunk of the classifier and of the autoencoder's encoder.

  Call it inside a compact module: its layers belong to (and are named in) the caller.
  """
  h = nn.Conv(ch, (3, 3))(x)
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      h = ResBlock(ch * mult, dropout)(h, emb, train)
    if level != len(ch_mult) - 1:
      h = Downsample()(h)
  return h


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
  With context_dim > 0, `context` [B, S, context_dim] (e.g. research.models.text's token
  features) with `context_lengths` [B] (valid tokens; default all S) conditions the network
  through cross-attention (see the module docstring); context=None is the null condition.
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
  context_dim: int = 0                      # 0: no cross-attention; else the context width
  transformer_resolutions: Sequence[int] = ()  # resolutions (px) with SpatialTransformers
  transformer_depth: int = 1                # TransformerBlocks per SpatialTransformer
  pooled_context: bool = False              # also add the mean of the valid context tokens
                                            # (projected) to the time embedding, as SDXL adds
                                            # its pooled text embedding: a global condition
  transformer_position_embedding: bool = False  # add a fixed 2-D sin-cos position table to
                                            # the SpatialTransformers' tokens

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
    if self.context_dim < 0 or self.transformer_depth < 1:
      raise ValueError(f"unet: context_dim={self.context_dim} must be >= 0 and "
                       f"transformer_depth={self.transformer_depth} >= 1.")
    if self.pooled_context and not self.context_dim:
      raise ValueError("unet: pooled_context=True needs context_dim > 0 (a context to pool).")
    if self.transformer_resolutions and not self.context_dim:
      raise ValueError(f"unet: transformer_resolutions={tuple(self.transformer_resolutions)} "
                       "needs context_dim > 0 (the width of the context it attends to).")
    missing = sorted(set(self.transformer_resolutions) - set(levels))
    if missing:
      raise ValueError(f"unet: transformer_resolutions={tuple(self.transformer_resolutions)} "
                       f"has {missing}, which this UNet never reaches; its resolutions are "
                       f"{levels} px.")
    both = sorted(set(self.transformer_resolutions) & set(self.attn_resolutions))
    if both:  # a SpatialTransformer self-attends already
      raise ValueError(f"unet: resolutions {both} are in both attn_resolutions and "
                       "transformer_resolutions; a transformer block already self-attends, "
                       "so list each resolution in one of them.")

  def _context(self, x, context, context_lengths):
    """(context [B, S, Cc], lengths [B] int32) to cross-attend to; None -> the null condition."""
    b = x.shape[0]
    if not self.context_dim:
      if context is not None or context_lengths is not None:
        raise ValueError("unet: context was given but context_dim=0 (no cross-attention); "
                         "set model.context_dim to the context's width.")
      return None, None
    if context is None:  # nothing to attend to: one zero token of length 0
      return jnp.zeros((b, 1, self.context_dim), x.dtype), jnp.zeros((b,), jnp.int32)
    if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != self.context_dim:
      raise ValueError(f"unet: context must be [B={b}, S, context_dim={self.context_dim}], "
                       f"got {context.shape}.")
    if context_lengths is None:
      context_lengths = jnp.full((b,), context.shape[1], jnp.int32)
    if context_lengths.shape != (b,):
      raise ValueError(f"unet: context_lengths must be [B={b}], got {context_lengths.shape}.")
    return context, context_lengths.astype(jnp.int32)

  @nn.compact
  def __call__(self, x, t, labels=None, train: bool = False, context=None,
               context_lengths=None):
    self._check(x)
    context, context_lengths = self._context(x, context, context_lengths)
    emb_dim = 4 * self.ch
    # In the input's dtype, so a bfloat16 forward pass (models.precision) stays bfloat16.
    emb = TimeEmbedding(emb_dim, self.time_embedding)(t).astype(x.dtype)
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim)(labels)
    if self.context_dim and self.pooled_context:
      # Mean over the valid tokens only (padding never enters); length 0 pools to zeros.
      valid = jnp.arange(context.shape[1])[None, :] < context_lengths[:, None]
      total = jnp.sum(jnp.where(valid[..., None], context, 0), axis=1)
      pooled = total / jnp.maximum(context_lengths, 1)[:, None].astype(context.dtype)
      emb = emb + nn.Dense(emb_dim, name="pooled_context")(pooled.astype(x.dtype))
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

    xattn = set(int(r) for r in self.transformer_resolutions)

    def transformer(h):
      return SpatialTransformer(self.num_heads, self.transformer_depth, self.attention_impl,
                                self.transformer_position_embedding)(h, context, context_lengths)

    h = nn.Conv(self.ch, (3, 3))(x)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(self.ch * mult, self.dropout)(h, emb, train)
        if h.shape[1] in attn:
          h = attn_block(self.num_heads, self.attention_impl)(h)
        if h.shape[1] in xattn:
          h = transformer(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample()(h)
        skips.append(h)

    h = res_block(h.shape[-1], self.dropout)(h, emb, train)
    if self.context_dim:
      h = transformer(h)
    else:
      h = attn_block(self.num_heads, self.attention_impl)(h)
    h = res_block(h.shape[-1], self.dropout)(h, emb, train)

    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = res_block(self.ch * self.ch_mult[level], self.dropout)(
            jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
        if h.shape[1] in attn:
          h = attn_block(self.num_heads, self.attention_impl)(h)
        if h.shape[1] in xattn:
          h = transformer(h)
      if level != 0:
        h = Upsample()(h)
    assert not skips, "every skip connection is consumed exactly once"

    h = nn.silu(GroupNorm(num_groups=_num_groups(h.shape[-1]))(h))
    return nn.Conv(x.shape[-1], (3, 3), kernel_init=_ZERO)(h)


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
