"""TFDS builder `digits`: scikit-learn's 8x8 handwritten digits, optionally upsampled.

The train/test split is research.data.digits' (1,438 / 359 images, fixed seed 0), so every
part of the project that uses the digits sees the same split.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from research.data import digits as digits_lib
from research.data import images as images_lib

SIZES = (8, 16, 32)


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  size: int = 8  # side length in pixels (8 = native)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits as uint8 [size, size, 1] images with labels 0..9."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DigitsConfig(name=str(s), size=s, description=f"{s}x{s} pixels")
                     for s in SIZES]
  DEFAULT_CONFIG_NAME = "8"

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.size
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's 8x8 handwritten digits (UCI optical recognition), "
                    "pixel values 0..16 rescaled to 0..255.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        disable_shuffling=True,  # record i is example i: reading order is ours to choose
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships with scikit-learn
    return {split: self._generate_examples(split) for split in digits_lib.SPLITS}

  def _generate_examples(self, split: str):
    images, labels = digits_lib.load_digits(split)
    images = images_lib.resize_uint8(images, self.builder_config.size)
    for i, (img, lab) in enumerate(zip(images, labels)):
      yield i, {"image": img, "label": int(lab)}
