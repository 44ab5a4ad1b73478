"""Entry point: `python -m experiments.main --config=configs/X.py[:variant] --workdir=DIR --mode=M`.

Deliberately thin (as flax's examples/imagenet/main.py): it parses flags, validates the config
before anything is compiled, sets debug switches, and calls one library-style function per mode.
Everything it calls is importable and testable without flags.
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/quickstart.py or configs/x.py:variant.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and figures.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate", "sweep"],
                  "train: train (resuming) then sample + evaluate; sample: draw samples from the "
                  "latest checkpoint; evaluate: sample metrics (+ likelihood where available); "
                  "sweep: compare samplers x steps on the latest checkpoint.")
flags.DEFINE_bool("debug", False, "Disable jit and enable NaN checks so pdb/breakpoint() work "
                  "inside models (slow).")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str, mode: str = "train", debug: bool = False):
  """Runs one mode. Validation happens first, so a bad config fails before any compile."""
  from experiments import validate
  validate.validate(config, mode)
  import jax
  if debug:
    jax.config.update("jax_disable_jit", True)
    jax.config.update("jax_debug_nans", True)
    logging.warning("--debug: jit disabled, NaN checks on.")
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":
    from experiments import train, sample
    state = train.train(config, workdir)
    if config.guidance.kind != "none":
      from experiments import guided
      return guided.guided_sample_and_evaluate(config, workdir, state)
    metrics = sample.sample_and_evaluate(config, workdir, state)
    if config.objective != "flow":
      for name, steps in validate.parse_extra(config.sample.extra, _samplers()):
        sample.sample_and_evaluate(sample.with_sampler(config, name, steps), workdir, state)
    return metrics
  if mode == "sample":
    from experiments import sample
    return sample.sample_and_evaluate(config, workdir)
  if mode == "evaluate":
    from experiments import evaluate
    return evaluate.evaluate(config, workdir)
  if mode == "sweep":
    from experiments import sweep
    return sweep.sweep(config, workdir)
  raise ValueError(f"--mode={mode!r}; allowed: train, sample, evaluate, sweep.")


def _samplers():
  from research.diffusion import samplers
  return tuple(samplers.available())


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
  from experiments.validate import ConfigError
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.debug)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
