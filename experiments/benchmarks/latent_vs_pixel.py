"""Latent diffusion (8x8x4 latents + decode) vs a pixel-space UNet on the same 32x32x3 shapes:
training steps/s, sampling wall time at the same sampler, NFE and number of samples, and
fd_shapes of those samples, in one process.

  python -m experiments.benchmarks.latent_vs_pixel --latent_workdir=/tmp/ldm \
      --pixel_workdir=/tmp/pixel [--num=500] [--sampler=dpm_solver++] [--steps=20] \
      [--scales=1,5]

The latent side is the trained model of a finished configs/latent/shapes_ldm.py job
(--latent_workdir). The pixel side is configs/images/shapes_ddpm.py:small,conditional
(class-conditional on the shape label), trained in --pixel_workdir (e.g. for the same
training time as both latent stages: `--config.train.steps=N`); `--pixel_train_steps=N` reads
that run's config the same way. Without --pixel_workdir the pixel UNet is timed at
initialisation (the weights do not change the time) and no fd_shapes is computed for it.

For each CFG weight in --scales (1 = unguided: one network call per NFE; w != 1: one call on
the doubled batch) each side samples --num images once to compile, then once timed; the timed
samples give fd_shapes (against the train split, as every run's metrics). Training speed is
--train_steps steps of each model's own train step (batch 64 latent, 128 pixel) after a
warm-up. Prints a table and writes results/latent/latent_vs_pixel.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from configs.common import override
from configs.images import shapes_ddpm
from configs.latent import shapes_ldm
from experiments import builders
from experiments import data as data_lib
from experiments import sample as sample_lib
from experiments import state as state_lib
from experiments.options import SampleRequest
from research.diffusion import guidance, samplers

RESULTS = os.path.join(os.path.dirname(__file__), "results", "latent")


def _timed(fn):
  """(result, seconds) of fn() after one untimed call that compiles it."""
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def _train_rate(config, objective, spec, steps: int) -> float:
  """Steps per second of the model's own train step (fresh state, `steps` distinct batches)."""
  state = state_lib.create_state(config, objective, spec, jax.random.PRNGKey(0))
  _, schedule = state_lib.optimizer(config)
  step = state_lib.make_train_step(objective, schedule)
  batches = data_lib.train_batches(config, spec, 0)
  data = [next(batches) for _ in range(steps + 1)]
  rng = jax.random.PRNGKey(1)
  state, m = step(state, data[0], rng)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in data[1:]:
    state, m = step(state, b, rng)
  jax.block_until_ready((state, m))
  return steps / (time.perf_counter() - t0)


