"""Samplers on the exact GMM score: the issue's numbers on small cases, NFE, compilation.

Sample counts are the smallest that keep each bound several standard errors away from the
expected value (noted per test); all seeds are fixed.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import analytic, samplers
from research.diffusion import sde as sde_lib

VP, SUBVP, VE, EDM = (sde_lib.get_sde(n) for n in ("vp", "subvp", "ve", "edm"))
RING2 = analytic.GaussianMixture.ring(num_modes=8, radius=4.0, std=0.1, dim=2)
RING16 = analytic.GaussianMixture.ring(num_modes=8, radius=4.0, std=0.1, dim=16)
ALL = ["ddim", "ddpm", "dpm_solver++", "euler_maruyama", "heun", "ode_adaptive", "ode_euler",
       "pc"]


def _quality(gmm, name, sde, n, seed=0, **kw):
  x, info = samplers.sample(name, gmm.score_fn(sde), sde, (n, gmm.dim),
                            jax.random.PRNGKey(seed), **kw)
  ref = gmm.sample(jax.random.PRNGKey(1000 + seed), n)
  return analytic.sample_quality(gmm, x, ref), info


def test_registry_and_errors():
  assert samplers.available() == ALL
  with pytest.raises(KeyError, match="ddim, ddpm, dpm_solver"):
    samplers.sample("ddpmm", RING2.score_fn(VP), VP, (4, 2), jax.random.PRNGKey(0), steps=3)
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['etaa'\].*'eta'"):
    samplers.sample("ddim", RING2.score_fn(VP), VP, (4, 2), jax.random.PRNGKey(0), steps=3,
                    etaa=1.0)
  with pytest.raises(ValueError, match="grid='cosine'.*'uniform', 'quadratic', 'logsnr', 'edm'"):
    samplers.sample("ddim", RING2.score_fn(VP), VP, (4, 2), jax.random.PRNGKey(0), steps=3,
                    grid="cosine")
  with pytest.raises(ValueError, match="steps"):
    samplers.sample("ddim", RING2.score_fn(VP), VP, (4, 2), jax.random.PRNGKey(0), steps=0)
  with pytest.raises(ValueError, match="sde"):
    samplers.sample("ddim", RING2.score_fn(VP), "vp", (4, 2), jax.random.PRNGKey(0), steps=3)
  with pytest.raises(ValueError, match="snr"):
    samplers.sample("pc", RING2.score_fn(VP), VP, (4, 2), jax.random.PRNGKey(0), steps=3, snr=-1.)


@pytest.mark.parametrize("kind", samplers.GRIDS)
@pytest.mark.parametrize("sde", [VP, VE], ids=["vp", "ve"])
def test_time_grids(kind, sde):
  t = np.asarray(samplers.time_grid(sde, 10, kind))
  assert t.shape == (11,) and t[0] == sde.T and abs(t[-1] - sde.eps) < 1e-9
  assert np.all(np.diff(t) < 0)
  if kind == "logsnr":
    np.testing.assert_allclose(np.diff(np.asarray(sde.logsnr(t))), np.diff(sde.logsnr(t))[0],
                               rtol=2e-3)


def test_ode_adaptive_nfe_matches_a_counted_run():
  calls = []
  exact = RING2.score_fn(VP)

  def counted(x, t):  # host callback per evaluation: test only
    jax.debug.callback(lambda: calls.append(1))
    return exact(x, t)
  x, info = samplers.sample("ode_adaptive", counted, VP, (16, 2), jax.random.PRNGKey(0),
                            steps=500, rtol=1e-3, atol=1e-3)
  x.block_until_ready()
  assert info["nfe"] == len(calls) > 0
  assert info["num_steps"] == info["num_accepted_steps"] + info["num_rejected_steps"]
  assert info["num_rejected_steps"] > 0  # rejected steps are paid for too
  with pytest.raises(RuntimeError, match="max_steps"):
    samplers.sample("ode_adaptive", exact, VP, (16, 2), jax.random.PRNGKey(0), steps=3)


def test_compiled_once_per_shape_and_steps_without_host_round_trips():
  """Image-shaped batches [B, H, W] work too; the mixture lives on the flattened H * W."""
  shape = (5, 2, 3)
  gmm = analytic.GaussianMixture.ring(num_modes=8, radius=4.0, std=0.1, dim=6)
  # The jitted sampler of one (name, sde, shape, steps, options); its cache counts traces.
  jitted = lambda fn, steps: samplers._prepare("dpm_solver++", fn, VP, shape, steps, {})
  assert jitted(gmm.score_fn(VP), 6)._cache_size() == 0
  x, _ = samplers.sample("dpm_solver++", gmm.score_fn(VP), VP, shape, jax.random.PRNGKey(0),
                         steps=6)
  assert x.shape == shape and bool(jnp.all(jnp.isfinite(x)))
  # A new mixture (new Partial leaves) and a new key: no retrace, no implicit transfer.
  other = analytic.GaussianMixture.ring(num_modes=8, radius=3.0, std=0.2, dim=6)
  fn, rng = other.score_fn(VP), jax.random.PRNGKey(1)
  with jax.transfer_guard("disallow"):
    samplers.sample("dpm_solver++", fn, VP, shape, rng, steps=6)
  assert jitted(fn, 6)._cache_size() == 1
  assert jitted(fn, 7)._cache_size() == 0
  samplers.sample("dpm_solver++", fn, VP, shape, rng, steps=7)  # new steps: one more trace
  assert jitted(fn, 7)._cache_size() == 1 and jitted(fn, 6)._cache_size() == 1
  # The loop is a single scan in the program, not unrolled per step.
  jaxpr = jax.make_jaxpr(lambda r: samplers.get("dpm_solver++").run(
      fn, VP, shape, r, 6, order=2, grid="logsnr", rho=7.0, lower_order_final="auto",
      denoise=False))(rng)
  assert "scan" in str(jaxpr)


CASES = {  # name: (steps, options, expected NFE)
    "ddpm": (200, {"grid": "quadratic"}, 200),
    "ddim": (100, {"grid": "quadratic", "denoise": True}, 101),
    "euler_maruyama": (400, {"grid": "quadratic"}, 400),
    "pc": (150, {"grid": "quadratic", "corrector_steps": 2}, 450),
    "ode_euler": (100, {"grid": "logsnr"}, 100),
    "heun": (30, {"S_churn": 5.0, "S_min": 0.05, "S_max": 2.0}, 60),
    "dpm_solver++": (30, {"order": 3}, 30),
    "ode_adaptive": (1000, {"rtol": 1e-4, "atol": 1e-4}, None),
}


@pytest.mark.parametrize("sde,names", [(VP, ALL), (SUBVP, ALL), (VE, ALL),
                                       (EDM, ["ddim", "heun"])],
                         ids=["vp", "subvp", "ve", "edm"])
def test_every_sampler_samples_the_ring(sde, names):
  """Every sampler on every SDE: modes found with the right weights, within-mode std within
  12% and NFE as counted (n = 1000: mode_tv noise ~ 0.03, std-ratio noise ~ 1.6%; the loose
  bound covers the coarse stochastic samplers at these small step counts; measured worst:
  std 0.912 for ode_euler on VE, mode_tv 0.063 for euler_maruyama on VE)."""
  for name in names:
    steps, opts, nfe = CASES[name]
    if sde is EDM and opts.get("grid") == "quadratic":
      # t is the noise level on [0.002, 80] there: t-quadratic steps are far too coarse at
      # the data end, so the fixed-grid samplers take EDM's own sigma^(1/7) grid.
      opts = dict(opts, grid="edm")
    q, info = _quality(RING2, name, sde, 1000, steps=steps, **opts)
    assert q["nonfinite"] == 0 and q["mode_tv"] < 0.08, (name, q)
    assert abs(q["std_ratio"] - 1) < 0.12, (name, q)
    assert nfe is None or info["nfe"] == nfe, (name, info)


def test_known_equivalences():
  """DDIM with eta = 1 is DDPM's ancestral step (same noise draws), and DPM-Solver++ of
  order 1 is DDIM with eta = 0 (Lu et al. 2022, Sec. 4)."""
  fn, rng, shape = RING2.score_fn(VE), jax.random.PRNGKey(4), (64, 2)
  a, _ = samplers.sample("ddpm", fn, VE, shape, rng, steps=20, grid="logsnr")
  b, _ = samplers.sample("ddim", fn, VE, shape, rng, steps=20, grid="logsnr", eta=1.0)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  c, _ = samplers.sample("ddim", fn, VE, shape, rng, steps=20, grid="logsnr")
  d, _ = samplers.sample("dpm_solver++", fn, VE, shape, rng, steps=20, order=1)
  np.testing.assert_allclose(c, d, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(a - c))) > 0.1  # eta matters


def test_ddpm_variance_matches_gaussian_recursion():
  """On one Gaussian N(0, 0.1^2 I), ancestral sampling is linear: its output variance follows
  a scalar recursion exactly, which separates the 'posterior' (beta tilde) and 'forward'
  (beta) variances (100 uniform steps: std ratios 0.801 and 1.141)."""
  gmm = analytic.GaussianMixture(np.zeros((1, 16)), [0.1])
  ts = np.asarray(samplers.time_grid(VP, 100, "uniform"), np.float64)

  def la2(t):
    return -(0.1 * t + 0.5 * 19.9 * t * t)
  for variance in ("posterior", "forward"):
    v = 1.0
    for t, s in zip(ts[:-1], ts[1:]):
      at2, as2 = math.exp(la2(t)), math.exp(la2(s))
      ats2, sts2 = at2 / as2, (1 - at2) - at2 / as2 * (1 - as2)
      c = (1 - sts2 / (at2 * 0.01 + 1 - at2)) / math.sqrt(ats2)
      v = c * c * v + (sts2 * (1 - as2) / (1 - at2) if variance == "posterior" else sts2)
    x, _ = samplers.sample("ddpm", gmm.score_fn(VP), VP, (2000, 16), jax.random.PRNGKey(3),
                           steps=100, variance=variance)
    ratio = float(jnp.std(x)) / math.sqrt(v)
    assert abs(ratio - 1) < 4 / math.sqrt(2 * x.size), (variance, ratio)


def test_ddpm_1000_steps_matches_data():
  """Issue: ddpm at 1000 steps, |gap| <= 0.05 nats in 2-D and std ratio within 1% in 2-D and
  16-D. Holds on the quadratic time grid (DDIM paper); DDPM's uniform grid gives 0.97 with
  the posterior variance (see the benchmark) because the beta-tilde deficit piles up where
  sigma_t << the data's 0.1 std. n = 16000 (2-D): gap se 0.011, std se 0.4%; the 16-D
  std is pooled over 3000 x 16 coordinates (se 0.3%). Expected std ratio ~0.999."""
  q2, info = _quality(RING2, "ddpm", VP, 16000, steps=1000, grid="quadratic")
  assert info["nfe"] == 1000
  assert abs(q2["gap"]) <= 0.05 and abs(q2["std_ratio"] - 1) <= 0.01, q2
  q16, _ = _quality(RING16, "ddpm", VP, 3000, steps=1000, grid="quadratic")
  assert abs(q16["std_ratio"] - 1) <= 0.01, q16


def test_best_sampler_at_most_25_nfe():
  """Issue: the best sampler at <= 25 NFE has |gap| <= 0.15 and |std ratio - 1| <= 0.03 in
  2-D and 16-D. DPM-Solver++(2M), log-SNR grid, first-order final step, final denoising:
  16 NFE. Expected (n = 20000): 2-D +0.004 / 1.000, 16-D +0.07 / 0.996 (the benchmark has
  the same variant passing at 20 NFE too); here n = 20000 as well (cheap at 16 NFE): 16-D
  gap se 0.028."""
  for gmm in (RING2, RING16):
    q, info = _quality(gmm, "dpm_solver++", VP, 20000, steps=15, lower_order_final=True,
                       denoise=True)
    assert info["nfe"] == 16
    assert abs(q["gap"]) <= 0.15 and abs(q["std_ratio"] - 1) <= 0.03, (gmm.dim, q)


def test_deterministic_samplers_converge_at_their_order():
  """Issue: from the same noise, against ode_adaptive at rtol = atol = 1e-6, doubling the
  steps cuts the error by >= 1.7x (ode_euler) and >= 3x (heun, dpm_solver++ 2M) in the
  asymptotic range (80 -> 160 steps; measured 2.0x, 3.5x, 3.3x)."""
  n, fn, rng = 128, RING2.score_fn(VP), jax.random.PRNGKey(11)
  ref, _ = samplers.sample("ode_adaptive", fn, VP, (n, 2), rng, steps=4096, rtol=1e-6,
                           atol=1e-6)
  for name, factor in (("ode_euler", 1.7), ("heun", 3.0), ("dpm_solver++", 3.0)):
    errs = [float(jnp.sqrt(jnp.mean((samplers.sample(name, fn, VP, (n, 2), rng,
                                                     steps=s)[0] - ref)**2)))
            for s in (80, 160)]
    assert errs[0] / errs[1] >= factor, (name, errs)


@pytest.mark.parametrize("sde", [VP, sde_lib.VESDE()], ids=["vp", "ve"])
def test_heun_churn_outside_its_sigma_range_equals_no_churn_bit_for_bit(sde):
  """S_churn > 0 with [S_min, S_max] beyond every sigma of the grid churns no step."""
  fn = RING2.score_fn(sde)
  rng = jax.random.PRNGKey(7)
  base, _ = samplers.sample("heun", fn, sde, (64, 2), rng, steps=18)
  far = 10.0 * float(sde.edm_sigma(sde.T))
  churned, _ = samplers.sample("heun", fn, sde, (64, 2), rng, steps=18, S_churn=40.0,
                               S_min=far, S_max=far)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(churned))
  inside, _ = samplers.sample("heun", fn, sde, (64, 2), rng, steps=18, S_churn=40.0)
  assert not np.array_equal(np.asarray(base), np.asarray(inside))  # and churn does act


@pytest.mark.parametrize("name,options", [
    ("ddpm", {}), ("ddim", {"denoise": True}), ("euler_maruyama", {}), ("ode_euler", {}),
    ("heun", {}), ("heun", {"denoise": True}), ("pc", {}), ("pc", {"corrector_steps": 2}),
    ("pc", {"corrector": "none"}), ("dpm_solver++", {"order": 3, "denoise": True})])
def test_expected_nfe_is_what_the_sampler_spends(name, options):
  """samplers.expected_nfe / steps_for_nfe (what sweeps align cells by) against info['nfe']."""
  sde = sde_lib.get_sde("vp")
  score = analytic.GaussianMixture.ring().score_fn(sde)
  for steps in (3, 7):
    _, info = samplers.sample(name, score, sde, (4, 2), jax.random.PRNGKey(0), steps=steps,
                              **options)
    assert samplers.expected_nfe(name, steps, **options) == info["nfe"]
  budget = 12
  steps = samplers.steps_for_nfe(name, budget, **options)
  assert samplers.expected_nfe(name, steps, **options) <= budget
  assert samplers.expected_nfe(name, steps + 1, **options) > budget
  assert samplers.expected_nfe("ode_adaptive", 10) is None
  assert samplers.steps_for_nfe("ode_adaptive", 10) is None


@pytest.mark.parametrize("sde", [VP, VE], ids=["vp", "ve"])
def test_time_quadratic_grid_is_the_official_dpm_solver_one(sde):
  """'time_quadratic': sqrt(t) equally spaced (DPM-Solver's skip_type), against float64 numpy;
  'quadratic' (ours, t - eps quadratic in i/N) is a different grid."""
  for steps in (3, 10, 50):
    ref = np.linspace(np.sqrt(float(sde.T)), np.sqrt(float(sde.eps)), steps + 1)**2
    t = np.asarray(samplers.time_grid(sde, steps, "time_quadratic"))
    np.testing.assert_allclose(t, ref, rtol=1e-6, atol=0)
    ours = np.asarray(samplers.time_grid(sde, steps, "quadratic"))
    assert np.max(np.abs(ours - ref)) > 1e-4
  # Every sampler taking `grid` accepts it (resolve: no compile); one runs on it.
  for name in ("ddpm", "ddim", "euler_maruyama", "pc", "ode_euler", "heun", "dpm_solver++"):
    assert samplers.get(name).resolve({"grid": "time_quadratic"}, VP, 4)["grid"] \
        == "time_quadratic"
  x, _ = samplers.sample("ddim", RING2.score_fn(VP), VP, (8, 2), jax.random.PRNGKey(0), steps=4,
                         grid="time_quadratic")
  assert bool(jnp.all(jnp.isfinite(x)))


def test_lower_order_final_threshold_lowers_exactly_below_it():
  """lower_order_final='auto' lowers the final order for steps < lower_order_final_below
  (15 by default, diffusers; 10 the official DPM-Solver), bit for bit True below, False at or
  above it; the lowering itself changes the result."""
  fn, rng = RING2.score_fn(VP), jax.random.PRNGKey(3)
  run = lambda steps, **kw: np.asarray(samplers.sample("dpm_solver++", fn, VP, (64, 2), rng,
                                                       steps=steps, order=3, **kw)[0])
  for steps in (9, 12):  # below both thresholds; between 10 and 15
    low, high = run(steps, lower_order_final=True), run(steps, lower_order_final=False)
    assert not np.array_equal(low, high)
    for below in (10, 15):
      auto = run(steps, lower_order_final="auto", lower_order_final_below=below)
      np.testing.assert_array_equal(auto, low if steps < below else high)
    np.testing.assert_array_equal(run(steps), low if steps < 15 else high)  # the default
  with pytest.raises(ValueError, match="lower_order_final_below must be a positive int"):
    run(5, lower_order_final_below=0)
