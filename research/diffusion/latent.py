"""Latent diffusion (Rombach et al. 2022) as a training objective: diffusion on the latents of
a frozen KL autoencoder, conditioned on text (or class labels), guided with CFG.

It implements the objective protocol (research/objective.py) with `has_likelihood = False`
(the autoencoder's decoder has no tractable density), `guidance_kinds = ("cfg",)` and every
sampler of research.diffusion.samplers:

  training   z = scale_factor * posterior sample of the frozen encoder (autoencoder.
             FrozenAutoencoder.encode); the condition (text features of the caption, or the
             label) is replaced by the null condition with probability p_uncond (caption /
             label dropout); a research.diffusion.losses loss on z.
  sampling   the sampler runs on latents [num, h, w, C]; the text is encoded once, outside the
             sampler loop; with guidance_scale w != 1 each score evaluation is ONE UNet call on
             the doubled batch [cond; null] (guidance.classifier_free_guidance_on); the latents
             are decoded to data space (not clipped, like every objective's samples).

Conditioning "text": params = {"unet": ..., "text_encoder": ...} (the text encoder trains
jointly with the UNet); batches {"x": images [B, H, W, C] in [-1, 1], "caption_ids": int32
[B, L], "caption_lengths": int32 [B]} (Tokenizer.encode); the null condition is the empty
caption (length 0), which the UNet's cross-attention attends to nothing of.
Conditioning "label": params = {"unet": ...}; batches {"x", "label": int [B]}; the null
condition is label `num_classes` (the UNet's null class token).

Everything is pure: the autoencoder's weights and the scale factor live in the objective (they
are frozen), and nothing reads or writes files.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion import guidance
from research.diffusion import losses as losses_lib
from research.diffusion import samplers as samplers_lib
from research.diffusion.objective import check_sampler_options
from research.models.autoencoder import FrozenAutoencoder
from research.models.text import Tokenizer

CONDITIONINGS = ("text", "label")


def _unet_kwargs(conditioning: str, unet_cond) -> Dict[str, Any]:
  """The UNet's keyword arguments for a condition: labels, or (context, lengths)."""
  if conditioning == "text":
    return {"context": unet_cond[0], "context_lengths": unet_cond[1]}
  return {"labels": unet_cond}


@functools.lru_cache(maxsize=None)
def _unet_fn(unet: nn.Module, conditioning: str):
  """fn(params, x, t, cond) -> raw UNet output in eval mode; cond = (context, lengths) for
  text, labels [B] for "label". One function object per module, so Partials share jit caches."""
  def fn(params, x, t, cond):
    return unet.apply({"params": params}, x, t, train=False, **_unet_kwargs(conditioning, cond))
  return fn


@functools.lru_cache(maxsize=None)
def _text_fn(text_encoder: nn.Module):
  return jax.jit(lambda params, ids, lengths: text_encoder.apply({"params": params}, ids,
                                                                 lengths))


