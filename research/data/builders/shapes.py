"""TFDS builder `shapes`: procedural 32x32 RGB images of one coloured shape on black.

Each image holds a circle, square or triangle (the class label) in one of 8 colours, 3 sizes
and 9 positions (a 3x3 grid with sub-cell jitter), anti-aliased, with a caption such as
"small red circle at top left". Everything is a deterministic function of (seed, split), and
generation is vectorised numpy (60,000 images in a few seconds), so nothing is downloaded.
The attribute labels (colour, size, position) and the caption are kept for the
text/attribute-conditional latent-diffusion work.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange")
RGB = np.array([(230, 40, 40), (40, 200, 60), (50, 90, 230), (240, 220, 40),
                (220, 50, 220), (40, 210, 220), (240, 240, 240), (250, 140, 30)], np.float32)
SIZES = ("small", "medium", "large")
RADII = np.array([3.5, 5.5, 7.5], np.float32)       # "radius" in px per size class
POSITIONS = ("top left", "top centre", "top right", "middle left", "centre", "middle right",
             "bottom left", "bottom centre", "bottom right")
CELL_CENTRES = np.array([9.0, 16.0, 23.0], np.float32)  # px, for rows and columns
JITTER = 1.5    # px: uniform jitter of the centre inside its cell
SPLIT_INDEX = {"train": 0, "test": 1}


def sample_attributes(n: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
  """Random attributes of n images: class ids and continuous geometry."""
  shape = rng.integers(0, len(SHAPES), n)
  colour = rng.integers(0, len(COLOURS), n)
  size = rng.integers(0, len(SIZES), n)
  position = rng.integers(0, len(POSITIONS), n)
  jitter = rng.uniform(-JITTER, JITTER, (n, 2)).astype(np.float32)
  radius = RADII[size] + rng.uniform(-0.5, 0.5, n).astype(np.float32)
  cy = CELL_CENTRES[position // 3] + jitter[:, 0]
  cx = CELL_CENTRES[position % 3] + jitter[:, 1]
  return dict(shape=shape, colour=colour, size=size, position=position, cx=cx, cy=cy,
              radius=radius)


def render(attrs: Dict[str, np.ndarray], chunk: int = 4096) -> np.ndarray:
  """uint8 [n, 32, 32, 3] images of `attrs` (vectorised; anti-aliased by signed distance)."""
  n = len(attrs["shape"])
  out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  pix = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5  # pixel centres
  for s in range(0, n, chunk):
    sl = slice(s, min(n, s + chunk))
    dy = pix[None, :, None] - attrs["cy"][sl, None, None]   # [n, H, 1]; y points down
    dx = pix[None, None, :] - attrs["cx"][sl, None, None]   # [n, 1, W]
    r = attrs["radius"][sl, None, None]
    circle = np.sqrt(dx**2 + dy**2) - r
    # The square and triangle are scaled to roughly the circle's area (pi r^2).
    square = np.maximum(np.abs(dx), np.abs(dy)) - 0.886 * r
    inradius = 0.5 * 1.3 * r  # upright equilateral triangle, circumradius 1.3 r
    triangle = np.maximum(np.maximum(dy, 0.866 * dx - 0.5 * dy), -0.866 * dx - 0.5 * dy)
    triangle = triangle - inradius
    shape = attrs["shape"][sl, None, None]
    dist = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))
    cover = np.clip(0.5 - dist, 0.0, 1.0)  # pixel coverage ~ 0.5 - signed distance
    img = cover[..., None] * RGB[attrs["colour"][sl]][:, None, None, :]
    out[sl] = np.round(img).astype(np.uint8)
  return out


def captions(attrs: Dict[str, np.ndarray]) -> list:
  return [f"{SIZES[z]} {COLOURS[c]} {SHAPES[s]} at {POSITIONS[p]}"
          for s, c, z, p in zip(attrs["shape"], attrs["colour"], attrs["size"],
                                attrs["position"])]


# The attributes a caption names, in caption-independent order, with their class names; the
# shape is stored as "label" in `generate`'s output and the TFDS records.
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}


def attribute_labels(examples: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """{attribute: int class ids [N]} of `generate` output (or a batch with the same keys)."""
  return {name: np.asarray(examples["label" if name == "shape" else name]).astype(np.int64)
          for name in ATTRIBUTES}


def parse_captions(texts) -> Dict[str, np.ndarray]:
  """{attribute: int class ids [N]} named by captions such as "small red circle at top left"
  (the inverse of `captions`); a caption of another form raises ValueError naming it."""
  out = {name: [] for name in ATTRIBUTES}
  for text in texts:
    text = str(text)
    head, sep, position = text.partition(" at ")
    words = head.split()
    if (not sep or len(words) != 3 or words[0] not in SIZES or words[1] not in COLOURS
        or words[2] not in SHAPES or position not in POSITIONS):
      raise ValueError(f"caption {text!r} is not '<size> <colour> <shape> at <position>' with "
                       f"size in {SIZES}, colour in {COLOURS}, shape in {SHAPES}, position in "
                       f"{POSITIONS}.")
    out["size"].append(SIZES.index(words[0]))
    out["colour"].append(COLOURS.index(words[1]))
    out["shape"].append(SHAPES.index(words[2]))
    out["position"].append(POSITIONS.index(position))
  return {name: np.asarray(v, np.int64) for name, v in out.items()}


def generate(n: int, seed: int, split: str = "train") -> Dict[str, np.ndarray]:
  """The first n examples of `split` for `seed`: images, labels, attributes, captions."""
  if split not in SPLIT_INDEX:
    raise ValueError(f"split={split!r} is not allowed; allowed: {tuple(SPLIT_INDEX)}.")
  attrs = sample_attributes(n, np.random.default_rng([seed, SPLIT_INDEX[split]]))
  return dict(image=render(attrs), label=attrs["shape"].astype(np.int64),
              colour=attrs["colour"], size=attrs["size"], position=attrs["position"],
              caption=np.array(captions(attrs)))


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  num_train: int = 50_000
  num_test: int = 10_000
  seed: int = 0


class Shapes(tfds.core.GeneratorBasedBuilder):
  """32x32 RGB shapes with a shape label, attribute labels and a caption."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", description="50,000 train / 10,000 test images"),
      ShapesConfig(name="small", num_train=5_000, num_test=1_000,
                   description="5,000 train / 1,000 test images (quick experiments)"),
      ShapesConfig(name="tiny", num_train=512, num_test=128,
                   description="512 train / 128 test images (tests)"),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedural 32x32 RGB circles, squares and triangles with colour, size, "
                    "position labels and a caption.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=SHAPES),
            "colour": tfds.features.ClassLabel(names=COLOURS),
            "size": tfds.features.ClassLabel(names=SIZES),
            "position": tfds.features.ClassLabel(names=POSITIONS),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # record i is example i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # procedural: nothing to download
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test)}

  def _generate_examples(self, split: str, n: int):
    ex = generate(n, self.builder_config.seed, split)
    keys = ("image", "label", "colour", "size", "position", "caption")
    for i in range(n):
      yield i, {k: (ex[k][i] if k in ("image", "caption") else int(ex[k][i])) for k in keys}
