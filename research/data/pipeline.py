"""TFDS data sources -> deterministic, resumable, per-process numpy batches of images.

  source = open_source("digits", "train", data_dir, image_size=16)   # prepares digits offline
  images, labels = load_arrays(source)                               # uint8 [N,H,W,C], int32 [N]
  for batch in train_batches(images, labels, batch_size=128, seed=0, start_step=0):
    ...                                                              # {"x": [-1,1] float32, "label"}

Order. The global example stream is the concatenation of per-epoch permutations, epoch e
permuted by `np.random.default_rng([seed, e])`; global batch i is stream[i*B : (i+1)*B]
(batches may straddle epochs, so no example is dropped). Batch i is therefore a function of
(seed, i) alone, and a run restarted at step s continues with exactly the batches an
uninterrupted run would have seen. Flips are drawn from (seed, i) too.

Sharding. Process p of P takes rows [p*B/P, (p+1)*B/P) of every global batch (B must be a
multiple of P), so the processes together see the global batch. `per_device` reshapes the
local batch to [num_local_devices, B/(P*D), ...] for pmap-style code.

Our own builders (research.data.builders: digits, shapes) are prepared on first use. Any
other name goes straight to TFDS with `download=False`: if it is not already prepared in
`data_dir` (in the ArrayRecord format, which random access needs), the error says how to
prepare it on a machine with internet access.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from research.data.images import from_model_space, resize_uint8, to_model_space  # noqa: F401  (re-exported)

OWN_BUILDERS = ("digits", "shapes")
SPLITS = ("train", "test")
_READ_CHUNK = 4096


class DataNotFoundError(FileNotFoundError):
  """A TFDS dataset that is not prepared in the data dir (and that we cannot build offline)."""


def default_data_dir() -> str:
  """~/.cache/genjax/tfds: where our builders are prepared when no data dir is given."""
  return os.path.join(os.path.expanduser("~"), ".cache", "genjax", "tfds")


# --- sources ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What a split holds: image shape, number of classes (0 = unlabelled), number of examples."""
  name: str
  split: str
  image_shape: Tuple[int, int, int]
  num_classes: int
  num_examples: int
  image_key: str = "image"
  label_key: Optional[str] = "label"
  resize_to: int = 0        # > 0: images are resized to this size when read
  features: Tuple[str, ...] = ()   # every feature of a record (e.g. "caption" for shapes)


@dataclasses.dataclass(frozen=True)
class Source:
  """A random-access TFDS data source plus what `load_arrays` needs to decode it."""
  data: object              # len() + __getitems__(indices) -> list of example dicts
  info: SourceInfo

  def __len__(self) -> int:
    return len(self.data)


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - tensorflow-datasets is a dependency
    raise ImportError("Image datasets need tensorflow-datasets (TensorFlow itself is not "
                      "needed): pip install tensorflow-datasets array_record") from e
  return tfds


def _builder_name(name: str, image_size: int) -> Tuple[str, int]:
  """(TFDS name with config, size still to resize to) for a dataset name and image_size."""
  base = name.split("/")[0].split(":")[0]
  if base == "digits" and "/" not in name:
    from research.data.builders import digits as digits_builder
    if image_size in (0, 8):
      return "digits/8", 0
    if image_size in digits_builder.SIZES:
      return f"digits/{image_size}", 0
    raise ValueError(f"image_size={image_size} is not allowed for digits; allowed: 0 (native 8), "
                     f"{', '.join(str(s) for s in digits_builder.SIZES)}.")
  return name, image_size


def open_source(name: str, split: str, data_dir: str, *, image_size: int = 0) -> Source:
  """Opens split `split` of dataset `name`, preparing our own builders offline if needed.

  Args:
    name: "digits", "shapes" (optionally with a config: "shapes/small", "digits/16"), or any
      TFDS name already prepared in data_dir in the ArrayRecord format.
    split: a TFDS split ("train", "test", ...).
    data_dir: the TFDS data dir (our builders are written here on first use).
    image_size: resize images to image_size x image_size when read (0 = native). For digits
      this picks the builder config (8, 16 or 32) instead.
  Returns:
    A Source.
  Raises:
    DataNotFoundError: a standard TFDS dataset that is not prepared in data_dir.
    ValueError: bad split or image size.
  """
  if not isinstance(image_size, int) or image_size < 0:
    raise ValueError(f"image_size={image_size!r} is not allowed: an integer >= 0.")
  tfds = _tfds()
  tfds_name, resize_to = _builder_name(name, image_size)
  base = tfds_name.split("/")[0].split(":")[0]
  if base in OWN_BUILDERS:
    import research.data.builders  # noqa: F401  (registers digits and shapes with TFDS)
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare()  # offline: generated from scikit-learn / numpy
  else:
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:  # unknown name: TFDS lists the registered ones
      raise DataNotFoundError(
          f"Unknown dataset {name!r}: not one of our offline builders ({', '.join(OWN_BUILDERS)}) "
          f"and TFDS does not know it ({type(e).__name__}: {str(e).splitlines()[0]}).") from e
    if not builder.is_prepared():
      raise DataNotFoundError(_how_to_prepare(tfds_name, data_dir, "is not prepared in"))
    formats = {getattr(f, "value", str(f)) for f in builder.info.available_file_formats()}
    formats.add(getattr(builder.info.file_format, "value", str(builder.info.file_format)))
    if "array_record" not in formats:
      raise DataNotFoundError(_how_to_prepare(
          tfds_name, data_dir, f"is prepared as {sorted(formats)}, not ArrayRecord (random "
          "access needs ArrayRecord), in"))
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(f"split={split!r} is not allowed for {tfds_name}; allowed: "
                     f"{', '.join(sorted(splits.keys()))}.")
  data = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  return Source(data=data, info=_source_info(name, split, builder, resize_to, len(data)))


