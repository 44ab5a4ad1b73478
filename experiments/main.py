"""Entry point: `python -m experiments.main --config=configs/X.py[:variant] --workdir=DIR --mode=M`.

Deliberately thin (as flax's examples/imagenet/main.py): it parses flags, validates the config
before anything is compiled, takes the workdir's lock, sets debug switches, and calls one
library-style function per mode. Everything it calls is importable and testable without flags.

Every anticipated failure (a bad flag, config file, variant, field or value; an unknown or
unprepared dataset; an unwritable or locked workdir; a missing or damaged checkpoint;
non-finite training or samples) ends the process with exit code 2 and one line on stderr
naming the field or path and what is allowed. The full traceback comes only with --debug or
absl's --verbosity=1 and above.
"""
from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Optional, Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import evaluate
from experiments import guided
from experiments import report
from experiments import sample
from experiments import sweep
from experiments import train
from experiments import validate
from experiments import workdir as wd
from experiments.options import (MODES, ConfigError, UserError, apply_overrides,
                                 split_overrides)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/quickstart.py or configs/x.py:variant; "
    "fields are overridden with --config.a.b=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and figures.")
flags.DEFINE_enum("mode", "train", list(MODES),
                  "train: train (resuming) then sample + evaluate; sample: draw samples from the "
                  "latest checkpoint; evaluate: sample metrics (+ likelihood where available); "
                  "sweep: compare samplers x steps on the latest checkpoint; report: write "
                  "WORKDIR/report.md (config, final metrics next to their references, figures).")
flags.DEFINE_bool("debug", False, "Disable jit and enable NaN checks so pdb/breakpoint() work "
                  "inside models (slow); show full tracebacks.")

flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0's "
                    "coordinator (every process passes the same); with --num_processes and "
                    "--process_id.")
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")
flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize() with no "
                  "arguments, where the platform discovers them (TPU pods, SLURM, ...).")

EXIT_USER_ERROR = 2


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           auto=False) -> bool:
  """Starts JAX's distributed runtime before anything touches a device; True if started.

  On CPU the processes reach each other through gloo collectives (e.g. several processes on
  127.0.0.1 for tests); on GPU/TPU through the platform's own.
  """
  given = [coordinator_address, num_processes, process_id]
  if not auto and all(v is None for v in given):
    return False
  if not auto and any(v is None for v in given):
    raise ConfigError("--coordinator_address, --num_processes and --process_id go together "
                      f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}); or "
                      "pass --distributed where the platform provides them.")
  if not auto and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} is not allowed: 0 <= process_id < "
                      f"--num_processes={num_processes}.")
  platforms = os.environ.get("JAX_PLATFORMS", "") or ""
  if platforms.startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if auto:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id)
  except (RuntimeError, ValueError) as e:
    raise ConfigError(f"jax.distributed.initialize failed: {_first_line(e)}") from None
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def run(config, workdir: str, mode: str = "train", debug: bool = False):
  """Runs one mode. Validation happens first, so a bad config fails before any compile; the
  workdir's lock is held for the whole run (a second run on it is refused)."""
  validate.validate(config, mode)
  with wd.WorkdirLock(workdir):
    if debug:
      jax.config.update("jax_disable_jit", True)
      jax.config.update("jax_debug_nans", True)
      logging.warning("--debug: jit disabled, NaN checks on.")
    if mode == "train":
      state = train.train(config, workdir)
      if config.guidance.kind != "none":
        return guided.guided_sample_and_evaluate(config, workdir, state)
      return sample.sample_all(config, workdir, state)
    if mode == "sample":
      return sample.sample_and_evaluate(config, workdir)
    if mode == "evaluate":
      return evaluate.evaluate(config, workdir)
    if mode == "sweep":
      return sweep.sweep(config, workdir)
    if mode == "report":
      return report.report(config, workdir)
  raise ConfigError(f"--mode={mode!r} is not allowed: one of {', '.join(MODES)}.")


class _QuietLibraries:
  """Drops INFO records from orbax/absl internals so our progress and results stay readable."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def _first_line(e: BaseException) -> str:
  """The message of `e` on one line; for a message that carries a formatted traceback (as
  config_flags' do), the exception line at its end."""
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  if any(l.startswith("Traceback (most recent call last)") for l in lines):
    lines = [l.split(": ", 1)[1] if ": " in l else l for l in lines[-1:]]
  return " ".join(lines) if lines else type(e).__name__


def parse_flags(argv: Sequence[str]):
  """Parses argv into FLAGS (the config loaded, --config.* overrides applied); returns
  (config, workdir, mode, debug). Raises ConfigError with one line for any bad flag."""
  rest, overrides = split_overrides(list(argv))
  FLAGS.unparse_flags()
  saved = sys.argv
  sys.argv = rest  # config_flags reads overrides from sys.argv: ours are applied below
  path = _config_arg(rest).split(":", 1)[0]
  try:
    extra = FLAGS(rest)
    if FLAGS["config"].present:
      FLAGS.config.keys()  # config_flags defers a load failure to the first access
  except flags.Error as e:
    if str(e).startswith("flag --config="):  # a bad variant or an error inside the file
      raise ConfigError(f"--config={_config_arg(rest)!r}: {_first_line(e)}") from None
    raise ConfigError(_first_line(e)) from None
  except OSError as e:
    if path and not os.path.isfile(path):
      raise ConfigError(f"--config={_config_arg(rest)!r}: no such file (a config file such "
                        "as configs/quickstart.py, optionally with :variant).") from None
    raise ConfigError(f"--config={_config_arg(rest)!r} cannot be loaded: {_first_line(e)}"
                      ) from None
  except (OSError, ValueError, KeyError, AttributeError, TypeError, SyntaxError,
          ImportError) as e:
    # config_flags reports a missing file, a bad variant or a broken config file like this.
    raise ConfigError(f"--config={_config_arg(rest)!r} cannot be loaded: {_first_line(e)}"
                      ) from None
  finally:
    sys.argv = saved
  if len(extra) > 1:
    raise ConfigError(f"unexpected arguments {extra[1:]}; every setting is a --flag.")
  for name in ("config", "workdir"):
    if getattr(FLAGS, name) is None:
      raise ConfigError(f"--{name} is required (python -m experiments.main --help).")
  if FLAGS["verbosity"].using_default_value:
    FLAGS.verbosity = 0  # INFO, as absl's app.run does
  config = FLAGS.config
  apply_overrides(config, overrides)
  return config, FLAGS.workdir, FLAGS.mode, FLAGS.debug


def _config_arg(argv) -> str:
  for a in argv:
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return ""


def cli(argv: Optional[Sequence[str]] = None) -> int:
  """The command line: returns the exit code (0, or 2 with one line on stderr)."""
  argv = list(sys.argv if argv is None else argv)
  app.define_help_flags()
  logging.use_absl_handler()
  for h in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
    h.addFilter(_QuietLibraries())
  debug = "--debug" in argv
  try:
    config, workdir, mode, debug = parse_flags(argv)
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.distributed)
    run(config, workdir, mode, debug)
  except UserError as e:
    if debug or logging.get_verbosity() > 0:
      raise
    sys.stderr.write(f"error: {_first_line(e)}\n")
    return EXIT_USER_ERROR
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(cli())
