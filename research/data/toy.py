"""Toy distributions in R^d with exact log-densities (where one exists) and labels.

Each distribution is a frozen dataclass with
  sample(rng, n) -> (x [n, dim] float32, labels [n] int32 or None)
  log_prob(x [B, dim]) -> [B]          (only where an exact density exists; `has_density`)
Gaussian mixtures also expose `means [K, dim]`, `stds [K]`, `weights [K]`, so the exact score
harness (research.diffusion.analytic.GaussianMixture) can be built from them, and each
component is a class.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from research import mixture
from research.registry import Registry

Array = jnp.ndarray

DATASETS: Registry = Registry("toy dataset")


@dataclasses.dataclass(frozen=True)
class _Mixture:
  """Shared sampling/log-density for isotropic Gaussian mixtures with equal weights."""

  has_density = True

  # Subclasses define `_means_np()` -> numpy [K, dim] and `std`.

  @property
  def means(self) -> Array:
    return jnp.asarray(self._means_np())

  @property
  def num_classes(self) -> int:
    return int(np.shape(self._means_np())[0])

  @property
  def stds(self) -> Array:
    return jnp.full((self.num_classes,), self.std, jnp.float32)  # pytype: disable=attribute-error

  @property
  def weights(self) -> Array:
    return jnp.full((self.num_classes,), 1.0 / self.num_classes, jnp.float32)

  def sample(self, rng, n: int, labels: Optional[Array] = None) -> Tuple[Array, Array]:
    """n samples; `labels` [n] (optional) fixes each sample's component."""
    k_rng, n_rng = jax.random.split(rng)
    if labels is None:
      labels = jax.random.randint(k_rng, (n,), 0, self.num_classes)
    noise = jax.random.normal(n_rng, (n, self.means.shape[1]))
    x = self.means[labels] + self.std * noise  # pytype: disable=attribute-error
    return x.astype(jnp.float32), labels.astype(jnp.int32)

  def log_prob(self, x: Array) -> Array:
    return mixture.log_prob(x, self.means, self.stds, jnp.log(self.weights))

  def component_log_prob(self, x: Array, labels: Array) -> Array:
    """log p(x | class) [B]."""
    var = jnp.full((x.shape[0], 1), self.std**2, jnp.float32)  # pytype: disable=attribute-error
    return mixture.component_logpdf(x, self.means[labels][:, None, :], var)[:, 0]


@DATASETS.register("ring")
@dataclasses.dataclass(frozen=True)
class Ring(_Mixture):
  """K isotropic Gaussians evenly spaced on a circle in the first two coordinates.

  In dim > 2 the remaining coordinates of each mean are zero; every coordinate has std `std`.
  Component k is class k.
  """
  num_modes: int = 8
  radius: float = 4.0
  std: float = 0.1
  dim: int = 2

  def _means_np(self) -> np.ndarray:
    ang = 2 * np.pi * np.arange(self.num_modes) / self.num_modes
    m = np.zeros((self.num_modes, self.dim), np.float32)
    m[:, 0] = self.radius * np.cos(ang)
    m[:, 1] = self.radius * np.sin(ang)
    return m


@DATASETS.register("grid")
@dataclasses.dataclass(frozen=True)
class Grid(_Mixture):
  """A side x side grid of isotropic Gaussians with the given spacing, centred at 0."""
  side: int = 5
  spacing: float = 2.0
  std: float = 0.05
  dim: int = 2

  def _means_np(self) -> np.ndarray:
    c = (np.arange(self.side) - (self.side - 1) / 2) * self.spacing
    xx, yy = np.meshgrid(c, c, indexing="ij")
    m = np.zeros((self.side * self.side, self.dim), np.float32)
    m[:, 0], m[:, 1] = xx.ravel(), yy.ravel()
    return m