@dataclasses.dataclass(frozen=True)
class LatentDiffusionObjective:
  """Text- or label-conditional diffusion on a frozen autoencoder's latents.

  Attributes:
    autoencoder: the frozen stage-1 model with its params and scale factor.
    unet: the latent network, research.models.unet.UNet with context_dim = the text
      encoder's width (text) or num_classes = num_classes (label), on latent channels.
    sde: an SDE from research.diffusion.sde.
    conditioning: "text" or "label".
    text_encoder: research.models.text.TextEncoder (text only).
    tokenizer: research.models.text.Tokenizer of the captions (text only; prompts given as
      strings go through it).
    num_classes: number of classes (label only); label num_classes is the null token.
    p_uncond: probability of replacing the condition by the null one in training (CFG).
    loss_name, prediction, loss_options: the research.diffusion.losses loss on latents.
    data_shape: shape of one image (H, W, C): what `sample` returns after decoding.
  """
  autoencoder: FrozenAutoencoder
  unet: nn.Module
  sde: Any
  conditioning: str = "text"
  text_encoder: Optional[nn.Module] = None
  tokenizer: Optional[Tokenizer] = None
  num_classes: int = 0
  p_uncond: float = 0.1
  loss_name: str = "ddpm"
  prediction: str = "eps"
  loss_options: Tuple[Tuple[str, Any], ...] = ()
  data_shape: Tuple[int, ...] = ()

  guidance_kinds = ("cfg",)
  has_likelihood = False
  guidance_in_sample = True   # sample(..., guidance_scale=w) applies CFG itself

  @property
  def takes_prompts(self) -> bool:
    """Whether `sample` is conditioned on text (prompts=...) rather than labels."""
    return self.conditioning == "text"

  def __post_init__(self):
    object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"conditioning={self.conditioning!r}; allowed: "
                       + ", ".join(map(repr, CONDITIONINGS)) + ".")
    if len(self.data_shape) != 3:
      raise ValueError(f"data_shape={self.data_shape} must be the image shape (H, W, C).")
    if not 0.0 <= self.p_uncond < 1.0:
      raise ValueError(f"p_uncond={self.p_uncond!r} must lie in [0, 1).")
    context_dim = getattr(self.unet, "context_dim", 0)
    if self.conditioning == "text":
      if self.text_encoder is None or self.tokenizer is None:
        raise ValueError("conditioning='text' needs text_encoder and tokenizer.")
      if self.text_encoder.vocab_size != self.tokenizer.vocab_size:
        raise ValueError(f"text_encoder.vocab_size={self.text_encoder.vocab_size} differs from "
                         f"the tokenizer's {self.tokenizer.vocab_size}.")
      if context_dim != self.text_encoder.width:
        raise ValueError(f"unet.context_dim={context_dim} must equal text_encoder.width="
                         f"{self.text_encoder.width} (the UNet cross-attends to its output).")
    else:
      if self.num_classes < 1 or getattr(self.unet, "num_classes", 0) != self.num_classes:
        raise ValueError(f"conditioning='label' needs num_classes >= 1 equal to "
                         f"unet.num_classes; got {self.num_classes} and "
                         f"{getattr(self.unet, 'num_classes', None)}.")
      if context_dim:
        raise ValueError("conditioning='label' takes a UNet without cross-attention "
                         f"(context_dim=0), got context_dim={context_dim}.")
    # Eagerly, so a bad loss name/option or image size fails before any compile.
    object.__setattr__(self, "_loss_fn", losses_lib.get_loss_fn(
        self.loss_name, self.sde, prediction=self.prediction, **dict(self.loss_options)))
    object.__setattr__(self, "_latent_shape", self.autoencoder.latent_shape(self.data_shape))

  # -- capabilities ----------------------------------------------------------------------------
  @property
  def sampler_names(self) -> Tuple[str, ...]:
    return tuple(samplers_lib.available())

  @property
  def latent_shape(self) -> Tuple[int, int, int]:
    """(h, w, C) of the latents the UNet diffuses."""
    return self._latent_shape

  @property
  def max_caption_length(self) -> int:
    """Tokens per caption (text only): the text encoder's max_len, used to encode prompts."""
    return int(self.text_encoder.max_len) if self.conditioning == "text" else 0

  @property
  def sampling_prediction(self) -> str:
    return losses_lib.sampling_prediction(self.loss_name, self.prediction)

  @property
  def sigma_data(self) -> float:
    return float(dict(self.loss_options).get("sigma_data", 0.5))

  # -- conditions ------------------------------------------------------------------------------
  def _captions(self, batch) -> Tuple[jax.Array, jax.Array]:
    missing = [k for k in ("caption_ids", "caption_lengths") if k not in batch]
    if missing:
      raise ValueError(f"conditioning='text' needs batch keys 'caption_ids' [B, L] and "
                       f"'caption_lengths' [B]; missing {missing} (have {sorted(batch)}).")
    return (jnp.asarray(batch["caption_ids"], jnp.int32),
            jnp.asarray(batch["caption_lengths"], jnp.int32))

  def _labels(self, batch) -> jax.Array:
    if "label" not in batch:
      raise ValueError(f"conditioning='label' needs batch key 'label' [B]; have {sorted(batch)}.")
    return jnp.asarray(batch["label"], jnp.int32)

  def _dropped(self, cond, rng):
    """cond with each example replaced by the null condition with probability p_uncond."""
    if self.p_uncond <= 0:
      return cond
    if self.conditioning == "label":
      drop = jax.random.bernoulli(rng, self.p_uncond, cond.shape)
      return jnp.where(drop, self.num_classes, cond)
    ids, lengths = cond
    drop = jax.random.bernoulli(rng, self.p_uncond, lengths.shape)
    empty = jnp.full(ids.shape[1:], Tokenizer.PAD_ID, jnp.int32).at[0].set(Tokenizer.EMPTY_ID)
    return jnp.where(drop[:, None], empty[None], ids), jnp.where(drop, 0, lengths)

  def _unet_cond(self, params, cond):
    """The UNet's conditioning input: (context, lengths) from the text encoder, or labels."""
    if self.conditioning == "label":
      return cond
    ids, lengths = cond
    return self.text_encoder.apply({"params": params["text_encoder"]}, ids, lengths), lengths

  # -- training --------------------------------------------------------------------------------
  def _check_images(self, x):
    if tuple(x.shape[1:]) != self.data_shape:
      raise ValueError(f"batch['x'] has shape {tuple(x.shape)}; expected [B, *data_shape] with "
                       f"data_shape={self.data_shape}.")

  def init(self, rng, batch: Dict[str, jax.Array]):
    """{"unet": ..., "text_encoder": ... (text only)} from one batch."""
    x = jnp.asarray(batch["x"], jnp.float32)
    self._check_images(x)
    t_rng, u_rng = jax.random.split(rng)
    z = self.autoencoder.encode(x)  # the posterior mean: only its shape matters here
    t = jnp.full((x.shape[0],), 0.5, jnp.float32)
    params = {}
    if self.conditioning == "text":
      ids, lengths = self._captions(batch)
      params["text_encoder"] = self.text_encoder.init(t_rng, ids, lengths)["params"]
      cond = self._unet_cond(params, (ids, lengths))
    else:
      cond = self._labels(batch)
    params["unet"] = self.unet.init(
        {"params": u_rng, "dropout": u_rng}, z, t,
        **_unet_kwargs(self.conditioning, cond))["params"]
    return params

  def loss(self, params, batch, rng):
    """Mean diffusion loss on the scaled latents of batch["x"]; metrics: loss, latent_std."""
    e_rng, c_rng, l_rng, d_rng = jax.random.split(rng, 4)
    x = jnp.asarray(batch["x"], jnp.float32)
    z = self.autoencoder.encode(x, e_rng)
    raw = self._captions(batch) if self.conditioning == "text" else self._labels(batch)
    unet_cond = self._unet_cond(params, self._dropped(raw, c_rng))

    def model_fn(zt, t):
      return self.unet.apply({"params": params["unet"]}, zt, t, train=True,
                             rngs={"dropout": d_rng}, **_unet_kwargs(self.conditioning, unet_cond))

    loss = jnp.mean(self._loss_fn(model_fn, z, l_rng))
    return loss, {"loss": loss, "latent_std": jnp.std(z)}

  # -- sampling --------------------------------------------------------------------------------
  def encode_prompts(self, prompts, num: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ids [num, max_caption_length], lengths [num]) of `prompts`: None (the empty caption for
    every sample), a sequence of num strings (through the tokenizer), a pair (ids, lengths)
    or a dict with "caption_ids" and "caption_lengths"."""
    if self.conditioning != "text":
      raise ValueError("prompts apply to conditioning='text'; this objective is "
                       f"conditioning={self.conditioning!r} (pass labels).")
    max_len = self.max_caption_length
    if prompts is None:
      return self.tokenizer.encode([""] * num, max_len)
    if isinstance(prompts, dict):
      prompts = (prompts["caption_ids"], prompts["caption_lengths"])
    if isinstance(prompts, str):
      raise ValueError("prompts must be a sequence of num strings, not one string.")
    if all(isinstance(p, str) for p in prompts):
      ids, lengths = self.tokenizer.encode(list(prompts), max_len)
    elif len(prompts) == 2:
      ids, lengths = (np.asarray(a, np.int32) for a in prompts)
    else:
      raise ValueError("prompts must be None, num strings, (ids [num, L], lengths [num]) or "
                       "a dict with caption_ids / caption_lengths.")
    if ids.shape[0] != num or lengths.shape != (num,) or ids.ndim != 2:
      raise ValueError(f"prompts give ids {ids.shape} and lengths {lengths.shape}; need "
                       f"[num={num}, L] and [num].")
    return ids, lengths

  def conditions(self, params, num: int, *, labels=None, prompts=None):
    """(cond, null_cond) in the UNet's conditioning form, each with leading dimension num:
    text: (context [num, L, D], lengths [num]) with the null condition the empty caption's;
    label: labels [num] (None: the null label) and the null label."""
    if self.conditioning == "label":
      if prompts is not None:
        raise ValueError("prompts apply to conditioning='text'; this objective is "
                         "conditioning='label' (pass labels).")
      null = jnp.full((num,), self.num_classes, jnp.int32)
      if labels is None:
        return null, null
      labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (num,))
      return labels, null
    if labels is not None:
      raise ValueError("labels apply to conditioning='label'; this objective is "
                       "conditioning='text' (pass prompts).")
    ids, lengths = self.encode_prompts(prompts, num)
    empty_ids, empty_lengths = self.tokenizer.encode([""] * num, ids.shape[1])
    # One text-encoder call for the prompts and the null caption.
    context = _text_fn(self.text_encoder)(
        params["text_encoder"], jnp.concatenate([ids, empty_ids]),
        jnp.concatenate([lengths, empty_lengths]))
    return ((context[:num], jnp.asarray(lengths)),
            (context[num:], jnp.asarray(empty_lengths)))

  def score_fn(self, params, cond, null_cond=None, guidance_scale=1.0):
    """score_fn(z, t) on latents, a jax.tree_util.Partial (compiles once per shape).

    guidance_scale w = 1 (a Python number): the conditional score, one UNet call on the
    batch. Otherwise CFG eps_u + w (eps_c - eps_u) from ONE UNet call on the doubled batch.
    """
    model_fn = jax.tree_util.Partial(_unet_fn(self.unet, self.conditioning), params["unet"])
    common = dict(sde=self.sde, prediction=self.sampling_prediction,
                  sigma_data=self.sigma_data)
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 1:
      return guidance.condition_score_fn(model_fn, cond, **common)
    if null_cond is None:
      raise ValueError("guidance_scale != 1 needs null_cond (see `conditions`).")
    return guidance.classifier_free_guidance_on(model_fn, cond, null_cond, guidance_scale,
                                                **common)

  def check_options(self, options: Dict[str, Any], steps: int) -> None:
    """options = {"sampler": name, "guidance_scale": w (optional), **sampler options}."""
    opts = dict(options)
    _check_scale(opts.pop("guidance_scale", 1.0))
    check_sampler_options(opts, self.sde, steps)

  def sample(self, params, rng, num: int, *, labels=None, prompts=None, sampler: str = "ddpm",
             steps: int = 1000, guidance_scale=1.0, **options):
    """`num` images [num, *data_shape]: latents sampled with `sampler`, then decoded.

    Args:
      params: {"unet", "text_encoder" (text)}.
      rng: PRNG key.
      num: number of samples.
      labels: int [num] classes (label conditioning; None: unconditional).
      prompts: text conditioning: num strings, (ids, lengths) or a dict (see
        encode_prompts); None: unconditional (the empty caption).
      sampler, steps, **options: a research.diffusion.samplers sampler and its options.
      guidance_scale: CFG weight w (scalar or [num]); 1 is the plain conditional model.
    Returns:
      (images [num, H, W, C], the sampler's info with "nfe" = UNet evaluations per sample,
      each on the doubled batch when guided).
    """
    _check_scale(guidance_scale)
    cond, null = self.conditions(params, num, labels=labels, prompts=prompts)
    score_fn = self.score_fn(params, cond, null, guidance_scale)
    z, info = samplers_lib.sample(sampler, score_fn, self.sde, (num, *self.latent_shape), rng,
                                  steps=steps, **options)
    return self.autoencoder.decode(z), info

  def decode(self, z):
    """Scaled latents [B, h, w, C] -> images [B, H, W, C]."""
    return self.autoencoder.decode(z)


def _check_scale(scale) -> None:
  values = np.asarray(scale, np.float64)
  if values.ndim > 1 or not np.all(np.isfinite(values)):
    raise ValueError(f"guidance_scale={scale!r} must be a finite number (or one per sample).")
