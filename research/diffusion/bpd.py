"""Bits per dimension for 8-bit data: THE one helper shared by flows and diffusion likelihoods.

An 8-bit datum is an integer vector k in {0, ..., N-1}^D (N = `num_bins` = 256). Models see it
in a continuous "model space": the canonical map is x = lo + (hi - lo) * k / (N - 1), i.e.
`x = k / 127.5 - 1` for `data_range="[-1,1]"` and `x = k / 255` for `"[0,1]"`.

A continuous density p over model space gives a likelihood for the discrete data through uniform
dequantisation (Theis et al. 2016; Ho et al. 2019): with u ~ U[0, 1)^D,

    y = lo + (hi - lo) * (k + u) / N                  (the dequantised datum, in [lo, hi))
    log P(k) >= E_u[ log p(y) ] + D * log((hi - lo) / N)

because the cube k + [0, 1)^D has volume 1 and the affine map v = k + u -> y has Jacobian
((hi - lo) / N)^D. Hence the negative log-likelihood of the discrete data in nats and the bits/dim:

    nll = -log p(y) + D * log(N / (hi - lo))          (nats per example)
    bpd = nll / (D * log 2) = -log p(y) / (D log 2) + log2(N / (hi - lo))

The offset log2(N / (hi - lo)) is 7 for [-1, 1] and 8 for [0, 1] when N = 256. Averaged over u,
this is an upper bound on the true bits/dim of the discrete data (the dequantisation gap).
"""
from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp

DATA_RANGES = {"[-1,1]": (-1.0, 1.0), "[0,1]": (0.0, 1.0)}


def _range(data_range: str) -> Tuple[float, float]:
  if data_range not in DATA_RANGES:
    raise ValueError(f"data_range={data_range!r} is not allowed; allowed: {sorted(DATA_RANGES)}.")
  return DATA_RANGES[data_range]


def _check_bins(num_bins: int):
  if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
    raise ValueError(f"num_bins={num_bins!r} is not allowed; it must be an integer >= 2.")


def to_integers(x: jnp.ndarray, *, data_range: str = "[-1,1]", num_bins: int = 256) -> jnp.ndarray:
  """Inverts the canonical map: model-space x -> integer-valued k in [0, num_bins - 1] (float)."""
  lo, hi = _range(data_range)
  _check_bins(num_bins)
  k = jnp.round((x - lo) / (hi - lo) * (num_bins - 1))
  return jnp.clip(k, 0, num_bins - 1)


def dequantize(rng: jax.Array, x: jnp.ndarray, *, data_range: str = "[-1,1]",
               num_bins: int = 256) -> jnp.ndarray:
  """Uniform dequantisation of 8-bit data given in model space.

  Args:
    rng: PRNG key for the uniform noise.
    x: data on the canonical grid lo + (hi - lo) * k / (num_bins - 1), any shape.
    data_range: "[-1,1]" or "[0,1]", the range x was mapped to.
    num_bins: number of integer levels (256 for 8-bit data).

  Returns:
    y = lo + (hi - lo) * (k + u) / num_bins with u ~ U[0, 1), same shape as x, in [lo, hi).
  """
  lo, hi = _range(data_range)
  k = to_integers(x, data_range=data_range, num_bins=num_bins)
  u = jax.random.uniform(rng, x.shape, jnp.float32)
  return (lo + (hi - lo) * (k + u) / num_bins).astype(jnp.float32)


def log_scale_per_dim(*, data_range: str = "[-1,1]", num_bins: int = 256) -> float:
  """log(num_bins / (hi - lo)): nats per dimension added to -log p(y) (the scaling term)."""
  lo, hi = _range(data_range)
  _check_bins(num_bins)
  return math.log(num_bins / (hi - lo))


def discrete_nll(log_prob: jnp.ndarray, num_dims: int, *, data_range: str = "[-1,1]",
                 num_bins: int = 256) -> jnp.ndarray:
  """Negative log-likelihood in nats of the 8-bit data: -log p(y) + D log(N / (hi - lo)).

  Args:
    log_prob: log-density in nats of the dequantised data y in model space, any shape (e.g. [B]).
    num_dims: D, the number of dimensions of one example (e.g. 8 * 8 * 1).
  """
  if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
    raise ValueError(f"num_dims={num_dims!r} is not allowed; it must be an integer >= 1.")
  return -log_prob + num_dims * log_scale_per_dim(data_range=data_range, num_bins=num_bins)


def bits_per_dim(log_prob: jnp.ndarray, num_dims: int, *, data_range: str = "[-1,1]",
                 num_bins: int = 256) -> jnp.ndarray:
  """Bits per dimension of 8-bit data from the model-space log-density of its dequantisation.

  bpd = (-log p(y) + D * log(N / (hi - lo))) / (D * log 2); see the module docstring.

  Args:
    log_prob: log p(y) in nats, y = dequantize(rng, x) (any shape, e.g. [B]).
    num_dims: D, dimensions of one example.
    data_range: "[-1,1]" or "[0,1]".
    num_bins: 256 for 8-bit data.

  Returns:
    bits/dim, same shape as `log_prob`.
  """
  return nll_to_bpd(discrete_nll(log_prob, num_dims, data_range=data_range, num_bins=num_bins),
                    num_dims)


def nll_to_bpd(nll: jnp.ndarray, num_dims: int) -> jnp.ndarray:
  """Bits per dimension of a discrete negative log-likelihood in nats per example: nll / (D log 2)."""
  return nll / (num_dims * math.log(2.0))
