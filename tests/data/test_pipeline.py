"""Deterministic, resumable, sharded batches (pure numpy: no TFDS, no compilation)."""
import itertools

import numpy as np
import pytest

from research.data import pipeline

N, H = 37, 4
IMAGES = np.random.default_rng(0).integers(0, 256, (N, H, H, 1), dtype=np.uint8)
LABELS = np.arange(N, dtype=np.int32)  # label = index: batches reveal the order


def _take(it, n):
  return list(itertools.islice(it, n))


def test_every_epoch_is_a_permutation():
  b = 8
  steps = 3 * N // b + 2
  stream = np.concatenate([pipeline.global_batch_indices(N, b, 5, s) for s in range(steps)])
  for e in range(3):
    np.testing.assert_array_equal(np.sort(stream[e * N:(e + 1) * N]), np.arange(N))
  assert not np.array_equal(stream[:N], stream[N:2 * N])  # reshuffled every epoch


def test_restart_continues_the_same_order():
  kw = dict(batch_size=8, seed=3, random_flip=True, process_index=0, process_count=1)
  full = _take(pipeline.train_batches(IMAGES, LABELS, start_step=0, **kw), 12)
  resumed = _take(pipeline.train_batches(IMAGES, LABELS, start_step=7, **kw), 5)
  for a, b in zip(full[7:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["x"], b["x"])
  other = _take(pipeline.train_batches(IMAGES, LABELS, start_step=0, **{**kw, "seed": 4}), 1)
  assert not np.array_equal(other[0]["label"], full[0]["label"])


def test_processes_split_the_global_batch():
  kw = dict(batch_size=8, seed=1, start_step=2)
  whole = next(pipeline.train_batches(IMAGES, LABELS, process_index=0, process_count=1, **kw))
  parts = [next(pipeline.train_batches(IMAGES, LABELS, process_index=p, process_count=2, **kw))
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])
  with pytest.raises(ValueError, match="batch_size=8"):
    next(pipeline.train_batches(IMAGES, LABELS, batch_size=8, seed=0, process_index=0,
                                process_count=3))
  seen = np.concatenate([b["label"] for p in range(3) for b in pipeline.eval_batches(
      IMAGES, LABELS, batch_size=5, process_index=p, process_count=3)])
  np.testing.assert_array_equal(seen, np.arange(N))  # every test example exactly once


def test_scaling_and_flips():
  x = pipeline.to_model_space(IMAGES)
  assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
  np.testing.assert_array_equal(pipeline.from_model_space(x), IMAGES)
  assert pipeline.to_model_space(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]
  batch = next(pipeline.train_batches(IMAGES, LABELS, batch_size=N, seed=2, random_flip=True,
                                      process_index=0, process_count=1))
  src = x[batch["label"]]
  flipped = np.array([np.array_equal(b, s[:, ::-1]) and not np.array_equal(b, s)
                      for b, s in zip(batch["x"], src)])
  same = np.array([np.array_equal(b, s) for b, s in zip(batch["x"], src)])
  assert np.all(flipped | same)
  mask = pipeline.flip_mask(2, 0, 4000)
  assert abs(mask.mean() - 0.5) < 4 * 0.5 / np.sqrt(4000)  # binomial, 4 standard errors


def test_per_device_batches():
  batch = next(pipeline.train_batches(IMAGES, LABELS, batch_size=8, seed=0, process_index=0,
                                      process_count=1, num_devices=4))
  assert batch["x"].shape == (4, 2, H, H, 1) and batch["label"].shape == (4, 2)
  with pytest.raises(ValueError, match="multiple of the device count"):
    pipeline.per_device({"x": np.zeros((6, 1))}, 4)


def test_grain_workers_give_the_same_batches_in_order():
  """num_workers > 0 (grain worker processes) changes where batches are made, not what."""
  kw = dict(batch_size=8, seed=3, random_flip=True, process_index=0, process_count=1,
            start_step=4)
  inline = _take(pipeline.train_batches(IMAGES, LABELS, **kw), 6)
  workers = _take(pipeline.train_batches(IMAGES, LABELS, num_workers=2, **kw), 6)
  for a, b in zip(inline, workers):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["x"], b["x"])
  with pytest.raises(ValueError, match="num_workers"):
    pipeline.train_batches(IMAGES, LABELS, num_workers=-1, **kw)
