"""A class-conditional diffusion model on the labelled 8-Gaussian ring, sampled with guidance.

Trained with label dropout (p_uncond) so one network is both the conditional and the
unconditional model; after training every class is sampled at every guidance scale
(experiments/guided.py), with samples/<tag>.npz holding the requested labels.

  python -m experiments.main --config=configs/toy/ring_guided.py --workdir=/tmp/rg_cfg
  python -m experiments.main --config=configs/toy/ring_guided.py:kind=classifier \
      --workdir=/tmp/rg_cg
  python -m experiments.main --config=configs/toy/ring_guided.py:tiny --workdir=/tmp/rg_tiny

Results (H200, both samplers): experiments/benchmarks/results/guidance.md.
"""
from configs import quickstart
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, kind="cfg")
  c = quickstart.get_config("tiny" if arg.tiny else None)
  c.data.conditional = True
  c.diffusion.p_uncond = 0.2              # label dropout: trains the null-label model
  c.guidance.kind = arg.kind              # cfg | classifier
  c.guidance.scales = (0.0, 1.0, 2.0, 3.0, 5.0)
  c.guidance.samples_per_class = 1000     # x 8 classes per scale
  c.guidance.classifier_steps = 2000
  c.sample.batch_size = 8000              # one sampler call per scale
  if arg.tiny:
    c.guidance.scales = (0.0, 3.0)
    c.guidance.samples_per_class = 16
    c.guidance.classifier_steps = 10
    c.guidance.classifier_hidden = 16
    c.guidance.classifier_depth = 1
    c.sample.batch_size = 128
  return c