def to_markdown(out) -> str:
  rows = ["| w | latent s | pixel s | pixel / latent | latent `fd_shapes` | pixel `fd_shapes` |",
          "|---|---|---|---|---|---|"]
  for w in out["scales"]:
    r = out[f"w{w:g}"]
    fd = lambda k: "-" if r.get(k) is None else f"{r[k]:.3f}"
    rows.append(f"| {w:g} | {r['latent_seconds']:.1f} | {r['pixel_seconds']:.1f} | "
                f"{r['pixel_over_latent']:.1f}x | {fd('latent_fd_shapes')} | "
                f"{fd('pixel_fd_shapes')} |")
  return "\n".join(rows)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--latent_workdir", required=True)
  p.add_argument("--pixel_workdir", default="")
  p.add_argument("--pixel_train_steps", type=int, default=0,
                 help="train.steps the pixel run was trained with (0: the config's)")
  p.add_argument("--num", type=int, default=500)
  p.add_argument("--sampler", default="dpm_solver++")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--scales", default="1", help="comma-separated CFG weights, e.g. 1,5")
  p.add_argument("--train_steps", type=int, default=20)
  a = p.parse_args()
  scales = tuple(float(s) for s in a.scales.split(","))
  request = SampleRequest(a.sampler, a.steps, (("denoise", True),))
  rng = jax.random.PRNGKey(0)
  out = {"num": a.num, "sampler": a.sampler, "steps": a.steps, "scales": scales,
         "device": str(jax.devices()[0]), "latent_workdir": a.latent_workdir,
         "pixel_workdir": a.pixel_workdir}

  lc = override(shapes_ldm.get_config(), **{"sample.batch_size": a.num})
  spec = data_lib.build_data_spec(lc)
  lobj = builders.build_objective(lc, spec, a.latent_workdir)
  lstate = state_lib.restore_trained(lc, a.latent_workdir, lobj, spec)
  prompts = sample_lib.sample_prompts(override(lc, **{"sample.num_samples": a.num}), lobj)
  pc = override(shapes_ddpm.get_config("small,conditional"), **{"sample.batch_size": a.num})
  if a.pixel_train_steps:
    pc = override(pc, **{"train.steps": a.pixel_train_steps})
  pspec = data_lib.build_data_spec(pc)
  pobj = builders.build_objective(pc, pspec)
  if a.pixel_workdir:
    pstate = state_lib.restore_trained(pc, a.pixel_workdir, pobj, pspec)
    out["pixel_step"] = int(pstate.step)
  else:
    pstate = state_lib.create_state(pc, pobj, pspec, rng)
  out["latent_step"] = int(lstate.step)
  # The pixel labels cycle through the shapes (the test captions' shapes are near uniform).
  labels = np.arange(a.num, dtype=np.int32) % pspec.num_classes
  n_params = lambda s: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.params))
  out["latent_params"], out["pixel_params"] = n_params(lstate), n_params(pstate)

  out["latent_train_steps_per_sec"] = _train_rate(lc, lobj, spec, a.train_steps)
  out["pixel_train_steps_per_sec"] = _train_rate(pc, pobj, pspec, a.train_steps)
  print(f"training: latent {out['latent_train_steps_per_sec']:.2f} steps/s (batch "
        f"{lc.data.batch_size}), pixel {out['pixel_train_steps_per_sec']:.2f} steps/s (batch "
        f"{pc.data.batch_size})", flush=True)

  for w in scales:
    lat_x, lat = _timed(lambda: sample_lib.draw_samples(
        lc, lobj, lstate.ema_params, request, rng, a.num, prompts=prompts,
        guidance_scale=w)[0])
    if w == 1.0:
      pix_x, pix = _timed(lambda: pobj.sample(pstate.ema_params, rng, a.num, labels=labels,
                                              **request.kwargs())[0])
    else:
      score = guidance.classifier_free_guidance(
          guidance.flax_model_fn(pobj.model, pstate.ema_params), jax.numpy.asarray(labels), w,
          sde=pobj.sde, prediction=pobj.sampling_prediction, null_label=pspec.num_classes,
          sigma_data=pobj.sigma_data)
      pix_x, pix = _timed(lambda: samplers.sample(
          a.sampler, score, pobj.sde, (a.num, *pspec.dims), rng, steps=a.steps,
          denoise=True)[0])
    row = {"latent_seconds": lat, "pixel_seconds": pix, "pixel_over_latent": pix / lat}
    lm = sample_lib.sample_metrics(lc, spec, np.asarray(lat_x), None, rng)
    row["latent_fd_shapes"] = lm["fd_shapes"]
    row["fd_shapes_train_vs_test"] = lm["fd_shapes_train_vs_test"]
    if a.pixel_workdir:
      pm = sample_lib.sample_metrics(pc, pspec, np.asarray(pix_x), labels, rng)
      row["pixel_fd_shapes"] = pm["fd_shapes"]
      row["pixel_classifier_accuracy"] = pm["classifier_accuracy"]
    out[f"w{w:g}"] = row
    print(f"w={w:g}: latent {lat:.2f} s, pixel {pix:.2f} s, ratio {pix / lat:.1f}x; fd_shapes "
          f"latent {row['latent_fd_shapes']:.3f}, pixel {row.get('pixel_fd_shapes', 'n/a')}",
          flush=True)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "latent_vs_pixel.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(to_markdown(out))


if __name__ == "__main__":
  main()
