"""Pallas flash attention (interpret mode on CPU) against the float32 reference.

Every check compares against `mha_reference` in float32 on the same inputs, with the
relative error max|x - ref| / max|ref| per array (forward output and dq, dk, dv). Small
tiles (16 / 32) make each shape span several tiles, so the unmasked loop, the masked loop,
skipped tiles and padding are all exercised. Compiles use XLA's lowest optimisation level:
the interpreted kernels are compile-bound on CPU, not run-bound.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import (BlockSizes, available_implementations, dot_product_attention,
                               pallas_attention)
from kernels.attention.testing import (as_kv_lengths, fwd_bwd, random_inputs,
                                       reference_fwd_bwd)
from kernels.attention.testing import rel_error as _rel

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SMALL_TILES = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                         block_q_dq=32, block_k_dq=16)


# name: (B, T, S, H, Hkv, D, causal, kv_lengths, scale)
CASES = {
    # The odd grid in one case: T != S, D=40, GQA 8:2, causal, an empty kv row.
    "odd_gqa_causal_kvlen": (2, 77, 130, 8, 2, 40, True, (0, 97), None),
    # No mask at all except the static key padding 130 -> 160; MHA, D=72 padded to 128;
    # an explicit scale.
    "odd_mha_noncausal": (1, 77, 130, 2, 2, 72, False, None, 0.3),
    # More queries than keys, causal: the first T-S rows see nothing; MQA; D=96.
    "causal_t_gt_s_mqa": (2, 100, 37, 2, 1, 96, True, (37, 20), None),
}


@functools.lru_cache(maxsize=None)  # several tests inspect the same (compile-bound) run
def _run_case(name, dtype, seed=0):
  b, t, s, h, hkv, d, causal, kvl, scale = CASES[name]
  q, k, v, do = random_inputs(seed, b, t, s, h, hkv, d, dtype)
  kvl = as_kv_lengths(kvl)
  ours = functools.partial(pallas_attention, causal=causal, kv_lengths=kvl, scale=scale,
                           block_sizes=SMALL_TILES, interpret=True)
  got = jax.jit(lambda *a: fwd_bwd(ours, *a), compiler_options=FAST_COMPILE)(q, k, v, do)
  want = reference_fwd_bwd(q, k, v, do, causal=causal, kv_lengths=kvl, scale=scale,
                           compiler_options=FAST_COMPILE)
  return got, want, (b, t, s, causal, kvl)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float32_reference_fp32(name):
  got, want, _ = _run_case(name, jnp.float32)
  for label, x, r in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(x))), f"{label} has NaN/inf"
    assert _rel(x, r) < 1e-5, (label, _rel(x, r))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_float32_reference_low_precision(dtype):
  got, want, _ = _run_case("odd_gqa_causal_kvlen", dtype)
  for label, x, r in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == dtype
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{label} has NaN/inf"
    assert _rel(x, r) < 2e-2, (label, _rel(x, r))


def test_rows_without_keys_are_zero_with_zero_gradient():
  # Case 3: causal with T=100 > S=37 (rows 0..62 see nothing in both examples) and
  # kv_lengths=(37, 20). Example 1 with 20 keys: rows r see keys j <= r - 63, j < 20.
  got, _, (b, t, s, _, _) = _run_case("causal_t_gt_s_mqa", jnp.float32)
  out, dq = np.asarray(got[0]), np.asarray(got[1])
  empty_rows = t - s
  assert np.all(out[:, :empty_rows] == 0.0)
  assert np.all(dq[:, :empty_rows] == 0.0)
  assert np.all(np.abs(out[:, empty_rows:]).max(axis=(-1, -2)) > 0)
  # Keys beyond kv_lengths[1] = 20 receive no gradient.
  assert np.all(np.asarray(got[2])[1, 20:] == 0.0)
  assert np.all(np.asarray(got[3])[1, 20:] == 0.0)


def test_empty_kv_row_gives_zeros():
  got, _, _ = _run_case("odd_gqa_causal_kvlen", jnp.float32)
  out, dq, dk, dv = (np.asarray(x) for x in got)
  assert np.all(out[0] == 0.0) and np.all(dq[0] == 0.0)
  assert np.all(dk[0] == 0.0) and np.all(dv[0] == 0.0)
  assert np.all(dk[1, 97:] == 0.0)  # padding keys of example 1


def test_op_pallas_interpret_equals_xla_under_jit_and_vmap():
  b, t, s, h, hkv, d, causal, kvl, _ = CASES["odd_gqa_causal_kvlen"]
  n = 2  # vmapped leading axis
  ks = jax.random.split(jax.random.PRNGKey(5), 3)
  q = jax.random.normal(ks[0], (n, b, t, h, d))
  k = jax.random.normal(ks[1], (n, b, s, hkv, d))
  v = jax.random.normal(ks[2], (n, b, s, hkv, d))
  kvl = jnp.asarray([kvl, (130, 5)], jnp.int32)  # [n, B]

  def op(impl, q, k, v, kvl):
    return dot_product_attention(q, k, v, causal=causal, kv_lengths=kvl,
                                 implementation=impl, interpret=True)

  outs = {impl: jax.jit(jax.vmap(functools.partial(op, impl)), compiler_options=FAST_COMPILE)(
      q, k, v, kvl) for impl in ("pallas", "xla")}
  assert _rel(outs["pallas"], outs["xla"]) < 1e-5
  # Unbatched, jitted, with implementation="auto" (xla on CPU) for the second example.
  single = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=causal,
                                                         kv_lengths=kvl[1]),
                   compiler_options=FAST_COMPILE)(q[1], k[1], v[1])
  assert _rel(outs["pallas"][1], single) < 1e-5
  # "auto" on CPU is the xla implementation, i.e. the float32 reference itself.
  assert _rel(single, outs["xla"][1]) < 1e-6


def test_dispatch_errors_are_clear():
  q, k, v, _ = random_inputs(0, 1, 8, 8, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError,
                     match="allowed: 'auto', 'cudnn', 'mosaic', 'pallas', 'pallas_tpu', "
                           "'triton', 'xla'"):
    dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="interpret=True"):
    dot_product_attention(q, k, v, implementation="pallas", interpret=False)
  with pytest.raises(ValueError, match="cudnn.*NVIDIA GPU"):
    dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="triton.*(GPU|jax-triton)"):
    dot_product_attention(q, k, v, implementation="triton", interpret=False)
  with pytest.raises(ValueError, match="multiple of k/v heads"):
    dot_product_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
  with pytest.raises(ValueError, match="kv_lengths"):
    dot_product_attention(q, k, v, kv_lengths=jnp.ones((2,), jnp.int32))
  with pytest.raises(ValueError, match="dtype"):
    dot_product_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
  with pytest.raises(ValueError, match="head_dim=320"):
    z = jnp.zeros((1, 8, 1, 320))
    dot_product_attention(z, z, z, implementation="pallas")
  assert available_implementations() == ["cudnn", "mosaic", "pallas", "pallas_tpu", "triton",
                                         "xla"]


def test_block_sizes_validation_and_fit():
  with pytest.raises(ValueError, match="block_k=48"):
    BlockSizes(block_k=48)
  with pytest.raises(ValueError, match="block_q=8"):
    BlockSizes(block_q=8)
  fitted = BlockSizes().fit(q_len=77, kv_len=20)
  assert fitted.block_q == 128 and fitted.block_k == 32 and fitted.block_k_dkv == 32


@pytest.mark.parametrize("dtype,d,causal,kvl,hkv", [
    (jnp.bfloat16, 40, True, True, 2),      # the odd grid
    (jnp.bfloat16, 128, True, False, 8),    # benchmark shape family
    (jnp.float16, 64, False, False, 8),
    (jnp.float32, 256, False, True, 1),     # widest head, MQA
])
def test_kernels_lower_to_triton_for_cuda(dtype, d, causal, kvl, hkv):
  """Cross-lowers forward + backward for the CUDA platform on this CPU machine.

  This runs Pallas' Triton lowering (jaxpr -> Triton IR, with its power-of-two and type
  checks) without a GPU; it does not run ptxas. It caught an i1 loop counter once.
  """
  b, t, s, h = 1, 200, 300, 8
  qa = jax.ShapeDtypeStruct((b, t, h, d), dtype)
  ka = jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
  kva = jax.ShapeDtypeStruct((b,), jnp.int32) if kvl else None

  def f(q, k, v, kv):
    attn = functools.partial(pallas_attention, causal=causal, kv_lengths=kv, interpret=False)
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(out)

  text = jax.jit(f).trace(qa, ka, ka, kva).lower(lowering_platforms=("cuda",)).as_text()
  for name in ("flash_attention_forward", "flash_attention_delta", "flash_attention_dkdv",
               "flash_attention_dq"):
    assert f'name = "{name}"' in text, name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float32_dots_ask_for_full_precision(dtype):
  """fp32 inputs: every in-kernel dot is HIGHEST, which Pallas' Triton lowering turns into
  `inputPrecision = ieee` (DEFAULT would be TF32, ~6e-4 relative error on the H200);
  bf16/fp16 dots keep the default (plain bf16/fp16 MMA)."""
  q = jnp.zeros((1, 40, 2, 16), dtype)
  attn = functools.partial(pallas_attention, causal=True, interpret=True)
  text = str(jax.make_jaxpr(lambda q, k, v: jax.vjp(attn, q, k, v)[1](q))(q, q, q))
  n_dots = text.count("dot_general[")
  n_highest = text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)")
  assert n_dots >= 7  # 2 forward + 4 dK/dV + 3 dQ, at least once each
  assert n_highest == (n_dots if dtype == jnp.float32 else 0), (n_dots, n_highest)


def test_gpu_defaults_are_chosen_by_head_dim_and_causal():
  from kernels.attention import default_block_sizes
  assert default_block_sizes("gpu", 128, True).block_k == 128
  assert default_block_sizes("gpu", 128, False).block_k == 64
  assert default_block_sizes("gpu", 40, False) == default_block_sizes("gpu", 64, False)
  assert default_block_sizes("gpu", 64, True).block_q_dkv == 64
  assert default_block_sizes("cpu", 128, True) == default_block_sizes("cpu", 16, False)
  with pytest.raises(ValueError, match="head_dim=512"):
    default_block_sizes("gpu", 512)


def test_float32_gpu_defaults_fit_shared_memory():
  from kernels.attention import default_block_sizes
  for d in (64, 128, 256):
    for causal in (False, True):
      bs = default_block_sizes("gpu", d, causal, jnp.float32)
      # pipelined streamed key/value (or q/dO) tiles: stages x 2 tiles x rows x D x 4 bytes
      for rows, stages in ((bs.block_k, bs.num_stages), (bs.block_q_dkv, bs.num_stages_dkv),
                           (bs.block_k_dq, bs.num_stages_dq)):
        assert stages * 2 * rows * d * 4 <= 128 * 1024, (d, causal, bs)
  assert default_block_sizes("gpu", 128, True, jnp.bfloat16) == default_block_sizes(
      "gpu", 128, True)
