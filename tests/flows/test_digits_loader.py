"""research.data.digits: the offline 8x8 digits loader used by the flow configs and benchmark."""
import numpy as np
import pytest
from sklearn import datasets

from research.data import digits


def test_splits_are_disjoint_deterministic_and_complete():
  train_x, train_y = digits.load_digits("train", seed=0)
  test_x, test_y = digits.load_digits("test", seed=0)
  assert train_x.shape == (1438, 8, 8, 1) and test_x.shape == (359, 8, 8, 1)
  assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
  assert set(np.unique(train_y)) == set(range(10))
  # Together they are exactly scikit-learn's images, rescaled 0..16 -> 0..255.
  ref = datasets.load_digits()
  ref_x = np.round(ref.images * 255 / 16).astype(np.uint8)[..., None]
  both = np.concatenate([train_x, test_x]).reshape(len(ref_x), -1)
  assert sorted(map(bytes, both)) == sorted(map(bytes, ref_x.reshape(len(ref_x), -1)))
  assert train_x.max() == 255 and train_x.min() == 0
  again_x, _ = digits.load_digits("test", seed=0)
  np.testing.assert_array_equal(again_x, test_x)
  other_x, _ = digits.load_digits("test", seed=1)
  assert not np.array_equal(other_x, test_x)


def test_model_space_map():
  x = digits.to_model_space(np.array([0, 255, 128], np.uint8))
  np.testing.assert_allclose(x, [-1.0, 1.0, 128 / 127.5 - 1], rtol=0, atol=1e-7)


def test_bad_split_fails_clearly():
  with pytest.raises(ValueError, match="split='validation'"):
    digits.load_digits("validation")
