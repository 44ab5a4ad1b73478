"""A small offline loader for scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

The images ship with scikit-learn, so nothing is downloaded. Pixel values 0..16 are rescaled to
0..255 (round(v * 255 / 16)) so the data looks like ordinary 8-bit images; a model sees them as
x = k / 127.5 - 1 in [-1, 1] (research.diffusion.bpd documents the map and the bits/dim).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from research.data.images import to_model_space  # noqa: F401  (re-exported)

TEST_FRACTION = 0.2  # 359 test images, 1438 train images
SPLITS = ("train", "test")


def load_digits(split: str = "train", seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """The train or test split of the digits, deterministic given `seed`.

  Args:
    split: "train" or "test"; the two are disjoint and together cover all 1797 images.
    seed: seed of the random permutation that assigns images to splits.

  Returns:
    images: uint8 [N, 8, 8, 1] in 0..255.
    labels: int32 [N] in 0..9.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not allowed; allowed: {SPLITS}.")
  from sklearn import datasets  # imported here: only this loader needs scikit-learn

  d = datasets.load_digits()
  images = np.round(d.images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(labels))
  num_test = int(round(TEST_FRACTION * len(labels)))
  idx = perm[:num_test] if split == "test" else perm[num_test:]
  idx = np.sort(idx)  # keep the original order inside a split
  return images[idx], labels[idx]
