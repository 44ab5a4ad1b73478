"""Bad attention inputs fail up front (interface.validate_inputs) naming the argument.

Runs the xla implementation only (the dense reference): no Pallas or Mosaic interpreter.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import dot_product_attention, pallas_attention

B, T, S, H, HKV, D = 2, 4, 6, 4, 2, 8


def _qkv(dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (B, T, H, D), dtype)
  k = jax.random.normal(ks[1], (B, S, HKV, D), dtype)
  v = jax.random.normal(ks[2], (B, S, HKV, D), dtype)
  return q, k, v


Q, K, V = _qkv()


def _call(q=Q, k=K, v=V, **kw):
  return dot_product_attention(q, k, v, implementation="xla", **kw)


@pytest.mark.parametrize("causal", ["no", 1, None, jnp.array(True)],
                         ids=["str", "int", "none", "jax_array"])
def test_causal_must_be_a_bool(causal):
  with pytest.raises(TypeError, match=r"causal must be a bool \(True or False\), got"):
    _call(causal=causal)


def test_pallas_entry_checks_causal_too():
  with pytest.raises(TypeError, match="causal must be a bool"):
    pallas_attention(Q, K, V, causal="no", interpret=True)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(q=Q[0]), ValueError, r"q must be 4-D \[B, T, H, D\]; got shape \(4, 4, 8\)"),
    (dict(k=K[None], v=V[None]), ValueError, r"k must be 4-D \[B, S, Hkv, D\]"),
    (dict(v=V[..., :1, :]), ValueError, r"k and v must have the same shape"),
    (dict(q=np.asarray(Q).tolist()), TypeError, r"q must be an array, got list"),
    (dict(q=Q[:, :, :3]), ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    (dict(k=K[:, :, :, :4], v=V[:, :, :, :4]), ValueError,
     r"k/v head dim must match q.*\(4 != 8\)"),
    (dict(k=K[:1], v=V[:1]), ValueError, r"k/v batch size must match q.*\(1 != 2\)"),
    (dict(q=Q[:0]), ValueError, r"empty attention: q has a zero-size axis"),
    (dict(q=Q[:, :0]), ValueError, r"empty attention: q has a zero-size axis"),
    (dict(q=Q[:, :, :0]), ValueError, r"empty attention: q has a zero-size axis"),
    (dict(k=K[:, :0], v=V[:, :0]), ValueError, r"empty attention: k has a zero-size axis"),
    (dict(k=K[:, :, :0], v=V[:, :, :0]), ValueError, r"empty attention: k has a zero-size axis"),
    (dict(q=Q.astype(jnp.int32), k=K.astype(jnp.int32), v=V.astype(jnp.int32)), ValueError,
     r"q/k/v dtype int32 not supported; allowed: float32, bfloat16, float16"),
    (dict(k=K.astype(jnp.bfloat16)), ValueError, r"q, k, v must share a dtype"),
])
def test_bad_q_k_v(kw, exc, match):
  with pytest.raises(exc, match=match):
    _call(**kw)


@pytest.mark.parametrize("kv_lengths,match", [
    (jnp.array([3, -1], jnp.int32), r"kv_lengths must lie in \[0, S=6\].*got \[-1\] at "
                                    r"batch index \[1\]"),
    (np.array([7, 2]), r"kv_lengths must lie in \[0, S=6\].*got \[7\] at batch index \[0\]"),
    ([6, 9], r"kv_lengths must lie in \[0, S=6\].*got \[9\]"),
    (jnp.array([3, 2, 1], jnp.int32), r"kv_lengths must be an integer array of shape "
                                      r"\[B\]=\(2,\); got shape \(3,\)"),
    (jnp.array([[3, 2]], jnp.int32), r"kv_lengths must be an integer array.*shape \(1, 2\)"),
    (jnp.array([3.0, 2.0]), r"kv_lengths must be an integer array.*dtype float32"),
    (jnp.array([True, False]), r"kv_lengths must be an integer array.*dtype bool"),
])
def test_bad_kv_lengths(kv_lengths, match):
  with pytest.raises(ValueError, match=match):
    _call(kv_lengths=kv_lengths)


def test_traced_kv_lengths_are_not_checked_by_value():
  # Under jit the values are unknown; out-of-range lengths keep their old meaning (clipped
  # by the kernels, "all keys" for the mask) and raise nothing.
  out = jax.jit(lambda kl: _call(kv_lengths=kl))(jnp.array([9, -1], jnp.int32))
  assert out.shape == (B, T, H, D)


def test_good_inputs_unchanged():
  # numpy bools and list / numpy kv_lengths give the result of the plain Python / jax forms.
  want = _call(causal=True, kv_lengths=jnp.array([6, 3], jnp.int32))
  for causal, kvl in ((np.bool_(True), [6, 3]), (True, np.array([6, 3], np.int64))):
    np.testing.assert_array_equal(np.asarray(_call(causal=causal, kv_lengths=kvl)),
                                  np.asarray(want))
  np.testing.assert_array_equal(np.asarray(dot_product_attention(Q, K, V)),
                                np.asarray(_call()))
