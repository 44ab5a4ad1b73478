"""Mosaic GPU (Hopper) kernels, without a GPU: Pallas' GPU interpreter + CUDA lowering.

The forward (mosaic.py) and the dQ and dK/dV kernels (mosaic_backward.py) are checked. The
interpreter runs each kernel's three warpgroups as threads with simulated barriers, TMA
copies and shared memory (it fails on a barrier phase some waiter never observed, and its
race detector reports shared-memory reads that may overlap a write), so the pipeline
protocol, the loop ranges and the masks are checked against the float32 reference on fresh
random inputs. Its matmuls are plain dots (see mosaic.py); the wgmma
version is checked by lowering the kernel for CUDA on this CPU machine, which runs Mosaic
GPU's lowering with its layout and shape checks, but not ptxas.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import (BlockSizes, MosaicBlockSizes, default_mosaic_block_sizes,
                               dot_product_attention, mha_reference, mosaic_attention)
from kernels.attention.mosaic import races_found
from kernels.attention.mosaic_backward import MosaicBackwardBlockSizes
from kernels.attention.testing import (as_kv_lengths, fwd_bwd, random_inputs,
                                       reference_fwd_bwd)
from kernels.attention.testing import rel_error as _rel

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Smallest legal Mosaic tiles: a CTA is 2 x 64 query rows, keys stream 64 at a time through a
# 2-slot ring, so the shapes below span several key tiles and reuse each slot.
MOSAIC_TILES = MosaicBlockSizes(block_q=64, block_kv=64, num_stages=2)
BWD_TILES = BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_k_dkv=64,
                       block_q_dq=64, block_k_dq=32)


# name: (B, T, S, H, Hkv, D, causal, kv_lengths, scale)
CASES = {
    # T != S, D=40 (padded to 64), GQA 2:1, causal with offset S - T = 53, kv_lengths
    # (0, 97): example 0 attends to nothing (no key tile is even loaded), example 1 has
    # warpgroup 0 needing 2 key tiles and warpgroup 1 all of its 2 (cut by the length).
    "odd_gqa_causal_kvlen": (2, 77, 130, 2, 1, 40, True, (0, 97), None),
    # More queries than keys (rows 0..62 see nothing), MQA, D=96 (-> 128), two examples;
    # no kv_lengths: the causal diagonal and the static key padding 37 -> 64.
    "causal_t_gt_s_mqa": (2, 100, 37, 2, 1, 96, True, None, None),
    # No causal mask: unmasked tiles then the padding tile; MHA, D=72, explicit scale.
    "noncausal_mha": (1, 200, 150, 2, 2, 72, False, None, 0.3),
    # Backward tiles block_q=128 != block_kv=64 with 3 stages (WIDE_BWD_TILES), causal GQA
    # 4:1: the dK/dV CTA for keys 128..255 starts at query block 1 and streams 1 block x 4
    # query heads through 3 slots, so the ring wraps across query heads.
    "causal_gqa_wide_bwd_tiles": (1, 256, 256, 4, 1, 64, True, None, None),
}
WIDE_BWD_TILES = MosaicBackwardBlockSizes(block_q=128, block_kv=64, num_stages=3)


@functools.lru_cache(maxsize=None)
def _run(name, dtype=jnp.bfloat16, seed=0, backward="mosaic"):
  b, t, s, h, hkv, d, causal, kvl, scale = CASES[name]
  kvl = as_kv_lengths(kvl)
  low = random_inputs(seed, b, t, s, h, hkv, d, dtype)
  ours = functools.partial(mosaic_attention, causal=causal, kv_lengths=kvl, scale=scale,
                           block_sizes=BWD_TILES, mosaic_block_sizes=MOSAIC_TILES,
                           backward=backward, interpret=True,
                           mosaic_backward_block_sizes=(
                               WIDE_BWD_TILES if name == "causal_gqa_wide_bwd_tiles" else None))
  # Op by op, not under one jit: with the forward's GPU interpreter and the backward in one
  # XLA:CPU program, the interpreter's simulated warpgroups deadlocked (jax 0.10.2, 2 cores);
  # each kernel is still compiled and run on its own.
  got = fwd_bwd(ours, *low)
  # The reference runs on the same rounded inputs.
  want = reference_fwd_bwd(*low, causal=causal, kv_lengths=kvl, scale=scale,
                           compiler_options=FAST_COMPILE)
  return got, want


@pytest.mark.parametrize("name,backward", [(n, "mosaic") for n in CASES]
                         + [("odd_gqa_causal_kvlen", "triton")])
def test_mosaic_forward_and_gradients_match_float32_reference(name, backward):
  got, want = _run(name, backward=backward)
  assert not races_found()  # the interpreter's race detector watched the whole pipeline
  for label, x, r in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{label} has NaN/inf"
    assert _rel(x, r) < 2e-2, (name, label, _rel(x, r))
  # Rows with nothing to attend to are exactly zero (checked here, on the same run: each
  # interpreted case costs a minute or more on a 2-core machine).
  out, dq, dk, dv = (np.asarray(x, np.float32) for x in got)
  if name == "causal_t_gt_s_mqa":
    empty = 100 - 37  # causal, bottom-right: row r sees keys j <= r - 63
    assert np.all(out[:, :empty] == 0.0) and np.all(dq[:, :empty] == 0.0)
    assert np.all(np.abs(out[:, empty:]).max(axis=(-1, -2)) > 0)
  if name == "odd_gqa_causal_kvlen":
    # kv_lengths: example 0 has no keys at all; example 1's keys >= 97 get no gradient.
    assert np.all(out[0] == 0.0) and np.all(dq[0] == 0.0)
    assert np.all(dk[0] == 0.0) and np.all(dv[0] == 0.0)
    assert np.all(dk[1, 97:] == 0.0) and np.all(dv[1, 97:] == 0.0)


def test_mosaic_fp16_and_op_dispatch():
  # T = S = 256, D = 64, causal: the op's default tiles are the short-query ones (2 x 128-row
  # warpgroups, 64-key tiles, GPU run 5), so this also runs them through the interpreter.
  b, t, s, h, hkv, d = 1, 256, 256, 2, 1, 64
  assert default_mosaic_block_sizes(d, True, t, s) == MosaicBlockSizes(128, 64, 2)
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float16)
  k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float16)
  v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float16)
  out = dot_product_attention(q, k, v, causal=True, implementation="mosaic", interpret=True)
  ref = mha_reference(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
  assert not races_found()
  assert out.dtype == jnp.float16 and _rel(out, ref) < 2e-2


def test_mosaic_forward_256_key_tiles():
  """The long non-causal D = 64 default (256-key tiles through a 2-slot ring), forward only:
  3 key tiles (the third reuses slot 0), the last one cut by kv_lengths; GQA 2:1."""
  b, t, s, h, hkv, d = 1, 128, 768, 2, 1, 64
  tiles = default_mosaic_block_sizes(d, False, 4096, 4096)
  assert tiles == MosaicBlockSizes(64, 256, 2)
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  q, k, v = (jax.random.normal(kk, (b, n, hh, d), jnp.float32).astype(jnp.bfloat16)
             for kk, n, hh in zip(ks, (t, s, s), (h, hkv, hkv)))
  kvl = jnp.asarray([600], jnp.int32)
  out = mosaic_attention(q, k, v, kv_lengths=kvl, mosaic_block_sizes=tiles, interpret=True)
  ref = mha_reference(*(x.astype(jnp.float32) for x in (q, k, v)), kv_lengths=kvl)
  assert not races_found()
  assert _rel(out, ref) < 2e-2


def test_mosaic_refusals_are_clear():
  q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="mosaic.*bfloat16 or float16"):
    dot_product_attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32),
                          implementation="mosaic", interpret=True)
  with pytest.raises(ValueError, match="compute capability 9"):
    dot_product_attention(q, q, q, implementation="mosaic", interpret=False)
  with pytest.raises(ValueError, match="in_place=False.*head dim 256"):
    z = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
    mosaic_attention(z, z, z, mosaic_block_sizes=MosaicBlockSizes(in_place=False),
                     interpret=True)
  with pytest.raises(ValueError, match="block_kv=96"):
    MosaicBlockSizes(block_kv=96)
  with pytest.raises(ValueError, match="num_stages=1"):
    MosaicBlockSizes(num_stages=1)
  z = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="backward='mosaic' at head_dim=256.*'triton'"):
    mosaic_attention(z, z, z, backward="mosaic", interpret=True)
  with pytest.raises(ValueError, match="backward='cudnn'; allowed"):
    mosaic_attention(q, q, q, backward="cudnn", interpret=True)
  with pytest.raises(ValueError, match="MosaicBackwardBlockSizes.block_q=32"):
    MosaicBackwardBlockSizes(block_q=32)
  # Tiles that cannot compile (shared memory) or would spill (registers) are refused up front.
  y = jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="needs 269312 bytes of shared memory"):
    mosaic_attention(y, y, y, interpret=True,
                     mosaic_backward_block_sizes=MosaicBackwardBlockSizes(128, 64, 3))
  with pytest.raises(ValueError, match="384 float32 accumulator registers.*<= 192"):
    jax.grad(lambda q: mosaic_attention(
        q, y, y, interpret=True,
        mosaic_backward_block_sizes=MosaicBackwardBlockSizes(64, 128, 2)).sum())(y)


def test_mosaic_defaults_fit_hopper_shared_memory():
  from kernels.attention.mosaic import MAX_SHARED_MEMORY_BYTES
  for d in (64, 128, 256):
    for causal in (False, True):
      for t in (None, 77, 256, 512, 1024, 1100, 4096):
        bs = default_mosaic_block_sizes(d, causal, t, t)
        assert bs.shared_memory_bytes(d) <= MAX_SHARED_MEMORY_BYTES, (d, bs)
  assert default_mosaic_block_sizes(40) == default_mosaic_block_sizes(64)
  with pytest.raises(ValueError, match="head_dim=512"):
    default_mosaic_block_sizes(512)


def test_mosaic_tile_table_is_chosen_by_shape():
  """GPU run 5's choices: only head dim 64 depends on the lengths, and only where the tiles
  add no padding (T % 256 == 0 for 128-row warpgroups, S % 256 == 0 for 256-key tiles)."""
  long, short, wide = (MosaicBlockSizes(64, 128, 2), MosaicBlockSizes(128, 64, 2),
                       MosaicBlockSizes(64, 256, 2))
  pick = default_mosaic_block_sizes
  assert pick(64, True, 512, 512) == pick(40, False, 256, 256) == short
  assert pick(64, True, 384, 384) == pick(64, True, 4096, 4096) == long
  assert pick(64, False, 4096, 4096) == pick(64, False, 1024, 1024) == wide
  assert pick(64, False, 1100, 1100) == pick(64, False, 768, 768) == long
  for t in (None, 512, 4096):
    assert pick(128, False, t, t) == pick(128, True, t, t) == long
  assert pick(256, False, 4096, 4096) == MosaicBlockSizes(64, 64, 2)


@pytest.mark.parametrize("dtype,d,causal,hkv,in_place,kvl", [
    (jnp.bfloat16, 128, False, 8, True, False),  # benchmark family, FlashAttention-3 accumulate
    (jnp.bfloat16, 128, True, 2, False, False),  # fresh-accumulator variant, causal, GQA
    (jnp.float16, 40, True, 1, True, True),      # odd head dim (-> 64), MQA, kv_lengths
    (jnp.bfloat16, 256, False, 8, True, False),  # widest head, key padding
])
def test_mosaic_kernel_lowers_for_cuda(dtype, d, causal, hkv, in_place, kvl):
  """Cross-lowers the wgmma kernels for CUDA on this CPU machine: the forward, and the
  Mosaic dQ and dK/dV kernels up to head dim 128 (above: the Triton backward)."""
  b, t, s, h = 1, 200, 300, 8
  qa = jax.ShapeDtypeStruct((b, t, h, d), dtype)
  ka = jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
  kva = jax.ShapeDtypeStruct((b,), jnp.int32) if kvl else None
  mbs = dataclasses.replace(default_mosaic_block_sizes(d), in_place=in_place)

  def f(q, k, v, kv):
    attn = functools.partial(mosaic_attention, causal=causal, kv_lengths=kv,
                             mosaic_block_sizes=mbs)
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(out)

  text = jax.jit(f).trace(qa, ka, ka, kva).lower(lowering_platforms=("cuda",)).as_text()
  mosaic_calls = text.count("custom_call @mosaic_gpu")
  triton_names = [n for n in ("flash_attention_delta", "flash_attention_dkdv",
                              "flash_attention_dq") if f'name = "{n}"' in text]
  if d <= 128:
    assert mosaic_calls == 3 and not triton_names, (mosaic_calls, triton_names)
  else:
    assert mosaic_calls == 1 and len(triton_names) == 3, (mosaic_calls, triton_names)


def test_auto_picks_mosaic_only_where_measured(monkeypatch):
  """auto: mosaic on Hopper for bf16/fp16 up to head dim 128 (GPU runs 3-4), else pallas."""
  from kernels.attention import op
  from kernels.attention.backends import mosaic as mosaic_backend

  def spec(dtype=jnp.bfloat16, d=128, backend="gpu"):
    return op.AttentionSpec(batch=2, q_len=512, kv_len=512, num_heads=8, num_kv_heads=8,
                            head_dim=d, dtype=jnp.dtype(dtype), causal=True,
                            has_kv_lengths=False, interpret=False, backend=backend)

  monkeypatch.setattr(mosaic_backend, "_is_hopper", lambda: True)
  assert op._auto(spec()) == "mosaic"
  assert op._auto(spec(jnp.float16, 40)) == "mosaic"
  assert op._auto(spec(jnp.float32)) == "pallas"  # Mosaic kernels take half precision only
  assert op._auto(spec(d=256)) == "pallas"  # Mosaic forward at D = 256 is untimed
  assert op._auto(spec(backend="cpu")) == "xla"
  monkeypatch.setattr(mosaic_backend, "_is_hopper", lambda: False)  # e.g. an A100
  assert op._auto(spec()) == "pallas"
