"""Defaults for every experiment. Experiment files start from `get_config()` and override.

Every field has a comment; anything a config can set is validated by
experiments/validate.py before any compilation.
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0                      # master seed: params, data order and sampling derive from it

  # --- data -----------------------------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.name = "ring"                 # toy: ring | grid | checkerboard | moons | swissroll; images: digits | shapes | any TFDS name
  d.num_modes = 8                 # ring: number of Gaussians (each one a class)
  d.radius = 4.0                  # ring: radius of the circle of means
  d.std = 0.1                     # ring/grid: std of every component (per coordinate)
  d.dim = 2                       # toy: ambient dimension (ring/grid means live in the first two)
  d.batch_size = 512              # global batch size per training step
  d.data_dir = ""                 # image data: TFDS data dir ("" = ~/.cache/genjax/tfds)
  d.image_size = 0                # image data: resize to this size (0 = native)
  d.random_flip = False           # image data: random horizontal flips
  d.num_workers = 0               # image data: grain worker processes making train batches (0: in the trainer)
  d.conditional = False           # feed class labels to the model (needs a labelled dataset)
  d.captions = False              # image data: tokenized captions in every batch (caption_ids/lengths; text-conditional latent diffusion)

  # --- model ----------------------------------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.name = "mlp"                  # registered model: see research.models.available()
  m.hidden = 256                  # mlp: width
  m.depth = 4                     # mlp: residual blocks
  m.time_embedding = "sinusoidal" # sinusoidal | fourier | linear (t itself: smooth in t, for the cnf objective)
  m.dropout = 0.0                 # dropout rate inside blocks
  m.attention_impl = "auto"       # attention op implementation: auto | pallas | mosaic | pallas_tpu | triton | cudnn | xla
  m.ch = 64                       # unet: base channels
  m.ch_mult = (1, 2, 2)           # unet: channel multiplier per resolution
  m.num_res_blocks = 2            # unet: residual blocks per resolution
  m.attn_resolutions = (8,)       # unet: resolutions (in px) with self-attention
  m.num_heads = 4                 # unet: attention heads
  m.remat = False                 # unet: rematerialise each block in the backward pass (less memory, more compute)
  m.transformer_resolutions = ()  # unet (latent text conditioning): resolutions (px) with cross-attention transformer blocks
  m.transformer_depth = 1         # unet: transformer blocks per cross-attention resolution
  m.pooled_context = False        # unet (text): add the pooled caption embedding to the time embedding (SDXL)
  m.transformer_position_embedding = False  # unet (text): a fixed 2-D sin-cos position table in the transformer blocks' tokens

  # --- objective ------------------------------------------------------------------------------
  c.objective = "diffusion"       # diffusion | flow | flow_matching | cnf | latent_diffusion
  c.diffusion = df = ml_collections.ConfigDict()
  df.sde = "vp"                   # vp | subvp | ve | edm (x_t = x_0 + t noise, t in [sigma_min, sigma_max])
  df.beta_min = 0.1               # vp/subvp: beta(t) at t=0
  df.beta_max = 20.0              # vp/subvp: beta(t) at t=1
  df.schedule = "linear"          # vp/subvp noise schedule: linear (beta_min..beta_max) | cosine | scaled_linear
  df.sigma_min = 0.01             # ve/edm: smallest noise level (EDM: 0.002)
  df.sigma_max = 50.0             # ve/edm: largest noise level (EDM: 80)
  df.loss = "ddpm"                # ddpm | dsm | v | edm
  df.prediction = "eps"           # what the network predicts: eps | x0 | v | score
  df.weighting = "uniform"        # dsm loss weighting: uniform | likelihood
  df.sigma_data = 0.5             # edm loss: data std of the preconditioning (EDM: 0.5 for [-1, 1] images)
  df.p_mean = -1.2                # edm loss: ln(sigma) ~ N(p_mean, p_std^2) in training (EDM's values)
  df.p_std = 1.2                  # edm loss: see p_mean
  df.p_uncond = 0.0               # label dropout rate (trains the unconditional model for CFG)

  # --- optimisation ---------------------------------------------------------------------------
  c.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 1e-3          # peak learning rate
  o.schedule = "cosine"           # cosine (warmup then cosine decay to 1%) | constant (after warmup)
  o.warmup_steps = 200            # linear warmup steps
  o.weight_decay = 0.0            # AdamW decoupled weight decay
  o.grad_clip = 1.0               # global-norm clipping (0 disables)
  o.b1 = 0.9                      # Adam beta1
  o.b2 = 0.999                    # Adam beta2
  o.ema_decay = 0.999             # EMA of parameters, used for sampling and evaluation

  # --- training loop --------------------------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.steps = 5000                  # total optimisation steps
  t.log_every = 100               # metrics to metrics.jsonl (and NaN check) every N steps
  t.ckpt_every = 1000             # checkpoint every N steps (and at the end)
  t.keep_ckpts = 3                # checkpoints kept on disk
  t.progress = True               # tqdm progress bar on stderr
  t.compute_dtype = "float32"     # float32 | bfloat16: activations and attention (params and optimizer stay float32)

  # --- where a run is watched (experiments/summaries.py) ------------------------------------------
  c.log = lg = ml_collections.ConfigDict()
  lg.tensorboard = True           # mirror metrics.jsonl into WORKDIR/tensorboard/<split>/ (tensorboardX event files; sample figures as images)
  lg.wandb = False                # also log to Weights & Biases (needs `pip install wandb`; never a hard dependency)
  lg.wandb_project = "genjax"     # wandb: project name
  lg.wandb_mode = "offline"       # wandb: offline (no network; `wandb sync` later) | online

  # --- devices (experiments/mesh.py) ------------------------------------------------------------
  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1                    # data-parallel axis size (-1 = the devices the other axis leaves)
  ms.fsdp = 1                     # fully-sharded axis: the batch AND each state array's largest divisible dim

  # --- sampling (after training, and --mode=sample) ---------------------------------------------
  c.sample = s = ml_collections.ConfigDict()
  s.sampler = "ddpm"              # see research.diffusion.samplers.available()
  s.steps = 1000                  # sampler steps (solver NFE depends on the sampler)
  s.num_samples = 10000           # samples drawn for the saved .npz and the metrics
  s.batch_size = 10000            # samples drawn per device call
  s.denoise = True                # final denoising step (Tweedie) at t = eps
  s.options = ""                  # sampler-specific options "k=v,k=v" (e.g. "eta=0.5,grid=quadratic")
  s.use_ema = True                # sample with the EMA parameters
  s.tag = ""                      # file tag for samples/<tag>.npz ("" = "<sampler>_<steps>")
  s.extra = ()                    # --mode=train: more "sampler:steps" runs after the main one, e.g. ("ddim:50", "dpm_solver++:20")
  s.prompts = ()                  # text-conditional models: prompts to sample, e.g. ('large red circle at centre',); () = the test split's captions
  s.per_prompt = 1                # samples per prompt of sample.prompts
  s.guidance_scale = 1.0          # latent diffusion: CFG weight w of the main sampling run (1 = conditional, no guidance)

  # --- evaluation -------------------------------------------------------------------------------
  c.eval = e = ml_collections.ConfigDict()
  e.num_reference = 10000         # fresh data samples the sample metrics compare against
  e.num_projections = 256         # sliced Wasserstein: random projections
  e.inception_weights = ""        # images: standard FID from pytorch-fid Inception weights as .npz (experiments/convert_inception_weights.py); "" = off
  e.likelihood = lk = ml_collections.ConfigDict()  # --mode=evaluate: test NLL via the probability-flow ODE
  lk.enabled = True               # compute the test likelihood in --mode=evaluate
  lk.num_examples = 2000          # toy: fresh test samples; images: first N of the test split (0 = all)
  lk.batch_size = 500             # examples per ODE solve (the batch shares the adaptive step size)
  lk.estimator = "auto"           # auto (exact trace for D <= 32, else hutchinson) | exact | hutchinson
  lk.num_probes = 1               # hutchinson: probes per example, averaged
  lk.probe = "rademacher"         # hutchinson: rademacher | gaussian
  lk.rtol = 1e-5                  # ODE solver relative tolerance
  lk.atol = 1e-5                  # ODE solver absolute tolerance
  lk.t_min = 1e-5                 # start of the ODE solve (data side)
  lk.solver = "dopri5"            # dopri5 | tsit5 (dopri5 took fewer steps in our benchmark)
  lk.split = "test"               # images: the TFDS split evaluated

  # --- guidance (conditional models; research/diffusion/guidance.py) ----------------------------
  c.guidance = g = ml_collections.ConfigDict()
  g.kind = "none"                 # none | cfg (classifier-free) | classifier (noise-conditional classifier)
  g.scales = (0.0, 1.0, 3.0)      # cfg: w (0 = unconditional, 1 = conditional); classifier: s
  g.classifier_steps = 2000       # classifier guidance: training steps of the noise-conditional classifier
  g.classifier_hidden = 128       # classifier guidance: classifier width (images: base channels, x model.ch_mult per level)
  g.classifier_depth = 3          # classifier guidance: classifier residual blocks (images: per level)
  g.classifier_learning_rate = 1e-3  # classifier guidance: peak AdamW rate (warmup, cosine decay)
  g.classifier_base = "unconditional"  # classifier guidance: score the gradient is added to: unconditional (null label; s=1 is exact Bayes) | conditional (Dhariwal & Nichol)
  g.samples_per_class = 1000      # samples drawn per class at each scale after training

  # --- flows (objective = flow) -----------------------------------------------------------------
  c.flow = f = ml_collections.ConfigDict()
  f.kind = "realnvp"              # nice | realnvp | glow | spline (RQ-spline couplings) | maf (masked autoregressive splines; vectors only)
  f.num_layers = 8                # coupling layers (per scale for image flows)
  f.hidden = 128                  # conditioner width / channels
  f.num_scales = 2                # image flows: multi-scale levels
  f.depth = 2                     # hidden layers of each MLP conditioner (toy flows)
  f.scale_bound = 2.0             # affine couplings: log-scale = scale_bound * tanh(raw / scale_bound)
  f.remat = False                 # rematerialise each coupling in the backward pass (less memory, ~30% slower)
  f.actnorm = "auto"              # ActNorm before every step: auto (on for image flows, off for vector flows: README "Flows") | on | off
  f.num_bins = 8                  # spline | maf: bins K of each rational-quadratic spline
  f.tail_bound = 5.0              # spline | maf: splines on [-B, B], the identity outside
  f.reflow_rounds = 0             # flow matching / cnf: reflow rounds after training (rectified flow; experiments/reflow.py); 0 = off
  f.reflow_pairs = 20000          # reflow: (noise, ODE(noise)) couples drawn from the previous round's model, per round
  f.reflow_steps = 5000           # reflow: training steps per round (started from the previous round's parameters)
  f.reflow_sampler = "ode_adaptive"  # reflow: the deterministic sampler that draws the couples
  f.reflow_sampler_steps = 1000   # reflow: its steps (ode_adaptive: its step limit)
  f.reflow_eval_steps = (1, 2, 4, 8)  # reflow: Euler steps at which every round's samples are measured

  # --- continuous normalizing flow by maximum likelihood (objective = cnf; research/flows/cnf.py) --
  c.cnf = cn = ml_collections.ConfigDict()  # the velocity network is config.model (mlp); vector data only
  cn.solver = "dopri5"            # training ODE solver: dopri5 | tsit5 | bosh3 | heun (adaptive or fixed) | midpoint | euler (fixed)
  cn.steps = 0                    # 0 = adaptive step size (cnf.rtol / cnf.atol), else that many fixed steps per training solve
  cn.rtol = 1e-5                  # adaptive training solve: relative tolerance
  cn.atol = 1e-5                  # adaptive training solve: absolute tolerance
  cn.max_steps = 512              # adaptive training solve: step limit (the step's solve_failed metric says when it was hit)
  cn.adjoint = "recursive_checkpoint"  # gradients: recursive_checkpoint (exact gradient of the solve, checkpointed) | backsolve (continuous adjoint, O(1) memory) | direct
  cn.probe = "gaussian"           # Hutchinson probes of the training divergence: gaussian | rademacher
  cn.num_probes = 1               # Hutchinson probes per example
  cn.kinetic_weight = 0.0         # RNODE: weight of int ||v||^2 dt (0 = off)
  cn.jacobian_weight = 0.0        # RNODE: weight of int ||dv/dx||_F^2 dt (0 = off)

  # --- latent diffusion (objective = latent_diffusion; stage 1 in WORKDIR/autoencoder) ---------
  c.latent = la = ml_collections.ConfigDict()
  la.conditioning = "text"        # text (captions through the text encoder; needs data.captions) | label (class labels; needs data.conditional)
  la.autoencoder_workdir = ""     # a finished stage 1 to reuse (its workdir); "" = train it in WORKDIR/autoencoder
  la.ch = 32                      # autoencoder: base channels
  la.ch_mult = (1, 2, 2)          # autoencoder: channel multiplier per level; f = 2**(len - 1) (4: 32x32 -> 8x8)
  la.num_res_blocks = 1           # autoencoder: ResBlocks per encoder level (decoder: + 1)
  la.z_channels = 4               # latent channels C
  la.num_heads = 1                # autoencoder: heads of the mid-block self-attention
  la.reconstruction = "l1"        # stage-1 reconstruction loss: l1 | l2
  la.kl_weight = 1e-6             # stage-1 weight of KL(q(z|x) || N(0, I))
  la.perceptual_weight = 0.0      # stage-1 weight of the perceptual distance in the fd feature network (0 = off)
  la.steps = 2000                 # stage-1 training steps
  la.batch_size = 64              # stage-1 batch size
  la.learning_rate = 1e-3         # stage-1 peak AdamW rate (warmup, cosine decay)
  la.warmup_steps = 100           # stage-1 warmup steps
  la.ema_decay = 0.999            # stage-1 EMA of the autoencoder's params (the EMA params are frozen for stage 2)
  la.scale_images = 5000          # train images whose latents give the scale factor 1 / std
  la.sample_posterior = True      # stage 2 trains on posterior samples (SD) rather than means
  la.text_width = 64              # text encoder: token feature width (the UNet's context_dim)
  la.text_depth = 2               # text encoder: transformer blocks
  la.text_heads = 2               # text encoder: attention heads

  # --- sweep (mode = sweep) ---------------------------------------------------------------------
  c.sweep = sw = ml_collections.ConfigDict()
  sw.samplers = ("ddpm", "ddim")  # samplers compared
  sw.steps = (10, 20, 50, 100)    # step counts compared (when sweep.nfe is empty)
  sw.nfe = ()                     # NFE budgets: each cell gets the most steps whose NFE fits
  sw.grid = ""                    # per-family option grids: "ddim: eta=0|0.5, grid=uniform|quadratic; heun: S_churn=0|10"
  sw.cells = ()                   # explicit extra cells: ("ddim: eta=0.3, grid=logsnr",)
  sw.seeds = (0,)                 # repeats: metrics get a mean and a 95% interval over seeds
  sw.score = "model"              # model (the latest checkpoint) | exact (toy mixtures' true score: no checkpoint)
  sw.num_samples = 0              # samples per cell (0: sample.num_samples)
  sw.guidance_scales = ()         # conditional models: CFG weights w as one more cell axis (0 unconditional, 1 conditional); () = no guidance
  sw.train = ()                   # training variants, each trained in WORKDIR/runs/<entry>/ then sampled: ("diffusion.prediction='eps'", "diffusion.prediction='v'")

  return c
