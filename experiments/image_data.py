"""Image data for the trainer: DataSpec, train/eval batches and sample-quality metrics.

The config side of research.data.pipeline (TFDS sources -> numpy batches) and
research.metrics.fd (Frechet distance in a dataset classifier's features). Splits are read
into memory once per process and cached here (the datasets this targets fit in RAM).
"""
from __future__ import annotations

import os
import time
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
from absl import logging

from experiments import builders
from experiments.validate import ConfigError
from research.data import pipeline

_ARRAYS: Dict[Tuple, Tuple[np.ndarray, Optional[np.ndarray], pipeline.SourceInfo]] = {}
_FEATURES: Dict[Tuple, Dict] = {}


def data_dir(config) -> str:
  return os.path.expanduser(config.data.data_dir) if config.data.data_dir else (
      pipeline.default_data_dir())


def dataset_key(config) -> str:
  """Short dataset name for metric names: 'digits', 'shapes', 'cifar10', 'celeb_a'."""
  return config.data.name.split("/")[0].split(":")[0]


def fd_metric(config) -> str:
  """The name of the sample-quality metric of image data: 'fd_<dataset>'."""
  return f"fd_{dataset_key(config)}"


def load_split(config, split: str) -> Tuple[np.ndarray, Optional[np.ndarray],
                                             pipeline.SourceInfo]:
  """(uint8 images [N, H, W, C], int32 labels [N] | None, SourceInfo), cached per process."""
  size = config.data.image_size
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise ConfigError(f"config.data.image_size={size!r} is not allowed: an integer >= 0 "
                      "(0 = native size).")
  key = (config.data.name, split, data_dir(config), size)
  if key not in _ARRAYS:
    t0 = time.perf_counter()
    try:
      source = pipeline.open_source(config.data.name, split, data_dir(config), image_size=size)
    except ValueError as e:
      raise ConfigError(f"config.data (name={config.data.name!r}, image_size={size}): {e}") from e
    images, labels = pipeline.load_arrays(source)
    _ARRAYS[key] = (images, labels, source.info)
    logging.info("Loaded %s/%s: %s images %s in %.1fs from %s", config.data.name, split,
                 len(images), images.shape[1:], time.perf_counter() - t0, data_dir(config))
  return _ARRAYS[key]


def data_spec(config) -> builders.DataSpec:
  _, _, info = load_split(config, "train")
  if config.data.conditional and info.num_classes == 0:
    raise ConfigError(f"config.data.conditional=True is not allowed: dataset "
                      f"{config.data.name!r} has no class labels.")
  h, w, c = info.image_shape
  if config.model.name == "unet":
    f = 2 ** (len(config.model.ch_mult) - 1)
    if h % f or w % f:
      raise ConfigError(f"config.model.ch_mult={tuple(config.model.ch_mult)} is not allowed for "
                        f"{h}x{w} images: the size must be divisible by 2**(len(ch_mult)-1)={f}.")
  return builders.DataSpec(dims=(h, w, c), num_classes=info.num_classes, kind="image")


def train_batches(config, spec: builders.DataSpec, start_step: int) -> Iterator[dict]:
  """Batches for steps start_step, ...; batch i depends only on (seed, i) (see pipeline)."""
  del spec
  images, labels, _ = load_split(config, "train")
  return pipeline.train_batches(
      images, labels, batch_size=config.data.batch_size,
      seed=config.seed,
      start_step=start_step, random_flip=config.data.random_flip)


def eval_batches(config, spec: builders.DataSpec, batch_size: Optional[int] = None,
                 split: str = "test") -> Iterator[dict]:
  """One pass over `split` (default test) in record order, this process's share."""
  del spec
  images, labels, _ = load_split(config, split)
  return pipeline.eval_batches(images, labels, batch_size=batch_size or config.data.batch_size)


# --- metrics ------------------------------------------------------------------------------------


