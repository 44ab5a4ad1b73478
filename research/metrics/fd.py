"""Frechet distance between image sets in the feature space of a small dataset classifier.

FD(P, Q) = |mu_P - mu_Q|^2 + tr(S_P) + tr(S_Q) - 2 tr((S_P^1/2 S_Q S_P^1/2)^1/2), the
2-Wasserstein distance between Gaussians fitted to the two feature sets (Heusel et al. 2017).
FID is this distance in Inception-v3 pool features; we use the penultimate layer of a small
classifier trained once on the dataset itself, so the metric is named `fd_<dataset>` and is
comparable only within one dataset and one feature network (a change of the network's
settings changes the cache key, and so the numbers).

Like FID, the plug-in estimate is biased upwards by O(D / N) for N samples of D features:
compare numbers computed from the same N (e.g. samples vs train against test vs train
with as many samples as test images).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from research.models.classifier import Classifier, fit, predict

CACHE_VERSION = 1


def gaussian_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D] in float64 (unbiased covariance)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}.")
  return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

  tr((S1^1/2 S2 S1^1/2)^1/2) is computed from symmetric eigendecompositions (float64), so
  it is real and stable for singular (rank-deficient) covariances, unlike a general sqrtm.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; cov {cov1.shape}, "
                     f"{cov2.shape}.")
  s1 = _sqrtm_psd(cov1)
  m = s1 @ cov2 @ s1
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
  fd = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt
  return float(max(fd, 0.0))


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
  return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


# --- the feature network, trained once per dataset and cached ---------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureNetSettings:
  """Everything that determines the trained feature network (and so its cache key)."""
  ch: int = 16
  ch_mult: Tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  feature_dim: int = 64
  steps: int = 400
  batch_size: int = 128
  learning_rate: float = 2e-3
  seed: int = 0

  def key(self, extra: str = "") -> str:
    """A short hash of the settings (and of `extra`, anything else that shapes the network)."""
    text = json.dumps(dataclasses.asdict(self), sort_keys=True) + f"v{CACHE_VERSION}" + extra
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A trained classifier used as a feature extractor; `info` holds its test accuracy."""
  model: Classifier
  params: dict
  info: Dict

  def logits_and_features(self, x: np.ndarray, batch_size: int = 1024):
    return predict(self.model, self.params, np.clip(np.asarray(x, np.float32), -1, 1),
                   batch_size=batch_size)

  def features(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    return self.logits_and_features(x, batch_size)[1]

  def accuracy(self, x: np.ndarray, labels: np.ndarray) -> float:
    logits, _ = self.logits_and_features(x)
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def feature_net_path(cache_dir: str, name: str, image_shape, settings: FeatureNetSettings) -> str:
  h, w, c = image_shape
  return os.path.join(cache_dir, f"{name}_{h}x{w}x{c}_featnet_{settings.key()}.msgpack")


def load_or_train_feature_net(cache_dir: str, name: str, train_x: np.ndarray,
                              train_labels: np.ndarray, num_classes: int, *,
                              test_x: Optional[np.ndarray] = None,
                              test_labels: Optional[np.ndarray] = None,
                              settings: FeatureNetSettings = FeatureNetSettings(),
                              log=None) -> FeatureNet:
  """The dataset's feature network: loaded from cache_dir, or trained once and saved there.

  Args:
    cache_dir: directory for <name>_<HxWxC>_featnet_<settings hash>.msgpack (+ .json).
    name: dataset name (part of the file name).
    train_x, train_labels: training images in [-1, 1] [N, H, W, C] and int labels [N].
    num_classes: number of classes.
    test_x, test_labels: held-out data for the recorded test accuracy.
    settings: architecture and optimisation settings.
    log: optional callable(str) for progress messages.
  Returns:
    A FeatureNet; info["test_accuracy"] when test data was given at training time.
  """
  model = Classifier(num_classes=num_classes, ch=settings.ch, ch_mult=tuple(settings.ch_mult),
                     num_res_blocks=settings.num_res_blocks, feature_dim=settings.feature_dim)
  path = feature_net_path(cache_dir, name, train_x.shape[1:], settings)

  def train():
    if log:
      log(f"Training the {name} feature network once ({settings.steps} steps); cached at {path}")
    params, loss = fit(model, train_x, train_labels, rng=jax.random.PRNGKey(settings.seed),
                       steps=settings.steps, batch_size=settings.batch_size,
                       learning_rate=settings.learning_rate)
    net = FeatureNet(model, jax.device_get(params), {})
    info = {"name": name, "settings": dataclasses.asdict(settings), "train_loss": loss,
            "train_accuracy": net.accuracy(train_x, train_labels)}
    if test_x is not None and test_labels is not None:
      info["test_accuracy"] = net.accuracy(test_x, test_labels)
    return net.params, info

  params, info = load_or_train_params(path, model, train_x[:1], train)
  return FeatureNet(model, params, info)


def load_or_train_params(path: str, model, example_x: np.ndarray, train) -> Tuple[dict, Dict]:
  """(params, info) of a network trained once: read from `path` (.msgpack) and its .json
  sidecar when both exist, else `train() -> (params, info)` runs and both files are written
  atomically (a crash never leaves a half-written cache that a later run would load).

  Args:
    path: the .msgpack file; its key (settings hash) must change whenever training would.
    model: the Linen module (its init on example_x gives the parameter template).
    example_x: one example batch for the template (shapes only; nothing is computed).
    train: zero-argument callable training the network, returning (params, JSON-able info).
  """
  from flax import serialization
  meta_path = path[:-len(".msgpack")] + ".json"
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example_x)["params"])
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  if os.path.exists(path) and os.path.exists(meta_path):
    with open(path, "rb") as f:
      params = serialization.from_bytes(template, f.read())
    with open(meta_path) as f:
      info = json.load(f)
    return params, info
  params, info = train()
  params = jax.device_get(params)
  text = json.dumps(info, indent=2)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  _atomic_write(path, serialization.to_bytes(params))
  _atomic_write(meta_path, text.encode())
  return params, json.loads(text)  # as a later load returns it (tuples become lists)


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
