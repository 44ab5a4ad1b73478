"""compute_dtype=bfloat16 (models.precision.MixedPrecision) and UNet remat."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import get_model
from research.models.precision import MixedPrecision

KW = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), num_heads=2,
          num_classes=3, attention_impl="xla")


def _inputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 3))
  return x, jnp.linspace(0.1, 1.0, 4), jnp.array([0, 1, 2, 3])


def _perturbed(params):  # non-zero output layers, so every block matters
  leaves, tree = jax.tree.flatten(params)
  return jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(jax.random.PRNGKey(i), l.shape)
                                   for i, l in enumerate(leaves)])


def _dtypes(fn, *args):
  """Output dtypes of every conv / matmul in fn's jaxpr, nested calls included."""
  out = collections.Counter()

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name in ("conv_general_dilated", "dot_general"):
        out[(e.primitive.name, str(e.outvars[0].aval.dtype))] += 1
      for v in e.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else [v]):
          if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


def test_bfloat16_compute_keeps_float32_params_and_gradients():
  unet = get_model("unet", **KW)
  x, t, lab = _inputs()
  params = _perturbed(jax.jit(unet.init)(jax.random.PRNGKey(1), x, t, lab))
  mixed = MixedPrecision(unet, "bfloat16")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      jax.eval_shape(mixed.init, jax.random.PRNGKey(1), x, t, lab)))
  out = jax.jit(mixed.apply)(params, x, t, lab)
  ref = jax.jit(unet.apply)(params, x, t, lab)
  assert out.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 1e-4 < rel < 0.05, rel  # bf16 rounding, not float32, and not garbage
  counts = _dtypes(lambda p: mixed.apply(p, x, t, lab), params)
  # Every convolution runs in bf16, and most matmuls; the float32 ones are the time
  # embedding's MLP (on float32 sinusoidal features) and the attention's float32 logits.
  assert counts[("conv_general_dilated", "float32")] == 0, counts
  assert counts[("conv_general_dilated", "bfloat16")] > 0, counts
  assert counts[("dot_general", "bfloat16")] > counts[("dot_general", "float32")], counts
  grads = jax.jit(jax.grad(lambda p: jnp.sum(mixed.apply(p, x, t, lab) ** 2)))(params)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  assert mixed.num_classes == 3  # the wrapped network's fields
  with pytest.raises(ValueError, match="dtype"):
    MixedPrecision(unet, "float8")


def test_unet_remat_has_the_same_parameters_outputs_and_gradients():
  x, t, lab = _inputs()
  plain, remat = get_model("unet", **KW), get_model("unet", remat=True, **KW)
  p = jax.jit(plain.init)(jax.random.PRNGKey(1), x, t, lab)
  pr = jax.jit(remat.init)(jax.random.PRNGKey(1), x, t, lab)
  assert jax.tree.structure(p) == jax.tree.structure(pr)
  jax.tree.map(np.testing.assert_array_equal, p, pr)
  p = _perturbed(p)

  def loss(model):
    return lambda q: jnp.sum(model.apply(q, x, t, lab, train=True,
                                         rngs={"dropout": jax.random.PRNGKey(2)}) ** 2)
  np.testing.assert_array_equal(jax.jit(plain.apply)(p, x, t, lab),
                                jax.jit(remat.apply)(p, x, t, lab))
  # Recomputation may fuse differently: float32 rounding, per parameter array.
  g, gr = jax.jit(jax.grad(loss(plain)))(p), jax.jit(jax.grad(loss(remat)))(p)
  floor = 1e-3 * float(jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(g))))
  rel = jax.tree.map(lambda a, b: float(jnp.linalg.norm(a - b) / max(float(jnp.linalg.norm(a)),
                                                                       floor)), g, gr)
  assert max(jax.tree.leaves(rel)) < 1e-4, rel
