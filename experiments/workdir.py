"""Workdir I/O: config.json, metrics.jsonl, checkpoints, samples and figures (DESIGN.md contract)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional

import numpy as np


def _jsonable(v):
  if isinstance(v, (np.generic,)):
    return v.item()
  if hasattr(v, "item") and getattr(v, "shape", None) == ():
    return v.item()
  return v


class MetricWriter:
  """Appends one JSON object per event to WORKDIR/metrics.jsonl (flushes every write)."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, split: str, metrics: Dict[str, Any]) -> None:
    row = {"step": int(step), "split": split}
    row.update({k: _jsonable(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def read_metrics(workdir: str):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Write-then-rename, so a crash never leaves a half-written file behind."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_config(workdir: str, config) -> None:
  atomic_write_bytes(os.path.join(workdir, "config.json"), config.to_json(indent=2).encode())


def save_samples(workdir: str, tag: str, samples, labels=None) -> str:
  import io
  path = os.path.join(workdir, "samples", f"{tag}.npz")
  buf = io.BytesIO()
  arrays = {"samples": np.asarray(samples, np.float32)}
  if labels is not None:
    arrays["labels"] = np.asarray(labels)
  np.savez(buf, **arrays)
  atomic_write_bytes(path, buf.getvalue())
  return path


def figure_path(workdir: str, tag: str) -> str:
  os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
  return os.path.join(workdir, "figures", f"{tag}.png")


class Checkpointer:
  """orbax CheckpointManager around a TrainState: atomic saves, keep K, restore the latest."""

  def __init__(self, workdir: str, keep: int = 3):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=self._ocp.args.StandardSave(state))

  def restore(self, state, step: Optional[int] = None):
    step = self.manager.latest_step() if step is None else step
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(state))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
