"""--mode=evaluate: sample metrics of the latest checkpoint, plus test log-likelihood where the
objective provides one (flows: exact; diffusion: probability-flow ODE, see research.diffusion.likelihood)."""
from __future__ import annotations

from typing import Dict

from experiments import sample as sample_lib


def evaluate(config, workdir: str) -> Dict[str, float]:
  return sample_lib.sample_and_evaluate(config, workdir)
