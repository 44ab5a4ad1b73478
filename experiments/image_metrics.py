"""Sample quality of image data: fd_<dataset> in a cached feature classifier, standard FID.

  image_metrics(config, spec, samples, labels=None) -> {"fd_<dataset>": ..., ...}
  adherence_metrics(config, samples, prompts) -> {"adherence_<attribute>": ..., ...}

research.metrics.fd is the library side (feature network, Frechet distance); this module
feeds it the run's splits (experiments.data) and caches the reference statistics per process.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
from absl import logging

from experiments.data import DataSpec, data_dir, dataset_key, load_captions, load_split
from experiments.options import ConfigError
from research.data import pipeline
from research.metrics import adherence as adherence_lib
from research.metrics import fd as fd_lib

_FEATURES: Dict[tuple, Dict] = {}



def _feature_settings(h: int):
  levels = max(1, int(np.log2(max(h, 8) // 4)))  # downsample to 4-8 px before pooling
  return fd_lib.FeatureNetSettings(ch_mult=(1,) + (2,) * levels)


def feature_net(config):
  """The dataset's (cached) feature classifier, and the train/test reference features."""
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


def image_metrics(config, spec: DataSpec, samples: np.ndarray,
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


# --- prompt adherence (text-conditional samples of the shapes data) ------------------------------

_ATTRIBUTE_NETS: Dict[tuple, adherence_lib.AttributeNet] = {}
ATTRIBUTE_NET_SETTINGS = adherence_lib.ATTRIBUTE_NET_SETTINGS  # (tests shorten its training)


def _shapes_builder():
  # Imported on use: the builder module loads tensorflow_datasets, which toy runs never need.
  from research.data.builders import shapes
  return shapes


def _parse(captions):
  """{attribute: class ids} of shapes-style captions, or None for captions of another form."""
  shapes_builder = _shapes_builder()
  try:
    return shapes_builder.parse_captions(captions)
  except ValueError:
    return None


def attribute_net(config) -> Optional[adherence_lib.AttributeNet]:
  """The dataset's attribute classifier (trained once on the train split's images and the
  attributes its captions name, cached like the fd network), or None when the captions are
  not of the shapes form '<size> <colour> <shape> at <position>'."""
  key = (config.data.name, data_dir(config), config.data.image_size)
  if key not in _ATTRIBUTE_NETS:
    tr_caps = load_captions(config, "train")
    tr_attrs = _parse(tr_caps)
    if tr_attrs is None:
      return None
    tr_x, _, _ = load_split(config, "train")
    te_x, _, _ = load_split(config, "test")
    te_attrs = _parse(load_captions(config, "test"))
    heads = {name: len(classes) for name, classes in _shapes_builder().ATTRIBUTES.items()}
    _ATTRIBUTE_NETS[key] = adherence_lib.load_or_train_attribute_net(
        os.path.join(data_dir(config), "genjax_metrics"), dataset_key(config),
        pipeline.to_model_space(tr_x), tr_attrs, heads, test_x=pipeline.to_model_space(te_x),
        test_attrs=te_attrs, settings=ATTRIBUTE_NET_SETTINGS, log=logging.info)
  return _ATTRIBUTE_NETS[key]


def adherence_metrics(config, samples: np.ndarray, prompts) -> Dict[str, float]:
  """Share of samples showing each attribute their prompt names ("adherence_shape", ...,
  "adherence_all"), next to the attribute classifier's accuracy on real test images
  ("attribute_net_test_accuracy_<attribute>"). {} when the prompts are not shapes captions."""
  requested = _parse(prompts)
  net = attribute_net(config) if requested is not None else None
  if net is None:
    return {}
  out = {f"adherence_{k}": v for k, v in net.adherence(samples, requested).items()}
  for k, v in dict(net.info.get("test_accuracy", {})).items():
    out[f"attribute_net_test_accuracy_{k}"] = float(v)
  return out