@DATASETS.register("checkerboard")
@dataclasses.dataclass(frozen=True)
class Checkerboard:
  """Uniform on the dark squares of a `squares` x `squares` board covering [-half, half]^2.

  Exact density: 2 / (2*half)^2 on dark squares, 0 elsewhere (log_prob = -inf there).
  The label is the index of the dark square.
  """
  squares: int = 4
  half: float = 4.0
  dim: int = 2
  has_density = True

  def __post_init__(self):
    if self.squares % 2:
      raise ValueError(f"squares={self.squares}: must be even so half of the board is dark.")
    if self.dim != 2:
      raise ValueError(f"dim={self.dim}: the checkerboard is 2-D only.")

  @property
  def num_classes(self) -> int:
    return self.squares * self.squares // 2

  def _dark(self, ix, iy):
    return (ix + iy) % 2 == 0

  def sample(self, rng, n: int, labels=None):
    del labels
    c_rng, u_rng = jax.random.split(rng)
    idx = np.array([(i, j) for i in range(self.squares) for j in range(self.squares)
                    if (i + j) % 2 == 0], np.float32)
    lab = jax.random.randint(c_rng, (n,), 0, idx.shape[0])
    u = jax.random.uniform(u_rng, (n, 2))
    w = 2 * self.half / self.squares
    x = (jnp.asarray(idx)[lab] + u) * w - self.half
    return x.astype(jnp.float32), lab.astype(jnp.int32)

  def log_prob(self, x):
    w = 2 * self.half / self.squares
    ij = jnp.floor((x + self.half) / w)
    inside = jnp.all((x >= -self.half) & (x < self.half), axis=-1)
    dark = self._dark(ij[:, 0].astype(jnp.int32), ij[:, 1].astype(jnp.int32))
    logp = math.log(2.0 / (2 * self.half) ** 2)
    return jnp.where(inside & dark, logp, -jnp.inf)


@DATASETS.register("moons")
@dataclasses.dataclass(frozen=True)
class Moons:
  """Two interleaving half circles (scikit-learn's make_moons), scaled; label = moon. No density."""
  noise: float = 0.05
  scale: float = 2.0
  dim: int = 2
  has_density = False
  num_classes = 2

  def sample(self, rng, n: int, labels=None):
    del labels
    l_rng, a_rng, n_rng = jax.random.split(rng, 3)
    lab = jax.random.randint(l_rng, (n,), 0, 2)
    a = jax.random.uniform(a_rng, (n,)) * jnp.pi
    upper = jnp.stack([jnp.cos(a), jnp.sin(a)], -1)
    lower = jnp.stack([1 - jnp.cos(a), 0.5 - jnp.sin(a)], -1)
    x = jnp.where(lab[:, None] == 0, upper, lower) - jnp.array([0.5, 0.25])
    x = x + self.noise * jax.random.normal(n_rng, x.shape)
    return (self.scale * x).astype(jnp.float32), lab.astype(jnp.int32)


@DATASETS.register("swissroll")
@dataclasses.dataclass(frozen=True)
class SwissRoll:
  """The 2-D swiss roll (scikit-learn's make_swiss_roll, x-z plane), scaled. No density, no labels."""
  noise: float = 0.1
  scale: float = 0.4
  dim: int = 2
  has_density = False
  num_classes = 0

  def sample(self, rng, n: int, labels=None):
    del labels
    a_rng, n_rng = jax.random.split(rng)
    tt = 1.5 * jnp.pi * (1 + 2 * jax.random.uniform(a_rng, (n,)))
    x = jnp.stack([tt * jnp.cos(tt), tt * jnp.sin(tt)], -1)
    x = x + self.noise * jax.random.normal(n_rng, x.shape)
    return (self.scale * x).astype(jnp.float32), None


def get_dataset(name: str, **kwargs):
  """Builds a toy distribution by name; unknown keyword arguments fail naming the allowed ones."""
  cls = DATASETS.get(name)
  fields = {f.name for f in dataclasses.fields(cls)}
  bad = sorted(set(kwargs) - fields)
  if bad:
    raise ValueError(f"toy dataset {name!r} got unknown options {bad}; allowed: {sorted(fields)}.")
  return cls(**kwargs)
