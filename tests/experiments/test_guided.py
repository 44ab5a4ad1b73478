"""Guided sampling end to end on the tiny ring_guided config: the workdir contract per scale,
metrics, the noise-conditional classifier's training and checkpoint, and config errors."""
import math
import os

import jax
import numpy as np
import pytest

from configs.common import override
from configs.toy import ring_guided
from experiments import builders
from experiments import data as data_lib
from experiments import guided
from experiments import train as train_lib
from experiments import validate
from experiments import workdir as wd


def _config(arg="tiny", **over):
  return override(ring_guided.get_config(arg), **over)


def _fresh_state(config, workdir):
  """An untrained model's state (guided sampling of a workdir needs a checkpoint)."""
  spec = data_lib.build_data_spec(config)
  state, ckpt = train_lib.restore_or_create(config, workdir, builders.build_objective(config, spec),
                                            spec)
  ckpt.close()
  return state


def test_cfg_then_classifier_guidance_tiny(tmp_path):
  """On an untrained tiny model (the training loop is tested in test_end_to_end; the sample
  quality of guidance against exact scores in tests/diffusion/test_guidance.py)."""
  workdir = str(tmp_path)
  c = _config()
  results = guided.guided_sample_and_evaluate(c, workdir, _fresh_state(c, workdir))
  k, n = 8, c.guidance.samples_per_class
  want_labels = np.repeat(np.arange(k), n)
  tags = [guided.scale_tag(c, s) for s in c.guidance.scales]
  assert sorted(results) == sorted(tags) == ["cfg_w0_ddpm_20", "cfg_w3_ddpm_20"]
  for tag in tags:
    data = np.load(tmp_path / "samples" / f"{tag}.npz")
    assert data["samples"].shape == (k * n, 2) and data["samples"].dtype == np.float32
    np.testing.assert_array_equal(data["labels"], want_labels)
    assert (tmp_path / "figures" / f"{tag}.png").stat().st_size > 1000
    m = results[tag]
    assert m["nfe"] == c.sample.steps + 1  # 20 steps + the final denoising step
    assert 0.0 <= m["accuracy"] <= 1.0 and m["std_ratio"] > 0
  assert (tmp_path / "figures" / "guidance_cfg.png").exists()
  rows = [r for r in wd.read_metrics(workdir) if r["split"] == "guidance"]
  assert [(r["step"], r["scale"]) for r in rows] == [(0, 0.0), (0, 3.0)]
  for key in ("accuracy", "std_ratio", "nfe", "tag", "kind"):
    assert all(key in r for r in rows), key

  # Classifier guidance: trains the classifier first, checkpoints it under
  # WORKDIR/classifier/, logs its loss beside the exact (Bayes) posterior's on the same batch.
  cc = _config("tiny,kind=classifier", **{"guidance.classifier_steps": 40,
                                          "guidance.classifier_learning_rate": 1e-2})
  validate.validate(cc)
  guided.guided_sample_and_evaluate(cc, workdir, _fresh_state(cc, workdir))
  ck = wd.Checkpointer(os.path.join(workdir, guided.CLASSIFIER_DIR))
  assert ck.latest_step() == 40
  ck.close()
  clf = [r for r in wd.read_metrics(workdir) if r["split"] == "classifier"]
  assert [r["step"] for r in clf] == [5 * i for i in range(1, 9)]
  # It learns: from log K (the zero-initialised head is uniform) towards the Bayes loss.
  assert clf[-1]["loss"] < math.log(k) - 0.2
  assert all(r["loss_bayes"] < math.log(k) for r in clf)
  for tag in ("classifier_s0_ddpm_20", "classifier_s3_ddpm_20"):
    data = np.load(tmp_path / "samples" / f"{tag}.npz")
    np.testing.assert_array_equal(data["labels"], want_labels)
  # s = 0 is the base (null-label) score alone, i.e. CFG at w = 0: the same samples.
  np.testing.assert_allclose(
      np.load(tmp_path / "samples" / "classifier_s0_ddpm_20.npz")["samples"],
      np.load(tmp_path / "samples" / "cfg_w0_ddpm_20.npz")["samples"], rtol=1e-4, atol=1e-4)
  # A finished classifier is restored, not retrained.
  spec = data_lib.build_data_spec(cc)
  sde = builders.build_sde(cc)
  _, params = guided.train_classifier(cc, workdir, spec, sde)
  assert len([r for r in wd.read_metrics(workdir) if r["split"] == "classifier"]) == len(clf)
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("over,field", [
    ({"guidance.scales": (1.0, -1.0)}, "guidance.scales"),
    ({"guidance.scales": ()}, "guidance.scales"),
    ({"guidance.samples_per_class": 0}, "guidance.samples_per_class"),
    ({"guidance.kind": "classifier", "guidance.classifier_base": "both"},
     "guidance.classifier_base"),
    ({"guidance.kind": "classifier", "guidance.classifier_steps": 0},
     "guidance.classifier_steps"),
    ({"guidance.kind": "classifier", "diffusion.p_uncond": 0.0}, "guidance.classifier_base"),
    ({"data.name": "swissroll"}, "guidance.kind"),
    ({"guidance.kind": "cfg", "diffusion.p_uncond": 0.0}, "diffusion.p_uncond"),
])
def test_bad_guidance_config_fails_naming_the_field(over, field):
  with pytest.raises(validate.ConfigError, match=f"config.{field}="):
    validate.validate(_config(**over))


