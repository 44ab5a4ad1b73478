"""Offline TFDS builders: prepared into a fresh data dir, read back with tfds.data_source."""
import sys

import numpy as np
import pytest

from research.data import digits as digits_lib
from research.data import pipeline
from research.data.builders import shapes as shapes_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_digits_prepare_and_read_offline_without_tensorflow(data_dir):
  for split, n in (("train", 1438), ("test", 359)):
    src = pipeline.open_source("digits", split, data_dir)
    assert src.info.image_shape == (8, 8, 1) and src.info.num_classes == 10
    images, labels = pipeline.load_arrays(src)
    ref_images, ref_labels = digits_lib.load_digits(split)
    assert images.shape == (n, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, ref_images)   # record i is example i
    np.testing.assert_array_equal(labels, ref_labels)
  assert "tensorflow" not in sys.modules


def test_digits_resized_config(data_dir):
  src = pipeline.open_source("digits", "test", data_dir, image_size=16)
  images, _ = pipeline.load_arrays(src)
  assert images.shape == (359, 16, 16, 1)
  np.testing.assert_array_equal(
      images, pipeline.resize_uint8(digits_lib.load_digits("test")[0], 16))
  # Upsampling keeps the mean brightness (bicubic is interpolating, up to rounding/ringing).
  assert abs(images.mean() - digits_lib.load_digits("test")[0].mean()) < 2.0
  with pytest.raises(ValueError, match="image_size=12"):
    pipeline.open_source("digits", "test", data_dir, image_size=12)


def test_shapes_prepare_and_read(data_dir):
  src = pipeline.open_source("shapes/tiny", "train", data_dir)
  assert len(src) == 512 and src.info.image_shape == (32, 32, 3) and src.info.num_classes == 3
  ref = shapes_lib.generate(512, 0, "train")
  idx = [0, 7, 300, 511]
  recs = src.data.__getitems__(idx)
  for i, rec in zip(idx, recs):
    np.testing.assert_array_equal(rec["image"], ref["image"][i])
    assert rec["label"] == ref["label"][i]
    assert rec["caption"].decode() == ref["caption"][i]
    assert rec["colour"] == ref["colour"][i] and rec["position"] == ref["position"][i]
  images, labels = pipeline.load_arrays(pipeline.open_source("shapes/tiny", "test", data_dir))
  assert images.shape == (128, 32, 32, 3) and set(np.unique(labels)) == {0, 1, 2}


def test_shapes_default_size_and_determinism():
  from research.data.builders.shapes import Shapes
  default = [c for c in Shapes.BUILDER_CONFIGS if c.name == "default"][0]
  assert default.num_train >= 50_000
  a, b = shapes_lib.generate(64, 3, "train"), shapes_lib.generate(64, 3, "train")
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], shapes_lib.generate(64, 3, "test")["image"])
  assert not np.array_equal(a["image"], shapes_lib.generate(64, 4, "train")["image"])


def test_shapes_geometry_and_captions():
  """Rendered area matches each shape's analytic area; colour and caption match the labels."""
  rng = np.random.default_rng(0)
  attrs = shapes_lib.sample_attributes(600, rng)
  attrs["position"][:] = 4                      # centre cell: no shape touches the border
  attrs["cx"][:] = 16.0 + rng.uniform(-1, 1, 600).astype(np.float32)
  attrs["cy"][:] = 16.0 + rng.uniform(-1, 1, 600).astype(np.float32)
  images = shapes_lib.render(attrs)
  rgb = shapes_lib.RGB[attrs["colour"]]
  area = images.astype(np.float64).sum((1, 2, 3)) / rgb.sum(-1)  # pixel coverage, summed
  r = attrs["radius"].astype(np.float64)
  expected = np.where(attrs["shape"] == 0, np.pi * r**2,
                      np.where(attrs["shape"] == 1, (2 * 0.886 * r)**2,
                               3 * np.sqrt(3) / 4 * (1.3 * r)**2))
  # Anti-aliasing by clipped signed distance is exact on straight edges and within a few %
  # at corners and for small circles; 8-bit rounding adds < 0.5 / 40 per pixel.
  np.testing.assert_allclose(area, expected, rtol=0.05)
  # The brightest pixel is (up to rounding) the labelled colour.
  peak = images.reshape(600, -1, 3)[np.arange(600), images.reshape(600, -1, 3).sum(-1).argmax(1)]
  np.testing.assert_allclose(peak, rgb, atol=1.0)
  caps = shapes_lib.captions(attrs)
  for i in range(5):
    words = caps[i].split()
    assert words[0] == shapes_lib.SIZES[attrs["size"][i]]
    assert words[1] == shapes_lib.COLOURS[attrs["colour"][i]]
    assert words[2] == shapes_lib.SHAPES[attrs["shape"][i]]
    assert caps[i].endswith("at centre")


def test_absent_standard_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(pipeline.DataNotFoundError, match="tfds build mnist") as e:
    pipeline.open_source("mnist", "train", str(tmp_path))
  assert "never downloads" in str(e.value)
  with pytest.raises(pipeline.DataNotFoundError, match="Unknown dataset"):
    pipeline.open_source("no_such_dataset_xyz", "train", str(tmp_path))


def test_bad_split(data_dir):
  with pytest.raises(ValueError, match="split='validation'"):
    pipeline.open_source("digits", "validation", data_dir)
