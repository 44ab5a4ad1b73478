"""The image main job: a small UNet diffusion model on scikit-learn's 8x8 digits, on a CPU.

  python -m experiments.main --config=configs/images/digits_ddpm.py --workdir=/tmp/digits

trains, then samples with ddpm-1000 and (sample.extra) ddim-50 and dpm_solver++-19 on the same
checkpoint; fd_digits of each is in WORKDIR/metrics.jsonl. One more sampler later:
  python -m experiments.main --config=configs/images/digits_ddpm.py --workdir=/tmp/digits \
      --mode=sample --config.sample.sampler=heun --config.sample.steps=25

The digits are prepared offline on first use (from scikit-learn) under data.data_dir, and
fd_digits' feature classifier is trained once and cached there. 359 samples = the size of the
test split, so fd_digits is directly comparable with fd_digits_train_vs_test (see
research/metrics/fd.py on the 1/N bias).

Variants (`:a,b=c`): tiny (seconds; tests), conditional (class labels with label dropout for
classifier-free guidance), size=16|32 (bicubic-upsampled digits, a deeper UNet).
"""
from configs import base
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, conditional=False, size=8)
  c = base.get_config()
  c.data.name = "digits"
  c.data.image_size = arg.size if arg.size != 8 else 0
  c.data.batch_size = 128
  c.data.random_flip = False            # digits are not mirror-symmetric
  c.data.conditional = arg.conditional
  c.model.name = "unet"
  c.model.ch = 16
  c.model.ch_mult = (1, 2)              # 8 -> 4 px
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_heads = 2
  c.model.dropout = 0.0
  c.diffusion.sde = "vp"
  # v-prediction (Salimans & Ho 2022): on this small, briefly trained network it closes most of
  # the gap between the probability-flow ODE samplers and ancestral DDPM that eps-prediction
  # leaves (fd_digits of dpm_solver++-20 / ddpm-1000: 1.17 with v, 1.55 with eps; same compute).
  c.diffusion.loss = "v"
  c.diffusion.prediction = "v"
  c.diffusion.p_uncond = 0.1 if arg.conditional else 0.0
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.995             # ~200-step horizon: short runs must not average in the start
  c.train.steps = 1500
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.sample.sampler = "ddpm"
  c.sample.steps = 1000
  c.sample.num_samples = 359            # = test split size (fair vs the train-vs-test fd)
  c.sample.batch_size = 359
  # dpm_solver++ at 19 steps + the final denoising call = 20 NFE (the <= 20-NFE comparison).
  c.sample.extra = ("ddim:50", "dpm_solver++:19")
  # Classifier guidance (guidance.kind="classifier"): the noise-conditional classifier is the
  # UNet's encoder half at 16 base channels, one residual block per level.
  c.guidance.classifier_hidden = 16
  c.guidance.classifier_depth = 1
  c.guidance.classifier_steps = 1500
  c.guidance.classifier_learning_rate = 2e-3
  c.sweep.samplers = ("ddim", "dpm_solver++")
  c.sweep.steps = (20, 50)
  if arg.size != 8:
    c.model.ch_mult = (1, 2, 2) if arg.size == 16 else (1, 2, 2, 2)
    c.model.attn_resolutions = (4,)
  if arg.tiny:  # a seconds-long run for tests and smoke checks
    c.data.batch_size = 16
    c.model.ch = 8
    c.model.ch_mult = (1,)              # one level: the smallest graph (compile time dominates)
    c.model.attn_resolutions = ()
    c.train.steps = 4
    c.train.log_every = 2
    c.train.ckpt_every = 2
    c.optim.warmup_steps = 1
    c.sample.steps = 5
    c.sample.num_samples = 16
    c.sample.batch_size = 16
    c.sample.extra = ()
    c.guidance.classifier_hidden = 8
    c.guidance.classifier_steps = 4
    c.train.progress = False
  return c