def _how_to_prepare(name: str, data_dir: str, what: str) -> str:
  return (f"TFDS dataset {name!r} {what} {data_dir!r}, and this code never downloads. "
          "Prepare it on a machine with internet access (TFDS needs TensorFlow to build most "
          "standard datasets):\n"
          "  pip install tensorflow tensorflow-datasets array_record\n"
          f"  tfds build {name.split('/')[0]} --data_dir=DIR --file_format=array_record\n"
          f"then copy DIR/{name.split('/')[0]} into {data_dir} (or pass --config.data.data_dir=DIR).")


def _source_info(name, split, builder, resize_to: int, n: int) -> SourceInfo:
  feats = builder.info.features
  keys = list(feats.keys())
  image_key = "image" if "image" in keys else None
  if image_key is None:
    raise ValueError(f"Dataset {name!r} has no 'image' feature (features: {keys}).")
  shape = tuple(feats[image_key].shape)
  if len(shape) != 3 or shape[0] is None or shape[1] is None:
    if resize_to <= 0:
      raise ValueError(f"Dataset {name!r} has images of variable shape {shape}; set "
                       "data.image_size to resize them.")
  if resize_to > 0:
    shape = (resize_to, resize_to, shape[-1])
  label_key, num_classes = None, 0
  if "label" in keys and hasattr(feats["label"], "num_classes"):
    label_key, num_classes = "label", int(feats["label"].num_classes)
  return SourceInfo(name=name, split=split, image_shape=tuple(int(s) for s in shape),
                    num_classes=num_classes, num_examples=n, image_key=image_key,
                    label_key=label_key, resize_to=resize_to, features=tuple(keys))


