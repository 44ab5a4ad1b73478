"""Latent diffusion objective: every sampler on latents, CFG as one UNet call on the doubled
batch, joint text-encoder training with caption dropout, label conditioning, clear errors.

Compiling is what costs on CPU, so the sampler sweep uses a stand-in denoiser with the UNet's
call signature (one dense layer, a time embedding and cross-attention through our op); the
real UNet is traced (jax.make_jaxpr, no compile) where the call count is checked."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import samplers
from research.diffusion import sde as sde_lib
from research.diffusion.latent import LatentDiffusionObjective
from research.models.autoencoder import AutoencoderKL, FrozenAutoencoder
from research.models.layers import MultiHeadAttention, sinusoidal_embedding
from research.models.text import TextEncoder, Tokenizer
from research.models.unet import UNet

CAPTIONS = ["small red circle at top left", "large blue square at centre"]
VP = sde_lib.get_sde("vp")


def _key(seed):
  """An rbg PRNG key: the code under test takes any key, and XLA:CPU compiles threefry's
  random draws ~10x slower (about 2 s per draw site), which would dominate these tests."""
  return jax.random.key(seed, impl="rbg")


class TinyDenoiser(nn.Module):
  """The UNet's signature at a fraction of its compile time."""
  context_dim: int = 0
  num_classes: int = 0

  @nn.compact
  def __call__(self, x, t, labels=None, train=False, context=None, context_lengths=None):
    h = nn.Dense(8)(x) + nn.Dense(8)(sinusoidal_embedding(t, 8))[:, None, None]
    if self.context_dim:
      h = h + MultiHeadAttention(num_heads=2, attention_impl="xla")(
          h, context=context, kv_lengths=context_lengths)
    if self.num_classes:
      h = h + nn.Embed(self.num_classes + 1, 8)(labels)[:, None, None]
    return nn.Dense(x.shape[-1])(nn.silu(h))


def _random(tree, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree)


@pytest.fixture(scope="module")
def parts():
  ae = AutoencoderKL(ch=4, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, out_channels=1,
                     attention_impl="xla")
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  frozen = FrozenAutoencoder(ae, _random(jax.eval_shape(ae.init, jax.random.PRNGKey(0), x)
                                         ["params"], 0, 0.2), scale_factor=0.7)
  tok = Tokenizer.from_captions(CAPTIONS)
  text = TextEncoder(vocab_size=tok.vocab_size, max_len=7, width=8, depth=1, num_heads=2,
                     attention_impl="xla")
  ids, lengths = tok.encode(CAPTIONS, 7)
  return dict(frozen=frozen, tok=tok, text=text, x=x,
              batch={"x": x, "caption_ids": ids, "caption_lengths": lengths})


def _objective(parts, unet, **kw):
  kw.setdefault("conditioning", "text")
  if kw["conditioning"] == "text":
    kw.update(text_encoder=parts["text"], tokenizer=parts["tok"])
  return LatentDiffusionObjective(parts["frozen"], unet, VP, data_shape=(8, 8, 1), **kw)


def _params(objective, batch, seed=1):
  return _random(jax.eval_shape(objective.init, jax.random.PRNGKey(0), batch), seed)


SAMPLER_STEPS = {"ode_adaptive": 200}
SAMPLER_OPTIONS = {"ode_adaptive": {"rtol": 1e-2, "atol": 1e-2}}


def test_every_sampler_samples_latents_and_decodes_images(parts):
  obj = _objective(parts, TinyDenoiser(context_dim=8), p_uncond=0.2)
  assert obj.sampler_names == tuple(samplers.available()) and obj.guidance_kinds == ("cfg",)
  assert not obj.has_likelihood and obj.data_shape == (8, 8, 1) and obj.latent_shape == (4, 4, 2)
  params = _params(obj, parts["batch"])
  assert set(params) == {"unet", "text_encoder"}
  for name in samplers.available():
    steps = SAMPLER_STEPS.get(name, 2)
    options = SAMPLER_OPTIONS.get(name, {})
    obj.check_options({"sampler": name, "guidance_scale": 2.0, **options}, steps)
    x, info = obj.sample(params, _key(3), 2, prompts=CAPTIONS, sampler=name,
                         steps=steps, guidance_scale=2.0, **options)
    assert x.shape == (2, 8, 8, 1), name
    assert np.all(np.isfinite(np.asarray(x))), name
    assert info["nfe"] >= 2, (name, info)


def _count_unet_calls(fn, *args):
  calls = []

  def interceptor(next_fun, args_, kwargs, context):
    if isinstance(context.module, UNet) and context.method_name == "__call__":
      calls.append((args_[0].shape[0], kwargs["context"].shape[0]))
    return next_fun(*args_, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.make_jaxpr(fn)(*args)  # traces, compiles nothing
  return calls


def test_text_cfg_is_one_unet_call_on_the_doubled_batch(parts):
  unet = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_heads=2,
              context_dim=8, transformer_resolutions=(4,), attention_impl="xla")
  obj = _objective(parts, unet)
  params = _params(obj, parts["batch"])
  cond, null = obj.conditions(params, 2, prompts=CAPTIONS)
  z, t = jnp.zeros((2, 4, 4, 2)), jnp.full((2,), 0.5)
  assert _count_unet_calls(obj.score_fn(params, cond, null, 3.0), z, t) == [(4, 4)]
  assert _count_unet_calls(obj.score_fn(params, cond, null, 1.0), z, t) == [(2, 2)]
  # Per-example scales take the same single call.
  assert _count_unet_calls(obj.score_fn(params, cond, null, jnp.asarray([1.0, 4.0])), z, t) == [
      (4, 4)]


