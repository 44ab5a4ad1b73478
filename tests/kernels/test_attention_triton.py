"""The `triton` implementation: our Triton-language kernels (kernels/attention/triton_lang.py).

On CPU the kernels run in Triton's interpreter (interpret=True: a child process with
TRITON_INTERPRET=1, see triton_interpreter.py) through exactly the launches that
jax_triton.triton_call makes on a GPU (same kernels, argument lists, grids and constexprs),
and every output buffer starts as NaN, so an element a kernel fails to write fails the test.
They are checked against the float32 reference on fresh random inputs: outputs and q/k/v
gradients, odd T / S / D, GQA and MQA, causal with T < S and T > S, kv_lengths with an
empty row, float32 / float16 / bfloat16, head dim up to 256.

What CPU tests cannot check is jax_triton's lowering (its import needs a CUDA jaxlib) and
the compiled code's speed; test_kernels_compile_for_hopper_and_ampere compiles every launch
of a forward + backward with Triton for sm_90 and sm_80 (no GPU needed) and checks the
tiles fit in shared memory. The GPU run (experiments/benchmarks/attention_gpu_check.py
--mode run6) covers the rest.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import BlockSizes, dot_product_attention
from kernels.attention import triton_attention as ta
from kernels.attention.testing import (as_kv_lengths, fwd_bwd, random_inputs,
                                       reference_fwd_bwd, rel_error)

# Tiles of 16 / 32 rows make every shape below span several tiles: the unmasked loop, the
# masked loop, skipped tiles and the partial last tile are all exercised.
SMALL_TILES = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                         block_q_dq=32, block_k_dq=16)

# name: (B, T, S, H, Hkv, D, causal, kv_lengths, scale, dtype)
CASES = {
    "f32_odd_mqa_scale": (2, 40, 72, 4, 1, 40, False, None, 0.3, jnp.float32),
    "f32_gqa_causal_t_gt_s_empty_row": (2, 72, 40, 4, 2, 72, True, (0, 30), None, jnp.float32),
    "f16_mqa_causal_t_lt_s_empty_row": (2, 40, 72, 4, 1, 40, True, (50, 0), None, jnp.float16),
    "bf16_d256_gqa_causal": (1, 20, 36, 4, 2, 256, True, None, None, jnp.bfloat16),
}


@functools.lru_cache(maxsize=None)
def _run(name):
  b, t, s, h, hkv, d, causal, kvl, scale, dtype = CASES[name]
  q, k, v, do = random_inputs(7, b, t, s, h, hkv, d, dtype)
  kvl = as_kv_lengths(kvl)
  ours = functools.partial(ta.triton_attention, causal=causal, kv_lengths=kvl, scale=scale,
                           block_sizes=SMALL_TILES, interpret=True)
  got = fwd_bwd(ours, q, k, v, do)
  want = reference_fwd_bwd(q, k, v, do, causal=causal, kv_lengths=kvl, scale=scale)
  return got, want, kvl


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float32_reference(name):
  got, want, kvl = _run(name)
  dtype = CASES[name][-1]
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for label, x, r in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == dtype, label
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{label}: NaN (unwritten) or inf"
    assert rel_error(x, r) < tol, (label, rel_error(x, r))
  if kvl is not None:  # an example with no key at all: zero output and zero gradients
    for i in np.flatnonzero(np.asarray(kvl) == 0):
      for label, x in zip(("out", "dq", "dk", "dv"), got):
        assert not np.any(np.asarray(x[i], np.float32)), (label, i)


def test_op_dispatches_to_the_interpreter_and_refuses_without_gpu():
  b, t, s, h, hkv, d = 1, 24, 40, 2, 1, 16
  q, k, v, _ = random_inputs(3, b, t, s, h, hkv, d, jnp.float32)
  kvl = jnp.array([29], jnp.int32)
  out = dot_product_attention(q, k, v, causal=True, kv_lengths=kvl, implementation="triton",
                              interpret=True)
  want = dot_product_attention(q, k, v, causal=True, kv_lengths=kvl, implementation="xla")
  assert rel_error(out, want) < 1e-5
  with pytest.raises(ValueError, match="triton.*(GPU|jax-triton)"):
    dot_product_attention(q, k, v, implementation="triton", interpret=False)
  with pytest.raises(ValueError, match="head_dim=320"):
    z = jnp.zeros((1, 8, 1, 320))
    dot_product_attention(z, z, z, implementation="triton", interpret=True)


# (capability, q shape, k shape, dtype, causal): the default tiles of the GPU benchmark's
# shapes; shared memory per block is at most 227 KiB on sm_90 and 163 KiB on sm_80.
COMPILE_CASES = [
    (90, (2, 4096, 16, 128), (2, 4096, 4, 128), jnp.bfloat16, True),
    (90, (1, 2048, 8, 256), (1, 2048, 8, 256), jnp.float16, False),
    (80, (2, 1000, 8, 64), (2, 1500, 2, 64), jnp.float16, True),
]
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@pytest.mark.parametrize("capability,q_shape,k_shape,dtype,causal", COMPILE_CASES)
def test_kernels_compile_for_hopper_and_ampere(capability, q_shape, k_shape, dtype, causal):
  launches = ta.kernel_launches(q_shape, k_shape, dtype, causal=causal)
  assert [l.kernel for l in launches] == ["attn_fwd", "attn_delta", "attn_dkdv", "attn_dq"]
  b, t, h, _ = q_shape
  fwd = launches[0]
  assert fwd.grid == (-(-t // dict(fwd.constexprs)["BLOCK_M"]), b * h)
  assert launches[2].grid[1] == b * k_shape[2]  # dK/dV: one program per key tile and kv head
  for launch in launches:
    compiled = ta.compile_launch(launch, capability=capability)
    assert len(compiled.asm["cubin"]) > 1000
    assert f".target sm_{capability}" in compiled.asm["ptx"]
    assert 0 <= compiled.metadata.shared <= SMEM_LIMIT[capability], (
        launch.kernel, compiled.metadata.shared)
