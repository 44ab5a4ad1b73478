"""Shared pieces of the samplers: time grids, option checking, the fixed-grid driver.

A sampler family module defines `run(score_fn, sde, shape, rng, steps, **opts)` returning
`(x, nfe, extra)` where nfe is an int32 array counted at run time (each score evaluation
adds one inside the scanned step) and extra is a dict of scalar arrays for `info`. Fixed-step
families write only their step function and hand it to `run_fixed_grid` (prior sample ->
grid -> scan -> optional denoise).

Every call is checked before anything is traced for real (`check_call`, from the entry
points in __init__.py): shape, steps, options, the SDE, and the score function's output
shape through `jax.eval_shape` (a shape-only trace; nothing is compiled).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion import parameterization as param
from research.diffusion.sde import is_sde
from research import sharding
from research.registry import Registry

Array = jax.Array
GRIDS = ("uniform", "quadratic", "logsnr", "edm", "time_quadratic")
REGISTRY: Registry = Registry("sampler")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """A registered sampler: its run function, option defaults and allowed choices."""
  name: str
  run: Callable[..., Tuple[Array, Array, Dict[str, Array]]]
  defaults: Dict[str, Any]
  choices: Dict[str, Tuple[Any, ...]]
  check: Callable[[Dict[str, Any], Any, int], None] | None = None
  doc: str = ""
  # Score evaluations per step from the resolved options; None: adaptive (steps = max_steps).
  evals_per_step: Callable[[Dict[str, Any]], int] | None = lambda opts: 1

  def nfe(self, steps: int, opts: Dict[str, Any]) -> int | None:
    """The score evaluations `steps` steps spend (the final denoise counts one); None: adaptive."""
    if self.evals_per_step is None:
      return None
    return int(steps) * int(self.evals_per_step(opts)) + (1 if opts.get("denoise") else 0)

  def resolve(self, options: Dict[str, Any], sde, steps: int) -> Dict[str, Any]:
    """Fills defaults and validates `options`; raises ValueError naming the bad argument."""
    unknown = sorted(set(options) - set(self.defaults))
    if unknown:
      raise ValueError(f"Unknown option(s) {unknown} for sampler {self.name!r}; "
                       f"allowed: {sorted(self.defaults)}.")
    if not is_sde(sde):
      raise ValueError(f"sampler {self.name!r}: `sde` must be an SDE from "
                       f"research.diffusion.sde (vp, subvp, ve), got {type(sde).__name__}.")
    check_steps(self.name, steps)
    opts = {**self.defaults, **options}
    for key, allowed in self.choices.items():
      if opts[key] not in allowed:
        raise ValueError(f"sampler {self.name!r}: {key}={opts[key]!r}; allowed: "
                         f"{', '.join(map(repr, allowed))}.")
    for key, value in opts.items():
      if isinstance(value, (list, dict, set)) or hasattr(value, "shape"):
        raise ValueError(f"sampler {self.name!r}: option {key} must be a Python scalar or "
                         "string (options are compile-time constants).")
    if self.check is not None:
      self.check(opts, sde, int(steps))
    return opts


def is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_steps(name: str, steps) -> None:
  """steps: a positive Python or numpy int (not a bool, float or None)."""
  if not is_int(steps):
    raise TypeError(f"sampler {name!r}: steps must be a positive int, got {steps!r} "
                    f"({type(steps).__name__}).")
  if steps < 1:
    raise ValueError(f"sampler {name!r}: steps must be a positive int, got {steps!r}.")


def check_shape(name: str, shape) -> Tuple[int, ...]:
  """shape: a non-empty tuple or list (B, *dims) of positive ints; returned as a tuple."""
  if not isinstance(shape, (tuple, list)) or not all(is_int(d) for d in shape):
    raise TypeError(f"sampler {name!r}: shape must be a tuple (B, *dims) of positive ints, "
                    f"got {shape!r}.")
  if not shape or any(d < 1 for d in shape):
    raise ValueError(f"sampler {name!r}: shape must be a non-empty tuple (B, *dims) of "
                     f"positive ints, got {tuple(shape)!r}.")
  return tuple(int(d) for d in shape)


def check_score_fn(name: str, score_fn, shape: Tuple[int, ...]) -> None:
  """score_fn(x [B, *dims], t [B]) must return one array of x's shape; checked with
  jax.eval_shape (traces score_fn for shapes only: no compile, no device work)."""
  if not callable(score_fn):
    raise TypeError(f"sampler {name!r}: score_fn must be callable (x [B, *dims], t [B]) -> "
                    f"[B, *dims], got {type(score_fn).__name__}.")
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
  if isinstance(score_fn, jax.tree_util.Partial):
    # As the jitted sampler does, pass a Partial as an argument (its leaves abstract), so
    # that eval_shape's cache answers a new Partial of the same structure without a retrace.
    out = jax.eval_shape(_call_score, score_fn, x, t)
  else:
    out = jax.eval_shape(score_fn, x, t)  # cached per function object and shapes
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(f"sampler {name!r}: score_fn must return one array of shape {shape} (the "
                    f"shape of x), got {jax.tree_util.tree_structure(out)}.")
  if tuple(out.shape) != shape:
    raise ValueError(f"sampler {name!r}: score_fn returned shape {tuple(out.shape)}; expected "
                     f"{shape} (the shape of x).")


def _call_score(score_fn, x, t):
  return score_fn(x, t)


def check_call(name: str, score_fn, sde, shape, steps, options: Dict[str, Any]
               ) -> Tuple[Tuple[int, ...], Dict[str, Any]]:
  """Checks one sampler call up front; returns (shape as a tuple, resolved options).

  Raises KeyError for an unknown sampler, TypeError / ValueError naming the bad argument
  (shape, steps, an option, sde, score_fn) otherwise.
  """
  spec = REGISTRY.get(name)
  shape = check_shape(name, shape)
  opts = spec.resolve(options, sde, steps)
  check_score_fn(name, score_fn, shape)
  return shape, opts


def check_positive(name: str, opts: Dict[str, Any], *keys: str, strict=True) -> None:
  for k in keys:
    v = opts[k]
    if not isinstance(v, (int, float)) or (v <= 0 if strict else v < 0) or math.isnan(v):
      raise ValueError(f"sampler {name!r}: {k} must be {'>' if strict else '>='} 0, got {v!r}.")


def time_grid(sde, steps: int, kind: str = "uniform", rho: float = 7.0) -> Array:
  """Times t_0 = T > t_1 > ... > t_steps = eps, float32 [steps + 1].

  kind:
    "uniform"    equal steps in t.
    "quadratic"  t - eps proportional to (1 - i/N)^2: dense near the data (DDIM paper).
    "time_quadratic"  sqrt(t) equally spaced from sqrt(T) to sqrt(eps): the official
                 DPM-Solver's skip_type="time_quadratic" (t_i = (sqrt(T) + i/N (sqrt(eps) -
                 sqrt(T)))^2); differs from "quadratic" by its eps offset, most at few steps.
    "logsnr"     equal steps in lambda = log(alpha^2 / sigma^2) (DPM-Solver).
    "edm"        EDM sigma^(1/rho) equally spaced (Karras et al. 2022, rho = 7).
  """
  if kind not in GRIDS:
    raise ValueError(f"Unknown time grid {kind!r}; allowed: {', '.join(GRIDS)}.")
  u = jnp.linspace(0.0, 1.0, steps + 1)  # 0 at T, 1 at eps
  t_hi, t_lo = float(sde.T), float(sde.eps)
  if kind == "uniform":
    t = t_hi + (t_lo - t_hi) * u
  elif kind == "quadratic":
    t = t_lo + (t_hi - t_lo) * (1.0 - u)**2
  elif kind == "time_quadratic":
    t = (math.sqrt(t_hi) + (math.sqrt(t_lo) - math.sqrt(t_hi)) * u)**2
  elif kind == "logsnr":
    l_hi, l_lo = sde.logsnr(t_hi), sde.logsnr(t_lo)
    t = sde.t_from_logsnr(l_hi + (l_lo - l_hi) * u)
  else:
    s_max, s_min = sde.edm_sigma(t_hi), sde.edm_sigma(t_lo)
    s = (s_max**(1 / rho) + u * (s_min**(1 / rho) - s_max**(1 / rho)))**rho
    t = sde.t_from_edm_sigma(s)
  # Pin the ends exactly (the inverse maps are float32 round trips) and keep monotone.
  t = t.at[0].set(t_hi).at[-1].set(t_lo)
  return t.astype(jnp.float32)


def full_t(t: Array, batch: int) -> Array:
  return jnp.full((batch,), t, jnp.float32)


def denoise(score_fn, sde, x: Array, t: Array) -> Array:
  """Tweedie's E[x_0 | x_t = x] at the final time (one score evaluation)."""
  return param.score_to_x0(score_fn(x, t), t, sde, x)