def test_classifier_guidance_on_images_raises_the_requested_class_accuracy():
  """Image classifier guidance end to end at the library level, where the answer is known:
  images [8, 8, 1] from a 3-class Gaussian mixture (each class one Gaussian in pixel space),
  the exact unconditional score as the base, and the image noise-conditional classifier that
  guided.build_classifier makes for image data (the UNet-encoder Classifier with a time
  embedding), trained by ClassifierObjective's loss on x_t. Guidance at s = 3 must put far
  more samples in the requested class (judged by the Bayes assignment) than s = 0 (1/3)."""
  import jax.numpy as jnp
  import optax
  from research.diffusion import analytic, guidance, samplers
  from research.diffusion import sde as sde_lib
  rng = np.random.default_rng(0)
  means = rng.choice([-0.6, 0.6], size=(3, 64)).astype(np.float32)
  gmm = analytic.GaussianMixture(means, np.full(3, 0.3, np.float32))
  sde = sde_lib.get_sde("vp")
  c = override(ring_guided.get_config("tiny"), **{"guidance.classifier_hidden": 8,
                                                   "guidance.classifier_depth": 1,
                                                   "model.ch_mult": (1, 2)})
  spec = type("Spec", (), {"kind": "image", "num_classes": 3})()
  module = guided.build_classifier(c, spec)
  assert type(module).__name__ == "Classifier" and module.time_embedding
  objective = guided.ClassifierObjective(module, sde)
  key = jax.random.PRNGKey(0)

  def batch(k):
    kk, kx = jax.random.split(k)
    labels = jax.random.randint(kk, (128,), 0, 3)
    x = gmm.means[labels] + 0.3 * jax.random.normal(kx, (128, 64))
    return {"x": x.reshape(128, 8, 8, 1), "label": labels}

  params = objective.init(key, batch(key))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, k):
    kb, kl = jax.random.split(k)
    grads = jax.grad(lambda p: objective.loss(p, batch(kb), kl)[0])(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  for i in range(80):
    params, opt = step(params, opt, jax.random.fold_in(key, i))
  base = gmm.score_fn(sde)

  def image_score(x, t):  # the exact mixture score, on images
    return base(x.reshape(x.shape[0], -1), t).reshape(x.shape)

  logits_fn = guidance.flax_classifier_fn(module, params, sde)
  labels = jnp.repeat(jnp.arange(3), 60)
  acc = {}
  for s in (0.0, 3.0):
    score = guidance.classifier_guidance(image_score, logits_fn, labels, s)
    x, _ = samplers.sample("ddim", score, sde, (180, 8, 8, 1), jax.random.PRNGKey(1), steps=15)
    acc[s] = float(jnp.mean(gmm.assign(x.reshape(180, -1)) == labels))
  print("accuracy by guidance scale:", acc)
  assert abs(acc[0.0] - 1 / 3) < 0.15, acc
  assert acc[3.0] > acc[0.0] + 0.4, acc
