"""Flow models: steps of flow stacked with `nn.scan`, vector flows and multi-scale image flows.

  NICE     additive couplings with alternating masks, then a diagonal scaling layer.
  RealNVP  affine couplings with alternating masks (checkerboard and channel for images), each
           preceded by ActNorm in image flows (our stand-in for RealNVP's batch norm: same
           role, no batch statistics at test time).
  Glow     [ActNorm] -> invertible 1x1 convolution (LU) -> affine coupling with a channel mask.
  spline   rational-quadratic spline couplings with alternating masks (neural spline flow,
           Durkan et al. 2019).
  maf      masked autoregressive layers with spline transformers (MADE conditioner), each
           followed by reversing the order of the dimensions (vectors only).

ActNorm: on by default for image flows (RealNVP, Glow); off by default for vector flows,
where it measured worse on the ring (README, "Flows"); `actnorm=True/False` overrides.

A stack of L steps is one `nn.scan` over a single step module with parameters stacked along a
leading layer axis, so the traced program (and the compile time) does not grow with L. Layer
i receives its index i and its fixed 1x1-convolution permutation as scanned inputs; from the
index the step picks its mask (`mask_pattern[i % len(mask_pattern)]`).

Every flow maps data x to a latent z of the same shape with a standard-normal prior:
  forward(x, labels=None) -> (z, logdet [B]);  inverse(z, labels=None) -> (x, logdet [B]).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from research.flows import bijectors
from research.flows import splines

Array = jnp.ndarray

KINDS = ("nice", "realnvp", "glow", "spline", "maf")
VECTOR_ONLY_KINDS = ("maf",)
STEP_TRANSFORMS = bijectors.COUPLINGS + ("autoregressive",)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """One step of flow (frozen, so it can be a Linen attribute).

  Attributes:
    coupling: "additive" (NICE), "affine", "spline" (masked couplings) or "autoregressive"
      (a MAF layer with spline transformers, then the dimensions reversed; vectors only).
    mask_pattern: masks cycled over the layers of a stack (see bijectors.MASK_KINDS).
    actnorm: start the step with ActNorm.
    conv1x1: then an invertible 1x1 convolution (LU).
    hidden: conditioner width (MLP units / conv channels).
    depth: hidden layers of the MLP conditioner (vector flows).
    scale_bound: bound on the per-layer log-scale of affine couplings.
    seed: seed of the fixed permutations of the 1x1 convolutions.
    num_bins, tail_bound: spline bins K on [-tail_bound, tail_bound] (spline, autoregressive).
  """
  coupling: str = "affine"
  mask_pattern: Tuple[str, ...] = ("channel", "channel_inv")
  actnorm: bool = True
  conv1x1: bool = False
  hidden: int = 128
  depth: int = 2
  scale_bound: float = 2.0
  seed: int = 0
  num_bins: int = 8
  tail_bound: float = 5.0

  @property
  def spline(self) -> splines.SplineSettings:
    return splines.SplineSettings(num_bins=self.num_bins, tail_bound=self.tail_bound)

  def validate(self):
    if self.coupling not in STEP_TRANSFORMS:
      raise ValueError(f"coupling={self.coupling!r} is not allowed; allowed: {STEP_TRANSFORMS}.")
    self.spline.validate()
    for k in self.mask_pattern:
      if k not in bijectors.MASK_KINDS:
        raise ValueError(f"mask_pattern entry {k!r} is not allowed; allowed: {bijectors.MASK_KINDS}.")
    if not self.mask_pattern:
      raise ValueError("mask_pattern is empty; give at least one mask kind.")
    if self.hidden < 1 or self.depth < 0:
      raise ValueError(f"hidden={self.hidden}, depth={self.depth}: need hidden >= 1, depth >= 0.")
    if not self.scale_bound > 0:
      raise ValueError(f"scale_bound={self.scale_bound!r} is not allowed; it must be > 0.")


class FlowStep(nn.Module):
  """[ActNorm] -> [1x1 conv with permutation `perm`] -> coupling with mask number `index`.

  With coupling="autoregressive" the last part is a MAF layer followed by reversing the
  dimensions (a permutation, logdet 0), so consecutive layers alternate the ordering.
  """
  config: StepConfig

  def setup(self):
    cfg = self.config
    if cfg.actnorm:
      self.actnorm = bijectors.ActNorm()
    if cfg.conv1x1:
      self.conv = bijectors.Conv1x1(seed=cfg.seed)
    if cfg.coupling == "autoregressive":
      self.coupling = bijectors.MaskedAutoregressive(hidden=cfg.hidden, depth=cfg.depth,
                                                     spline=cfg.spline)
    else:
      self.coupling = bijectors.Coupling(kind=cfg.coupling, hidden=cfg.hidden, depth=cfg.depth,
                                         scale_bound=cfg.scale_bound, spline=cfg.spline)

  def _transform(self, x, index, context, inverse: bool):
    if self.config.coupling == "autoregressive":
      if inverse:
        x, ld = self.coupling.inverse(x[..., ::-1], context)
        return x, ld
      x, ld = self.coupling.forward(x, context)
      return x[..., ::-1], ld
    if inverse:
      return self.coupling.inverse(x, self._mask(x, index), context)
    return self.coupling.forward(x, self._mask(x, index), context)

  def _mask(self, x: Array, index) -> Array:
    masks = jnp.asarray(bijectors.make_masks(self.config.mask_pattern, x.shape[1:]))
    return masks[index % len(self.config.mask_pattern)]

  def forward(self, x: Array, index, perm=None, context: Optional[Array] = None):
    logdet = jnp.zeros((x.shape[0],), x.dtype)
    if self.config.actnorm:
      x, ld = self.actnorm.forward(x)
      logdet += ld
    if self.config.conv1x1:
      x, ld = self.conv.forward(x, perm)
      logdet += ld
    x, ld = self._transform(x, index, context, inverse=False)
    return x, logdet + ld

  def inverse(self, y: Array, index, perm=None, context: Optional[Array] = None):
    y, logdet = self._transform(y, index, context, inverse=True)
    if self.config.conv1x1:
      y, ld = self.conv.inverse(y, perm)
      logdet += ld
    if self.config.actnorm:
      y, ld = self.actnorm.inverse(y)
      logdet += ld
    return y, logdet

  def __call__(self, x, index, perm=None, context=None):
    return self.forward(x, index, perm, context)


class FlowStack(nn.Module):
  """`num_layers` FlowSteps as one `nn.scan` (optionally rematerialised in the backward pass).

  Parameters of all layers are stacked along a leading axis of size `num_layers`. During init
  the scan runs the layers in order on the real input, so each ActNorm is initialised from the
  statistics of the batch as it arrives at that layer.
  """
  config: StepConfig
  num_layers: int
  remat: bool = False

  @nn.compact
  def _setup(self):
    if self.num_layers < 1:
      raise ValueError(f"num_layers={self.num_layers!r} is not allowed; it must be >= 1.")
    self.config.validate()
    step_cls = FlowStep
    if self.remat:
      step_cls = nn.remat(FlowStep, prevent_cse=False, methods=("forward", "inverse"))
    step = step_cls(self.config, name="steps")

    def fwd(m, x, index, perm, context):
      return m.forward(x, index, perm, context)

    def inv(m, x, index, perm, context):
      return m.inverse(x, index, perm, context)

    kw = dict(variable_axes={"params": 0}, split_rngs={"params": True},
              in_axes=(0, 0, nn.broadcast), length=self.num_layers)
    return step, nn.scan(fwd, **kw), nn.scan(inv, reverse=True, **kw)

  def _layer_inputs(self, x: Array):
    """Per-layer scanned inputs: the index and the 1x1-conv permutation [L, C] (constants)."""
    c = x.shape[-1]
    perms = np.stack([bijectors.fixed_permutation(self.config.seed, i, c)
                      for i in range(self.num_layers)])
    return jnp.arange(self.num_layers), jnp.asarray(perms)

  def forward(self, x: Array, context: Optional[Array] = None):
    step, scan_fwd, _ = self._setup()
    x, logdets = scan_fwd(step, x, *self._layer_inputs(x), context)
    return x, jnp.sum(logdets, axis=0)

  def inverse(self, y: Array, context: Optional[Array] = None):
    step, _, scan_inv = self._setup()
    y, logdets = scan_inv(step, y, *self._layer_inputs(y), context)
    return y, jnp.sum(logdets, axis=0)

  def __call__(self, x, context=None):
    return self.forward(x, context)


def step_config(kind: str, *, image: bool, hidden: int = 128, depth: int = 2,
                scale_bound: float = 2.0, seed: int = 0, actnorm: Optional[bool] = None,
                num_bins: int = 8, tail_bound: float = 5.0) -> StepConfig:
  """The step of flow of each kind for vector (image=False) or image data.

  actnorm=None takes the measured default: ActNorm before every RealNVP / Glow / spline step
  of an image flow, none in vector flows (NICE never has one).
  """
  if kind not in KINDS:
    raise ValueError(f"flow kind={kind!r} is not allowed; allowed: {KINDS}.")
  if image and kind in VECTOR_ONLY_KINDS:
    raise ValueError(f"flow kind={kind!r} is for vector data [D] only; for images use one of "
                     f"{tuple(k for k in KINDS if k not in VECTOR_ONLY_KINDS)}.")
  alternating = (("checkerboard", "checkerboard_inv", "channel", "channel_inv") if image
                 else ("channel", "channel_inv"))
  common = dict(hidden=hidden, depth=depth, scale_bound=scale_bound, seed=seed,
                num_bins=num_bins, tail_bound=tail_bound)
  if kind == "nice":
    if actnorm:
      raise ValueError("actnorm=True is not allowed with kind='nice' (volume-preserving "
                       "couplings and one diagonal scaling); use None or False.")
    return StepConfig(coupling="additive", mask_pattern=alternating, actnorm=False,
                      conv1x1=False, **common)
  actnorm = bool(image) if actnorm is None else bool(actnorm)
  if kind == "realnvp":
    return StepConfig(coupling="affine", mask_pattern=alternating, actnorm=actnorm,
                      conv1x1=False, **common)
  if kind == "spline":
    return StepConfig(coupling="spline", mask_pattern=alternating, actnorm=actnorm,
                      conv1x1=False, **common)
  if kind == "maf":
    return StepConfig(coupling="autoregressive", actnorm=actnorm, conv1x1=False, **common)
  return StepConfig(coupling="affine", mask_pattern=("channel",), actnorm=actnorm, conv1x1=True,
                    **common)


class _LabelContext(nn.Module):
  """Class label [B] -> embedding [B, dim] fed to every conditioner (None when unconditional)."""
  num_classes: int
  dim: int

  @nn.compact
  def __call__(self, labels: Optional[Array], batch: int) -> Optional[Array]:
    if self.num_classes == 0:
      return None
    if labels is None:
      raise ValueError(f"this flow is class-conditional (num_classes={self.num_classes}); "
                       "pass labels [B].")
    labels = jnp.asarray(labels, jnp.int32).reshape(batch)
    return nn.Embed(self.num_classes, self.dim, name="embed")(labels)


class VectorFlow(nn.Module):
  """A coupling flow on vectors [B, D] with MLP conditioners.

  Attributes:
    kind: "nice", "realnvp" or "glow".
    num_layers: steps of flow.
    hidden, depth: MLP conditioner width and hidden layers.
    scale_bound: per-layer log-scale bound of affine couplings.
    num_classes: > 0 makes the flow class-conditional (labels [B] required).
    remat: rematerialise each step in the backward pass (memory for compute).
    actnorm: ActNorm in every step; None = the kind's default (off for vector flows).
    num_bins, tail_bound: spline bins on [-tail_bound, tail_bound] (spline, maf).
  """
  kind: str = "realnvp"
  num_layers: int = 8
  hidden: int = 128
  depth: int = 2
  scale_bound: float = 2.0
  num_classes: int = 0
  remat: bool = False
  seed: int = 0
  actnorm: Optional[bool] = None
  num_bins: int = 8
  tail_bound: float = 5.0

  @nn.compact
  def _setup(self, x: Array, labels):
    if x.ndim != 2:
      raise ValueError(f"VectorFlow input must be [B, D], got shape {x.shape}.")
    if x.shape[-1] < 2:
      raise ValueError(f"VectorFlow needs D >= 2 (a coupling splits the vector), got D={x.shape[-1]}.")
    cfg = step_config(self.kind, image=False, hidden=self.hidden, depth=self.depth,
                      scale_bound=self.scale_bound, seed=self.seed, actnorm=self.actnorm,
                      num_bins=self.num_bins, tail_bound=self.tail_bound)
    stack = FlowStack(cfg, self.num_layers, self.remat, name="stack")
    context = _LabelContext(self.num_classes, self.hidden, name="context")(labels, x.shape[0])
    scaling = bijectors.Scaling(name="scaling") if self.kind == "nice" else None
    return stack, context, scaling

  def forward(self, x: Array, labels: Optional[Array] = None):
    stack, context, scaling = self._setup(x, labels)
    z, logdet = stack.forward(x, context)
    if scaling is not None:
      z, ld = scaling.forward(z)
      logdet += ld
    return z, logdet

  def inverse(self, z: Array, labels: Optional[Array] = None):
    stack, context, scaling = self._setup(z, labels)
    logdet = jnp.zeros((z.shape[0],), z.dtype)
    if scaling is not None:
      z, logdet = scaling.inverse(z)
    x, ld = stack.inverse(z, context)
    return x, logdet + ld

  def __call__(self, x, labels=None):
    return self.forward(x, labels)


def multiscale_shapes(shape: Sequence[int], num_scales: int):
  """Per level: the shape [h, w, c] the steps act on, and the channels factored out after it.

  Level l squeezes by 2, runs its steps, then (except the last level) factors out half of the
  channels, which go straight to the latent.
  """
  h, w, c = (int(s) for s in shape)
  if num_scales < 1:
    raise ValueError(f"num_scales={num_scales!r} is not allowed; it must be >= 1.")
  if h % (2**num_scales) or w % (2**num_scales):
    raise ValueError(f"image shape {tuple(shape)} does not allow num_scales={num_scales}: H and W "
                     f"must be divisible by 2**num_scales={2**num_scales}.")
  levels = []
  for level in range(num_scales):
    h, w, c = h // 2, w // 2, c * 4
    out = c // 2 if level < num_scales - 1 else 0
    levels.append(((h, w, c), out))
    c -= out
  return levels


class MultiScaleFlow(nn.Module):
  """A multi-scale coupling flow on images [B, H, W, C] (RealNVP/Glow architecture).

  Per level: squeeze (2x2 space-to-depth) -> `num_layers` steps of flow -> factor out half of
  the channels (they are Gaussian latents from here on; the remaining half continues to the
  next, coarser level). The factored-out parts and the final output are flattened and
  concatenated into z with the input's shape. At a 1x1 level, checkerboard masks are dropped
  from the pattern (they would leave nothing to transform).

  Attributes:
    kind: "nice", "realnvp" or "glow".
    num_scales: levels (H and W must be divisible by 2**num_scales).
    num_layers: steps of flow per level.
    hidden: conditioner channels.
    scale_bound, num_classes, remat, seed, num_bins, tail_bound: as in VectorFlow.
    actnorm: ActNorm in every step; None = the kind's default (on for image flows).
  """
  kind: str = "glow"
  num_scales: int = 2
  num_layers: int = 8
  hidden: int = 64
  scale_bound: float = 2.0
  num_classes: int = 0
  remat: bool = False
  seed: int = 0
  actnorm: Optional[bool] = None
  num_bins: int = 8
  tail_bound: float = 5.0

  @nn.compact
  def _setup(self, x: Array, labels):
    if x.ndim != 4:
      raise ValueError(f"MultiScaleFlow input must be [B, H, W, C], got shape {x.shape}.")
    levels = multiscale_shapes(x.shape[1:], self.num_scales)
    stacks = []
    for level, ((h, w, _), _) in enumerate(levels):
      cfg = step_config(self.kind, image=True, hidden=self.hidden, scale_bound=self.scale_bound,
                        seed=self.seed * 1000 + level, actnorm=self.actnorm,
                        num_bins=self.num_bins, tail_bound=self.tail_bound)
      if h * w == 1:
        cfg = dataclasses.replace(
            cfg, mask_pattern=tuple(k for k in cfg.mask_pattern if "checkerboard" not in k))
      stacks.append(FlowStack(cfg, self.num_layers, self.remat, name=f"level{level}"))
    context = _LabelContext(self.num_classes, self.hidden, name="context")(labels, x.shape[0])
    scaling = bijectors.Scaling(name="scaling") if self.kind == "nice" else None
    return levels, stacks, context, scaling

  def forward(self, x: Array, labels: Optional[Array] = None):
    levels, stacks, context, scaling = self._setup(x, labels)
    b = x.shape[0]
    logdet = jnp.zeros((b,), x.dtype)
    h, parts = x, []
    for ((_, _, c), out), stack in zip(levels, stacks):
      h = bijectors.squeeze(h)
      h, ld = stack.forward(h, context)
      logdet += ld
      if out:
        parts.append(h[..., c - out:].reshape(b, -1))
        h = h[..., :c - out]
    parts.append(h.reshape(b, -1))
    z = jnp.concatenate(parts, axis=-1).reshape(x.shape)
    if scaling is not None:
      z, ld = scaling.forward(z)
      logdet += ld
    return z, logdet

  def inverse(self, z: Array, labels: Optional[Array] = None):
    levels, stacks, context, scaling = self._setup(z, labels)
    b = z.shape[0]
    logdet = jnp.zeros((b,), z.dtype)
    if scaling is not None:
      z, logdet = scaling.inverse(z)
    flat = z.reshape(b, -1)
    # Split the flat latent back into the factored-out parts and the last level's output.
    sizes = [hh * ww * out for (hh, ww, _), out in levels[:-1]]
    (hh, ww, cc), _ = levels[-1]
    sizes.append(hh * ww * cc)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1], axis=-1)
    h = parts[-1].reshape(b, hh, ww, cc)
    for level in reversed(range(len(levels))):
      (hh, ww, c), out = levels[level]
      if out:
        h = jnp.concatenate([h, parts[level].reshape(b, hh, ww, out)], axis=-1)
      h, ld = stacks[level].inverse(h, context)
      logdet += ld
      h = bijectors.unsqueeze(h)
    return h, logdet

  def __call__(self, x, labels=None):
    return self.forward(x, labels)


def make_flow(kind: str, data_shape: Sequence[int], *, num_layers: int = 8, hidden: int = 128,
              depth: int = 2, num_scales: int = 2, scale_bound: float = 2.0,
              num_classes: int = 0, remat: bool = False, seed: int = 0,
              actnorm: Optional[bool] = None, num_bins: int = 8,
              tail_bound: float = 5.0) -> nn.Module:
  """A flow of one of KINDS for examples of shape `data_shape` ([D] or [H, W, C])."""
  if kind not in KINDS:
    raise ValueError(f"flow kind={kind!r} is not allowed; allowed: {KINDS}.")
  data_shape = tuple(int(s) for s in data_shape)
  common = dict(kind=kind, num_layers=num_layers, hidden=hidden, scale_bound=scale_bound,
                num_classes=num_classes, remat=remat, seed=seed, actnorm=actnorm,
                num_bins=num_bins, tail_bound=tail_bound)
  # Validate the step here, before anything is traced.
  step_config(kind, image=len(data_shape) == 3, hidden=hidden, depth=depth,
              scale_bound=scale_bound, actnorm=actnorm, num_bins=num_bins,
              tail_bound=tail_bound).validate()
  if len(data_shape) == 1:
    return VectorFlow(depth=depth, **common)
  if len(data_shape) == 3:
    return MultiScaleFlow(num_scales=num_scales, **common)
  raise ValueError(f"data_shape={data_shape} is not allowed: [D] (vectors) or [H, W, C] (images).")