def test_cfg_combines_the_conditional_and_the_empty_caption_scores(parts):
  obj = _objective(parts, TinyDenoiser(context_dim=8))
  params = _params(obj, parts["batch"])
  cond, null = obj.conditions(params, 2, prompts=CAPTIONS)
  # Strings and (ids, lengths) are the same prompts; None is the empty caption.
  same, _ = obj.conditions(params, 2, prompts=(parts["batch"]["caption_ids"],
                                               parts["batch"]["caption_lengths"]))
  np.testing.assert_array_equal(np.asarray(same[0]), np.asarray(cond[0]))
  empty, _ = obj.conditions(params, 2, prompts=None)
  np.testing.assert_array_equal(np.asarray(empty[1]), 0)
  z = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 2)), jnp.float32)
  t = jnp.asarray([0.3, 0.8])
  call = jax.jit(lambda fn: fn(z, t))
  s_c, s_u = call(obj.score_fn(params, cond)), call(obj.score_fn(params, null))
  guided = call(obj.score_fn(params, cond, null, 2.5))
  # score = -eps / sigma is affine in eps, so the eps combination is the score combination.
  np.testing.assert_allclose(guided, s_u + 2.5 * (s_c - s_u), rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(s_c - s_u)).max() > 1e-3  # the caption matters


def test_loss_trains_the_text_encoder_and_drops_captions(parts):
  obj = _objective(parts, TinyDenoiser(context_dim=8), p_uncond=0.5)
  params = _params(obj, parts["batch"])
  (loss, metrics), grads = jax.jit(jax.value_and_grad(obj.loss, has_aux=True))(
      params, parts["batch"], _key(4))
  assert np.isfinite(loss) and float(metrics["latent_std"]) > 0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["text_encoder"])) > 0
  # Caption dropout: about p_uncond of the captions become the empty caption (length 0).
  ids, lengths = np.repeat(parts["batch"]["caption_ids"], 500, 0), np.full((1000,), 6)
  d_ids, d_len = obj._dropped((jnp.asarray(ids), jnp.asarray(lengths)), _key(5))
  dropped = np.asarray(d_len) == 0
  assert 0.45 < dropped.mean() < 0.55
  assert np.all(np.asarray(d_ids)[dropped, 0] == Tokenizer.EMPTY_ID)
  np.testing.assert_array_equal(np.asarray(d_ids)[~dropped], ids[~dropped])


def test_label_conditioning(parts):
  obj = _objective(parts, TinyDenoiser(num_classes=3), conditioning="label", num_classes=3,
                   p_uncond=0.1)
  batch = {"x": parts["x"], "label": np.asarray([0, 2])}
  params = _params(obj, batch)
  assert set(params) == {"unet"}
  loss, _ = jax.jit(obj.loss)(params, batch, _key(0))
  assert np.isfinite(loss)
  x, info = obj.sample(params, _key(1), 3, labels=np.asarray([0, 1, 2]),
                       sampler="ddim", steps=3, guidance_scale=2.0)
  assert x.shape == (3, 8, 8, 1) and np.all(np.isfinite(np.asarray(x))) and info["nfe"] == 3
  cond, null = obj.conditions(params, 3)  # labels=None: the null label
  np.testing.assert_array_equal(np.asarray(cond), 3)
  np.testing.assert_array_equal(np.asarray(null), 3)
  with pytest.raises(ValueError, match="prompts apply to conditioning='text'"):
    obj.sample(params, jax.random.PRNGKey(1), 2, prompts=CAPTIONS, sampler="ddim", steps=2)


def test_bad_settings_fail_clearly(parts):
  obj = _objective(parts, TinyDenoiser(context_dim=8))
  with pytest.raises(ValueError, match="sampler='nope' is not allowed: one of 'ddim'"):
    obj.check_options({"sampler": "nope"}, 10)
  with pytest.raises(ValueError, match="guidance_scale=nan"):
    obj.check_options({"sampler": "ddim", "guidance_scale": float("nan")}, 10)
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['order'\] for sampler 'ddim'"):
    obj.check_options({"sampler": "ddim", "order": 2}, 10)
  with pytest.raises(ValueError, match=r"unknown word 'purple'.*The vocabulary"):
    obj.encode_prompts(["small purple circle at centre", ""], 2)
  with pytest.raises(ValueError, match="labels apply to conditioning='label'"):
    obj.conditions({}, 2, labels=np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="conditioning='words'"):
    _objective(parts, TinyDenoiser(context_dim=8), conditioning="words")
  with pytest.raises(ValueError, match="unet.context_dim=4 must equal text_encoder.width=8"):
    _objective(parts, TinyDenoiser(context_dim=4))
  with pytest.raises(ValueError, match="needs num_classes >= 1 equal to unet.num_classes"):
    _objective(parts, TinyDenoiser(num_classes=3), conditioning="label", num_classes=2)
  with pytest.raises(ValueError, match="divisible by f=2"):
    LatentDiffusionObjective(parts["frozen"], TinyDenoiser(context_dim=8), VP,
                             text_encoder=parts["text"], tokenizer=parts["tok"],
                             data_shape=(9, 9, 1))
