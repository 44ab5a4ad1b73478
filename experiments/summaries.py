"""Where a run is watched: TensorBoard event files, optional Weights & Biases, training curves.

  writer(config, workdir) -> wd.MetricWriter   metrics.jsonl plus the sinks config.log asks for
  refresh_curves(workdir, split="train")        figures/<split>_curves.png from metrics.jsonl

TensorBoard layout: WORKDIR/tensorboard/<split>/ is one TensorBoard run per metrics.jsonl split
(train, classifier, sample, eval, guidance, info), so each split keeps its own step axis. A row
that carries a "tag" (one sampling run such as "ddpm_1000", a sweep cell "sweep_ddim_20") has
its scalars written as "<tag>/<name>"; figures go in as images under their tag, config.json as
text. TensorBoard allows [A-Za-z0-9_./-] in names: "+" is written "p" (so "dpm_solver++_20"
shows as "dpm_solverpp_20"), any other character as "_". Written with tensorboardX (pure Python, no TensorFlow), by process 0 only.

Resume: MetricWriter.drop_after(split, S), called when training restarts from checkpoint S,
makes the split's next event file start with purge_step=S+1. TensorBoard's readers (the
EventAccumulator and the server's loader) then drop every event of the split's earlier files
with step > S, so each step is shown once, as metrics.jsonl keeps each step once.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any, Dict, Optional

import numpy as np

from experiments import plotting
from experiments import workdir as wd

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("step", "split", "tag")


def _scalars(row: Dict[str, Any]) -> Dict[str, float]:
  """The numbers of a metrics row, named "<tag>/<name>" when the row has a tag."""
  tag = row.get("tag")
  prefix = f"{tag}/" if isinstance(tag, str) and tag else ""
  return {prefix + k: float(v) for k, v in row.items()
          if k not in _NOT_SCALARS and isinstance(v, (bool, int, float))}


def _tb_name(name: str) -> str:
  """A TensorBoard-legal name (tensorboardX would rename it itself, warning once per scalar)."""
  return re.sub(r"[^A-Za-z0-9_./-]", "_", name.replace("+", "p"))


class TensorBoardSink:
  """One tensorboardX SummaryWriter per split under `logdir`, opened on first use."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writers: Dict[str, Any] = {}
    self._purge: Dict[str, int] = {}

  def _writer(self, split: str):
    w = self._writers.get(split)
    if w is None:
      from tensorboardX import SummaryWriter  # config.log.tensorboard=False runs without it
      # tensorboardX names a file by the second and the host only: two writers opened in one
      # second would share (and overwrite) one file. The suffix keeps names unique and in
      # time order, the order TensorBoard reads a run's files in.
      w = SummaryWriter(os.path.join(self.logdir, split), purge_step=self._purge.pop(split, None),
                        flush_secs=10, filename_suffix=f".{time.time_ns()}.{os.getpid()}")
      self._writers[split] = w
    return w

  def resume(self, split: str, step: int) -> None:
    """Steps > `step` of `split` written before are hidden by the split's next file."""
    w = self._writers.pop(split, None)
    if w is not None:
      w.close()
    self._purge[split] = step + 1

  def write(self, step: int, split: str, row: Dict[str, Any]) -> None:
    w = self._writer(split)
    for name, value in _scalars(row).items():
      w.add_scalar(_tb_name(name), value, step)
    w.flush()

  def image(self, step: int, split: str, tag: str, path: str) -> None:
    from PIL import Image
    with Image.open(path) as im:
      pixels = np.asarray(im.convert("RGB"))
    w = self._writer(split)
    w.add_image(_tb_name(tag), pixels, step, dataformats="HWC")
    w.flush()

  def text(self, step: int, split: str, tag: str, text: str) -> None:
    w = self._writer(split)
    w.add_text(_tb_name(tag), text, step)
    w.flush()

  def close(self) -> None:
    writers, self._writers = self._writers, {}
    for w in writers.values():
      w.close()


class WandbSink:
  """The same rows in one Weights & Biases run per workdir.

  The run id is derived from the workdir's absolute path, so sampling, evaluation and a resumed
  training log into the run training started. Each split has its own step axis
  ("<split>/step"). wandb cannot hide logged steps: after a resume the steps between the
  checkpoint and the kill show twice there (TensorBoard and metrics.jsonl show them once).
  """

  def __init__(self, config, workdir: str):
    import wandb  # optional: validate checked that it is installed when config.log.wandb
    self._wandb = wandb
    path = os.path.abspath(workdir)
    self.run = wandb.init(
        project=config.log.wandb_project, mode=config.log.wandb_mode, dir=workdir,
        id=hashlib.sha1(path.encode()).hexdigest()[:16], name=os.path.basename(path),
        config=json.loads(config.to_json()), resume="allow")
    self._splits = set()

  def _log(self, step: int, split: str, values: Dict[str, Any]) -> None:
    if split not in self._splits:
      self.run.define_metric(f"{split}/step")
      self.run.define_metric(f"{split}/*", step_metric=f"{split}/step")
      self._splits.add(split)
    self.run.log({**{f"{split}/{k}": v for k, v in values.items()}, f"{split}/step": step})

  def resume(self, split: str, step: int) -> None:
    del split, step

  def write(self, step: int, split: str, row: Dict[str, Any]) -> None:
    self._log(step, split, _scalars(row))

  def image(self, step: int, split: str, tag: str, path: str) -> None:
    self._log(step, split, {tag: self._wandb.Image(path)})

  def text(self, step: int, split: str, tag: str, text: str) -> None:
    del step, split, tag, text  # the config is the run's config already

  def close(self) -> None:
    self.run.finish()


def writer(config, workdir: str) -> wd.MetricWriter:
  """A MetricWriter for `workdir` with the sinks config.log asks for (none on processes other
  than 0). Close it, or use it in a `with`, so the event files are complete."""
  sinks = []
  if wd.is_writer():
    if config.log.tensorboard:
      sinks.append(TensorBoardSink(os.path.join(workdir, TENSORBOARD_DIR)))
    if config.log.wandb:
      sinks.append(WandbSink(config, workdir))
  return wd.MetricWriter(workdir, sinks)


def refresh_curves(workdir: str, split: str = "train") -> Optional[str]:
  """figures/<split>_curves.png (loss, gradient norm, learning rate against step) from the
  split's rows in metrics.jsonl; its path, or None when there are no rows or on processes
  other than 0."""
  rows = [r for r in wd.read_metrics(workdir) if r.get("split") == split]
  if not rows:
    return None
  return plotting.train_curves(wd.figure_path(workdir, f"{split}_curves"), rows,
                               title=f"{os.path.basename(os.path.abspath(workdir))}: {split}")
