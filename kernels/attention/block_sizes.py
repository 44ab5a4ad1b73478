"""Tile sizes and launch parameters of the Pallas attention kernels.

The forward, the dK/dV and the dQ kernels each have their own tiles: the forward and the dQ
kernel hold a query tile and stream key tiles, the dK/dV kernel holds a key tile and streams
query tiles, so what is "resident" and what is "streamed" differs and so does the best shape.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def _is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (rows of queries / keys per program or per loop step) and Triton launch parameters.

  All block sizes must be powers of two >= 16 (Triton's dot needs that); they are shrunk to
  the (padded) sequence length for short sequences, see `fit`.

  Attributes:
    block_q, block_k: forward kernel: resident query tile, streamed key tile.
    num_warps, num_stages: forward kernel launch (stages = software-pipelining depth).
    block_q_dkv, block_k_dkv: dK/dV kernel: streamed query tile, resident key tile.
    num_warps_dkv, num_stages_dkv: dK/dV kernel launch.
    block_q_dq, block_k_dq: dQ kernel: resident query tile, streamed key tile.
    num_warps_dq, num_stages_dq: dQ kernel launch.
  """
  block_q: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3
  block_q_dkv: int = 32
  block_k_dkv: int = 128
  num_warps_dkv: int = 4
  num_stages_dkv: int = 3
  block_q_dq: int = 128
  block_k_dq: int = 32
  num_warps_dq: int = 4
  num_stages_dq: int = 3

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name.startswith("block_") and (not _is_pow2(v) or v < 16):
        raise ValueError(f"BlockSizes.{f.name}={v}; allowed: a power of two >= 16.")
      if f.name.startswith("num_") and v < 1:
        raise ValueError(f"BlockSizes.{f.name}={v}; allowed: a positive integer.")

  def fit(self, q_len: int, kv_len: int) -> "BlockSizes":
    """Shrinks tiles that exceed the sequence (rounded up to a power of two, at least 16).

    A 77-query problem then uses one 128-row tile instead of padding to the default tile
    of a long sequence; padding and masking handle the remainder.
    """
    qcap = max(16, 1 << max(q_len - 1, 0).bit_length())
    kcap = max(16, 1 << max(kv_len - 1, 0).bit_length())
    return dataclasses.replace(
        self,
        block_q=min(self.block_q, qcap), block_k=min(self.block_k, kcap),
        block_q_dkv=min(self.block_q_dkv, qcap), block_k_dkv=min(self.block_k_dkv, kcap),
        block_q_dq=min(self.block_q_dq, qcap), block_k_dq=min(self.block_k_dq, kcap))

  @property
  def q_multiple(self) -> int:
    """Queries are padded to a multiple of every query tile (all powers of two: the max)."""
    return max(self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def kv_multiple(self) -> int:
    return max(self.block_k, self.block_k_dkv, self.block_k_dq)


# Defaults on an H100/H200-class GPU, keyed by (padded head dim <= key, causal).
# D = 64 and D = 128 come from the tuning sweep of the first H200 run (jax 0.11.2, bf16,
# T = 4096; NOTES.md "Measured on GPU", run 1): the backward's 64 x 64 tiles with 4 warps and
# 3 stages beat the tutorial's 32 x 128 / 128 x 32 by 1.2-1.5x at both head dims (the 128-row
# resident tile with two float32 accumulators spilled registers at D = 128). Forward: 64 x 128
# with 4 warps at D = 64; 128 x 128 with 8 warps at D = 128 causal (286 vs 233 TFLOP/s);
# D = 128 non-causal keeps 128 x 64 with 8 warps: the tuner's 64 x 64 / 4 warps won by 2%
# (within the run's noise) at T = 4096 but lost 15% at T = 2048.
_BWD_64X64 = dict(block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=3,
                  block_q_dq=64, block_k_dq=64, num_warps_dq=4, num_stages_dq=3)
_GPU_TABLE = {
    (64, False): BlockSizes(block_q=64, block_k=128, num_warps=4, num_stages=3, **_BWD_64X64),
    (64, True): BlockSizes(block_q=64, block_k=128, num_warps=4, num_stages=3, **_BWD_64X64),
    (128, False): BlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=3, **_BWD_64X64),
    (128, True): BlockSizes(block_q=128, block_k=128, num_warps=8, num_stages=3, **_BWD_64X64),
    # head dim 256 (not tuned yet): registers and shared memory run out with 128 x 64 tiles
    # and 3 stages, so every tile is halved.
    **{(256, causal): BlockSizes(block_q=64, block_k=32, num_warps=8, num_stages=2,
                                 block_q_dkv=16, block_k_dkv=64, num_warps_dkv=8,
                                 num_stages_dkv=1, block_q_dq=64, block_k_dq=16,
                                 num_warps_dq=8, num_stages_dq=1)
       for causal in (False, True)},
}

# Interpret mode (CPU): every grid step and loop step is a host-side XLA while-loop
# iteration, so fewer, larger tiles are faster; launch parameters are ignored.
_CPU_DEFAULT = BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128,
                          block_q_dq=128, block_k_dq=128)


def _for_float32(bs: BlockSizes, head_dim: int) -> BlockSizes:
  """Shrinks bf16-tuned tiles for 4-byte inputs.

  float32 tiles take twice the shared memory per pipeline stage (128 x 128 key and value
  tiles at D = 128 with 3 stages would need 384 KiB; an H100/H200 has 227 KiB), and the
  full-precision ("ieee") dot runs on FMA units, not tensor cores, with its operands in
  registers. So every tile is capped at 64 rows (D <= 64) or 32 rows (D >= 128) and the
  pipeline at 2 stages: at most 2 stages x 2 tiles x 32 x 256 x 4 B = 128 KiB at D = 256.
  """
  cap = 64 if head_dim <= 64 else 32
  changes = {}
  for f in dataclasses.fields(bs):
    v = getattr(bs, f.name)
    if f.name.startswith("block_"):
      changes[f.name] = min(v, cap)
    elif f.name.startswith("num_stages"):
      changes[f.name] = min(v, 2)
  return dataclasses.replace(bs, **changes)


def default_block_sizes(backend: str, head_dim: int, causal: bool = False,
                        dtype=None) -> BlockSizes:
  """Per-backend default tiles, chosen by (padded head dim, causal) on a GPU.

  Args:
    backend: "cpu" (interpret mode: one table for everything) or "gpu".
    head_dim: the padded head dimension the kernel sees (a power of two >= 16).
    causal: causal masking (the GPU table is tuned per mode).
    dtype: input dtype; 4-byte inputs (float32) get smaller tiles on a GPU (the table is
      tuned for bf16/fp16). None means a 2-byte dtype.

  Returns:
    The BlockSizes before `fit` (shrinking to short sequences).
  """
  if backend == "cpu":
    return _CPU_DEFAULT
  for d in sorted({d for d, _ in _GPU_TABLE}):
    if head_dim <= d:
      bs = _GPU_TABLE[(d, bool(causal))]
      if dtype is not None and np.dtype(dtype).itemsize >= 4:
        bs = _for_float32(bs, head_dim)
      return bs
  raise ValueError(f"head_dim={head_dim}; the Pallas kernel supports head dims up to 256.")
