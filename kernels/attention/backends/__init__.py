"""One adapter per backend of the attention op; importing this package registers all six.

Each module defines `unsupported_reason(spec) -> str | None` (None: it can run this call,
else a sentence saying why not) and `fn(q, k, v, *, causal, kv_lengths, scale, interpret)`,
and registers them as an `Implementation` under its own name in
`interface.IMPLEMENTATIONS`:

  pallas.py   our Pallas kernels through Pallas' Triton lowering (flash.pallas_attention)
  xla.py      the dense float32-logit reference (reference.mha_reference); runs everywhere
  cudnn.py    jax.nn.dot_product_attention(implementation="cudnn")
  mosaic.py   our Hopper kernels in Pallas' Mosaic GPU backend (flash.mosaic_attention)
  pallas_tpu.py  our kernels in Pallas' Mosaic TPU backend (tpu.tpu_attention)
  triton.py   our Triton-language kernels (triton_lang.py) through jax-triton; interpreter on CPU

The imports below are the registration order; op.py imports this package, so importing
kernels.attention (or any module of it that reaches the op) registers all six.
"""
from kernels.attention.backends import (pallas, xla, cudnn, mosaic, triton,  # noqa: F401
                                        pallas_tpu)
