"""The UNet's cross-attention (context_dim > 0): padding is never attended to, the transformer
block matches a dense numpy reference, and the new fields fail clearly when misused."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.unet import SpatialTransformer, TransformerBlock, UNet, position_embedding_2d


def _random_params(model, *args, seed=0, **kwargs):
  """Every parameter N(0, 0.3^2) in numpy (no RNG compile), so no layer is zero."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                      shapes)


@pytest.mark.parametrize("pooled,position", [(False, False), (True, True)])
def test_cross_attention_never_attends_to_padding(pooled, position):
  # pooled: the mean of the valid tokens also enters the time embedding (SDXL-style);
  # position: the transformer tokens carry the 2-D sin-cos table.
  model = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_heads=2,
               context_dim=6, transformer_resolutions=(8,), attention_impl="xla",
               pooled_context=pooled, transformer_position_embedding=position)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 2)), jnp.float32)
  t = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)
  context = rng.standard_normal((3, 5, 6)).astype(np.float32)
  lengths = np.asarray([5, 2, 0], np.int32)
  params = _random_params(model, x, t, context=context, context_lengths=lengths)
  assert "SpatialTransformer_0" in params and "AttnBlock_0" not in params
  assert ("pooled_context" in params) == pooled
  apply = jax.jit(lambda c, n: model.apply({"params": params}, x, t, context=c,
                                           context_lengths=n))
  out = np.asarray(apply(context, lengths))
  assert np.all(np.isfinite(out)) and np.std(out) > 1e-3
  # Changing every padded token leaves the output unchanged.
  other = context.copy()
  pad = np.arange(5)[None] >= lengths[:, None]
  other[pad] = 10 * rng.standard_normal((pad.sum(), 6))
  np.testing.assert_allclose(np.asarray(apply(other, lengths)), out, rtol=1e-5, atol=1e-5)
  # Changing a valid token changes it (rows 0 and 1; row 2 has length 0).
  other[:, 0] += 1.0
  diff = np.abs(np.asarray(apply(other, lengths)) - out).max(axis=(1, 2, 3))
  assert diff[0] > 1e-3 and diff[1] > 1e-3 and diff[2] < 1e-5


def test_position_table_separates_rows_and_columns():
  table = np.asarray(position_embedding_2d(4, 6, 16)).reshape(4, 6, 16)
  assert np.all(np.abs(table) <= 1.0)
  # The first half depends on the row only, the second on the column only...
  np.testing.assert_array_equal(table[:, :, :8], np.broadcast_to(table[:, :1, :8], (4, 6, 8)))
  np.testing.assert_array_equal(table[:, :, 8:], np.broadcast_to(table[:1, :, 8:], (4, 6, 8)))
  # ...and every position gets its own vector.
  flat = table.reshape(24, 16)
  dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
  assert np.all(dist[~np.eye(24, dtype=bool)] > 0.1)
  with pytest.raises(ValueError, match="divisible by 4"):
    position_embedding_2d(2, 2, 6)


def test_position_embedding_breaks_translation_symmetry():
  # Without it, a transformer block maps a spatially constant input to a constant output (every
  # token is the same); with it, the tokens at different places differ.
  x = jnp.ones((1, 4, 4, 8), jnp.float32)
  ctx, n = jnp.ones((1, 3, 6), jnp.float32), jnp.asarray([3], jnp.int32)
  for position in (False, True):
    block = SpatialTransformer(num_heads=2, attention_impl="xla", position_embedding=position)
    params = _random_params(block, x, ctx, n)
    out = np.asarray(block.apply({"params": params}, x, ctx, n)).reshape(16, 8)
    spread = np.abs(out - out[:1]).max()
    assert (spread > 1e-2) if position else (spread < 1e-5), (position, spread)


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _attention(x, ctx, lengths, p, heads):
  """Dense masked multi-head attention in float64 numpy."""
  q = np.einsum("btc,chd->bthd", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bsc,chd->bshd", ctx, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bsc,chd->bshd", ctx, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
  valid = np.arange(ctx.shape[1])[None, None, None, :] < lengths[:, None, None, None]
  logits = np.where(valid, logits, -1e300)
  w = np.exp(logits - logits.max(-1, keepdims=True)) * valid
  w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)   # rows with no valid key: all 0
  h = np.einsum("bhts,bshd->bthd", w, v)
  return np.einsum("bthd,hdc->btc", h, p["out"]["kernel"]) + p["out"]["bias"]


def test_transformer_block_matches_a_dense_masked_reference():
  from scipy.special import erf
  block = TransformerBlock(num_heads=2, attention_impl="xla")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 6, 8)).astype(np.float32)
  ctx = rng.standard_normal((2, 4, 5)).astype(np.float32)
  lengths = np.asarray([3, 0], np.int32)
  params = _random_params(block, x, ctx, lengths, seed=2)
  got = np.asarray(jax.jit(lambda: block.apply({"params": params}, x, ctx, lengths))())
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = x.astype(np.float64)
  full = np.full((2,), 6)
  h = h + _attention(_layer_norm(h, p["ln_self"]), _layer_norm(h, p["ln_self"]), full,
                     p["self_attn"], 2)
  h = h + _attention(_layer_norm(h, p["ln_cross"]), ctx.astype(np.float64), lengths,
                     p["cross_attn"], 2)
  a, g = np.split(_layer_norm(h, p["ln_ff"]) @ p["ff_in"]["kernel"] + p["ff_in"]["bias"], 2, -1)
  gelu = 0.5 * g * (1 + erf(g / np.sqrt(2)))
  want = h + (a * gelu) @ p["ff_out"]["kernel"] + p["ff_out"]["bias"]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_new_fields_fail_clearly():
  x, t = jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,))
  init = lambda m, **kw: jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, t, **kw))  # noqa
  with pytest.raises(ValueError, match="context_dim=0"):
    init(UNet(ch=8, ch_mult=(1,), num_heads=2, attn_resolutions=()),
         context=jnp.zeros((1, 3, 4)))
  with pytest.raises(ValueError, match="needs context_dim > 0"):
    init(UNet(ch=8, ch_mult=(1,), num_heads=2, attn_resolutions=(), transformer_resolutions=(8,)))
  with pytest.raises(ValueError, match=r"has \[2\], which this UNet never reaches"):
    init(UNet(ch=8, ch_mult=(1,), num_heads=2, attn_resolutions=(), context_dim=4,
              transformer_resolutions=(2,)))
  with pytest.raises(ValueError, match="in both attn_resolutions and transformer_resolutions"):
    init(UNet(ch=8, ch_mult=(1,), num_heads=2, attn_resolutions=(8,), context_dim=4,
              transformer_resolutions=(8,)))
  with pytest.raises(ValueError, match="pooled_context=True needs context_dim > 0"):
    init(UNet(ch=8, ch_mult=(1,), num_heads=2, attn_resolutions=(), pooled_context=True))
  with pytest.raises(ValueError, match="context_dim=4"):
    init(UNet(ch=8, ch_mult=(1,), num_heads=2, attn_resolutions=(), context_dim=4),
         context=jnp.zeros((1, 3, 5)))