def scan_grid(step_fn, x0_carry, grid: Array, rng: Array, *, with_index=False):
  """Runs `carry = step_fn(carry, t_cur, t_next, key[, i])` over consecutive grid pairs."""
  steps = grid.shape[0] - 1
  keys = jax.random.split(rng, steps)
  xs = (grid[:-1], grid[1:], keys, jnp.arange(steps))

  def body(carry, inp):
    t_cur, t_next, key, i = inp
    if with_index:
      return step_fn(carry, t_cur, t_next, key, i), None
    return step_fn(carry, t_cur, t_next, key), None

  carry, _ = jax.lax.scan(body, x0_carry, xs)
  return carry


def finish(score_fn, sde, x: Array, nfe: Array, denoise_final: bool):
  """Optional final denoising step at t = eps (counted as one NFE)."""
  if not denoise_final:
    return x, nfe
  t = full_t(sde.eps, x.shape[0])
  return denoise(score_fn, sde, x, t), nfe + 1


def run_fixed_grid(step_fn, score_fn, sde, shape, rng, steps: int, *, grid: str, rho: float,
                   denoise: bool, init=None, unpack=None, with_index: bool = False):
  """The driver every fixed-step sampler plugs its step into: returns (x, nfe, extra).

  prior sample x_T from split(rng)[0] (so every sampler starts from the same noise) ->
  the time grid -> one lax.scan of `carry = step_fn(carry, t_cur, t_next, key[, i])` over
  consecutive grid pairs (keys from split(rng)[1]) -> the optional final denoising step.

  Args:
    step_fn: one step; its carry is (x, nfe) unless `init` says otherwise.
    init: (x_T, grid) -> initial carry (default (x_T, 0)).
    unpack: (carry, grid) -> (x, nfe) after the last step (default: carry[0], carry[-1]).
    with_index: pass the step index i to step_fn.
  """
  rng_init, rng_steps = jax.random.split(rng)
  x = sharding.constrain_batch(sde.prior_sample(rng_init, shape))
  grid_t = time_grid(sde, steps, grid, rho)
  carry = (x, jnp.int32(0)) if init is None else init(x, grid_t)
  carry = scan_grid(step_fn, carry, grid_t, rng_steps, with_index=with_index)
  x, nfe = (carry[0], carry[-1]) if unpack is None else unpack(carry, grid_t)
  x, nfe = finish(score_fn, sde, x, nfe, denoise)
  return x, nfe, {}


def register(name: str, *, defaults: Dict[str, Any], choices: Dict[str, Tuple[Any, ...]] = None,
             check=None, evals_per_step=lambda opts: 1):
  """Decorator registering `run(score_fn, sde, shape, rng, steps, **opts)` as sampler `name`.

  evals_per_step(opts) -> score evaluations per step (None for an adaptive sampler).
  """
  def deco(run):
    REGISTRY.register(name, SamplerSpec(name, run, dict(defaults), dict(choices or {}), check,
                                        run.__doc__ or "", evals_per_step))
    return run
  return deco