def _feature_settings(h: int):
  from research.metrics.fd import FeatureNetSettings
  levels = max(1, int(np.log2(max(h, 8) // 4)))  # downsample to 4-8 px before pooling
  return FeatureNetSettings(ch_mult=(1,) + (2,) * levels)


def feature_net(config):
  """The dataset's (cached) feature classifier, and the train/test reference features."""
  from research.metrics import fd as fd_lib
  tr_x, tr_y, info = load_split(config, "train")
  key = (config.data.name, data_dir(config), config.data.image_size)
  if key not in _FEATURES:
    te_x, te_y, _ = load_split(config, "test")
    net = fd_lib.load_or_train_feature_net(
        os.path.join(data_dir(config), "genjax_metrics"), dataset_key(config),
        pipeline.to_model_space(tr_x), tr_y, info.num_classes,
        test_x=pipeline.to_model_space(te_x), test_labels=te_y,
        settings=_feature_settings(info.image_shape[0]), log=logging.info)
    f_tr = net.features(pipeline.to_model_space(tr_x))
    f_te = net.features(pipeline.to_model_space(te_x))
    _FEATURES[key] = {"net": net, "train_stats": fd_lib.gaussian_stats(f_tr),
                      "train_vs_test": fd_lib.frechet_distance(
                          *fd_lib.gaussian_stats(f_te), *fd_lib.gaussian_stats(f_tr)),
                      "num_test": len(te_x)}
  return _FEATURES[key]


def _inception_fid(config, samples) -> Dict[str, float]:
  """Standard FID of samples vs as many train images ({} if eval.inception_weights is "")."""
  path = os.path.expanduser(config.eval.get("inception_weights", "") or "")
  if not path:
    return {}
  if not os.path.isfile(path):
    raise ConfigError(f"config.eval.inception_weights={path!r} is not allowed: an existing .npz "
                      "made by experiments/convert_inception_weights.py, or \"\" (off).")
  from research.metrics import inception
  try:
    variables = inception.load_fid_inception_params(path)
  except ValueError as e:
    raise ConfigError(f"config.eval.inception_weights={path!r}: {e}") from e
  tr_x, _, _ = load_split(config, "train")
  n = min(len(samples), len(tr_x))
  idx = np.sort(np.random.default_rng(0).choice(len(tr_x), n, replace=False))
  value = inception.fid(np.asarray(samples, np.float32), pipeline.to_model_space(tr_x[idx]),
                        variables)
  return {"fid": value, "fid_num_samples": len(samples), "fid_num_reference": n}


def image_metrics(config, spec: builders.DataSpec, samples: np.ndarray,
                  labels: Optional[np.ndarray] = None) -> Dict[str, float]:
  """fd_<dataset> of samples vs the train split, the train-vs-test reference, and (for
  class-conditional samples) the feature classifier's accuracy on them.

  fd_<dataset>_train_vs_test compares the test split (N_test images) with train: the value a
  perfect model would get from N_test samples. FD is biased upwards by O(1/N), so sample
  with num_samples close to N_test (reported as fd_num_test) to compare like with like.
  """
  del spec
  fid_out = _inception_fid(config, samples)
  name = dataset_key(config)
  _, _, info = load_split(config, "train")
  if info.num_classes == 0:
    logging.warning("fd_%s needs class labels to train its feature network; %s has none, so "
                    "no fd_%s is computed.", name, config.data.name, name)
    return fid_out
  from research.metrics import fd as fd_lib
  ref = feature_net(config)
  net = ref["net"]
  samples = np.asarray(samples, np.float32)
  logits, feats = net.logits_and_features(samples)
  out = {f"fd_{name}": fd_lib.frechet_distance(*fd_lib.gaussian_stats(feats), *ref["train_stats"]),
         f"fd_{name}_train_vs_test": ref["train_vs_test"],
         "fd_num_samples": len(samples), "fd_num_test": ref["num_test"],
         "feature_net_test_accuracy": float(net.info.get("test_accuracy", float("nan"))),
         "samples_out_of_range": float(np.mean(np.abs(samples) > 1.0))}
  if labels is not None:
    out["classifier_accuracy"] = float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
  out.update(fid_out)
  return out
