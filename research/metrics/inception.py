"""Standard FID: the FID Inception-v3 network in Flax, its weight loader, features and FID.

The network is pytorch-fid's `fid_inception_v3` (mseitzer/pytorch-fid,
src/pytorch_fid/inception.py), itself a port of the 2015-12-05 TensorFlow Inception graph
that the original TTUR FID code used: torchvision's Inception-v3 layout (BasicConv2d =
conv without bias -> BatchNorm(eps=1e-3) -> ReLU) with the FID patches

  * Mixed_5b..5d (InceptionA), Mixed_6b..6e (InceptionC), Mixed_7b (InceptionE): the pool
    branch is a 3x3 / stride 1 / pad 1 average pool that does NOT count the zero padding
    (TensorFlow's behaviour; torch `count_include_pad=False`);
  * Mixed_7c (InceptionE): the pool branch is a 3x3 / stride 1 / pad 1 MAX pool.

The features are pool3: the global average of Mixed_7c's output, 2048 numbers per image.
Layout here is NHWC with HWIO kernels; parameter names mirror the torch module names
(`Mixed_5b/branch_pool/conv/kernel` <-> `Mixed_5b.branch_pool.conv.weight`).

Input pipeline, as pytorch-fid computes it from image files (uint8 -> [0, 1] ->
F.interpolate(size=(299, 299), mode="bilinear", align_corners=False) -> 2x - 1):

  * our images are float in [-1, 1] (research.data.pipeline.to_model_space); they are
    clipped to [-1, 1] and, with `quantize=True` (default), rounded to the 256 levels a
    saved PNG holds, exactly as `pipeline.from_model_space` does, then mapped to [0, 1];
  * they are resized bilinearly to 299x299 with half-pixel centres and no anti-aliasing
    (torch's align_corners=False formula, also when downsampling), then mapped to [-1, 1];
  * grayscale images (C = 1) are repeated to 3 channels (what PIL's convert("RGB") does
    for pytorch-fid).

No weights ship with this code and nothing is downloaded. Get pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` yourself and convert it once with
`python -m experiments.convert_inception_weights IN.pth OUT.npz`; the .npz holds the
torch state_dict names and arrays (OIHW conv weights, BN weight/bias/running_mean/var).

FID values are only comparable between computations with the same weights, preprocessing
and number of samples (the estimate is biased upwards by O(1/N); 50k samples is the usual
standard). On a CPU, 299x299 Inception costs ~6 GFLOP per image: use an accelerator for
thousands of images.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Mapping, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.metrics import fd

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPSILON = 1e-3
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release asset

Variables = Dict[str, Any]  # {"params": ..., "batch_stats": ...}


def _pair(v) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU, as torchvision's."""
  features: int
  kernel_size: Union[int, Tuple[int, int]]
  strides: Union[int, Tuple[int, int]] = 1
  padding: Union[int, Tuple[int, int]] = 0  # symmetric (rows, cols), as torch's `padding`
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), _pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def avg_pool_3x3_exclude_pad(x):
  """3x3 / stride 1 / pad 1 average pool that averages only real pixels (TF 'SAME' pooling;
  torch F.avg_pool2d(..., count_include_pad=False)): a corner averages 4 values, an edge 6."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_3x3_same(x):
  """3x3 / stride 1 / pad 1 max pool (padding never wins: it is -inf)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """FIDInceptionA: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool(excl. pad) -> 1x1."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(48, 1, name="branch5x5_1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool 3x3/2."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, 3, strides=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC: 1x1 | 1x7, 7x1 factorised branches | avgpool(excl. pad) -> 1x1."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, 1, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, 1, name="branch3x3_1")(x)
    b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (pool="avg", excl. pad) or FIDInceptionE_2 (pool="max")."""
  pool: str = "avg"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    if self.pool not in ("avg", "max"):
      raise ValueError(f"InceptionE pool={self.pool!r} is not allowed: 'avg' or 'max'.")
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = conv(448, 1, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool_3x3_same(x)
    bp = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Inception-v3 up to pool3, FID variant. Input: [N, 299, 299, 3] in [-1, 1] (already
  preprocessed, see `preprocess`); output: pool3 features [N, 2048]."""
  precision: Any = jax.lax.Precision.HIGHEST  # f32 convs (no TF32/bf16 passes on GPUs)

  @nn.compact
  def __call__(self, x):
    p = self.precision
    conv = functools.partial(BasicConv2d, precision=p)
    x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)  # 149
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)  # 147
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)  # 147
    x = _max_pool_3x3_s2(x)  # 73
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)  # 73
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)  # 71
    x = _max_pool_3x3_s2(x)  # 35
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # 35x35x256
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # 288
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # 17x17x768
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # 8x8x1280
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)  # 2048
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)  # 2048
    return jnp.mean(x, axis=(1, 2))  # pool3 (AdaptiveAvgPool2d(1))


# --- preprocessing -----------------------------------------------------------------------------


def resize_bilinear(x, size: int = INPUT_SIZE):
  """[N, H, W, C] -> [N, size, size, C], torch F.interpolate(mode="bilinear",
  align_corners=False) semantics: half-pixel centres, edge clamping, no anti-aliasing."""
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, size, size, c), method="bilinear", antialias=False)


def preprocess(images, quantize: bool = True):
  """Images [N, H, W, C in {1, 3}] in [-1, 1] -> Inception input [N, 299, 299, 3] in [-1, 1].

  Clip to [-1, 1]; (quantize) round to the 256 levels of a saved 8-bit image; to [0, 1];
  bilinear resize to 299x299; to [-1, 1]. Grayscale is repeated to 3 channels.
  """
  x = jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0)
  if quantize:
    x = jnp.round((x + 1.0) * 127.5) / 255.0
  else:
    x = (x + 1.0) / 2.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return 2.0 * resize_bilinear(x) - 1.0


_preprocess_jit = jax.jit(preprocess, static_argnames=("quantize",))


@jax.jit
def _pool3(variables, x):
  return FIDInceptionV3().apply(variables, x)


def _check_images(images, name: str) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] < 1 or min(x.shape[1:3]) < 1:
    raise ValueError(f"{name} must be [N >= 1, H, W, C] with C = 1 (grayscale) or 3 (RGB) in "
                     f"[-1, 1], got shape {x.shape}.")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name} must be float in [-1, 1] (model space), got dtype {x.dtype}; "
                     "convert uint8 images with research.data.pipeline.to_model_space.")
  return x


def inception_features(variables: Variables, images, batch_size: int = 50,
                       quantize: bool = True) -> np.ndarray:
  """pool3 features [N, 2048] float32 of images [N, H, W, C in {1, 3}] in [-1, 1].

  Args:
    variables: from `load_fid_inception_params` ({"params", "batch_stats"}).
    images: float images in [-1, 1] (NHWC); any H, W (resized to 299x299); C = 1 is repeated.
    batch_size: images per jitted call; the last batch is padded, so one compile per size.
    quantize: round to 8-bit levels first, as if the images were saved as PNG (the usual
      way FID is computed); reference images that came from uint8 are unchanged by it.
  Returns:
    float32 numpy array [N, 2048].
  """
  x = _check_images(images, "images")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise ValueError(f"batch_size={batch_size!r} is not allowed: a positive integer.")
  variables = jax.device_put(variables)
  n = len(x)
  out = []
  for start in range(0, n, batch_size):
    chunk = x[start:start + batch_size]
    if len(chunk) < batch_size:
      pad = np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)
      chunk = np.concatenate([chunk, pad], 0)
    feats = _pool3(variables, _preprocess_jit(chunk, quantize=bool(quantize)))
    out.append(np.asarray(feats[:min(batch_size, n - start)], np.float32))
  return np.concatenate(out, 0)


def fid(samples, reference_images, weights: Union[str, os.PathLike, Variables], *,
        batch_size: int = 50, quantize: bool = True) -> float:
  """FID between two image sets [N, H, W, C] in [-1, 1] (N >= 2 each), in pool3 features.

  weights: the converted .npz path, or variables from `load_fid_inception_params`.
  The covariance square root is fd.frechet_distance's (float64 eigendecompositions).
  """
  if isinstance(weights, (str, os.PathLike)):
    variables = load_fid_inception_params(weights)
  elif isinstance(weights, Mapping) and {"params", "batch_stats"} <= set(weights):
    variables = weights
  else:
    raise ValueError("weights must be a path to the converted .npz or the variables dict from "
                     f"load_fid_inception_params, got {type(weights).__name__}.")
  for name, imgs in (("samples", samples), ("reference_images", reference_images)):
    if len(_check_images(imgs, name)) < 2:
      raise ValueError(f"{name} must hold at least 2 images for a covariance, got {len(imgs)}.")
  f1 = inception_features(variables, samples, batch_size, quantize)
  f2 = inception_features(variables, reference_images, batch_size, quantize)
  return fd.frechet_distance_from_features(f1, f2)


# --- weights: pytorch-fid state_dict names <-> Flax variables ----------------------------------

# Entries of the torch state_dict that the features do not use: the 1008-way classifier and
# BatchNorm's step counter (newer torch versions save it).
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_IGNORED_PREFIXES = ("fc.",)
_LEAF_TO_TORCH = {("params", "conv", "kernel"): "conv.weight",
                  ("params", "bn", "scale"): "bn.weight",
                  ("params", "bn", "bias"): "bn.bias",
                  ("batch_stats", "bn", "mean"): "bn.running_mean",
                  ("batch_stats", "bn", "var"): "bn.running_var"}


def _hwio_to_oihw(shape):
  return (shape[3], shape[2], shape[0], shape[1])


@functools.lru_cache(maxsize=1)
def _flax_layout() -> Tuple[Tuple[str, Tuple[str, ...], Tuple[int, ...]], ...]:
  """(torch name, Flax path (collection, *modules, leaf), Flax shape) for every variable."""
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path)
    collection, modules, (layer, var) = keys[0], keys[1:-2], keys[-2:]
    torch_leaf = _LEAF_TO_TORCH[(collection, layer, var)]
    rows.append((".".join(modules) + "." + torch_leaf, keys, tuple(leaf.shape)))
  return tuple(rows)


def torch_state_dict_shapes() -> Dict[str, Tuple[int, ...]]:
  """The pytorch-fid state_dict names this network needs and their torch shapes (OIHW convs),
  derived from the Flax parameter tree (fc.* excluded)."""
  return {name: (_hwio_to_oihw(shape) if len(shape) == 4 else shape)
          for name, _, shape in _flax_layout()}


def variables_from_state_dict(state_dict: Mapping[str, Any], source: str = "state_dict"
                              ) -> Variables:
  """Flax variables from a pytorch-fid state_dict (name -> array); OIHW -> HWIO for convs.

  Raises ValueError naming missing keys, unexpected keys, or a key with the wrong shape.
  """
  names = set(state_dict)
  needed = torch_state_dict_shapes()
  missing = sorted(set(needed) - names)
  if missing:
    raise ValueError(f"{source} is missing {len(missing)} of the {len(needed)} FID Inception "
                     f"arrays: {', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}.")
  unexpected = sorted(k for k in names - set(needed)
                      if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(_IGNORED_PREFIXES))
  if unexpected:
    hint = (" (AuxLogits.* means torchvision's ImageNet Inception, not pytorch-fid's "
            f"{WEIGHTS_FILE})" if any(k.startswith("AuxLogits.") for k in unexpected) else "")
    raise ValueError(f"{source} has {len(unexpected)} unexpected arrays{hint}: "
                     f"{', '.join(unexpected[:8])}{', ...' if len(unexpected) > 8 else ''}.")
  variables: Variables = {}
  for name, path, flax_shape in _flax_layout():
    arr = np.asarray(state_dict[name])
    if arr.shape != needed[name]:
      raise ValueError(f"{source}: {name} has shape {arr.shape}, expected {needed[name]}.")
    if len(flax_shape) == 4:
      arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    node = variables
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.ascontiguousarray(arr, np.float32)
  return variables


def load_fid_inception_params(path: Union[str, os.PathLike]) -> Variables:
  """Flax variables {"params", "batch_stats"} from the converted pytorch-fid .npz.

  The .npz keys are pytorch-fid's state_dict names (`Conv2d_1a_3x3.conv.weight`,
  `Mixed_5b.branch1x1.bn.running_mean`, ...; `fc.*` and `*.num_batches_tracked` ignored).
  Raises FileNotFoundError for a missing file, ValueError for an unreadable file or
  missing / unexpected / wrongly shaped arrays (named).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"FID Inception weights not found at {path!r}: convert pytorch-fid's {WEIGHTS_FILE} "
        "with `python -m experiments.convert_inception_weights IN.pth OUT.npz` (no download "
        "happens here).")
  try:
    with np.load(path, allow_pickle=False) as data:
      state_dict = {k: data[k] for k in data.files}
  except Exception as e:  # not an .npz (e.g. the .pth itself), truncated file, ...
    raise ValueError(f"{path!r} is not a readable .npz of FID Inception weights ({e}); "
                     "convert the .pth with experiments/convert_inception_weights.py.") from e
  return variables_from_state_dict(state_dict, source=path)
