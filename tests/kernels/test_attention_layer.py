"""The Flax attention layer trains the same with attention_impl="pallas" (interpret) and "xla"."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.models.layers import MultiHeadAttention, SelfAttention

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class TinyModel(nn.Module):
  """A causal GQA self-attention block over padded sequences, then a linear readout."""
  attention_impl: str

  @nn.compact
  def __call__(self, x, kv_lengths):
    h = nn.Dense(16)(x)
    h = h + SelfAttention(num_heads=4, num_kv_heads=2, head_dim=12,  # 12 -> 16 in the kernel
                          causal=True, attention_impl=self.attention_impl)(h, None, kv_lengths)
    return nn.Dense(3)(nn.gelu(h))


def _train(impl: str, steps: int = 30):
  rng = jax.random.PRNGKey(0)
  kx, ky, kp = jax.random.split(rng, 3)
  x = jax.random.normal(kx, (2, 21, 5))
  kv_lengths = jnp.array([21, 13], jnp.int32)
  y = jax.random.normal(ky, (2, 21, 3))
  model = TinyModel(attention_impl=impl)
  # Parameters do not depend on the implementation: initialise through the xla one.
  params = jax.jit(TinyModel(attention_impl="xla").init, compiler_options=FAST_COMPILE)(
      kp, x, kv_lengths)
  tx = optax.adam(1e-2)

  def loss_fn(p):
    return jnp.mean((model.apply(p, x, kv_lengths) - y) ** 2)

  def step(carry, _):
    p, opt = carry
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[1],
                compiler_options=FAST_COMPILE)
  return np.asarray(run(params))


def test_pallas_layer_trains_to_the_same_loss_as_xla():
  losses_xla = _train("xla")
  losses_pallas = _train("pallas")  # interpret mode: the default backend is CPU
  assert losses_xla[-1] < 0.7 * losses_xla[0]  # it does learn
  # Same trajectory: float32 rounding differences (~1e-7) are amplified by Adam's
  # normalisation over the steps, so the tolerance grows from 1e-5 to 1e-3.
  np.testing.assert_allclose(losses_pallas[:5], losses_xla[:5], rtol=1e-5)
  np.testing.assert_allclose(losses_pallas, losses_xla, rtol=1e-3)


def test_layer_shapes_and_bad_impl():
  x = jnp.ones((2, 4, 4, 8))  # a feature map
  layer = SelfAttention(num_heads=2)
  params = jax.jit(layer.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0), x)
  assert jax.eval_shape(layer.apply, params, x).shape == (2, 4, 4, 8)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    SelfAttention(num_heads=2, attention_impl="flash").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    SelfAttention(num_heads=4, num_kv_heads=3).init(jax.random.PRNGKey(0), x)
  # Cross-attention from tokens to a 3x3 feature map with GQA.
  tokens, fmap = jnp.ones((2, 5, 6)), jnp.ones((2, 3, 3, 7))
  xattn = MultiHeadAttention(num_heads=4, num_kv_heads=1, head_dim=8, out_features=10)
  params = jax.eval_shape(xattn.init, jax.random.PRNGKey(1), tokens, fmap)
  assert jax.eval_shape(xattn.apply, params, tokens, fmap).shape == (2, 5, 10)
