"""Attention op with a Pallas flash-attention fast path (see op.py and NOTES.md)."""
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.mosaic import MosaicBlockSizes, default_mosaic_block_sizes
from kernels.attention.mosaic_backward import MosaicBackwardBlockSizes
from kernels.attention.op import (AttentionSpec, IMPLEMENTATIONS, Implementation,
                                  available_implementations, dot_product_attention,
                                  mosaic_attention, pallas_attention, register_implementation)
from kernels.attention.reference import attention_mask, mha_reference

__all__ = [
    "AttentionSpec", "BlockSizes", "IMPLEMENTATIONS", "Implementation",
    "MosaicBackwardBlockSizes", "MosaicBlockSizes",
    "attention_mask", "available_implementations", "default_block_sizes",
    "default_mosaic_block_sizes", "dot_product_attention", "mha_reference", "mosaic_attention",
    "pallas_attention", "register_implementation",
]
