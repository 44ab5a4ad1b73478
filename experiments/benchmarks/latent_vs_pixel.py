"""Latent diffusion (8x8x4 latents + decode) vs a pixel-space UNet on the same 32x32x3 shapes:
training steps/s, sampling wall time at the same sampler, NFE and number of samples, and
fd_shapes of those samples, in one process.

  python -m experiments.benchmarks.latent_vs_pixel --latent_workdir=/tmp/ldm \
      --pixel_workdirs=/tmp/pix1,/tmp/pix4 --pixel_train_steps=160,640 [--num=500] \
      [--sampler=dpm_solver++] [--steps=20] [--scales=1,3,5]

The latent side is the trained model of a finished configs/latent/shapes_ldm.py job
(--latent_workdir). The pixel side is configs/images/shapes_ddpm.py:small,conditional
(class-conditional on the shape label), trained in each of --pixel_workdirs (e.g. for the
same training time as both latent stages: `--config.train.steps=N`), with --pixel_train_steps
their train.steps (so their configs, schedules included, are the ones they were trained
with). Without --pixel_workdirs the pixel UNet is timed at initialisation (the weights do not
change the time) and no pixel fd_shapes is computed.

For each CFG weight in --scales (1 = unguided: one network call per NFE; w != 1: one call on
the doubled batch) every model samples --num images; at the first weight the latent model and
the first pixel model are run once to compile, then once timed. Each sample set's fd_shapes is
measured against the train split, as every run's metrics are. Training speed is
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
from experiments import guided
from experiments import sample as sample_lib
from experiments import state as state_lib
from experiments.options import SampleRequest
from research.diffusion import samplers

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
  pixels = out["pixel_runs"]
  head = "| w | latent `fd_shapes` | " + " | ".join(f"pixel {p['name']} `fd_shapes`" for p in pixels)
  rows = [head + " |", "|---|---|" + "---|" * len(pixels)]
  for w in out["scales"]:
    r = out[f"w{w:g}"]
    fd = lambda v: "-" if v is None else f"{v:.3f}"
    rows.append(f"| {w:g} | {fd(r['latent_fd_shapes'])} | "
                + " | ".join(fd(r.get(f"pixel_fd_shapes_{p['name']}")) for p in pixels) + " |")
  t = out["timing"]
  rows += ["", f"sampling ({out['num']} samples, {out['sampler']} {out['steps']} steps, w = "
           f"{t['scale']:g}): latent {t['latent_seconds']:.1f} s, pixel {t['pixel_seconds']:.1f} s "
           f"-> {t['pixel_over_latent']:.1f}x; training: latent {out['latent_train_steps_per_sec']:.2f} "
           f"steps/s, pixel {out['pixel_train_steps_per_sec']:.2f} steps/s"]
  return "\n".join(rows)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--latent_workdir", required=True)
  p.add_argument("--pixel_workdirs", default="",
                 help="comma-separated trained pixel runs (none: timed at initialisation)")
  p.add_argument("--pixel_train_steps", default="",
                 help="comma-separated train.steps of those runs (their configs' schedules)")
  p.add_argument("--num", type=int, default=500)
  p.add_argument("--sampler", default="dpm_solver++")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--scales", default="1", help="comma-separated CFG weights, e.g. 1,5; the "
                 "first is timed")
  p.add_argument("--train_steps", type=int, default=20)
  a = p.parse_args()
  scales = tuple(float(s) for s in a.scales.split(","))
  workdirs = [w for w in a.pixel_workdirs.split(",") if w]
  steps = [int(s) for s in a.pixel_train_steps.split(",") if s] or [0] * len(workdirs)
  if len(steps) != len(workdirs):
    raise SystemExit("--pixel_train_steps needs one value per --pixel_workdirs entry.")
  request = SampleRequest(a.sampler, a.steps, (("denoise", True),))
  rng = jax.random.PRNGKey(0)
  out = {"num": a.num, "sampler": a.sampler, "steps": a.steps, "scales": scales,
         "device": str(jax.devices()[0]), "latent_workdir": a.latent_workdir}

  lc = override(shapes_ldm.get_config(), **{"sample.batch_size": a.num})
  spec = data_lib.build_data_spec(lc)
  lobj = builders.build_objective(lc, spec, a.latent_workdir)
  lstate = state_lib.restore_trained(lc, a.latent_workdir, lobj, spec)
  out["latent_step"] = int(lstate.step)
  prompts = sample_lib.sample_prompts(override(lc, **{"sample.num_samples": a.num}), lobj)
  pc = override(shapes_ddpm.get_config("small,conditional"), **{"sample.batch_size": a.num})
  pspec = data_lib.build_data_spec(pc)
  pobj = builders.build_objective(pc, pspec)
  pixels = []  # (name, params) of each pixel model; the first is timed
  for workdir, n in zip(workdirs, steps):
    c = override(pc, **{"train.steps": n}) if n else pc
    st = state_lib.restore_trained(c, workdir, pobj, pspec)
    pixels.append({"name": f"{int(st.step)} steps", "workdir": workdir, "step": int(st.step),
                   "params": st.ema_params})
  timing_params = pixels[0]["params"] if pixels else state_lib.create_state(
      pc, pobj, pspec, rng).ema_params
  out["pixel_runs"] = [{k: v for k, v in q.items() if k != "params"} for q in pixels]
  # The pixel labels cycle through the shapes (the test captions' shapes are near uniform).
  labels = np.arange(a.num, dtype=np.int32) % pspec.num_classes
  n_params = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  out["latent_params"], out["pixel_params"] = n_params(lstate.params), n_params(timing_params)

  out["latent_train_steps_per_sec"] = _train_rate(lc, lobj, spec, a.train_steps)
  out["pixel_train_steps_per_sec"] = _train_rate(pc, pobj, pspec, a.train_steps)
  print(f"training: latent {out['latent_train_steps_per_sec']:.2f} steps/s (batch "
        f"{lc.data.batch_size}), pixel {out['pixel_train_steps_per_sec']:.2f} steps/s (batch "
        f"{pc.data.batch_size})", flush=True)

  def latent_samples(w):
    return sample_lib.draw_samples(lc, lobj, lstate.ema_params, request, rng, a.num,
                                   prompts=prompts, guidance_scale=w)[0]

  def pixel_samples(params, w):
    if w == 1.0:
      return pobj.sample(params, rng, a.num, labels=labels, **request.kwargs())[0]
    score = guided.cfg_score_factory(pobj, params, pspec)(jax.numpy.asarray(labels), w)
    return samplers.sample(a.sampler, score, pobj.sde, (a.num, *pspec.dims), rng,
                           steps=a.steps, denoise=True)[0]

  for i, w in enumerate(scales):
    row = {}
    if i == 0:  # timed: compiled first, then one timed run each
      lat_x, lat = _timed(lambda: latent_samples(w))
      pix_x, pix = _timed(lambda: pixel_samples(timing_params, w))
      out["timing"] = {"scale": w, "latent_seconds": lat, "pixel_seconds": pix,
                       "pixel_over_latent": pix / lat}
      print(f"w={w:g}: latent {lat:.2f} s, pixel {pix:.2f} s, ratio {pix / lat:.1f}x",
            flush=True)
    else:
      lat_x, pix_x = latent_samples(w), None
    lm = sample_lib.sample_metrics(lc, spec, np.asarray(lat_x), None, rng)
    row["latent_fd_shapes"] = lm["fd_shapes"]
    row["fd_shapes_train_vs_test"] = lm["fd_shapes_train_vs_test"]
    for j, q in enumerate(pixels):
      x = pix_x if (i == 0 and j == 0) else pixel_samples(q["params"], w)
      pm = sample_lib.sample_metrics(pc, pspec, np.asarray(x), labels, rng)
      row[f"pixel_fd_shapes_{q['name']}"] = pm["fd_shapes"]
      row[f"pixel_classifier_accuracy_{q['name']}"] = pm["classifier_accuracy"]
    out[f"w{w:g}"] = row
    print(f"w={w:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "latent_vs_pixel.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(to_markdown(out))


if __name__ == "__main__":
  main()
