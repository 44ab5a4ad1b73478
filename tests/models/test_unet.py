"""UNet: output shapes for 8/16/32 px with/without attention and class conditioning (traced
with eval_shape: no compilation), and real properties of one small network."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import get_model
from research.models.unet import UNet, count_params


def _shapes(model, x_shape, labels=True):
  b = x_shape[0]
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  t = jax.ShapeDtypeStruct((b,), jnp.float32)
  lab = jax.ShapeDtypeStruct((b,), jnp.int32) if labels else None
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, lab)
  out = jax.eval_shape(lambda p, x, t, lab: model.apply(p, x, t, lab), params, x, t, lab)
  return params, out


@pytest.mark.parametrize("size,ch_mult,attn,channels,num_classes,time_embedding", [
    (8, (1, 2), (), 1, 0, "sinusoidal"), (8, (1, 2), (4, 8), 1, 10, "fourier"),
    (16, (1, 2, 2), (), 3, 10, "sinusoidal"), (16, (1, 2, 2), (8,), 3, 0, "sinusoidal"),
    (32, (1, 2, 2, 2), (), 3, 0, "fourier"), (32, (1, 2, 2, 2), (16, 8), 1, 10, "sinusoidal")])
def test_output_shape(size, ch_mult, attn, channels, num_classes, time_embedding):
  model = get_model("unet", ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn,
                    num_heads=2, num_classes=num_classes, time_embedding=time_embedding,
                    attention_impl="xla")
  params, out = _shapes(model, (3, size, size, channels), labels=num_classes > 0)
  assert out.shape == (3, size, size, channels) and out.dtype == jnp.float32
  p = params["params"]
  assert ("Embed_0" in p) == (num_classes > 0)
  n_attn = sum(k.startswith("AttnBlock") for k in p)
  # Each attention resolution r: 1 block per down ResBlock + 2 per up level, + 1 middle.
  levels = {size // 2**i for i in range(len(ch_mult))}
  assert n_attn == 1 + sum(3 for r in attn if r in levels)


def test_bad_settings_fail_clearly():
  with pytest.raises(ValueError, match="divisible by 4"):
    _shapes(UNet(ch=8, ch_mult=(1, 2, 2)), (1, 10, 10, 1), labels=False)
  with pytest.raises(ValueError, match="num_heads=3"):
    _shapes(UNet(ch=8, ch_mult=(1,), num_heads=3), (1, 8, 8, 1), labels=False)
  with pytest.raises(ValueError, match="unknown options"):
    get_model("unet", hidden=3)


def _random_params(model, x, t, labels, seed=0):
  """Every parameter drawn N(0, 0.2^2) in numpy (no RNG compile), so no layer is zero."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, labels)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_real_properties_of_a_small_unet():
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=2,
               num_classes=3, attention_impl="xla")
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
  t = jnp.asarray(rng.uniform(0.01, 1.0, 4), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3], jnp.int32)  # 3 = the null (unconditional) token
  apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  params = _random_params(model, x, t, labels)
  out = np.asarray(apply(params, x, t, labels))
  assert np.all(np.isfinite(out)) and np.std(out) > 1e-3
  # Examples do not interact (GroupNorm is per example): a permuted batch permutes the output.
  perm = jnp.asarray([2, 0, 3, 1])
  np.testing.assert_allclose(np.asarray(apply(params, x[perm], t[perm], labels[perm])),
                             out[np.asarray(perm)], rtol=2e-5, atol=2e-5)
  # labels=None means the null token.
  null = jnp.full((4,), 3, jnp.int32)
  uncond = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, None))
  np.testing.assert_allclose(np.asarray(uncond(params, x, t)),
                             np.asarray(apply(params, x, t, null)), rtol=2e-5, atol=2e-5)
  # The output depends on the label and on t.
  other = np.asarray(apply(params, x, t, (labels + 1) % 4))
  assert np.max(np.abs(other - out)) > 1e-3
  assert np.max(np.abs(np.asarray(apply(params, x, t * 0.5, labels)) - out)) > 1e-3
  # The output conv is zero-initialised: an untrained network predicts exactly 0.
  zero_out = dict(params)
  last = max((k for k in params if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))
  zero_out[last] = jax.tree.map(jnp.zeros_like, params[last])
  np.testing.assert_array_equal(np.asarray(apply(zero_out, x, t, labels)), 0.0)
  assert count_params(params) == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
