"""The vocabulary every experiment module shares: ConfigError, field checks, option parsing.

The bottom floor of experiments/ (it imports nothing from experiments/). Allowed names are
read from the library that owns them (registries and module constants), never copied here.

  UserError                         an anticipated failure (one line at the CLI), with the kinds
    ConfigError, WorkdirError, CheckpointError, NonFiniteError
  field(config, "a.b")              the value at a dotted path
  fail(field, value, allowed)       raises ConfigError naming the field and what is allowed
  choice / positive_int / positive_float / unit_interval   one-line field checks
  parse_options("eta=0.5,grid='quadratic'")  -> {"eta": 0.5, "grid": "quadratic"}
  parse_extra(("ddim:50",), allowed)        -> (("ddim", 50),)
  SampleRequest                     one sampling run: sampler, steps, options, tag
  sample_requests / check_sample_requests   the runs of config.sample, checked by the objective
"""
from __future__ import annotations

import ast
import dataclasses
import math
from typing import Any, Dict, Iterable, Optional, Tuple

MODES = ("train", "sample", "evaluate", "sweep", "report")


class UserError(Exception):
  """An anticipated failure: the CLI prints its one-line message (traceback only with --debug)."""


class ConfigError(UserError, ValueError):
  """A config field (or flag) holds a value that is not allowed."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be used: not writable, or held by another run."""


class CheckpointError(UserError, FileNotFoundError):
  """No usable checkpoint: none at all, every kept step damaged, or a different state."""


class NonFiniteError(UserError, FloatingPointError):
  """Training or sampling produced NaN or inf; nothing non-finite was saved."""


def field(c, name: str):
  """The value at dotted path `name` of config `c` (KeyError naming the path if absent)."""
  for part in name.split("."):
    c = c[part]
  return c


def fail(name: str, value: Any, allowed: str):
  raise ConfigError(f"config.{name}={value!r} is not allowed: {allowed}.")


def choice(c, name: str, allowed: Iterable):
  allowed = tuple(allowed)
  v = field(c, name)
  if v not in allowed:
    fail(name, v, "one of " + ", ".join(repr(a) for a in allowed))


def positive_int(c, name: str, zero_ok: bool = False):
  v = field(c, name)
  if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
    fail(name, v, "an integer " + (">= 0" if zero_ok else ">= 1"))


