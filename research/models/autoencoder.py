"""A KL-regularised convolutional autoencoder: stage 1 of latent diffusion.

In the design of Stable Diffusion's AutoencoderKL (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1 and Appendix G), sized by fields:

  Encoder  3x3 conv -> per level `num_res_blocks` ResBlocks (GroupNorm -> SiLU -> conv), a
           strided-conv downsample between levels -> mid ResBlock / self-attention / ResBlock
           -> GroupNorm -> SiLU -> 3x3 conv to 2 * z_channels "moments" (mean, log-variance).
  Decoder  3x3 conv -> mid ResBlock / self-attention / ResBlock -> per level (deepest first)
           num_res_blocks + 1 ResBlocks, a nearest-neighbour upsample + conv between levels ->
           GroupNorm -> SiLU -> 3x3 conv to out_channels.

The downsampling factor is f = 2**(len(ch_mult) - 1): ch_mult=(1, 2, 2) (f = 4) turns
32x32x3 images into 8x8 x z_channels latents. The blocks are research.models.unet's
GroupNorm / ResBlock (without a time embedding) / AttnBlock / Downsample / Upsample, so the
mid-block self-attention runs through layers.MultiHeadAttention and hence
kernels.attention.dot_product_attention. SD's 1x1 quant_conv / post_quant_conv are left out:
each follows a linear conv, so it adds parameters and no expressiveness.

  model = AutoencoderKL(ch=32, ch_mult=(1, 2, 2), z_channels=4)
  params = model.init(rng, x)["params"]
  posterior = model.apply({"params": params}, x, method=AutoencoderKL.encode)
  z = scale_factor * posterior.sample(rng)      # what the latent diffusion model sees
  x_hat = model.apply({"params": params}, z / scale_factor, method=AutoencoderKL.decode)

Also here: the stage-1 loss and its objective (`AutoencoderObjective`), the latent scale
factor (`latent_scale_factor`, the role of SD's 0.18215) and `FrozenAutoencoder`, the trained
model + params + scale factor that stage 2 (research.diffusion.latent) encodes and decodes
with.

(Not in research.models' registry: that registry holds score networks, called as
model(x, t, labels, train) by the runner; an autoencoder is built from its own fields.)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from research.models.unet import (AttnBlock, GroupNorm, ResBlock, Upsample, _num_groups,
                                  downsampling_trunk)

LOGVAR_RANGE = (-30.0, 20.0)    # SD's DiagonalGaussianDistribution clamps logvar to this
RECONSTRUCTIONS = ("l1", "l2")


@flax.struct.dataclass
class DiagonalGaussian:
  """The posterior q(z | x) = N(mean, diag(exp(logvar))) over latents [B, h, w, C].

  A pytree (flax struct), so `encode` can return it from `apply` and jit can carry it.
  Build it with `from_moments`, which clips logvar to LOGVAR_RANGE as SD does (the clip
  keeps exp(logvar) finite early in training).
  """
  mean: jax.Array     # [B, h, w, C]
  logvar: jax.Array   # [B, h, w, C], clipped to LOGVAR_RANGE

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """moments [..., 2C] -> the posterior with mean = first C, logvar = last C channels."""
    if moments.shape[-1] % 2:
      raise ValueError(f"moments need an even channel count (mean, logvar), got "
                       f"{moments.shape}.")
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """A reparameterised draw mean + std * noise (differentiable in mean and logvar)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per example [B]: 0.5 sum(mean^2 + var - 1 - logvar) over latent dims."""
    per_dim = 0.5 * (jnp.square(self.mean) + self.var - 1.0 - self.logvar)
    return jnp.sum(per_dim.reshape(per_dim.shape[0], -1), axis=-1)


def _check_sizes(name: str, ch_mult: Sequence[int], num_res_blocks: int) -> None:
  if not ch_mult or any(int(m) < 1 for m in ch_mult):
    raise ValueError(f"{name}: ch_mult={tuple(ch_mult)} must be non-empty positive ints.")
  if num_res_blocks < 1:
    raise ValueError(f"{name}: num_res_blocks={num_res_blocks} must be >= 1.")


class _MidBlock(nn.Module):
  """ResBlock -> self-attention (unet.AttnBlock, through our attention op) -> ResBlock."""
  num_heads: int
  dropout: float
  attention_impl: str

  @nn.compact
  def __call__(self, h, train: bool):
    h = ResBlock(h.shape[-1], self.dropout)(h, None, train)
    h = AttnBlock(self.num_heads, self.attention_impl)(h)
    return ResBlock(h.shape[-1], self.dropout)(h, None, train)


def _out(h, features: int):
  """GroupNorm -> SiLU -> 3x3 conv: the output head of the encoder and the decoder."""
  h = nn.silu(GroupNorm(num_groups=_num_groups(h.shape[-1]))(h))
  return nn.Conv(features, (3, 3))(h)


class Encoder(nn.Module):
  """x [B, H, W, C] -> moments [B, H/f, W/f, 2 * z_channels] (see the module docstring)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  z_channels: int
  num_heads: int
  dropout: float
  attention_impl: str

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = downsampling_trunk(x, ch=self.ch, ch_mult=self.ch_mult,
                           num_res_blocks=self.num_res_blocks, dropout=self.dropout, emb=None,
                           train=train)
    h = _MidBlock(self.num_heads, self.dropout, self.attention_impl)(h, train)
    return _out(h, 2 * self.z_channels)


