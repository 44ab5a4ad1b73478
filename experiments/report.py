"""--mode=report: WORKDIR/report.md, one page on a run, from what the run left in its workdir.

  report(config, workdir) -> path of report.md

Sections: the config summary (from config.json), training (the last row against the first,
figures/train_curves.png refreshed from metrics.jsonl), then the latest metrics of every
sampling run, guidance scale and evaluation, each next to its reference where the row has one
(sliced_wasserstein_floor: two fresh data sets; fd_<dataset>_train_vs_test: the test split
against train; the true entropy H(p) next to the NLL), with the sample figures. On a sweep
workdir (WORKDIR/sweep/) the sweep's own section follows: `experiments.sweep.report(config,
workdir) -> markdown` where sweep has one, else its results.md table. Links are relative, so
the report renders wherever the workdir is copied.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, Optional

from experiments import summaries
from experiments import sweep as sweep_lib
from experiments import workdir as wd
from experiments.options import WorkdirError

REPORT = "report.md"

# The fields a reader needs to know what was trained (the rest is in config.json).
SUMMARY_FIELDS = (
    "objective", "data.name", "data.dim", "data.batch_size", "data.conditional", "model.name",
    "model.hidden", "model.depth", "diffusion.sde", "diffusion.loss", "diffusion.prediction",
    "flow.kind", "optim.learning_rate", "optim.schedule", "optim.ema_decay", "train.steps",
    "train.compute_dtype", "sample.sampler", "sample.steps", "sample.num_samples",
    "guidance.kind", "seed")

# What a metric is compared with when the row has no reference of its own.
IDEAL = {"logp_gap": 0, "std_ratio": 1, "nonfinite_fraction": 0, "support_fraction": 1,
         "mode_weight_error": 0, "nll_minus_entropy": 0}
_REFERENCE_SUFFIXES = ("_floor", "_train_vs_test")
_ROW_KEYS = ("step", "split", "tag")


def _get(d: Dict[str, Any], dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return ", ".join(map(str, v))
  return str(v)


def _last(rows: List[Dict[str, Any]], split: str) -> Optional[Dict[str, Any]]:
  rows = [r for r in rows if r.get("split") == split]
  return max(rows, key=lambda r: r["step"]) if rows else None


def _latest_per_tag(rows, split: str) -> List[Dict[str, Any]]:
  """The last row of every tag of `split`, in the order the tags first appeared."""
  out: Dict[str, Dict[str, Any]] = {}
  for r in rows:
    if r.get("split") == split:
      out[str(r.get("tag", ""))] = r
  return list(out.values())


def _is_reference(key: str, row) -> bool:
  return (key.endswith("_stderr") or key.startswith("mode_share_")
          or (key == "entropy" and "nll" in row)
          or any(key.endswith(s) and key[:-len(s)] in row for s in _REFERENCE_SUFFIXES))


def _value(key: str, row) -> str:
  se = row.get(f"{key}_stderr")
  return _fmt(row[key]) + (f" ± {se:.2g}" if isinstance(se, float) else "")


def _reference(key: str, row) -> str:
  for suffix in _REFERENCE_SUFFIXES:
    if key + suffix in row:
      return f"{_fmt(row[key + suffix])} (`{key}{suffix}`)"
  if key == "nll" and "entropy" in row:
    return f"{_value('entropy', row)} (`entropy`: the true H(p), the lowest NLL)"
  if key in IDEAL:
    return f"{IDEAL[key]} (ideal)"
  return ""


def metric_table(row: Dict[str, Any]) -> str:
  """| metric | value | reference | of one metrics row (references and stderrs folded in)."""
  lines = ["| metric | value | reference |", "|---|---|---|"]
  for key, v in row.items():
    if key in _ROW_KEYS or _is_reference(key, row):
      continue
    lines.append(f"| `{key}` | {_value(key, row)} | {_reference(key, row)} |")
  return "\n".join(lines)


def _figure(workdir: str, tag: str, alt: str) -> str:
  rel = os.path.join("figures", f"{tag}.png")
  return f"![{alt}]({rel})" if os.path.isfile(os.path.join(workdir, rel)) else ""


def _config_section(saved: Dict[str, Any], info: Optional[Dict[str, Any]]) -> str:
  lines = ["## Config", "", "| field | value |", "|---|---|"]
  flow = _get(saved, "objective") == "flow"
  for name in SUMMARY_FIELDS:
    v = _get(saved, name)
    if name.startswith("flow.") != flow and name.split(".")[0] in ("flow", "diffusion"):
      continue  # the settings of the other family
    if v is not None:
      lines.append(f"| `{name}` | {_fmt(v)} |")
  for name in ("num_params", "num_devices", "num_processes"):
    if info and name in info:
      lines.append(f"| {name} | {info[name]:,} |" if isinstance(info[name], int)
                   else f"| {name} | {_fmt(info[name])} |")
  lines += ["", "Full resolved config: [config.json](config.json)."]
  return "\n".join(lines)


def _training_section(workdir: str, rows, split: str, title: str, total) -> str:
  last = _last(rows, split)
  if last is None:
    return ""
  first = min((r for r in rows if r.get("split") == split), key=lambda r: r["step"])
  lines = [f"## {title}", ""]
  of = f" of {total}" if total and split == "train" else ""
  lines.append(f"Trained to step {last['step']}{of}; {len([r for r in rows if r.get('split') == split])} "
               f"log rows in metrics.jsonl (split `{split}`).")
  lines += ["", f"| metric | step {first['step']} | step {last['step']} (last) |", "|---|---|---|"]
  for key, v in last.items():
    if key not in _ROW_KEYS and isinstance(v, (int, float)):
      lines.append(f"| `{key}` | {_fmt(first.get(key, ''))} | {_fmt(v)} |")
  fig = _figure(workdir, f"{split}_curves", f"{split} curves")
  if fig:
    lines += ["", fig]
  return "\n".join(lines)


def _metrics_section(workdir: str, rows, split: str, title: str, skip_prefix: str = "") -> str:
  runs = [r for r in _latest_per_tag(rows, split)
          if not (skip_prefix and str(r.get("tag", "")).startswith(skip_prefix))]
  if not runs:
    return ""
  out = [f"## {title}"]
  for r in runs:
    tag = r.get("tag")
    head = f"### `{tag}` (step {r['step']})" if tag else f"Step {r['step']}."
    out += ["", head, "", metric_table(r)]
    fig = _figure(workdir, tag, tag) if tag else ""
    if fig:
      out += ["", fig]
  return "\n".join(out)


def _sweep_section(config, workdir: str) -> str:
  """The sweep's markdown: its own `sweep.report` where it has one, else results.md."""
  if not os.path.isdir(os.path.join(workdir, "sweep")):
    return ""
  hook = getattr(sweep_lib, "report", None)
  if callable(hook):
    md = hook(config, workdir)
    return md.strip() if isinstance(md, str) else ""
  table = os.path.join(workdir, "sweep", "results.md")
  if not os.path.isfile(table):
    return ""
  with open(table) as f:
    out = ["## Sweep", "", f.read().strip()]
  if os.path.isfile(os.path.join(workdir, "sweep", "quality_vs_nfe.png")):
    out += ["", "![quality vs NFE](sweep/quality_vs_nfe.png)"]
  return "\n".join(out)


