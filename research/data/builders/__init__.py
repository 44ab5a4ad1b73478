"""Offline TFDS builders: prepared on first use into a data dir, read with `tfds.data_source`.

  digits   scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); configs
           digits/8 (native), digits/16, digits/32 (bicubic upsampling).
  shapes   procedural 32x32 RGB circles, squares and triangles (label = shape) with colour,
           size, position and a caption ("small red circle at top left"); configs
           shapes/default (50,000 train + 10,000 test), shapes/small, shapes/tiny.

Nothing is downloaded, and TensorFlow is not needed: images are stored as uint8 `Tensor`
features (TFDS' `Image` feature would need TensorFlow to PNG-encode) in ArrayRecord files,
which `tfds.data_source` reads with numpy decoding.

Importing this package registers both builders with TFDS (`tfds.builder("digits/16")`).
"""
from research.data.builders.digits import Digits  # noqa: F401  (registers "digits")
from research.data.builders.shapes import Shapes  # noqa: F401  (registers "shapes")

NAMES = ("digits", "shapes")
