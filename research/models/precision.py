"""Mixed precision for any registered network: float32 parameters, low-precision compute.

  model = MixedPrecision(get_model("unet", ...), "bfloat16")
  model.init(...)                    float32 parameters (what the optimizer updates and saves)
  model.apply(variables, x, t, ...)  parameters and x cast to bfloat16 for the forward pass,
                                     the output cast back to float32

The casts are inside the differentiated function, so gradients arrive in float32 on the
float32 parameters (the "master weights" recipe of mixed-precision training). Networks keep
their normalisation statistics in float32 and cast the time embedding to the input's dtype,
so the activations (and the attention op's q, k, v) stay in the compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_floating(tree: Any, dtype) -> Any:
  """Every floating-point leaf of `tree` as `dtype` (integer leaves untouched)."""
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
  """A network computed in `dtype` ("bfloat16") with float32 parameters; see the module doc."""
  module: Any
  dtype: str = "bfloat16"

  def __post_init__(self):
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f"MixedPrecision: dtype={self.dtype!r} is not allowed; one of "
                       f"{sorted(COMPUTE_DTYPES)}.")

  def init(self, rngs, *args, **kwargs):
    return self.module.init(rngs, *args, **kwargs)

  def apply(self, variables, x, *args, **kwargs):
    dt = COMPUTE_DTYPES[self.dtype]
    out = self.module.apply(cast_floating(variables, dt), jnp.asarray(x).astype(dt), *args,
                            **kwargs)
    return cast_floating(out, jnp.float32)

  def __getattr__(self, name):  # the wrapped network's fields (num_classes, ...)
    if name.startswith("__") or name in ("module", "dtype"):
      raise AttributeError(name)
    return getattr(self.module, name)
