"""The Mosaic TPU kernels (kernels/attention/tpu.py) without a TPU.

* Pallas' TPU interpreter runs the forward, dQ and dK/dV kernels on the CPU (simulated
  VMEM / SMEM / HBM and DMAs, uninitialised memory NaN, out-of-bounds reads raising, in one
  case its race detector) against the float32 reference on fresh random inputs, and against
  JAX's bundled TPU flash attention where that kernel takes the inputs.
* The index maps are walked over the grid: a tile a row does not need is never loaded.
* `jax.export(..., platforms=["tpu"])` of the forward and the gradient runs Pallas' Mosaic
  TPU lowering (block-shape and op checks) on this CPU machine; Mosaic's own compiler passes
  and the speed need a TPU (experiments/benchmarks/attention_tpu.py).
Tiles of 24 / 32 rows make the odd shapes span two to three tiles per axis, so unmasked,
masked and skipped tiles and padding all occur; compiles use XLA's lowest optimisation level
(the interpreted kernels are compile-bound on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as bundled

from kernels.attention import (TpuBlockSizes, attention_mask, default_tpu_block_sizes,
                               dot_product_attention, tpu_attention)
from kernels.attention import op, tpu
from kernels.attention.testing import (as_kv_lengths, fwd_bwd, random_inputs,
                                       reference_fwd_bwd, rel_errors)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SMALL_TILES = TpuBlockSizes(block_q=24, block_k=32, block_q_dkv=24, block_k_dkv=32,
                            block_q_dq=24, block_k_dq=32)

# name: (B, T, S, H, Hkv, D, causal, kv_lengths)
CASES = {
    # GQA 4:1, causal with T < S (offset 32), D = 40 (-> 128 lanes), kv_lengths (0, 50):
    # example 0 attends to nothing, example 1's keys 50..71 are padding.
    "gqa_causal_t_lt_s_kvlen": (2, 40, 72, 8, 2, 40, True, (0, 50)),
    # MQA, causal with T > S: rows 0..31 see nothing; D = 72; kv_lengths (30, 0): an empty
    # example again, in bf16; through the op with its default tiles (one 128-row tile).
    "mqa_causal_t_gt_s": (2, 72, 40, 2, 1, 72, True, (30, 0)),
    # MHA, no causal mask, the widest head (D = 256), kv_lengths 50 of 72; race detector on.
    "mha_d256_kvlen": (1, 40, 72, 2, 2, 256, False, (50,)),
    # GQA 2:1, causal with T == S = 128 (the usual lower triangle), D = 64; 64-row tiles:
    # per query tile one unmasked, one diagonal and (the first) one skipped key tile.
    "gqa_causal_square": (1, 128, 128, 4, 2, 64, True, None),
}
TILES = {"gqa_causal_square": TpuBlockSizes(*[64] * 6)}


def _inputs(name, dtype, seed=0):
  b, t, s, h, hkv, d, causal, kvl = CASES[name]
  return random_inputs(seed, b, t, s, h, hkv, d, dtype), causal, as_kv_lengths(kvl)


@functools.lru_cache(maxsize=None)  # several tests inspect the same (compile-bound) run
def _run(name, dtype):
  (q, k, v, do), causal, kvl = _inputs(name, dtype)
  if name == "mqa_causal_t_gt_s":
    ours = functools.partial(dot_product_attention, causal=causal, kv_lengths=kvl,
                             implementation="pallas_tpu", interpret=True)
  else:
    interpret = tpu.interpret_params(detect_races=name == "mha_d256_kvlen")
    ours = functools.partial(tpu_attention, causal=causal, kv_lengths=kvl,
                             block_sizes=TILES.get(name, SMALL_TILES), interpret=interpret)
  got = jax.jit(lambda *a: fwd_bwd(ours, *a), compiler_options=FAST_COMPILE)(q, k, v, do)
  got = jax.block_until_ready(got)
  races = tpu.races_found()
  want = reference_fwd_bwd(q, k, v, do, causal=causal, kv_lengths=kvl,
                           compiler_options=FAST_COMPILE)
  return got, want, races


@pytest.mark.parametrize("name,dtype", [
    ("gqa_causal_t_lt_s_kvlen", jnp.float32), ("mqa_causal_t_gt_s", jnp.bfloat16),
    ("mha_d256_kvlen", jnp.float32), ("gqa_causal_square", jnp.float32)])
def test_forward_and_gradients_match_float32_reference(name, dtype):
  got, want, races = _run(name, dtype)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # what the GPU kernels meet
  errs = rel_errors(got, want)
  for x in got:
    assert x.dtype == dtype
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  assert all(e < tol for e in errs.values()), errs
  assert not races


def test_rows_without_keys_are_zero_with_zero_gradients():
  (out, dq, dk, dv), _, _ = _run("gqa_causal_t_lt_s_kvlen", jnp.float32)
  out, dq, dk, dv = (np.asarray(x) for x in (out, dq, dk, dv))
  assert np.all(out[0] == 0) and np.all(dq[0] == 0)  # kv_lengths[0] = 0
  assert np.all(dk[0] == 0) and np.all(dv[0] == 0)
  assert np.all(dk[1, 50:] == 0) and np.all(dv[1, 50:] == 0)  # keys past kv_lengths[1]
  assert np.abs(out[1]).min(axis=-1).max() > 0
  (out, dq, dk, dv), _, _ = _run("mqa_causal_t_gt_s", jnp.bfloat16)
  out, dq, dk, dv = (np.asarray(x, np.float32) for x in (out, dq, dk, dv))
  assert np.all(out[:, :32] == 0) and np.all(dq[:, :32] == 0)  # T - S = 32 rows see nothing
  assert np.all(np.abs(out[0, 32:]).max(axis=-1) > 0)
  assert np.all(out[1] == 0) and np.all(dq[1] == 0) and np.all(dk[1] == 0)  # kv_lengths 0
  assert np.all(dk[0, 30:] == 0) and np.all(dv[0, 30:] == 0)


@pytest.mark.parametrize("name", ["mha_d256_kvlen", "gqa_causal_square"])
def test_matches_jax_bundled_tpu_flash_attention(name):
  """JAX's pallas.ops.tpu.flash_attention on the same inputs, in the same interpreter, where
  it takes them: no causal mask, or causal with T == S (its mask is top-left aligned).

  It takes [B, H, T, D], equal head counts and key blocks of 128: k and v are repeated to
  the query heads (their gradients summed back by the repeat's vjp), padded to 128 keys,
  and the padding and kv_lengths become its kv segment ids (0 = masked).
  """
  (q, k, v, do), causal, kvl = _inputs(name, jnp.float32)
  b, t, h, d = q.shape
  s, sp = k.shape[1], 128
  if kvl is None:
    kvl = jnp.full((b,), s, jnp.int32)

  def theirs(q, k, v):
    bhtd = lambda x: jnp.transpose(x, (0, 2, 1, 3))
    kp, vp = (jnp.pad(jnp.repeat(x, h // x.shape[2], axis=2), [(0, 0), (0, sp - s), (0, 0),
                                                                 (0, 0)]) for x in (k, v))
    seg = bundled.SegmentIds(q=jnp.ones((b, t), jnp.int32),
                             kv=(jnp.arange(sp)[None] < kvl[:, None]).astype(jnp.int32))
    tiles = bundled.BlockSizes(block_q=t, block_k_major=sp, block_k=sp, block_b=1,
                               block_q_major_dkv=t, block_k_major_dkv=sp, block_k_dkv=sp,
                               block_q_dkv=t, block_k_major_dq=sp, block_k_dq=sp, block_q_dq=t)
    out = bundled.flash_attention(bhtd(q), bhtd(kp), bhtd(vp), segment_ids=seg, causal=causal,
                                  sm_scale=d ** -0.5, block_sizes=tiles)
    return bhtd(out)

  with pltpu.force_tpu_interpret_mode(tpu.interpret_params()):
    ref = jax.jit(lambda *a: fwd_bwd(theirs, *a), compiler_options=FAST_COMPILE)(q, k, v, do)
  got, want, _ = _run(name, jnp.float32)
  assert all(e < 1e-5 for e in rel_errors(ref, want).values())  # theirs is right too
  errs = rel_errors(got, ref)
  assert all(e < 1e-5 for e in errs.values()), errs


def _needed(causal, t, s, kv_len, bq, bk, tp, sp):
  """needed[i, j]: query tile i and key tile j share an allowed (query, key) pair
  (from reference.attention_mask over the padded sizes: padded keys are past kv_len)."""
  mask = np.zeros((tp, sp), bool)
  m = np.asarray(attention_mask(t, s, causal=causal, kv_lengths=jnp.asarray([kv_len])))[0, 0]
  mask[:t, :s] = m
  # Padded query rows (t..tp) follow the same causal rule; they see keys < kv_len.
  rows = np.arange(tp)[:, None]
  cols = np.arange(sp)[None, :]
  pad_rows = (cols < kv_len) & ((cols <= rows + s - t) if causal else True)
  mask[t:] = np.broadcast_to(pad_rows, (tp, sp))[t:]
  return mask.reshape(tp // bq, bq, sp // bk, bk).any(axis=(1, 3))


@pytest.mark.parametrize("causal,t,s,kv_len", [(True, 40, 72, 50), (True, 100, 60, 45),
                                               (False, 40, 72, 0)])
def test_index_maps_load_only_needed_tiles(causal, t, s, kv_len):
  """Walks each kernel's grid in order: Pallas' pipeline copies a block only when its index
  differs from the previous step's, so the blocks whose index changes are the loads."""
  bq, bk = 24, 32
  tp, sp = -(-t // 24) * 24, -(-s // 32) * 32
  nq, nk = tp // bq, sp // bk
  needed = _needed(causal, t, s, kv_len, bq, bk, tp, sp)
  kv = jnp.asarray(kv_len, jnp.int32)
  kw = dict(block_q=bq, block_k=bk, causal=causal, causal_offset=s - t)
  # forward / dQ: two heads of one example (kv heads 0, 0: GQA), each query tile i, key
  # tiles j = 0..nk-1.
  steps = [(h, i, j) for h in range(2) for i in range(nq) for j in range(nk)]
  _, i_s, j_s = (jnp.asarray(a, jnp.int32) for a in zip(*steps))  # the map, vectorised
  idx = np.asarray(tpu.kv_block_index(i_s, j_s, kv, num_k_blocks=nk, num_q_blocks=nq,
                                      **kw)).tolist()
  for n, (_, i, j) in enumerate(steps):
    loads = n == 0 or idx[n] != idx[n - 1]
    if needed[i, j]:
      assert idx[n] == j
    elif n > 0:
      assert not loads, (i, j, idx[n - 1], idx[n])
  # dK/dV: for each key tile j, heads g (2 here) and query tiles i.
  groups = 2
  steps = [(j, g, i) for j in range(nk) for g in range(groups) for i in range(nq)]
  j_s, g_s, i_s = (np.asarray(a, np.int32) for a in zip(*steps))
  qi, skipped = (np.asarray(x) for x in tpu.q_block_index(jnp.asarray(j_s), jnp.asarray(i_s),
                                                          kv, num_q_blocks=nq, **kw))
  blocks = list(zip(qi.tolist(), np.where(skipped, groups - 1, g_s).tolist()))
  for n, (j, g, i) in enumerate(steps):
    loads = n == 0 or blocks[n] != blocks[n - 1]
    if needed[i, j]:
      assert blocks[n] == (i, g)
    elif loads and n > 0:  # an early load is only ever of a tile needed next
      nxt = [(i2, g2) for (j2, g2, i2) in steps[n:] if j2 == j and needed[i2, j2]]
      assert nxt and blocks[n] == nxt[0], (j, g, i, blocks[n])


@pytest.mark.parametrize("dtype,d,causal,kvl,hkv", [
    (jnp.bfloat16, 40, True, True, 2),    # the odd grid: GQA 4:1, padded D
    (jnp.float32, 256, False, False, 1),  # widest head, MQA, float32
])
def test_forward_and_gradient_lower_for_tpu(dtype, d, causal, kvl, hkv):
  """jax.export for the TPU platform: Pallas' Mosaic TPU lowering, on this CPU machine."""
  b, t, s, h = 2, 300, 700, 8
  qa = jax.ShapeDtypeStruct((b, t, h, d), dtype)
  ka = jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
  kva = jax.ShapeDtypeStruct((b,), jnp.int32) if kvl else None
  tiles = default_tpu_block_sizes("TPU v5 lite")

  def forward(q, k, v, kv):
    return tpu_attention(q, k, v, causal=causal, kv_lengths=kv, block_sizes=tiles)

  def gradient(q, k, v, kv):
    return jax.grad(lambda *a: forward(*a, kv).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

  for fn, kernels in ((forward, 1), (gradient, 3)):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(qa, ka, ka, kva)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    assert text.count("tpu_custom_call") >= kernels, fn.__name__


def test_lowering_refuses_tiles_off_the_tpu_layout():
  """The export check is a real one: 16-row query tiles make 16-lane LSE blocks, which
  Pallas' TPU lowering refuses (lanes must be a multiple of 128)."""
  qa = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  f = functools.partial(tpu_attention, block_sizes=TpuBlockSizes(16, 16, 16, 16, 16, 16))
  with pytest.raises(ValueError, match="block shape"):
    jax.export.export(jax.jit(f), platforms=["tpu"])(qa, qa, qa)


def test_auto_picks_pallas_tpu_on_tpu_above_the_minimum_length():
  def spec(t=2048, s=2048, dtype=jnp.bfloat16, d=128, backend="tpu"):
    return op.AttentionSpec(batch=1, q_len=t, kv_len=s, num_heads=8, num_kv_heads=8,
                            head_dim=d, dtype=jnp.dtype(dtype), causal=True,
                            has_kv_lengths=False, interpret=False, backend=backend)

  n = op.TPU_MIN_SEQ_LEN
  assert op._auto(spec(n, n)) == "pallas_tpu"
  assert op._auto(spec(dtype=jnp.float32, d=256)) == "pallas_tpu"
  assert op._auto(spec(n - 1, 4 * n)) == "xla"  # short queries (decoding): dense is small
  assert op._auto(spec(dtype=jnp.float16)) == "xla"  # the TPU kernel takes f32 / bf16
  assert op._auto(spec(d=320)) == "xla"
  assert op._auto(spec(backend="cpu")) == "xla"


def test_errors_are_clear():
  q, k, v, _ = random_inputs(0, 1, 8, 8, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="needs a TPU.*interpret=True"):
    dot_product_attention(q, k, v, implementation="pallas_tpu", interpret=False)
  with pytest.raises(ValueError, match="float32 or bfloat16, not float16"):
    dot_product_attention(q.astype(jnp.float16), k.astype(jnp.float16),
                          v.astype(jnp.float16), implementation="pallas_tpu")
  with pytest.raises(ValueError, match="block_k=12.*multiple of 8"):
    TpuBlockSizes(block_k=12)
  assert default_tpu_block_sizes("TPU v6 lite").block_q == 1024
  assert default_tpu_block_sizes("TPU v5 lite") == TpuBlockSizes(*[512] * 6)
  assert default_tpu_block_sizes("cpu") == TpuBlockSizes()
  assert TpuBlockSizes().fit(40, 700) == TpuBlockSizes(128, 512, 128, 512, 128, 512)
