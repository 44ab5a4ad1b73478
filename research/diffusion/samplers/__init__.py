"""Samplers for diffusion models: a registry of families, all on device.

  samplers.available() -> list of names
  samplers.sample(name, score_fn, sde, shape, rng, *, steps, **options) -> (x, info)

`score_fn(x [B, *dims], t [B]) -> [B, *dims]` (a trained network enters through
parameterization.score_fn_from_model). `shape` is the full batch shape (B, *dims).
`info["nfe"]` is the number of score evaluations per sample, counted while running (a
counter carried through the scan, or diffrax's step statistics), never assumed.

Every sampler starts from `sde.prior_sample(split(rng)[0], shape)`, so the same rng gives
the same initial noise to all of them (deterministic samplers can be compared path for
path). Every sampler takes `denoise` (default False): one extra score evaluation at eps
returning Tweedie's E[x_0 | x_eps].

Compilation: the whole loop is one jitted function (lax.scan or diffrax), compiled once
per (sampler, sde, shape, steps, options) and per score_fn. A plain Python score_fn is a
static argument, so reuse the same function object to hit the cache; to change parameters
without recompiling, pass a `jax.tree_util.Partial(fn, params, ...)`, whose leaves are
traced (analytic.GaussianMixture.score_fn does this).

Families (modules): ddim (ddpm, ddim), sde_solvers (euler_maruyama, pc), ode_solvers
(ode_euler, heun), dpm_solver (dpm_solver++), adaptive (ode_adaptive). All of them work
with VP, sub-VP and VE: every update is written through the SDE's alpha(t), sigma(t),
f(t), g(t) and its log-SNR / EDM-sigma inverses, which each SDE provides; anything that is
not one of these SDE objects is refused with a ValueError.

Fixed-step samplers take `grid` ("uniform", "quadratic", "logsnr", "edm"; see
base.time_grid) and `rho` (EDM grid). `compile_sampler` compiles ahead of time and returns
the compile time, for benchmarks.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Dict, List, Tuple

import jax

from research.diffusion.samplers import base
from research.diffusion.samplers import ddim as _ddim  # noqa: F401  (registers)
from research.diffusion.samplers import sde_solvers as _sde_solvers  # noqa: F401
from research.diffusion.samplers import ode_solvers as _ode_solvers  # noqa: F401
from research.diffusion.samplers import dpm_solver as _dpm_solver  # noqa: F401
from research.diffusion.samplers import adaptive as _adaptive  # noqa: F401
from research.diffusion.samplers.base import GRIDS, REGISTRY, time_grid  # noqa: F401


def available() -> List[str]:
  return REGISTRY.names()


def get(name: str) -> base.SamplerSpec:
  return REGISTRY.get(name)


@functools.lru_cache(maxsize=256)
def _compiled(name: str, sde, shape: Tuple[int, ...], steps: int, opts: Tuple, dynamic: bool):
  spec = REGISTRY.get(name)

  def run(score_fn, rng):
    return spec.run(score_fn, sde, shape, rng, steps, **dict(opts))

  return jax.jit(run) if dynamic else jax.jit(run, static_argnums=0)


def sample(name: str, score_fn, sde, shape, rng, *, steps: int, **options
           ) -> Tuple[jax.Array, Dict[str, Any]]:
  """Draws samples with sampler `name`.

  Args:
    name: one of available().
    score_fn: (x [B, *dims], t [B]) -> score [B, *dims].
    sde: the SDE from research.diffusion.sde.
    shape: (B, *dims) of the output.
    rng: a PRNG key.
    steps: number of steps of the time grid (for ode_adaptive: the maximum number of
      solver steps).
    **options: per-sampler options (`get(name).defaults`); unknown names raise ValueError.
  Returns:
    (x [B, *dims] float32, info) with info["nfe"] an int and sampler-specific extras.
  """
  fn = _prepare(name, score_fn, sde, shape, steps, options)
  x, nfe, extra = fn(score_fn, rng)
  return x, _info(name, steps, nfe, extra)


def compile_sampler(name: str, score_fn, sde, shape, *, steps: int, **options):
  """Compiles a sampler ahead of time: returns (run, compile_seconds), run(rng) -> (x, info).

  Same arguments as `sample` (less rng); for timing sampling apart from compilation.
  """
  fn = _prepare(name, score_fn, sde, shape, steps, options)
  t0 = time.perf_counter()
  exe = fn.lower(score_fn, jax.random.PRNGKey(0)).compile()
  seconds = time.perf_counter() - t0
  dynamic = _is_dynamic(score_fn)

  def run(rng):
    x, nfe, extra = exe(score_fn, rng) if dynamic else exe(rng)
    return x, _info(name, steps, nfe, extra)
  return run, seconds


def _is_dynamic(score_fn) -> bool:
  return isinstance(score_fn, jax.tree_util.Partial)


def _prepare(name, score_fn, sde, shape, steps, options):
  spec = REGISTRY.get(name)
  opts = spec.resolve(options, sde, steps)
  shape = tuple(int(d) for d in shape)
  return _compiled(name, sde, shape, int(steps), tuple(sorted(opts.items())),
                   _is_dynamic(score_fn))


def _info(name, steps, nfe, extra) -> Dict[str, Any]:
  info: Dict[str, Any] = {"nfe": int(nfe), "steps": int(steps)}
  for k, v in extra.items():
    info[k] = v.item() if hasattr(v, "item") else v
  if info.get("failed"):
    raise RuntimeError(
        f"sampler {name!r} did not finish (info={info}); for ode_adaptive `steps` is the "
        f"solver's max_steps ({steps}): raise it or loosen rtol/atol.")
  return info
