"""Attention op with a Pallas flash-attention fast path (see op.py and NOTES.md).

  op.py          dot_product_attention: validation, dispatch ("auto"), the public entry
  interface.py   AttentionSpec, Implementation, the IMPLEMENTATIONS registry, input checks
  backends/      one adapter per implementation (pallas, xla, cudnn, mosaic, pallas_tpu, triton)
  flash.py       pallas_attention / mosaic_attention: padding, tile plan, custom_vjp
  forward.py, backward.py, _common.py, block_sizes.py   the Pallas (Triton) kernels
  mosaic.py, mosaic_backward.py                         the Mosaic GPU (Hopper) kernels
  tpu.py         tpu_attention: the Mosaic TPU kernels (forward, dQ, dK/dV), tiles, custom_vjp
  reference.py   the dense float32 reference (the xla implementation)
  testing.py     random inputs, float32 reference results, relative errors (tests, GPU check)
"""
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.mosaic import MosaicBlockSizes, default_mosaic_block_sizes
from kernels.attention.mosaic_backward import MosaicBackwardBlockSizes
from kernels.attention.op import (AttentionSpec, IMPLEMENTATIONS, Implementation,
                                  available_implementations, dot_product_attention,
                                  mosaic_attention, pallas_attention, register_implementation)
from kernels.attention.reference import attention_mask, mha_reference
from kernels.attention.tpu import TpuBlockSizes, default_tpu_block_sizes, tpu_attention

__all__ = [
    "AttentionSpec", "BlockSizes", "IMPLEMENTATIONS", "Implementation",
    "MosaicBackwardBlockSizes", "MosaicBlockSizes", "TpuBlockSizes",
    "attention_mask", "available_implementations", "default_block_sizes",
    "default_mosaic_block_sizes", "dot_product_attention", "mha_reference", "mosaic_attention",
    "default_tpu_block_sizes", "pallas_attention", "register_implementation", "tpu_attention",
]
