"""Elementary bijectors for coupling flows (NICE, RealNVP, Glow) as Flax Linen modules.

Every bijector has two methods, called through `module.apply(variables, x, method="forward")`:

  forward(x, ...) -> (y, logdet [B])     logdet = log|det dy/dx|
  inverse(y, ...) -> (x, logdet [B])     logdet = log|det dx/dy| = -(forward logdet)

Tensors are [B, D] (vectors) or [B, H, W, C] (images). Channel-wise layers (ActNorm, the 1x1
convolution) act on the last axis, so the same module serves both layouts: a vector is an
"image" with no spatial axes.

Per-layer choices that differ between the layers of a stack (which mask, which fixed
permutation) are method *arguments*, not attributes: `nn.scan` runs one module instance for
every layer, so only arguments can vary from layer to layer (big_vision jet does the same).

Couplings start as the identity: the conditioner's last layer is zero-initialised, and the
log-scale is bounded by `scale_bound * tanh(raw / scale_bound)` (slope 1 at 0), so one layer
can never scale by more than exp(scale_bound). Spline couplings and the masked autoregressive
layer (MAF) transform with monotone rational-quadratic splines (research/flows/splines.py),
whose all-zero parameters are the identity too.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.flows import splines as splines_lib

Array = jnp.ndarray

MASK_KINDS = ("checkerboard", "checkerboard_inv", "channel", "channel_inv")
COUPLINGS = ("additive", "affine", "spline")


def _sum_except_batch(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _num_positions(x: Array) -> int:
  """How many times a channel-wise map is applied per example (1 for vectors, H*W for images)."""
  return int(np.prod(x.shape[1:-1], dtype=np.int64))


# --- masks -------------------------------------------------------------------------------------

def make_mask(kind: str, shape: Sequence[int]) -> np.ndarray:
  """A binary coupling mask for one example of shape [D] or [H, W, C] (1 = conditioning part).

  "checkerboard": for images (h + w) even; for vectors even indices.
  "channel": the first half of the last axis (needs at least 2 channels).
  The "_inv" variants are the complements, so alternating kind and kind_inv transforms every
  dimension.
  """
  if kind not in MASK_KINDS:
    raise ValueError(f"mask kind={kind!r} is not allowed; allowed: {MASK_KINDS}.")
  shape = tuple(int(s) for s in shape)
  if len(shape) not in (1, 3):
    raise ValueError(f"mask shape={shape} is not allowed: [D] (vectors) or [H, W, C] (images).")
  base = kind.replace("_inv", "")
  if base == "checkerboard":
    if len(shape) == 1:
      m = (np.arange(shape[0]) % 2 == 0)
    else:
      h, w, c = shape
      if h * w < 2:
        raise ValueError(f"checkerboard mask needs at least 2 spatial positions, got shape {shape}; "
                         "use 'channel' masks at 1x1 resolution.")
      m = ((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0)
      m = np.broadcast_to(m[:, :, None], shape)
  else:
    c = shape[-1]
    if c < 2:
      raise ValueError(f"channel mask needs at least 2 channels on the last axis, got shape {shape}.")
    m = np.broadcast_to(np.arange(c) < c // 2, shape)
  m = m.astype(np.float32)
  return 1.0 - m if kind.endswith("_inv") else m


def make_masks(kinds: Sequence[str], shape: Sequence[int]) -> np.ndarray:
  """Stacked masks [len(kinds), *shape]; layer i of a stack uses masks[i % len(kinds)]."""
  if not kinds:
    raise ValueError("mask pattern is empty; give at least one of " + ", ".join(MASK_KINDS) + ".")
  return np.stack([make_mask(k, shape) for k in kinds])


# --- conditioners ------------------------------------------------------------------------------

class MLPConditioner(nn.Module):
  """x [B, D] (+ context [B, E]) -> [B, out_dim]; the last layer starts at zero."""
  hidden: int
  depth: int
  out_dim: int

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    h = x if context is None else jnp.concatenate([x, context], axis=-1)
    for _ in range(self.depth):
      h = nn.gelu(nn.Dense(self.hidden)(h))
    return nn.Dense(self.out_dim, kernel_init=nn.initializers.zeros)(h)


class ConvConditioner(nn.Module):
  """Glow's conditioner: conv3x3 -> conv1x1 -> conv3x3 (zero-initialised) on [B, H, W, C].

  The context (e.g. a class embedding [B, E]) enters as a per-channel bias after the first conv.
  """
  hidden: int
  out_channels: int

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    h = nn.Conv(self.hidden, (3, 3), padding="SAME")(x)
    if context is not None:
      h = h + nn.Dense(self.hidden)(context)[:, None, None, :]
    h = nn.relu(h)
    h = nn.relu(nn.Conv(self.hidden, (1, 1))(h))
    return nn.Conv(self.out_channels, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros)(h)


# --- coupling ----------------------------------------------------------------------------------

class Coupling(nn.Module):
  """Masked coupling: y = x * exp(s(x * m)) + t(x * m) on the part where the mask m is 0.

  kind="additive" (NICE) has s = 0 and logdet 0; kind="affine" (RealNVP/Glow) has a bounded s;
  kind="spline" (neural spline flow, Durkan et al. 2019) replaces the affine map by a monotone
  rational-quadratic spline per element with K bins on [-B, B] and identity tails, whose
  3K - 1 parameters per element the conditioner outputs.
  The conditioner is an MLP for vectors [B, D] and a conv net for images [B, H, W, C]; for
  images the mask itself is fed as extra channels so the network knows which half it sees.

  Attributes:
    kind: "additive" or "affine".
    hidden: conditioner width (MLP units or conv channels).
    depth: hidden layers of the MLP conditioner (vectors only).
    scale_bound: |log-scale| < scale_bound per layer (affine only).
    mask_kind: the mask (make_mask) used when forward/inverse get none; stacks pass theirs.
    spline: bins and interval of the splines (spline only).
  """
  kind: str = "affine"
  hidden: int = 128
  depth: int = 2
  scale_bound: float = 2.0
  mask_kind: str = "checkerboard"
  spline: splines_lib.SplineSettings = splines_lib.SplineSettings()

  @nn.compact
  def _shift_and_log_scale(self, x: Array, mask: Array, context: Optional[Array]):
    """(shift, log_scale) masked to the transformed part; for splines (params [*x.shape, 3K-1],
    the transformed part's 0/1 indicator)."""
    if self.kind not in COUPLINGS:
      raise ValueError(f"coupling kind={self.kind!r} is not allowed; allowed: {COUPLINGS}.")
    if self.kind == "spline":
      self.spline.validate()
    mask = jnp.broadcast_to(mask, x.shape[1:]).astype(x.dtype)
    n_out = {"additive": 1, "affine": 2, "spline": self.spline.num_params}[self.kind]
    if x.ndim == 2:
      h = MLPConditioner(self.hidden, self.depth, n_out * x.shape[-1], name="conditioner")(
          x * mask, context)
    elif x.ndim == 4:
      inp = jnp.concatenate([x * mask, jnp.broadcast_to(mask, x.shape)], axis=-1)
      h = ConvConditioner(self.hidden, n_out * x.shape[-1], name="conditioner")(inp, context)
    else:
      raise ValueError(f"Coupling input must be [B, D] or [B, H, W, C], got shape {x.shape}.")
    inv = 1.0 - mask
    if self.kind == "spline":
      return h.reshape(*x.shape, n_out), inv
    if self.kind == "additive":
      return h * inv, jnp.zeros_like(x)
    shift, raw = jnp.split(h, 2, axis=-1)
    log_scale = self.scale_bound * jnp.tanh(raw / self.scale_bound)
    return shift * inv, log_scale * inv

  def _mask(self, x: Array, mask: Optional[Array]) -> Array:
    return jnp.asarray(make_mask(self.mask_kind, x.shape[1:])) if mask is None else mask

  def _spline(self, x, mask, context, inverse):
    params, inv = self._shift_and_log_scale(x, mask, context)
    y, ld = splines_lib.rational_quadratic_spline(x, params, self.spline, inverse=inverse)
    # The conditioning part passes through unchanged (and the inverse sees it unchanged).
    return jnp.where(inv > 0, y, x), _sum_except_batch(ld * inv)

  def forward(self, x: Array, mask: Optional[Array] = None, context: Optional[Array] = None):
    mask = self._mask(x, mask)
    if self.kind == "spline":
      return self._spline(x, mask, context, inverse=False)
    shift, log_scale = self._shift_and_log_scale(x, mask, context)
    # On the conditioning part shift = log_scale = 0, so y equals x there and the inverse sees
    # the same conditioner input.
    return x * jnp.exp(log_scale) + shift, _sum_except_batch(log_scale)

  def inverse(self, y: Array, mask: Optional[Array] = None, context: Optional[Array] = None):
    mask = self._mask(y, mask)
    if self.kind == "spline":
      return self._spline(y, mask, context, inverse=True)
    shift, log_scale = self._shift_and_log_scale(y, mask, context)
    return (y - shift) * jnp.exp(-log_scale), -_sum_except_batch(log_scale)

  def __call__(self, x, mask=None, context=None):
    return self.forward(x, mask, context)


# --- masked autoregressive flow ----------------------------------------------------------------

def made_masks(num_inputs: int, hidden: int, depth: int, out_per_input: int):
  """Connectivity masks of a MADE (Germain et al. 2015) for the identity ordering.

  Input i has degree i + 1; hidden units get degrees 1..D-1 in turn; output unit j (outputs
  laid out [D, out_per_input]) has degree j // out_per_input + 1. A hidden connection needs
  degree(out) >= degree(in), an output connection degree(out) > degree(in), so output group i
  depends on inputs 0..i-1 only (group 0 on nothing: its parameters are biases).

  Returns: a list of `depth + 1` float32 masks [fan_in, fan_out].
  """
  d = int(num_inputs)
  deg_in = np.arange(1, d + 1)
  masks = []
  for _ in range(depth):
    deg_h = np.arange(hidden) % max(1, d - 1) + 1
    masks.append((deg_h[None, :] >= deg_in[:, None]).astype(np.float32))
    deg_in = deg_h
  deg_out = np.repeat(np.arange(1, d + 1), out_per_input)
  masks.append((deg_out[None, :] > deg_in[:, None]).astype(np.float32))
  return masks


class MaskedDense(nn.Module):
  """Dense layer whose kernel is multiplied by a fixed 0/1 mask [fan_in, fan_out]."""
  features: int
  mask: np.ndarray
  zero_init: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return x @ (kernel * jnp.asarray(self.mask)) + bias


class MADE(nn.Module):
  """Autoregressive conditioner: x [B, D] (+ context [B, E]) -> params [B, D, out_per_input].

  params[:, i] depends on x[:, :i] only, and on the context, which enters unmasked into the
  first hidden layer and the output. The output layers start at zero.
  """
  hidden: int
  depth: int
  out_per_input: int

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    d = x.shape[-1]
    masks = made_masks(d, self.hidden, self.depth, self.out_per_input)
    h = x
    for i, m in enumerate(masks[:-1]):
      h = MaskedDense(self.hidden, m, name=f"masked{i}")(h)
      if i == 0 and context is not None:
        h = h + nn.Dense(self.hidden, use_bias=False, name="context")(context)
      h = nn.gelu(h)
    out = MaskedDense(d * self.out_per_input, masks[-1], zero_init=True,
                      name=f"masked{len(masks) - 1}")(h)
    if context is not None:  # directly too: no hidden unit reaches output group 0
      out = out + nn.Dense(d * self.out_per_input, use_bias=False,
                           kernel_init=nn.initializers.zeros, name="context_out")(context)
    return out.reshape(x.shape[0], d, self.out_per_input)


class MaskedAutoregressive(nn.Module):
  """One MAF layer (Papamakarios et al. 2017) with a rational-quadratic spline transformer.

  forward (density direction, one pass): y_i = spline(x_i; MADE(x)_i), params of element i
  from x_<i. inverse (sampling direction): D passes, the recursion x^(0) = 0,
  x^(n+1) = spline^-1(y; MADE(x^(n))); after pass n the first n elements are exact, so D
  passes give x. Only vectors [B, D].

  Attributes:
    hidden, depth: MADE width and hidden layers.
    spline: bins and interval of the element-wise splines.
  """
  hidden: int = 128
  depth: int = 2
  spline: splines_lib.SplineSettings = splines_lib.SplineSettings()

  @nn.compact
  def _conditioner(self, x: Array, context: Optional[Array]) -> Array:
    if x.ndim != 2:
      raise ValueError(f"MaskedAutoregressive input must be [B, D], got shape {x.shape}.")
    return MADE(self.hidden, self.depth, self.spline.num_params, name="made")(x, context)

  def forward(self, x: Array, context: Optional[Array] = None):
    y, ld = splines_lib.rational_quadratic_spline(x, self._conditioner(x, context), self.spline)
    return y, jnp.sum(ld, axis=-1)

  def inverse(self, y: Array, context: Optional[Array] = None):
    x = jnp.zeros_like(y)
    ld = jnp.zeros_like(y)
    for _ in range(y.shape[-1]):  # D passes (static D: unrolled; vectors are small)
      x, ld = splines_lib.rational_quadratic_spline(y, self._conditioner(x, context), self.spline,
                                                    inverse=True)
    return x, jnp.sum(ld, axis=-1)

  def __call__(self, x, context=None):
    return self.forward(x, context)


# --- element-wise and channel-wise layers ------------------------------------------------------

class Scaling(nn.Module):
  """NICE's diagonal scaling layer: y = x * exp(s), one learned s per dimension (starts at 0)."""

  @nn.compact
  def _log_scale(self, x: Array) -> Array:
    return self.param("log_scale", nn.initializers.zeros, x.shape[1:], jnp.float32)

  def forward(self, x: Array):
    s = self._log_scale(x)
    return x * jnp.exp(s), jnp.full((x.shape[0],), jnp.sum(s), x.dtype)

  def inverse(self, y: Array):
    s = self._log_scale(y)
    return y * jnp.exp(-s), jnp.full((y.shape[0],), -jnp.sum(s), y.dtype)

  def __call__(self, x):
    return self.forward(x)


class ActNorm(nn.Module):
  """Per-channel affine y = (x + b) * exp(s) with data-dependent initialisation (Glow).

  When the module is initialised through `forward`, b and s are set so that the first batch
  leaves this layer with zero mean and unit variance per channel (statistics over all
  non-channel axes). Initialised through `inverse` it starts as the identity.
  """
  eps: float = 1e-6

  @nn.compact
  def _params(self, x: Array, data_init: bool):
    c = x.shape[-1]
    if data_init and self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      std = jnp.std(x, axis=axes)
      bias_init = lambda *_: -mean
      # Clamp so a channel that is (nearly) constant in the first batch cannot start with a
      # huge scale.
      log_scale_init = lambda *_: -jnp.log(jnp.maximum(std, 1e-2) + self.eps)
    else:
      bias_init = lambda *_: jnp.zeros((c,), jnp.float32)
      log_scale_init = bias_init
    bias = self.param("bias", bias_init, (c,))
    log_scale = self.param("log_scale", log_scale_init, (c,))
    return bias, log_scale

  def forward(self, x: Array):
    bias, log_scale = self._params(x, data_init=True)
    ld = _num_positions(x) * jnp.sum(log_scale)
    return (x + bias) * jnp.exp(log_scale), jnp.full((x.shape[0],), ld, x.dtype)

  def inverse(self, y: Array):
    bias, log_scale = self._params(y, data_init=False)
    ld = -_num_positions(y) * jnp.sum(log_scale)
    return y * jnp.exp(-log_scale) - bias, jnp.full((y.shape[0],), ld, y.dtype)

  def __call__(self, x):
    return self.forward(x)


def fixed_permutation(seed: int, index: int, num: int) -> np.ndarray:
  """A pseudo-random permutation of `num` channels determined by (seed, index), as a constant.

  Derived rather than stored, so no non-trainable array sits among the parameters; numpy, so
  it costs nothing in the compiled program.
  """
  return np.random.default_rng([int(seed), int(index)]).permutation(int(num)).astype(np.int32)


class Conv1x1(nn.Module):
  """Invertible 1x1 convolution in LU form (Glow): W = P L (U + diag(exp(log_s))).

  P is a fixed permutation (an argument: a stack passes each layer its own; by default the one
  from `seed`), L is unit lower-triangular and U strictly upper-triangular (both start at 0, so
  W starts as the permutation P), log_s starts at 0. log|det W| = sum(log_s), times H*W for
  images. Acts on the last axis; a vector [B, D] is treated as a single position, so this is
  also the learned linear layer of vector Glow.
  """
  seed: int = 0

  @nn.compact
  def _matrices(self, c: int, perm):
    lower = self.param("lower", nn.initializers.zeros, (c, c), jnp.float32)
    upper = self.param("upper", nn.initializers.zeros, (c, c), jnp.float32)
    log_s = self.param("log_s", nn.initializers.zeros, (c,), jnp.float32)
    eye = jnp.eye(c, dtype=jnp.float32)
    l = jnp.tril(lower, -1) + eye
    u = jnp.triu(upper, 1) + jnp.diag(jnp.exp(log_s))
    if perm is None:
      perm = fixed_permutation(self.seed, 0, c)
    return jnp.asarray(perm, jnp.int32), l, u, log_s

  def forward(self, x: Array, perm: Optional[Array] = None):
    perm, l, u, log_s = self._matrices(x.shape[-1], perm)
    w = jnp.matmul(l, u, precision="highest")[perm]  # P @ (L U): row i is row perm[i] of L U
    y = jnp.einsum("...k,ck->...c", x, w, precision="highest")
    return y, jnp.full((x.shape[0],), _num_positions(x) * jnp.sum(log_s), x.dtype)

  def inverse(self, y: Array, perm: Optional[Array] = None):
    c = y.shape[-1]
    perm, l, u, log_s = self._matrices(c, perm)
    eye = jnp.eye(c, dtype=jnp.float32)
    # W^-1 = U^-1 L^-1 P^T, with the triangular inverses from two triangular solves.
    l_inv = jax.scipy.linalg.solve_triangular(l, eye, lower=True, unit_diagonal=True)
    u_inv = jax.scipy.linalg.solve_triangular(u, eye, lower=False)
    w_inv = jnp.matmul(u_inv, l_inv, precision="highest")
    z = jnp.zeros_like(y).at[..., perm].set(y)  # P^T y
    x = jnp.einsum("...k,ck->...c", z, w_inv, precision="highest")
    return x, jnp.full((y.shape[0],), -_num_positions(y) * jnp.sum(log_s), y.dtype)

  def __call__(self, x, perm=None):
    return self.forward(x, perm)


# --- reshaping ---------------------------------------------------------------------------------

def squeeze(x: Array, factor: int = 2) -> Array:
  """[B, H, W, C] -> [B, H/f, W/f, f*f*C]: each f x f patch becomes f*f*C channels."""
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"squeeze needs H and W divisible by factor={factor}, got shape {x.shape}.")
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // factor, w // factor, factor * factor * c)


def unsqueeze(x: Array, factor: int = 2) -> Array:
  """Inverse of `squeeze`: [B, H, W, f*f*C] -> [B, H*f, W*f, C]."""
  b, h, w, c = x.shape
  if c % (factor * factor):
    raise ValueError(f"unsqueeze needs C divisible by factor**2={factor * factor}, got {x.shape}.")
  x = x.reshape(b, h, w, factor, factor, c // (factor * factor))
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * factor, w * factor, c // (factor * factor))


class Squeeze(nn.Module):
  """Space-to-depth as a bijector (a permutation of the dimensions: logdet 0)."""
  factor: int = 2

  def forward(self, x: Array):
    return squeeze(x, self.factor), jnp.zeros((x.shape[0],), x.dtype)

  def inverse(self, y: Array):
    return unsqueeze(y, self.factor), jnp.zeros((y.shape[0],), y.dtype)

  def __call__(self, x):
    return self.forward(x)


def standard_normal_log_prob(z: Array) -> Array:
  """log N(z; 0, I) summed over all non-batch axes -> [B]."""
  d = int(np.prod(z.shape[1:], dtype=np.int64))
  return -0.5 * _sum_except_batch(z**2) - 0.5 * d * math.log(2 * math.pi)
