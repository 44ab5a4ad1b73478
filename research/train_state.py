"""TrainState: params, EMA params, optimizer state and step, as one flax struct.

Callables (the optimizer) are static fields, so the whole state is a pytree that can be
donated to a jitted step and saved by orbax.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  step: jnp.ndarray          # [] int32
  params: Any
  ema_params: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  ema_decay: float = struct.field(pytree_node=False, default=0.999)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, ema_decay: float = 0.999):
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params), tx=tx,
               ema_decay=ema_decay)

  def apply_gradients(self, grads) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    d = self.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, self.ema_params, params)
    return self.replace(step=self.step + 1, params=params, ema_params=ema, opt_state=opt_state)


SCHEDULES = ("cosine", "constant")  # learning-rate schedules of make_optimizer


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int,
                   weight_decay: float = 0.0, grad_clip: float = 1.0, b1: float = 0.9,
                   b2: float = 0.999, schedule: str = "cosine"):
  """AdamW with linear warmup then cosine decay (or a constant rate), and global-norm clipping.

  Returns:
    (optax transformation, learning-rate schedule) - the schedule is logged as a metric.
  """
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  if schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=learning_rate * 0.01)
  elif schedule == "constant":
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
         optax.constant_schedule(learning_rate)], [warmup_steps])
  else:
    raise ValueError(f"schedule={schedule!r} is not allowed; allowed: "
                     + ", ".join(map(repr, SCHEDULES)) + ".")
  # The clipping transform is always there (max norm inf when grad_clip <= 0, which leaves
  # every finite gradient unchanged), so toggling grad_clip keeps the optimizer state's
  # structure and a run can resume with it changed.
  max_norm = grad_clip if grad_clip and grad_clip > 0 else float("inf")
  return optax.chain(optax.clip_by_global_norm(max_norm),
                     optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)), lr
