"""Monotone rational-quadratic splines with identity tails (neural spline flows).

One home for the spline maths used by the spline coupling and the masked autoregressive flow
(research/flows/bijectors.py). Element-wise: every scalar x gets its own spline with K bins on
[-B, B], given by 3K - 1 unconstrained numbers per element:

  widths  = softmax(w[:K]) scaled so every bin is at least `min_bin_width` of the interval,
  heights = softmax(h[K:2K]) likewise,
  interior knot derivatives = min_derivative + softplus(d[2K:] + c), c chosen so d = 0 gives 1;
  the two boundary derivatives are exactly 1, so the spline joins the identity tails with a
  continuous derivative. Outside [-B, B] the map is the identity (logdet exactly 0).

All-zero parameters give uniform bins and unit derivatives: the identity map, so a
zero-initialised conditioner starts the flow as the identity.

Inside bin k with xi = (x - x_k) / w_k in [0, 1], s_k = h_k / w_k (Durkan et al. 2019, eq. 4):

  y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_k + d_{k+1} - 2 s_k) xi (1 - xi))

The inverse solves the quadratic for xi in its cancellation-free form for either sign of b.

References:
  Durkan, Bekasov, Murray, Papamakarios. Neural Spline Flows. NeurIPS 2019 (arXiv:1906.04032).
  Gregory & Delbourgo. Piecewise rational quadratic interpolation to monotonic data. 1982.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class SplineSettings:
  """Shape of one element-wise spline.

  Attributes:
    num_bins: K, bins on [-tail_bound, tail_bound].
    tail_bound: B; the map is the identity outside [-B, B].
    min_bin_width, min_bin_height: smallest bin as a fraction of 2B (keeps the map well
      conditioned; K * min must be < 1).
    min_derivative: smallest knot derivative.
  """
  num_bins: int = 8
  tail_bound: float = 5.0
  min_bin_width: float = 1e-3
  min_bin_height: float = 1e-3
  min_derivative: float = 1e-3

  @property
  def num_params(self) -> int:
    """Unconstrained numbers per element: K widths, K heights, K - 1 interior derivatives."""
    return 3 * self.num_bins - 1

  def validate(self):
    if not (isinstance(self.num_bins, int) and self.num_bins >= 2):
      raise ValueError(f"num_bins={self.num_bins!r} is not allowed; it must be an int >= 2.")
    if not self.tail_bound > 0:
      raise ValueError(f"tail_bound={self.tail_bound!r} is not allowed; it must be > 0.")
    for name in ("min_bin_width", "min_bin_height"):
      v = getattr(self, name)
      if not (v > 0 and v * self.num_bins < 1):
        raise ValueError(f"{name}={v!r} is not allowed: need 0 < {name} < 1 / num_bins "
                         f"= {1 / self.num_bins:.4g}.")
    if not (0 < self.min_derivative < 1):
      raise ValueError(f"min_derivative={self.min_derivative!r} is not allowed: need 0 < it < 1.")


def _knots(raw: Array, bound: float, min_size: float):
  """Bin sizes and knot positions on [-B, B] from unnormalised sizes raw [..., K]."""
  k = raw.shape[-1]
  frac = min_size + (1.0 - min_size * k) * jax.nn.softmax(raw, axis=-1)
  cum = jnp.cumsum(frac, axis=-1)
  cum = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum], axis=-1)
  knots = 2.0 * bound * cum - bound
  # Pin the ends exactly (the cumulative sum can miss 1 by rounding).
  knots = knots.at[..., 0].set(-bound).at[..., -1].set(bound)
  return knots[..., 1:] - knots[..., :-1], knots


def _derivatives(raw: Array, min_derivative: float) -> Array:
  """Knot derivatives [..., K + 1]: 1 at both ends, min + softplus(raw + c) inside (c: raw 0 -> 1)."""
  c = math.log(math.expm1(1.0 - min_derivative))
  inner = min_derivative + jax.nn.softplus(raw + c)
  ones = jnp.ones_like(raw[..., :1])
  return jnp.concatenate([ones, inner, ones], axis=-1)


def _gather(a: Array, idx: Array) -> Array:
  return jnp.take_along_axis(a, idx[..., None], axis=-1)[..., 0]


def rational_quadratic_spline(x: Array, params: Array, settings: SplineSettings = SplineSettings(),
                              *, inverse: bool = False):
  """Applies the element-wise spline (or its inverse) to x.

  Args:
    x: inputs [...] (any shape).
    params: unconstrained spline parameters [..., 3K - 1], one set per element of x.
    settings: K, the interval and the minimum bin sizes / derivative.
    inverse: apply the inverse map.

  Returns:
    (y, logdet) with y of x's shape and logdet [...] = log |dy/dx| per element of the map that
    was applied (for inverse=True that is log |dx/dy| = -(forward log-derivative)).
  """
  k, bound = settings.num_bins, float(settings.tail_bound)
  if params.shape[-1] != settings.num_params or params.shape[:-1] != x.shape:
    raise ValueError(f"spline params have shape {params.shape}; expected [*x.shape, 3K-1] = "
                     f"{(*x.shape, settings.num_params)}.")
  widths, xk = _knots(params[..., :k], bound, settings.min_bin_width)
  heights, yk = _knots(params[..., k:2 * k], bound, settings.min_bin_height)
  d = _derivatives(params[..., 2 * k:], settings.min_derivative)

  inside = (x >= -bound) & (x <= bound)
  xc = jnp.clip(x, -bound, bound)  # the identity branch handles the rest; no NaNs either way
  knots = yk if inverse else xk
  # Bin index: how many interior knots lie at or below the input.
  idx = jnp.sum(xc[..., None] >= knots[..., 1:-1], axis=-1).astype(jnp.int32)
  x0, w, y0, h = _gather(xk, idx), _gather(widths, idx), _gather(yk, idx), _gather(heights, idx)
  d0, d1 = _gather(d, idx), _gather(d, idx + 1)
  s = h / w
  dsum = d0 + d1 - 2.0 * s

  if inverse:
    dy = xc - y0
    a = h * (s - d0) + dy * dsum
    b = h * d0 - dy * dsum
    c = -s * dy
    sq = jnp.sqrt(jnp.maximum(b * b - 4.0 * a * c, 0.0))
    # The same root written without cancellation for either sign of b:
    # 2c / (-b - sqrt(disc)) == (-b + sqrt(disc)) / (2a).
    pos = b >= 0
    num = jnp.where(pos, 2.0 * c, -b + sq)
    den = jnp.where(pos, -b - sq, 2.0 * a)
    den = jnp.where(den == 0, 1.0, den)  # only where the numerator is 0 too (dy = 0)
    xi = jnp.clip(num / den, 0.0, 1.0)
    out = x0 + xi * w
  else:
    xi = jnp.clip((xc - x0) / w, 0.0, 1.0)
  t = xi * (1.0 - xi)
  denom = s + dsum * t
  if not inverse:
    out = y0 + h * (s * xi * xi + d0 * t) / denom
  log_deriv = (2.0 * jnp.log(s) + jnp.log(d1 * xi * xi + 2.0 * s * t + d0 * (1.0 - xi) ** 2)
               - 2.0 * jnp.log(denom))
  y = jnp.where(inside, out, x)
  logdet = jnp.where(inside, -log_deriv if inverse else log_deriv, 0.0)
  return y, logdet
