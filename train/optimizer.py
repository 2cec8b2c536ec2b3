"""The optimizer every stage uses: global-norm clipping, then AdamW on a warm-up + cosine schedule."""
from __future__ import annotations

import jax
import optax

from loza_jax.config import Config


def make_schedule(cfg: Config) -> optax.Schedule:
  """Linear warmup to the peak over warmup_steps, cosine to peak * min_lr_ratio at decay_steps.

  Step s (0-based) uses the value at s + 1, so the first update is not wasted on lr = 0.
  """
  t = cfg.train
  decay = max(t.decay_steps or t.steps, 1)
  base = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, min(t.warmup_steps, decay - 1), decay,
                                            t.learning_rate * t.min_lr_ratio)
  return lambda step: base(step + 1)


def make_optimizer(cfg: Config, schedule: optax.Schedule | None = None,
                   post_update: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
  """Clipping then AdamW on `schedule` (default make_schedule(cfg)), no weight decay on vectors and
  scalars; `post_update` (e.g. a projection of the updated params) runs last."""
  t = cfg.train
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  adamw = optax.adamw(schedule or make_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw
  return tx if post_update is None else optax.chain(tx, post_update)