def report(config, workdir: str) -> str:
  """Writes WORKDIR/report.md (process 0) and returns its path; the curve figures are
  refreshed from metrics.jsonl first. Refuses a workdir no run has written."""
  rows = wd.read_metrics(workdir)
  saved = wd.read_config(workdir)
  sweep_md = _sweep_section(config, workdir)
  if not rows and saved is None and not sweep_md:
    raise WorkdirError(f"--workdir={workdir!r} has no metrics.jsonl, config.json or sweep/ to "
                       "report on: run --mode=train (or sweep) with this --workdir first.")
  for split in ("train", "classifier"):
    summaries.refresh_curves(workdir, split)
  if saved is None:
    saved = config.to_dict()
  name = os.path.basename(os.path.abspath(workdir))
  stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  sections = [
      f"# Run report: {name}",
      f"Written by `--mode=report` on {stamp} from metrics.jsonl, config.json and figures/. "
      "TensorBoard: `tensorboard --logdir tensorboard` in this directory.",
      _config_section(saved, _last(rows, "info")),
      _training_section(workdir, rows, "train", "Training", _get(saved, "train.steps")),
      _training_section(workdir, rows, "classifier", "Guidance classifier", None),
      _metrics_section(workdir, rows, "sample", "Samples",
                       skip_prefix="sweep_" if sweep_md else ""),
      _metrics_section(workdir, rows, "guidance", "Guidance"),
      _metrics_section(workdir, rows, "eval", "Evaluation (test likelihood)"),
      sweep_md,
  ]
  text = "\n\n".join(s for s in sections if s) + "\n"
  path = os.path.join(workdir, REPORT)
  if wd.is_writer():
    wd.atomic_write_bytes(path, text.encode())
  return path