def _is_number(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def positive_float(c, name: str, zero_ok: bool = False):
  v = field(c, name)
  if not _is_number(v) or v < 0 or (v == 0 and not zero_ok):
    fail(name, v, "a finite number " + (">= 0" if zero_ok else "> 0"))


def unit_interval(c, name: str, *, low_open: bool = False, high_open: bool = False):
  """A finite number in [0, 1], with either end excluded on request."""
  v = field(c, name)
  if (not _is_number(v) or v < 0 or v > 1 or (low_open and v == 0)
      or (high_open and v == 1)):
    fail(name, v, f"a number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


def boolean(c, name: str):
  v = field(c, name)
  if not isinstance(v, bool):
    fail(name, v, "True or False")


def parse_options(text: str, name: str = "sample.options") -> Dict[str, Any]:
  """'eta=0.5,grid=quadratic' -> {'eta': 0.5, 'grid': 'quadratic'} (values as Python literals)."""
  out: Dict[str, Any] = {}
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      raise ConfigError(f"config.{name}: item {item!r} must look like key=value.")
    k, v = item.split("=", 1)
    try:
      out[k.strip()] = ast.literal_eval(v.strip())
    except (ValueError, SyntaxError):
      out[k.strip()] = v.strip()
  return out


def parse_extra(extra, allowed_samplers) -> Tuple[Tuple[str, int], ...]:
  """("ddim:50", "dpm_solver++:20") -> (("ddim", 50), ("dpm_solver++", 20))."""
  allowed = ("a tuple of 'sampler:steps' strings, sampler one of "
             + ", ".join(repr(a) for a in allowed_samplers))
  if isinstance(extra, str) or not isinstance(extra, (tuple, list)):
    fail("sample.extra", extra, allowed)
  out = []
  for item in extra:
    name, _, steps = str(item).partition(":")
    if name not in allowed_samplers or not steps.isdigit() or int(steps) < 1:
      fail("sample.extra", extra, allowed + f" and steps an integer >= 1 (bad item {item!r})")
    out.append((name, int(steps)))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """One sampling run of a trained objective.

  Attributes:
    sampler: a name of research.diffusion.samplers, or None for an objective that samples in
      one pass (a coupling flow: objective.sampler_names is empty).
    steps: sampler steps (ignored without a sampler).
    options: the sampler's (or the one-pass sampler's) options as sorted (key, value) pairs;
      for samplers they include "denoise".
    tag: file tag of samples/<tag>.npz and figures/<tag>.png.
  """
  sampler: Optional[str]
  steps: int
  options: Tuple[Tuple[str, Any], ...] = ()
  tag: str = ""

  def kwargs(self) -> Dict[str, Any]:
    """Keyword arguments of objective.sample(params, rng, num, labels=..., **kwargs)."""
    out = dict(self.options)
    if self.sampler is not None:
      out.update(sampler=self.sampler, steps=self.steps)
    return out

  def check_options(self) -> Dict[str, Any]:
    """The options objective.check_options(options, steps) validates (sampler included)."""
    out = dict(self.options)
    if self.sampler is not None:
      out["sampler"] = self.sampler
    return out


def sample_requests(config, sampler_names) -> Tuple[SampleRequest, ...]:
  """The main sampling run of config.sample, then each sample.extra "sampler:steps" run.

  `sampler_names` is objective.sampler_names: empty for an objective that samples in one pass
  (it then gets one request with sample.options only, and sample.extra does not apply).
  """
  s = config.sample
  options = parse_options(s.options)
  if not sampler_names:
    return (SampleRequest(None, int(s.steps), tuple(sorted(options.items())),
                          s.tag or "flow"),)
  options.setdefault("denoise", s.denoise)
  main = SampleRequest(s.sampler, int(s.steps), tuple(sorted(options.items())),
                       s.tag or f"{s.sampler}_{s.steps}")
  extra = tuple(SampleRequest(name, steps, (("denoise", s.denoise),), f"{name}_{steps}")
                for name, steps in parse_extra(s.extra, tuple(sampler_names)))
  return (main,) + extra


def check_sample_requests(config, objective) -> None:
  """Each run of config.sample against the objective's own option list (ConfigError if not)."""
  for req in sample_requests(config, objective.sampler_names):
    try:
      objective.check_options(req.check_options(), req.steps)
    except ValueError as e:
      where = f"config.sample.options={config.sample.options!r}"
      if objective.sampler_names:
        where += (f" / config.sample.extra={tuple(config.sample.extra)!r} is not allowed "
                  f"with config.sample.sampler={config.sample.sampler!r}")
      else:
        where += " is not allowed"
      raise ConfigError(f"{where}: {e}") from None


# --- command-line overrides: --config.a.b=value ---------------------------------------------------

def _dotted_fields(c, prefix="") -> list:
  out = []
  for k in c.keys():
    v = c[k]
    if hasattr(v, "keys") and not isinstance(v, dict):
      out += _dotted_fields(v, f"{prefix}{k}.")
    else:
      out.append(f"{prefix}{k}")
  return out


def _close(name: str, names) -> str:
  import difflib
  near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
  return f" Did you mean {' or '.join(repr('config.' + n) for n in near)}?" if near else ""


def _convert(name: str, current, text: str):
  """The override `text` as the type of the field's current value, or ConfigError."""
  def bad(allowed):
    raise ConfigError(f"--config.{name}={text!r} is not allowed: {allowed}.")

  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    bad("True or False")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      bad("an integer")
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      bad("a number")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    bad(f"a Python literal like its default {current!r}")
  if isinstance(current, (tuple, list)):
    if isinstance(value, list):
      value = tuple(value)
    if not isinstance(value, tuple):
      bad(f"a tuple, e.g. {tuple(current)!r} (write one item as '(x,)')")
  return value


def split_overrides(argv) -> Tuple[list, list]:
  """(argv without --config.* overrides, [(field, text), ...]) in command-line order."""
  rest, overrides = [], []
  for arg in argv:
    m = arg.lstrip("-") if arg.startswith("--config.") or arg.startswith("-config.") else None
    if m is None:
      rest.append(arg)
      continue
    key, eq, text = m[len("config."):].partition("=")
    overrides.append((key, text if eq else "true"))
  return rest, overrides


def apply_overrides(config, overrides) -> None:
  """Sets each (dotted field, text) on the (locked) config; an unknown field or a value of the
  wrong type raises ConfigError naming it, with close matches for a misspelt field."""
  fields = _dotted_fields(config)
  for key, text in overrides:
    node, parts = config, key.split(".")
    for part in parts[:-1]:
      if part not in node or not hasattr(node[part], "keys"):
        raise ConfigError(f"--config.{key}: config has no field {key!r}.{_close(key, fields)}")
      node = node[part]
    if parts[-1] not in node:
      raise ConfigError(f"--config.{key}: config has no field {key!r}.{_close(key, fields)}")
    current = node[parts[-1]]
    if hasattr(current, "keys"):
      raise ConfigError(f"--config.{key} is a group of fields; set one of them, e.g. "
                        f"--config.{key}.{next(iter(current.keys()))}=...")
    value = _convert(key, current, text)
    try:
      with config.ignore_type():
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"--config.{key}={text!r} is not allowed: {e}.") from None


def load_config(path_arg: str, overrides: Optional[Dict[str, Any]] = None, root: str = ""):
  """The config of `file.py[:variant]` (relative to `root`) with {dotted field: value} set;
  for scripts that build a run without the command line (benchmarks, test workers)."""
  import importlib.util
  import os
  path, _, variant = path_arg.partition(":")
  spec = importlib.util.spec_from_file_location("config_file", os.path.join(root, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
