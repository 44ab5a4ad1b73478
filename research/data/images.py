"""8-bit image conversions, the one home for them: resizing and the model-space map.

  resize_uint8(images, size)   bicubic (upsampling) / area-averaging (downsampling), uint8
  to_model_space(images)       uint8 0..255 -> float32 x = k / 127.5 - 1 in [-1, 1]
  from_model_space(x)          float in [-1, 1] -> uint8 0..255 (rounded, clipped)

Below both the TFDS builders (research/data/builders) and the pipeline that reads them
(research/data/pipeline.py); research.diffusion.bpd documents the map for bits/dim.
"""
from __future__ import annotations

import numpy as np


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
  """Bicubic (upsampling) / area-averaging (downsampling) resize of uint8 [N, H, W, C]."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  from PIL import Image
  method = Image.Resampling.BICUBIC if size > images.shape[1] else Image.Resampling.BOX
  c = images.shape[-1]
  out = np.empty((len(images), size, size, c), np.uint8)
  for i, img in enumerate(images):
    im = Image.fromarray(img[..., 0] if c == 1 else img).resize((size, size), method)
    out[i] = np.asarray(im).reshape(size, size, c)
  return out


def to_model_space(images: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 in [-1, 1] (x = k / 127.5 - 1)."""
  return images.astype(np.float32) / 127.5 - 1.0


def from_model_space(x: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 0..255 (rounded, clipped)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
