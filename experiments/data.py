"""The data of a run: its DataSpec, toy distributions and image splits, training batches.

  spec = build_data_spec(config)                 # dims, num_classes, toy distribution or image
  for batch in train_batches(config, spec, start_step): ...   # batch i depends on (seed, i) only
  load_captions(config, "test")                  # the split's captions (data.captions=True)

With data.captions=True (text-conditional latent diffusion) the spec carries the tokenizer of
the train split's captions, and every image batch also holds "caption_ids" [B, L] and
"caption_lengths" [B] (research.models.text.Tokenizer.encode of each image's caption).

Toy data comes from research.data.toy; image data from research.data.pipeline (TFDS sources
-> numpy batches). Image splits are read into memory once per process and cached here (the
datasets this targets fit in RAM).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Dict, Iterator, Optional, Tuple

import jax
import numpy as np
from absl import logging

from experiments import mesh as mesh_lib
from experiments.options import ConfigError
from research.data import pipeline
from research.data import toy
from research.models.text import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the rest of the run needs to know about the data."""
  dims: Tuple[int, ...]          # shape of one example
  num_classes: int               # 0 when unlabelled
  toy: Optional[Any] = None      # the research.data.toy distribution, for toy data
  kind: str = "toy"              # "toy" | "image"
  tokenizer: Optional[Tokenizer] = None  # data.captions: the train captions' vocabulary
  caption_length: int = 0        # data.captions: words in the longest train caption


def is_toy(config) -> bool:
  return config.data.name in toy.DATASETS


def build_toy(config):
  d = config.data
  kw = {}
  if d.name == "ring":
    kw = dict(num_modes=d.num_modes, radius=d.radius, std=d.std, dim=d.dim)
  elif d.name == "grid":
    kw = dict(std=d.std, dim=d.dim)
  return toy.get_dataset(d.name, **kw)


def build_data_spec(config) -> DataSpec:
  if is_toy(config):
    ds = build_toy(config)
    return DataSpec(dims=(ds.dim,), num_classes=int(getattr(ds, "num_classes", 0)), toy=ds)
  return image_data_spec(config)


def train_batches(config, spec: DataSpec, start_step: int, mesh=None,
                  batch_size: Optional[int] = None) -> Iterator[dict]:
  """Global batches for steps start_step, start_step+1, ...; batch i depends only on (seed, i).

  `batch_size` defaults to data.batch_size (stage 1 of a latent job trains with its own).

  That makes a resumed run see exactly the batches an uninterrupted run would have seen, on
  any number of devices. With a `mesh` every batch is one global jax.Array split over its
  batch axes: toy batches are generated on the devices (each computes its rows; random bits
  are partitionable, so the values do not depend on the device count), and image batches
  are read by each process for its own rows only and assembled with
  jax.make_array_from_process_local_data.
  """
  sharding = None if mesh is None else mesh_lib.batch_sharding(mesh)
  if spec.kind == "image":
    images, labels, _ = load_split(config, "train")
    local = pipeline.train_batches(
        images, labels, batch_size=batch_size or config.data.batch_size, seed=config.seed,
        start_step=start_step, random_flip=config.data.random_flip,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=int(config.data.get("num_workers", 0)),
        extra=_caption_arrays(config, spec, "train"))
    for batch in local:
      if sharding is None:
        yield batch
      else:
        yield {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    return
  data_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  n = batch_size or config.data.batch_size

  @functools.partial(jax.jit, out_shardings=sharding)
  def make(step):
    x, labels = spec.toy.sample(jax.random.fold_in(data_rng, step), n)
    batch = {"x": x}
    if labels is not None:
      batch["label"] = labels
    return batch

  step = start_step
  while True:
    yield make(step)
    step += 1


# --- image data ---------------------------------------------------------------------------------

_ARRAYS: Dict[Tuple, Tuple[np.ndarray, Optional[np.ndarray], pipeline.SourceInfo]] = {}


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
    except pipeline.DataNotFoundError as e:
      raise ConfigError(f"config.data.name={config.data.name!r} is not allowed here: {e}"
                        ) from None
    except ValueError as e:
      raise ConfigError(f"config.data (name={config.data.name!r}, image_size={size}): {e}") from e
    images, labels = pipeline.load_arrays(source)
    _ARRAYS[key] = (images, labels, source.info)
    logging.info("Loaded %s/%s: %s images %s in %.1fs from %s", config.data.name, split,
                 len(images), images.shape[1:], time.perf_counter() - t0, data_dir(config))
  return _ARRAYS[key]


def image_data_spec(config) -> DataSpec:
  _, _, info = load_split(config, "train")
  if config.data.conditional and info.num_classes == 0:
    raise ConfigError(f"config.data.conditional=True is not allowed: dataset "
                      f"{config.data.name!r} has no class labels.")
  h, w, c = info.image_shape
  tokenizer, caption_length = None, 0
  if config.data.captions:
    captions = load_captions(config, "train")
    tokenizer = Tokenizer.from_captions(captions)
    caption_length = max(1, tokenizer.max_length(captions))
  if config.model.name == "unet":
    f = 2 ** (len(config.model.ch_mult) - 1)
    if h % f or w % f:
      raise ConfigError(f"config.model.ch_mult={tuple(config.model.ch_mult)} is not allowed for "
                        f"{h}x{w} images: the size must be divisible by 2**(len(ch_mult)-1)={f}.")
  return DataSpec(dims=(h, w, c), num_classes=info.num_classes, kind="image",
                  tokenizer=tokenizer, caption_length=caption_length)


_CAPTIONS: Dict[Tuple, np.ndarray] = {}
_ENCODED: Dict[Tuple, Dict[str, np.ndarray]] = {}


def load_captions(config, split: str) -> np.ndarray:
  """The captions (str [N], record order) of `split`; ConfigError if the dataset has none."""
  _, _, info = load_split(config, split)
  key = (config.data.name, split, data_dir(config))
  if key not in _CAPTIONS:
    if "caption" not in info.features:
      raise ConfigError(f"config.data.captions=True is not allowed: dataset "
                        f"{config.data.name!r} has no captions (features: "
                        f"{', '.join(info.features)}).")
    source = pipeline.open_source(config.data.name, split, data_dir(config),
                                  image_size=int(config.data.image_size))
    _CAPTIONS[key] = pipeline.load_column(source, "caption")
  return _CAPTIONS[key]


def _caption_arrays(config, spec: DataSpec, split: str) -> Optional[Dict[str, np.ndarray]]:
  """{"caption_ids" [N, L], "caption_lengths" [N]} of a split, or None without captions."""
  if spec.tokenizer is None:
    return None
  key = (config.data.name, split, data_dir(config), spec.tokenizer.words, spec.caption_length)
  if key not in _ENCODED:
    ids, lengths = spec.tokenizer.encode(list(load_captions(config, split)), spec.caption_length)
    _ENCODED[key] = {"caption_ids": ids, "caption_lengths": lengths}
  return _ENCODED[key]


def eval_batches(config, spec: DataSpec, batch_size: Optional[int] = None,
                 split: str = "test") -> Iterator[dict]:
  """One pass over `split` (default test) in record order, this process's share."""
  images, labels, _ = load_split(config, split)
  return pipeline.eval_batches(images, labels, batch_size=batch_size or config.data.batch_size,
                               extra=_caption_arrays(config, spec, split))
