"""Workdir I/O: config.json, metrics.jsonl, checkpoints, samples, figures, the lock (DESIGN.md).

  WorkdirLock(workdir)      fcntl lock on WORKDIR/.lock held by every mode that writes; a second
                            run on the same workdir is refused naming the holder's PID
  MetricWriter(workdir)     appends rows to metrics.jsonl; `drop_after` removes rows of a split
                            past a restored step, so a resumed run logs each step once; rows,
                            figures and text also go to its sinks (TensorBoard, wandb: built
                            by experiments/summaries.py from config.log)
  Checkpointer(workdir)     orbax CheckpointManager: a declined save raises, a restore falls
                            back over damaged steps to the newest good one, a checkpoint of a
                            different state is refused naming the config fields that changed
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import jax
import numpy as np
from absl import logging

from experiments.options import CheckpointError, WorkdirError


def _jsonable(v):
  if isinstance(v, (np.generic,)):
    return v.item()
  if hasattr(v, "item") and getattr(v, "shape", None) == ():
    return v.item()
  return v


def is_writer() -> bool:
  """Only process 0 writes the workdir's shared files (metrics, config, samples, figures, the
  lock); orbax coordinates the checkpoint writes of every process itself."""
  return jax.process_index() == 0


class WorkdirLock:
  """An exclusive lock on WORKDIR/.lock (fcntl.flock), released when closed or when the
  process dies. Refuses, with one line naming the holder's PID, while another run holds it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir or ".", ".lock")
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    if not is_writer():
      return self
    if not self.workdir:
      raise WorkdirError("--workdir='' is not allowed: a directory to write the run into.")
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"--workdir={self.workdir!r} cannot be written ({e.strerror}): give a "
                         "directory this user can create and write.") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirError(f"--workdir={self.workdir!r} is in use by another run (pid {holder}): "
                         "wait for it to finish, or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class MetricWriter:
  """Appends one JSON object per event to WORKDIR/metrics.jsonl (flushes every write).

  `sinks` receive the same rows (and figures, text): objects with
  `write(step, split, row)`, `resume(split, step)`, `image(step, split, tag, path)`,
  `text(step, split, tag, text)` and `close()`. Close the writer (or use it as a context
  manager) so they finish their files.
  """

  def __init__(self, workdir: str, sinks=()):
    if is_writer():
      os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.sinks = list(sinks) if is_writer() else []

  def write(self, step: int, split: str, metrics: Dict[str, Any]) -> None:
    if not is_writer():
      return
    row = {"step": int(step), "split": split}
    row.update({k: _jsonable(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for sink in self.sinks:
      sink.write(int(step), split, row)

  def image(self, step: int, split: str, tag: str, path: Optional[str]) -> None:
    """A figure file (PNG) to the sinks; None (not the writing process) is skipped."""
    if path is None or not is_writer():
      return
    for sink in self.sinks:
      sink.image(int(step), split, tag, path)

  def text(self, step: int, split: str, tag: str, text: str) -> None:
    for sink in self.sinks:
      sink.text(int(step), split, tag, text)

  def drop_after(self, split: str, step: int) -> int:
    """Removes rows of `split` with a step > `step` (logged past a checkpoint a resumed run
    restarts from); returns how many. The file is rewritten atomically; the sinks hide their
    own steps > `step` of that split."""
    for sink in self.sinks:
      sink.resume(split, int(step))
    if not is_writer() or not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a torn last line of a killed run
        continue
      if not (row.get("split") == split and int(row.get("step", -1)) > step):
        keep.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(keep)
    if dropped:
      atomic_write_bytes(self.path, "".join(keep).encode())
    return dropped

  def close(self) -> None:
    sinks, self.sinks = self.sinks, []
    for sink in sinks:
      sink.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in (l for l in f if l.strip()):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a torn last line of a killed run
        continue
  return rows


def read_config(workdir: str) -> Optional[Dict[str, Any]]:
  """The config.json a previous run wrote (a plain dict), or None."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _flat(d, prefix="") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def config_changes(old: Optional[Dict[str, Any]], config) -> List[str]:
  """'field: old -> new' for every config field that differs from a saved config.json."""
  if old is None:
    return []
  new = _flat(json.loads(config.to_json()))
  old = _flat(old)
  return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Write-then-rename, so a crash never leaves a half-written file behind."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_config(workdir: str, config) -> None:
  if not is_writer():
    return
  atomic_write_bytes(os.path.join(workdir, "config.json"), config.to_json(indent=2).encode())


def write_json(path: str, data: Dict[str, Any]) -> None:
  """`data` as indented JSON, written atomically."""
  atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True,
                                      default=_jsonable).encode())


def read_json(path: str) -> Optional[Dict[str, Any]]:
  """The JSON object at `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def save_tree(path: str, tree) -> None:
  """A pytree of arrays as flax msgpack, written atomically."""
  from flax import serialization
  atomic_write_bytes(path, serialization.to_bytes(jax.device_get(tree)))


def load_tree(path: str, template):
  """The pytree saved by save_tree, in the structure of `template` (arrays or ShapeDtypeStructs)."""
  from flax import serialization
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  with open(path, "rb") as f:
    return serialization.from_bytes(template, f.read())


def save_samples(workdir: str, tag: str, samples, labels=None, prompts=None) -> str:
  """samples/<tag>.npz: "samples" float32, "labels" when given, "prompts" (str, one per
  sample, loadable without pickle) for text-conditional samples."""
  import io
  path = os.path.join(workdir, "samples", f"{tag}.npz")
  if not is_writer():
    return path
  buf = io.BytesIO()
  arrays = {"samples": np.asarray(samples, np.float32)}
  if labels is not None:
    arrays["labels"] = np.asarray(labels)
  if prompts is not None:
    arrays["prompts"] = np.asarray([str(p) for p in prompts], dtype=str)
  np.savez(buf, **arrays)
  atomic_write_bytes(path, buf.getvalue())
  return path


def figure_path(workdir: str, tag: str) -> Optional[str]:
  """WORKDIR/figures/<tag>.png; None on processes other than 0 (figure writers skip None)."""
  if not is_writer():
    return None
  os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
  return os.path.join(workdir, "figures", f"{tag}.png")


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("name", "key", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_structure(tree) -> Dict[str, tuple]:
  """{'params/Dense_0/kernel': shape, ...} of a pytree of arrays (or of orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(getattr(v, "shape", ())) for p, v in leaves}


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
  """orbax CheckpointManager around a TrainState: atomic saves, keep K, restore the newest good."""

  def __init__(self, workdir: str, keep: int = 3):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state) -> None:
    saved = self.manager.save(step, args=self._ocp.args.StandardSave(state))
    if not saved:
      raise CheckpointError(f"orbax declined to save step {step} in {self.directory} (kept "
                            f"steps: {self.all_steps()}); nothing was written for it.")

  def restore(self, state, step: Optional[int] = None):
    step = self.manager.latest_step() if step is None else step
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(state))

  def _check_structure(self, state, step: int) -> None:
    """Refuses a checkpoint whose arrays differ from `state`'s, naming the changed fields."""
    want = tree_structure(state)
    have = tree_structure(self.manager.item_metadata(step))
    if want == have:
      return
    if not have:  # a damaged step, not a different state
      raise ValueError(f"step {step} has no readable array metadata (default/_METADATA is "
                       "missing or damaged)")
    diff = sorted(set(want.items()) ^ set(have.items()))
    example = ", ".join(f"{p} {s}" for p, s in diff[:3])
    raise CheckpointError(
        f"the checkpoint at step {step} in {self.directory} holds a different train state "
        f"than this config builds ({len(diff)} arrays differ, e.g. {example})")

  def restore_newest_good(self, state, *, config=None, quarantine: bool = False):
    """(restored state, step): the newest kept step that restores, trying older ones when one
    is damaged (a warning each, naming the step and the reason). A checkpoint of a different
    state (changed model, optimizer, ...) raises CheckpointError naming the config fields
    that changed since config.json was written. `quarantine` moves damaged steps aside to
    WORKDIR/checkpoints_damaged/ so training can write those steps again."""
    steps = self.all_steps()[::-1]
    reasons = []
    for step in steps:
      try:
        self._check_structure(state, step)
        restored = self.restore(state, step)
      except CheckpointError as e:
        changes = config_changes(read_config(self.workdir), config) if config is not None else []
        hint = ("; config fields changed since it was written: " + "; ".join(changes)
                if changes else "")
        raise CheckpointError(f"{e}{hint}. Use a new --workdir, or set those fields back."
                              ) from None
      except Exception as e:  # a damaged step: any error orbax or tensorstore raises
        reasons.append(f"step {step}: {_first_line(e)}")
        logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying an older "
                        "one.", step, self.directory, _first_line(e))
        if quarantine:
          self._quarantine(step)
        continue
      if reasons:
        logging.warning("Restored step %d instead of the newest (%s).", step, "; ".join(reasons))
      return restored, step
    if reasons:
      raise CheckpointError(f"no kept checkpoint in {self.directory} can be restored: "
                            + "; ".join(reasons) + ". Delete the directory to start over.")
    return None, None

  def _quarantine(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    if not os.path.isdir(src):
      return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dst = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged", f"{step}-{stamp}")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    logging.warning("Moved the damaged step %d to %s.", step, dst)
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
    finally:
      self.manager.close()


REFLOW_DIR = "reflow"  # WORKDIR/reflow/round_<r>: the reflow rounds of experiments/reflow.py


def reflow_round_dir(workdir: str, r: int) -> str:
  return os.path.join(workdir, REFLOW_DIR, f"round_{r}")


def trained_dir(config, workdir: str) -> str:
  """Where a job's trained model lives: WORKDIR, or (flow.reflow_rounds = R > 0) the last
  reflow round's directory once it holds a checkpoint."""
  r = int(config.flow.get("reflow_rounds", 0))
  last = reflow_round_dir(workdir, r)
  if r and os.path.isdir(os.path.join(last, "checkpoints")):
    ckpt = Checkpointer(last, keep=config.train.keep_ckpts)
    latest = ckpt.latest_step()
    ckpt.close()
    if latest is not None:
      return last
  return workdir
