"""Tile sizes and launch parameters of the Pallas attention kernels.

The forward, the dK/dV and the dQ kernels each have their own tiles: the forward and the dQ
kernel hold a query tile and stream key tiles, the dK/dV kernel holds a key tile and streams
query tiles, so what is "resident" and what is "streamed" differs and so does the best shape.
"""
from __future__ import annotations

import dataclasses


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


# Defaults on an H100/H200-class GPU, keyed by (padded head dim <= key, causal). Starting
# points from the FlashAttention-2 Triton tutorial's Hopper configurations (forward 128x64
# tiles; backward 32x128 for dK/dV and 128x32 for dQ, i.e. the streamed tile is the small
# one); issue 5 tunes them on the card and records the measurements in NOTES.md.
_GPU_TABLE = {
    # head dim 16..64: small tiles in D leave room for deeper pipelines.
    64: BlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=3,
                   block_q_dkv=32, block_k_dkv=128, num_warps_dkv=4, num_stages_dkv=3,
                   block_q_dq=128, block_k_dq=32, num_warps_dq=4, num_stages_dq=3),
    128: BlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=3,
                    block_q_dkv=32, block_k_dkv=128, num_warps_dkv=8, num_stages_dkv=2,
                    block_q_dq=128, block_k_dq=32, num_warps_dq=8, num_stages_dq=2),
    # head dim 256: registers and shared memory run out with 128x64 tiles and 3 stages.
    256: BlockSizes(block_q=64, block_k=32, num_warps=8, num_stages=2,
                    block_q_dkv=16, block_k_dkv=64, num_warps_dkv=8, num_stages_dkv=1,
                    block_q_dq=64, block_k_dq=16, num_warps_dq=8, num_stages_dq=1),
}

# Interpret mode (CPU): every grid step and loop step is a host-side XLA while-loop
# iteration, so fewer, larger tiles are faster; launch parameters are ignored.
_CPU_DEFAULT = BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128,
                          block_q_dq=128, block_k_dq=128)


def default_block_sizes(backend: str, head_dim: int, causal: bool = False) -> BlockSizes:
  """Per-backend default tiles. `head_dim` is the padded head dimension the kernel sees."""
  del causal  # One table for both modes until the GPU tuning (issue 5) says otherwise.
  if backend == "cpu":
    return _CPU_DEFAULT
  for d in sorted(_GPU_TABLE):
    if head_dim <= d:
      return _GPU_TABLE[d]
  raise ValueError(f"head_dim={head_dim}; the Pallas kernel supports head dims up to 256.")
