"""Sampling wall time: latent diffusion (8x8x4 latents + decode) vs a pixel-space UNet on the
same 32x32x3 shapes, same sampler, same NFE, same number of samples.

  python -m experiments.benchmarks.latent_vs_pixel --latent_workdir=/tmp/ldm \
      [--pixel_workdir=/tmp/pixel] [--num=500] [--sampler=dpm_solver++] [--steps=20]

The latent side is the trained model of a finished configs/latent/shapes_ldm.py job
(--latent_workdir). The pixel side is configs/images/shapes_ddpm.py:small,conditional
(class-conditional); its weights do not change the time, so without --pixel_workdir it is
timed at initialisation. Both run unguided (w = 1: one network call per NFE) and, with
--guided, at CFG w = 3 (one call on the doubled batch). Each configuration is run once to
compile, then timed as the best of --repeats runs. Writes results/latent/latent_vs_pixel.json.
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
from research.diffusion import guidance

RESULTS = os.path.join(os.path.dirname(__file__), "results", "latent")


def _best(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--latent_workdir", required=True)
  p.add_argument("--pixel_workdir", default="")
  p.add_argument("--num", type=int, default=500)
  p.add_argument("--sampler", default="dpm_solver++")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--guided", action="store_true")
  a = p.parse_args()
  request = SampleRequest(a.sampler, a.steps, (("denoise", True),))
  rng = jax.random.PRNGKey(0)
  out = {"num": a.num, "sampler": a.sampler, "steps": a.steps, "device": str(jax.devices()[0])}

  lc = override(shapes_ldm.get_config(), **{"sample.batch_size": a.num})
  spec = data_lib.build_data_spec(lc)
  lobj = builders.build_objective(lc, spec, a.latent_workdir)
  lstate = state_lib.restore_trained(lc, a.latent_workdir, lobj, spec)
  prompts = sample_lib.sample_prompts(override(lc, **{"sample.num_samples": a.num}), lobj)
  pc = override(shapes_ddpm.get_config("small,conditional"), **{"sample.batch_size": a.num})
  pspec = data_lib.build_data_spec(pc)
  pobj = builders.build_objective(pc, pspec)
  if a.pixel_workdir:
    pstate = state_lib.restore_trained(pc, a.pixel_workdir, pobj, pspec)
  else:
    pstate = state_lib.create_state(pc, pobj, pspec, rng)
  labels = np.arange(a.num, dtype=np.int32) % pspec.num_classes
  n_params = lambda s: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.params))
  out["latent_params"], out["pixel_params"] = n_params(lstate), n_params(pstate)

  scales = (1.0, 3.0) if a.guided else (1.0,)
  for w in scales:
    lat = _best(lambda: sample_lib.draw_samples(lc, lobj, lstate.ema_params, request, rng,
                                                a.num, prompts=prompts,
                                                guidance_scale=w)[0], a.repeats)
    if w == 1.0:
      pix = _best(lambda: pobj.sample(pstate.ema_params, rng, a.num, labels=labels,
                                      **request.kwargs())[0], a.repeats)
    else:
      model_fn = guidance.flax_model_fn(pobj.model, pstate.ema_params)
      from research.diffusion import samplers
      score = guidance.classifier_free_guidance(
          model_fn, jax.numpy.asarray(labels), w, sde=pobj.sde,
          prediction=pobj.sampling_prediction, null_label=pspec.num_classes,
          sigma_data=pobj.sigma_data)
      pix = _best(lambda: samplers.sample(a.sampler, score, pobj.sde, (a.num, *pspec.dims),
                                          rng, steps=a.steps, denoise=True)[0], a.repeats)
    out[f"w{w:g}"] = {"latent_seconds": lat, "pixel_seconds": pix, "pixel_over_latent": pix / lat}
    print(f"w={w:g}: latent {lat:.2f} s, pixel {pix:.2f} s, ratio {pix / lat:.1f}x", flush=True)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "latent_vs_pixel.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