def read(source: Source, indices: Sequence[int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Examples `indices` of a source as (uint8 images [n, H, W, C], int32 labels [n] | None)."""
  info = source.info
  exs = source.data.__getitems__([int(i) for i in indices])
  if info.resize_to > 0:
    imgs = [resize_uint8(np.asarray(e[info.image_key])[None], info.resize_to)[0] for e in exs]
  else:
    imgs = [np.asarray(e[info.image_key]) for e in exs]
  images = np.stack(imgs).astype(np.uint8) if imgs else np.zeros((0, *info.image_shape), np.uint8)
  labels = None
  if info.label_key is not None:
    labels = np.asarray([int(e[info.label_key]) for e in exs], np.int32)
  return images, labels


def load_column(source: Source, key: str) -> np.ndarray:
  """One feature of every record of a split, in record order: int64 [N] for class labels and
  scalars, an array of str [N] for text features (e.g. the shapes builder's "caption")."""
  if key not in source.info.features:
    raise ValueError(f"Dataset {source.info.name!r} has no feature {key!r} (features: "
                     f"{list(source.info.features)}).")
  n = len(source)
  values = []
  for s in range(0, n, _READ_CHUNK):
    for e in source.data.__getitems__(list(range(s, min(n, s + _READ_CHUNK)))):
      v = e[key]
      if isinstance(v, bytes):
        v = v.decode("utf-8")
      elif isinstance(v, np.ndarray) and v.dtype.kind in "SO":
        v = v.item().decode("utf-8") if isinstance(v.item(), bytes) else str(v.item())
      values.append(v)
  if values and isinstance(values[0], str):
    return np.asarray(values, dtype=str)
  return np.asarray(values, np.int64)


def load_arrays(source: Source) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """The whole split in memory: (uint8 [N, H, W, C], int32 [N] | None), in record order."""
  n = len(source)
  parts = [read(source, range(s, min(n, s + _READ_CHUNK))) for s in range(0, n, _READ_CHUNK)]
  images = np.concatenate([p[0] for p in parts], 0)
  labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts], 0)
  return images, labels


# --- order, sharding, batches -------------------------------------------------------------------


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def global_batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of global batch `step` in the stream of per-epoch permutations ([batch_size])."""
  if num_examples < 1:
    raise ValueError(f"num_examples={num_examples}: the dataset is empty.")
  start = int(step) * batch_size
  out, filled = [], 0
  epoch, offset = divmod(start, num_examples)
  while filled < batch_size:
    perm = epoch_permutation(num_examples, seed, epoch)
    take = perm[offset:offset + batch_size - filled]
    out.append(take)
    filled += len(take)
    epoch, offset = epoch + 1, 0
  return np.concatenate(out)


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows of a global batch that process `process_index` of `process_count` owns."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: need "
                     "0 <= process_index < process_count.")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not allowed with {process_count} processes: "
                     "a multiple of the process count.")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def flip_mask(seed: int, step: int, batch_size: int) -> np.ndarray:
  """Which rows of global batch `step` are flipped horizontally (bool [batch_size])."""
  return np.random.default_rng([int(seed), int(step), 1]).random(batch_size) < 0.5


def per_device(batch: Dict[str, np.ndarray], num_devices: int) -> Dict[str, np.ndarray]:
  """Reshapes every [B, ...] array to [num_devices, B / num_devices, ...]."""
  out = {}
  for k, v in batch.items():
    if v.shape[0] % num_devices:
      raise ValueError(f"batch {k!r} of {v.shape[0]} rows does not split over {num_devices} "
                       "devices: use a batch size that is a multiple of the device count.")
    out[k] = v.reshape(num_devices, v.shape[0] // num_devices, *v.shape[1:])
  return out


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def train_batches(images: np.ndarray, labels: Optional[np.ndarray], *, batch_size: int,
                  seed: int, start_step: int = 0, random_flip: bool = False,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  num_devices: int = 0, num_workers: int = 0,
                  extra: Optional[Dict[str, np.ndarray]] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Endless batches for steps start_step, start_step + 1, ... of this process, via grain.

  A grain MapDataset indexed by the step: batch i is a pure function of (seed, i) (the
  epoch's permutation, this process's rows of the global batch, the flips), so a resumed run
  starts at its checkpoint step and sees exactly the batches an uninterrupted run would have,
  and the global batch is the same for any number of processes. (grain's IndexSampler with
  per-process ShardOptions would give each process its own slice of the records instead,
  which makes the global batch depend on the process count.) With num_workers > 0, grain
  worker processes read, convert and flip the batches ahead of the train step, in order.

  Args:
    images: uint8 [N, H, W, C] (or any array/source indexable by an index array).
    labels: int [N] or None.
    batch_size: the global batch size (over all processes).
    seed: seeds the per-epoch permutations and the flips.
    start_step: the first step's index (resuming runs pass their checkpoint step).
    random_flip: flip each image horizontally with probability 1/2.
    process_index, process_count: this process and their number (default: jax's).
    num_devices: > 0 reshapes to [num_devices, B_local / num_devices, ...].
    num_workers: grain worker processes (0: batches are made in this process).
    extra: more per-example arrays [N, ...] (e.g. tokenized captions "caption_ids",
      "caption_lengths"), batched under their own keys with the same rows as the images.
  Yields:
    {"x": float32 [B_local, H, W, C] in [-1, 1], "label": int32 [B_local], **extra} ("label"
    only when labels are given).
  """
  import grain  # pylint: disable=import-outside-toplevel
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
    raise ValueError(f"num_workers={num_workers!r} is not allowed: an integer >= 0.")
  p, pc = _process(process_index, process_count)
  make = _BatchAt(images, labels, batch_size, seed, random_flip, process_slice(batch_size, p, pc),
                  num_devices, extra)
  ds = grain.MapDataset.range(int(start_step), _ENDLESS).map(make).to_iter_dataset()
  if num_workers:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():  # grain's workers read their absl flags' defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


_ENDLESS = 2**62  # the step index range of the endless train stream


class _BatchAt:
  """step -> this process's batch of that step (a picklable callable for grain's workers)."""

  def __init__(self, images, labels, batch_size, seed, random_flip, rows, num_devices, extra):
    self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
    self.random_flip, self.rows, self.num_devices = random_flip, rows, num_devices
    self.extra = extra

  def __call__(self, step) -> Dict[str, np.ndarray]:
    step = int(step)
    idx = global_batch_indices(len(self.images), self.batch_size, self.seed, step)[self.rows]
    x = to_model_space(np.asarray(self.images[idx]))
    if self.random_flip:
      flip = flip_mask(self.seed, step, self.batch_size)[self.rows]
      x = np.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    batch = {"x": x}
    if self.labels is not None:
      batch["label"] = np.asarray(self.labels[idx], np.int32)
    for k, v in (self.extra or {}).items():
      batch[k] = np.asarray(v[idx])
    return per_device(batch, self.num_devices) if self.num_devices else batch


def eval_batches(images: np.ndarray, labels: Optional[np.ndarray], *, batch_size: int,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 extra: Optional[Dict[str, np.ndarray]] = None
                 ) -> Iterator[Dict[str, np.ndarray]]:
  """One pass over a split in record order, this process's contiguous share, last batch short.

  Process p of P takes examples [p*N//P, (p+1)*N//P), so every example is seen exactly once.
  """
  p, pc = _process(process_index, process_count)
  n = len(images)
  lo, hi = p * n // pc, (p + 1) * n // pc
  for s in range(lo, hi, batch_size):
    idx = np.arange(s, min(hi, s + batch_size))
    batch = {"x": to_model_space(np.asarray(images[idx]))}
    if labels is not None:
      batch["label"] = np.asarray(labels[idx], np.int32)
    for k, v in (extra or {}).items():
      batch[k] = np.asarray(v[idx])
    yield batch
