"""Figures: scatter plots for vector data, image grids, training curves."""
from __future__ import annotations

import os

import numpy as np


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def scatter(path: str, samples, reference=None, title: str = "", labels=None,
            max_points: int = 5000) -> str:
  """2-D scatter of the first two coordinates (reference data in grey underneath)."""
  if path is None:  # not the writing process
    return None
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
  s = np.asarray(samples)[:max_points]
  if reference is not None:
    r = np.asarray(reference)[:max_points]
    ax.scatter(r[:, 0], r[:, 1], s=1, c="0.75", label="data", rasterized=True)
  c = None if labels is None else np.asarray(labels)[:max_points]
  if c is None:
    ax.scatter(s[:, 0], s[:, 1], s=1, c="C0", label="samples", rasterized=True)
  else:
    ax.scatter(s[:, 0], s[:, 1], s=1, c=c, cmap="tab10", vmin=0, vmax=9, label="samples",
               rasterized=True)
  ax.set_aspect("equal")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="upper right", markerscale=6, fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def image_grid(path: str, images, nrow: int = 10, title: str = "") -> str:
  """Grid of images in [-1, 1], shape [N, H, W, C]."""
  if path is None:  # not the writing process
    return None
  plt = pyplot()
  x = np.clip((np.asarray(images) + 1) / 2, 0, 1)
  n = min(len(x), nrow * nrow)
  x = x[:n]
  h, w, c = x.shape[1:]
  rows = int(np.ceil(n / nrow))
  grid = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), np.float32)
  for i in range(n):
    r, q = divmod(i, nrow)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
  fig, ax = plt.subplots(figsize=(6, 6 * rows / nrow + 0.3), dpi=110)
  ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap="gray" if c == 1 else None,
            interpolation="nearest")
  ax.axis("off")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def prompt_grid(path: str, images, prompts, ncol: int = 8, max_images: int = 48,
                title: str = "") -> str:
  """Images in [-1, 1] [N, H, W, C], each with its prompt written under it."""
  import textwrap
  if path is None:  # not the writing process
    return None
  plt = pyplot()
  x = np.clip((np.asarray(images) + 1) / 2, 0, 1)[:max_images]
  n = len(x)
  ncol = max(1, min(ncol, n))
  rows = int(np.ceil(n / ncol))
  fig, axes = plt.subplots(rows, ncol, figsize=(1.3 * ncol, 1.85 * rows + 0.3), dpi=110,
                           squeeze=False, gridspec_kw={"hspace": 0.45, "wspace": 0.1})
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= n:
      continue
    img = x[i]
    ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img,
              cmap="gray" if img.shape[-1] == 1 else None, interpolation="nearest")
    ax.text(0.5, -0.04, "\n".join(textwrap.wrap(str(prompts[i]), 18)), fontsize=5.5,
            ha="center", va="top", transform=ax.transAxes)
  if title:
    fig.suptitle(title, fontsize=8)
  fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.06)
  fig.savefig(path)
  plt.close(fig)
  return path


CURVES = (("loss", "loss"), ("grad_norm", "gradient norm"), ("learning_rate", "learning rate"))


def smooth(values, weight: float = 0.8) -> np.ndarray:
  """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
  out, last = [], 0.0
  for i, v in enumerate(np.asarray(values, np.float64)):
    last = weight * last + (1 - weight) * v
    out.append(last / (1 - weight ** (i + 1)))
  return np.asarray(out)


def train_curves(path: str, rows, title: str = "", weight: float = 0.8) -> str:
  """Loss, gradient norm and learning rate of metrics rows against step, raw and smoothed.

  Written to a temporary file and renamed, so a reader never sees half a figure.
  """
  if path is None:  # not the writing process
    return None
  plt = pyplot()
  keys = [(k, label) for k, label in CURVES if any(k in r for r in rows)]
  fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3), dpi=110,
                           squeeze=False)
  for ax, (key, label) in zip(axes[0], keys):
    pts = sorted((int(r["step"]), float(r[key])) for r in rows
                 if key in r and np.isfinite(r[key]))
    steps = np.asarray([p[0] for p in pts])
    vals = np.asarray([p[1] for p in pts])
    if key == "learning_rate":  # a schedule, not a noisy measurement: nothing to smooth
      ax.plot(steps, vals, color="C1", lw=1.6)
    else:
      ax.plot(steps, vals, color="C0", alpha=0.3, lw=1, label="raw")
    if len(vals) and key != "learning_rate":
      ax.plot(steps, smooth(vals, weight), color="C0", lw=1.6, label=f"smoothed ({weight})")
      if vals.min() > 0 and vals.max() > 10 * vals.min():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
  fig.savefig(tmp, format="png")
  plt.close(fig)
  os.replace(tmp, path)
  return path
