"""Entry point: `python -m experiments.main --config=configs/X.py[:variant] --workdir=DIR --mode=M`.

Deliberately thin (as flax's examples/imagenet/main.py): it parses flags, validates the config
before anything is compiled, sets debug switches, and calls one library-style function per mode.
Everything it calls is importable and testable without flags.
"""
from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import evaluate
from experiments import guided
from experiments import sample
from experiments import sweep
from experiments import train
from experiments import validate
from experiments.options import MODES, ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/quickstart.py or configs/x.py:variant.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and figures.")
flags.DEFINE_enum("mode", "train", list(MODES),
                  "train: train (resuming) then sample + evaluate; sample: draw samples from the "
                  "latest checkpoint; evaluate: sample metrics (+ likelihood where available); "
                  "sweep: compare samplers x steps on the latest checkpoint.")
flags.DEFINE_bool("debug", False, "Disable jit and enable NaN checks so pdb/breakpoint() work "
                  "inside models (slow).")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str, mode: str = "train", debug: bool = False):
  """Runs one mode. Validation happens first, so a bad config fails before any compile."""
  validate.validate(config, mode)
  if debug:
    jax.config.update("jax_disable_jit", True)
    jax.config.update("jax_debug_nans", True)
    logging.warning("--debug: jit disabled, NaN checks on.")
  os.makedirs(workdir, exist_ok=True)
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
  raise ValueError(f"--mode={mode!r}; allowed: {', '.join(MODES)}.")


class _QuietLibraries:
  """Drops INFO records from orbax/absl internals so our progress and results stay readable."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import logging as py_logging
  for h in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
    h.addFilter(_QuietLibraries())
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.debug)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