class Decoder(nn.Module):
  """z [B, h, w, z_channels] -> x_hat [B, h*f, w*f, out_channels]."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  num_heads: int
  dropout: float
  attention_impl: str

  @nn.compact
  def __call__(self, z, train: bool = False):
    h = nn.Conv(self.ch * self.ch_mult[-1], (3, 3))(z)
    h = _MidBlock(self.num_heads, self.dropout, self.attention_impl)(h, train)
    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * self.ch_mult[level], self.dropout)(h, None, train)
      if level != 0:
        h = Upsample()(h)
    return _out(h, self.out_channels)


class AutoencoderKL(nn.Module):
  """The KL autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x_hat`.

  Call the methods through apply: model.apply(v, x, method=AutoencoderKL.encode) (or
  method="encode"); `__call__(x, rng=None)` encodes, draws z (the posterior mean when rng is
  None) and decodes, returning (x_hat, posterior), and is what `init` traces.
  """
  ch: int = 32                          # base channels
  ch_mult: Sequence[int] = (1, 2, 2)    # channel multiplier per level; f = 2**(len - 1)
  num_res_blocks: int = 1               # ResBlocks per encoder level (decoder: + 1)
  z_channels: int = 4                   # latent channels C
  out_channels: int = 3                 # image channels (the decoder's output)
  num_heads: int = 1                    # heads of the mid-block self-attention
  dropout: float = 0.0                  # dropout inside the ResBlocks
  attention_impl: str = "auto"          # kernels.attention implementation

  def setup(self):
    _check_sizes("autoencoder", self.ch_mult, self.num_res_blocks)
    if self.z_channels < 1 or self.out_channels < 1:
      raise ValueError(f"autoencoder: z_channels={self.z_channels} and out_channels="
                       f"{self.out_channels} must be >= 1.")
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  num_heads=self.num_heads, dropout=self.dropout,
                  attention_impl=self.attention_impl)
    self.encoder = Encoder(z_channels=self.z_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def latent_shape(self, image_shape: Sequence[int]) -> Tuple[int, int, int]:
    """(h, w, C) of the latents of one image of shape (H, W, channels)."""
    h, w, c = (int(s) for s in image_shape)
    f = self.downsampling_factor
    if h % f or w % f:
      raise ValueError(f"autoencoder: image size {(h, w)} must be divisible by f={f} "
                       f"(2**(len(ch_mult)-1) with ch_mult={tuple(self.ch_mult)}).")
    if c != self.out_channels:
      raise ValueError(f"autoencoder: images have {c} channels but out_channels="
                       f"{self.out_channels}; they must agree to reconstruct.")
    return h // f, w // f, self.z_channels

  def encode(self, x, train: bool = False) -> DiagonalGaussian:
    """x [B, H, W, out_channels] in [-1, 1] -> the posterior over [B, H/f, W/f, z_channels]."""
    if x.ndim != 4:
      raise ValueError(f"autoencoder.encode expects x of shape [B, H, W, C], got {x.shape}.")
    self.latent_shape(x.shape[1:])
    return DiagonalGaussian.from_moments(self.encoder(x, train))

  def decode(self, z, train: bool = False):
    """z [B, h, w, z_channels] (unscaled latents) -> x_hat [B, h*f, w*f, out_channels]."""
    if z.ndim != 4 or z.shape[-1] != self.z_channels:
      raise ValueError(f"autoencoder.decode expects z of shape [B, h, w, {self.z_channels}], "
                       f"got {z.shape}.")
    return self.decoder(z, train)

  def __call__(self, x, rng: Optional[jax.Array] = None, train: bool = False):
    posterior = self.encode(x, train)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z, train), posterior


# --- stage 1: training ------------------------------------------------------------------------


def autoencoder_loss(model: AutoencoderKL, params, x: jax.Array, rng: jax.Array, *,
                     reconstruction: str = "l1", kl_weight: float = 1e-6,
                     perceptual_weight: float = 0.0, perceptual_fn=None, train: bool = True
                     ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The stage-1 loss in SD's convention (its LPIPSWithDiscriminator without the GAN term).

  Per example, with D = H * W * C elements:
    rec        = sum over elements of |x - x_hat| ("l1") or (x - x_hat)^2 ("l2")
    loss_b     = rec + perceptual_weight * D * P(x, x_hat) + kl_weight * KL(q(z|x) || N(0, I))
  and the loss is the batch mean. x_hat decodes a posterior sample. Sums rather than means
  keep kl_weight on SD's scale (1e-6 in its KL-f4/f8 models); P, one number per example,
  is added to every element's error as SD adds LPIPS, hence the factor D.

  Args:
    model, params: the autoencoder and its parameters.
    x: images [B, H, W, C] in [-1, 1].
    rng: PRNG key (posterior sample, dropout).
    reconstruction: "l1" or "l2".
    kl_weight: weight of the KL term (>= 0).
    perceptual_weight: weight of the perceptual term (>= 0; 0 skips it).
    perceptual_fn: (x, x_hat) -> [B] distance, e.g. classifier.perceptual_distance_fn on
      research.metrics.fd's feature network; needed when perceptual_weight > 0.
    train: dropout on.
  Returns:
    (loss, metrics) with per-element means "l1" and "mse", the per-example "kl", and
    "perceptual" when used.
  """
  check_loss_settings(reconstruction, kl_weight, perceptual_weight, perceptual_fn)
  s_rng, d_rng = jax.random.split(rng)
  x_hat, posterior = model.apply({"params": params}, x, s_rng, train=train,
                                 rngs={"dropout": d_rng})
  diff = x_hat - x
  err = jnp.abs(diff) if reconstruction == "l1" else jnp.square(diff)
  b = x.shape[0]
  rec = jnp.sum(err.reshape(b, -1), axis=-1)
  kl = posterior.kl()
  per_example = rec + kl_weight * kl
  metrics = {"l1": jnp.mean(jnp.abs(diff)), "mse": jnp.mean(jnp.square(diff)),
             "kl": jnp.mean(kl)}
  if perceptual_weight > 0:
    perc = perceptual_fn(x, x_hat)
    per_example = per_example + perceptual_weight * (err[0].size) * perc
    metrics["perceptual"] = jnp.mean(perc)
  loss = jnp.mean(per_example)
  metrics["loss"] = loss
  return loss, metrics


def check_loss_settings(reconstruction: str, kl_weight: float, perceptual_weight: float,
                        perceptual_fn) -> None:
  """Raises ValueError naming the bad stage-1 loss setting."""
  if reconstruction not in RECONSTRUCTIONS:
    raise ValueError(f"reconstruction={reconstruction!r}; allowed: "
                     + ", ".join(map(repr, RECONSTRUCTIONS)) + ".")
  for name, value in (("kl_weight", kl_weight), ("perceptual_weight", perceptual_weight)):
    if not np.isfinite(value) or value < 0:
      raise ValueError(f"{name}={value!r} must be a finite number >= 0.")
  if perceptual_weight > 0 and perceptual_fn is None:
    raise ValueError("perceptual_weight > 0 needs perceptual_fn (x, x_hat) -> [B], e.g. "
                     "research.models.classifier.perceptual_distance_fn(net.model, net.params) "
                     "on research.metrics.fd's feature network.")


@dataclasses.dataclass(frozen=True)
class AutoencoderObjective:
  """Stage 1 as a trainable objective: init(rng, batch) -> params, loss(params, batch, rng).

  Batches are {"x": images [B, H, W, C] in [-1, 1], ...}; other keys are ignored. It has no
  sampler (an autoencoder does not generate): `reconstruct` is its evaluation, and
  `sampler_names` is empty, `guidance_kinds` empty, `has_likelihood` False.

  Attributes:
    model: the AutoencoderKL.
    reconstruction, kl_weight, perceptual_weight, perceptual_fn: see `autoencoder_loss`.
    data_shape: shape of one image (H, W, C).
  """
  model: AutoencoderKL
  reconstruction: str = "l1"
  kl_weight: float = 1e-6
  perceptual_weight: float = 0.0
  perceptual_fn: Optional[Callable] = None
  data_shape: Tuple[int, ...] = ()

  sampler_names = ()
  guidance_kinds = ()
  has_likelihood = False

  def __post_init__(self):
    object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
    check_loss_settings(self.reconstruction, self.kl_weight, self.perceptual_weight,
                        self.perceptual_fn)
    if self.data_shape:
      self.model.latent_shape(self.data_shape)

  def init(self, rng, batch):
    return self.model.init(rng, batch["x"])["params"]

  def loss(self, params, batch, rng):
    return autoencoder_loss(self.model, params, batch["x"], rng,
                            reconstruction=self.reconstruction, kl_weight=self.kl_weight,
                            perceptual_weight=self.perceptual_weight,
                            perceptual_fn=self.perceptual_fn)

  def reconstruct(self, params, x):
    """x_hat [B, H, W, C] decoded from the posterior mean (deterministic)."""
    _, mean = encode_latents(self.model, params, x, None)
    return decode_latents(self.model, params, mean)


# --- between the stages -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def encode_latents(model: AutoencoderKL, params, x, rng: Optional[jax.Array]
                   ) -> Tuple[Optional[jax.Array], jax.Array]:
  """(posterior sample, posterior mean) of images x, unscaled; the sample is None when rng
  is None (no random numbers drawn: they cost compile time on CPU). Jitted per model, shape
  and rng-or-None, and inlined into any jitted caller."""
  posterior = model.apply({"params": params}, x, method=AutoencoderKL.encode)
  return (None if rng is None else posterior.sample(rng)), posterior.mode()


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(model: AutoencoderKL, params, z) -> jax.Array:
  """Images decoded from unscaled latents z (jitted; params are arguments, not constants)."""
  return model.apply({"params": params}, z, method=AutoencoderKL.decode)


def latent_scale_factor(model: AutoencoderKL, params, images, rng: Optional[jax.Array], *,
                        use_mean: bool = False, batch_size: int = 256) -> float:
  """1 / std of the latents of `images`: the number z is multiplied by for stage 2.

  SD computes it once (0.18215 for its KL-f8 model) as 1 / std of posterior *samples* on
  training data, so that the diffusion model sees unit-variance latents; that is the
  default here (use_mean=True takes the posterior means instead). The std is over every
  latent entry of every image (mean subtracted), computed in float64.

  Args:
    model, params: the trained autoencoder.
    images: [N, H, W, C] training images in [-1, 1] (numpy or jax).
    rng: PRNG key of the posterior samples (unused, may be None, with use_mean).
    use_mean: take posterior means instead of samples.
    batch_size: images encoded per call (the last chunk is smaller: a second shape compiles
      unless batch_size divides N).
  Returns:
    A positive Python float.
  """
  images = np.asarray(images, np.float32)
  if rng is None and not use_mean:
    raise ValueError("latent_scale_factor: rng is needed for posterior samples (or pass "
                     "use_mean=True).")
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f"images must be a non-empty [N, H, W, C] array, got {images.shape}.")
  total = count = total_sq = 0.0
  for i, start in enumerate(range(0, len(images), batch_size)):
    key = None if use_mean else jax.random.fold_in(rng, i)
    sample, mean = encode_latents(model, params, jnp.asarray(images[start:start + batch_size]),
                                  key)
    z = np.asarray(mean if use_mean else sample, np.float64)
    total += z.sum()
    total_sq += np.square(z).sum()
    count += z.size
  mean = total / count
  std = float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
  if not np.isfinite(std) or std <= 0:
    raise ValueError(f"latent std is {std}: the autoencoder's latents are constant or not "
                     "finite, so no scale factor exists.")
  return 1.0 / std


@dataclasses.dataclass(frozen=True)
class FrozenAutoencoder:
  """A trained autoencoder as stage 2 uses it: z = scale_factor * posterior sample.

  `params` is excluded from equality and hashing (arrays do neither), so two holders of one
  model and scale compare equal whatever their weights: pass params as arguments, not as
  static values, to anything jit caches (as encode_latents / decode_latents take them).

  Attributes:
    model: the AutoencoderKL.
    params: its trained parameters (never updated by stage 2).
    scale_factor: latent_scale_factor's value, stored with the checkpoint.
    sample_posterior: stage-2 training latents are posterior samples (SD) or, if False, means.
  """
  model: AutoencoderKL
  params: Any = dataclasses.field(compare=False, repr=False)
  scale_factor: float = 1.0
  sample_posterior: bool = True

  def __post_init__(self):
    if not np.isfinite(self.scale_factor) or self.scale_factor <= 0:
      raise ValueError(f"scale_factor={self.scale_factor!r} must be a finite number > 0 "
                       "(latent_scale_factor computes it).")

  def latent_shape(self, image_shape: Sequence[int]) -> Tuple[int, int, int]:
    return self.model.latent_shape(image_shape)

  def encode(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """Images [B, H, W, C] in [-1, 1] -> scaled latents, gradient-stopped (frozen encoder):
    a posterior sample drawn with rng, or the posterior mean when rng is None or
    sample_posterior is False."""
    key = rng if self.sample_posterior else None
    sample, mean = encode_latents(self.model, self.params, x, key)
    return jax.lax.stop_gradient(self.scale_factor * (mean if sample is None else sample))

  def decode(self, z: jax.Array) -> jax.Array:
    """Scaled latents [B, h, w, C] -> images [B, H, W, C]."""
    return decode_latents(self.model, self.params, z / self.scale_factor)
