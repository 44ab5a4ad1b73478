"""A small (optionally noise-conditional) image classifier.

Uses: the feature extractor of research.metrics.fd (trained once on clean images; its
penultimate layer is the feature space of the Frechet distance), classifier guidance,
which needs log p(y | x_t, t) on noisy images (set `time_embedding` and train with an SDE),
the multi-head attribute classifier of research.metrics.adherence (`fit(..., heads=...)`,
pool="flatten"), and `perceptual_distance`, an LPIPS-style distance in a trained
classifier's activations (the optional perceptual term of the autoencoder's loss).

  model = Classifier(num_classes=10)
  params = fit(model, x, labels, rng=rng, steps=300)            # clean images
  logits, feats = model.apply({"params": params}, x, return_features=True)
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.models.layers import TimeEmbedding
from research.models.unet import GroupNorm, ResBlock, _num_groups, downsampling_trunk

POOLS = ("mean", "flatten")


class Classifier(nn.Module):
  """x [B, H, W, C] (, t [B]) -> logits [B, num_classes] (and features [B, feature_dim]).

  conv -> per level num_res_blocks ResBlocks, strided-conv downsample between levels ->
  GroupNorm-SiLU -> global mean pool -> Dense(feature_dim) = features -> SiLU -> Dense(logits).
  pool="flatten" flattens the last feature map instead of averaging it, so the features keep
  where things are (the position attribute of research.metrics.adherence needs that).
  """
  num_classes: int
  ch: int = 16                      # base channels
  ch_mult: Sequence[int] = (1, 2)   # channel multiplier per level (downsampling between)
  num_res_blocks: int = 1           # residual blocks per level
  feature_dim: int = 64             # width of the feature layer
  time_embedding: str = ""          # "": clean-image classifier; "sinusoidal" | "fourier": noisy
  dropout: float = 0.0
  pool: str = "mean"                # "mean" (translation invariant) | "flatten" (keeps position)

  @nn.compact
  def __call__(self, x, t=None, train: bool = False, return_features: bool = False):
    if x.ndim != 4:
      raise ValueError(f"classifier expects x of shape [B, H, W, C], got {x.shape}.")
    if self.num_classes < 2:
      raise ValueError(f"classifier: num_classes={self.num_classes} must be >= 2.")
    if self.pool not in POOLS:
      raise ValueError(f"classifier: pool={self.pool!r}; allowed: "
                       + ", ".join(map(repr, POOLS)) + ".")
    emb = None
    if self.time_embedding:
      if t is None:
        raise ValueError("classifier with time_embedding needs t [B] (noise-conditional).")
      emb = TimeEmbedding(4 * self.ch, self.time_embedding)(t)
    h = downsampling_trunk(x, ch=self.ch, ch_mult=self.ch_mult,
                           num_res_blocks=self.num_res_blocks, dropout=self.dropout, emb=emb,
                           train=train)
    h = nn.silu(GroupNorm(num_groups=_num_groups(h.shape[-1]))(h))
    pooled = jnp.mean(h, axis=(1, 2)) if self.pool == "mean" else h.reshape(h.shape[0], -1)
    feats = nn.Dense(self.feature_dim)(pooled)
    logits = nn.Dense(self.num_classes)(nn.silu(feats))
    return (logits, feats) if return_features else logits


def split_heads(logits, heads: Sequence[int]):
  """Logits [..., sum(heads)] -> one [..., k] block per head (a multi-head classifier is one
  Classifier with num_classes = sum(heads), each head its own softmax)."""
  if logits.shape[-1] != sum(heads):
    raise ValueError(f"logits have {logits.shape[-1]} classes, heads {tuple(heads)} sum to "
                     f"{sum(heads)}.")
  return jnp.split(logits, np.cumsum(heads)[:-1].tolist(), axis=-1)


def fit(model: Classifier, x: np.ndarray, labels: np.ndarray, *, rng: jax.Array,
        steps: int = 300, batch_size: int = 128, learning_rate: float = 2e-3, sde=None,
        random_flip: bool = False, heads: Optional[Sequence[int]] = None
        ) -> Tuple[dict, float]:
  """Trains `model` with AdamW (cosine decay) on images x [N, H, W, C] in [-1, 1].

  Args:
    model: the Classifier.
    x, labels: training images (float, [-1, 1]) and int labels [N] (with `heads`: [N, H],
      column j the class of head j).
    rng: PRNG key (init, batches, noise).
    steps, batch_size, learning_rate: optimisation settings.
    sde: when given (a noise-conditional model), each example is diffused to a uniform
      t in [sde.eps, sde.T]: x_t = alpha x + sigma noise, and the model sees (x_t, t).
    random_flip: horizontal flips as augmentation.
    heads: class counts of several heads sharing the network (model.num_classes must be
      their sum); the loss is the sum of the heads' cross-entropies.
  Returns:
    (params, mean training loss over the last 10% of steps).
  """
  if bool(model.time_embedding) != (sde is not None):
    raise ValueError("fit: pass sde exactly when the model is noise-conditional "
                     f"(time_embedding={model.time_embedding!r}, sde={sde!r}).")
  x = jnp.asarray(x, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if heads is not None:
    heads = tuple(int(k) for k in heads)
    if sum(heads) != model.num_classes or labels.shape != (x.shape[0], len(heads)):
      raise ValueError(f"fit: heads {heads} need model.num_classes={sum(heads)} (got "
                       f"{model.num_classes}) and labels [N, {len(heads)}] (got {labels.shape}).")
  n = x.shape[0]
  init_rng, data_rng = jax.random.split(rng)
  t0 = jnp.full((1,), 0.5) if sde is not None else None
  params = model.init(init_rng, x[:1], t0)["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05),
                   weight_decay=1e-4)
  opt = tx.init(params)

  def loss_fn(p, xb, yb, tb, drng):
    logits = model.apply({"params": p}, xb, tb, train=True, rngs={"dropout": drng})
    if heads is None:
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
    return sum(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lo, yb[:, j]))
               for j, lo in enumerate(split_heads(logits, heads)))

  @jax.jit
  def step(p, o, i):
    r = jax.random.fold_in(data_rng, i)
    ri, rf, rt, rn, rd = jax.random.split(r, 5)
    idx = jax.random.randint(ri, (batch_size,), 0, n)
    xb, yb = x[idx], labels[idx]
    if random_flip:
      xb = jnp.where(jax.random.bernoulli(rf, 0.5, (batch_size, 1, 1, 1)), xb[:, :, ::-1], xb)
    tb = None
    if sde is not None:
      tb = jax.random.uniform(rt, (batch_size,), minval=sde.eps, maxval=sde.T)
      alpha, sigma = sde.marginal(tb)
      xb = alpha[:, None, None, None] * xb + sigma[:, None, None, None] * jax.random.normal(
          rn, xb.shape)
    loss, g = jax.value_and_grad(loss_fn)(p, xb, yb, tb, rd)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  losses = []
  for i in range(steps):
    params, opt, loss = step(params, opt, i)
    losses.append(loss)
  tail = np.asarray(jax.device_get(losses[-max(1, steps // 10):]))
  return params, float(tail.mean())


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, x, t):
  return model.apply({"params": params}, x, t, return_features=True)


def predict(model: Classifier, params, x: np.ndarray, t: Optional[np.ndarray] = None,
            batch_size: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
  """(logits [N, K], features [N, F]) as numpy, in batches of batch_size.

  Each chunk is zero-padded to a power of two (at most batch_size) and the padding dropped,
  so calls with many different N reuse a handful of compiled shapes.
  """
  logits, feats = [], []
  for s in range(0, len(x), batch_size):
    xb = np.asarray(x[s:s + batch_size], np.float32)
    n = len(xb)
    size = min(batch_size, 1 << max(0, (n - 1).bit_length()))
    pad = ((0, size - n),) + ((0, 0),) * (xb.ndim - 1)
    tb = None if t is None else jnp.asarray(np.pad(np.asarray(t[s:s + batch_size]), pad[:1]))
    lo, fe = _apply(model, params, jnp.asarray(np.pad(xb, pad)), tb)
    logits.append(np.asarray(lo)[:n])
    feats.append(np.asarray(fe)[:n])
  return np.concatenate(logits), np.concatenate(feats)


# --- a perceptual distance on a trained classifier's activations ------------------------------


def _unit(h):
  return h * jax.lax.rsqrt(jnp.sum(jnp.square(h), axis=-1, keepdims=True) + 1e-10)


def perceptual_distance(model: Classifier, params, x, y):
  """LPIPS-style distance [B] between images x and y in a trained classifier's features.

  The output of every ResBlock is taken for both images, each position's channel vector is
  scaled to unit length, and the squared differences are averaged over positions and summed
  over channels and blocks (Zhang et al. 2018, eq. 1 with unit weights: no learned
  calibration, so no downloaded weights). Differentiable in x and y; the classifier is
  frozen (its params are gradient-stopped).
  """
  params = jax.lax.stop_gradient(params)

  def acts(images):
    _, state = model.apply({"params": params}, images, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, method: (
                               isinstance(mdl, ResBlock) and method == "__call__"))
    return jax.tree.leaves(state["intermediates"])

  total = 0.0
  for a, b in zip(acts(x), acts(y)):
    d = jnp.sum(jnp.square(_unit(a) - _unit(b)), axis=-1)          # [B, h, w]
    total = total + jnp.mean(d.reshape(d.shape[0], -1), axis=-1)
  return total


@functools.lru_cache(maxsize=None)
def _perceptual_impl(model: Classifier):
  return functools.partial(perceptual_distance, model)


def perceptual_distance_fn(model: Classifier, params):
  """perceptual_distance as fn(x, y) -> [B], a Partial over frozen params (jit-friendly), e.g.
  on research.metrics.fd's feature network: perceptual_distance_fn(net.model, net.params)."""
  return jax.tree_util.Partial(_perceptual_impl(model), params)
