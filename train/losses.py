"""Training losses: `(params, batch, rng) -> (scalar loss, metrics)`; metrics may carry `weight`,
the number of positions averaged over (evaluation weights batches by it)."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from train import data as data_lib
from train.partition import without

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def lm_loss_terms(logits_BTV, batch: Batch, z_loss: float = 0.0):
  """Next-token CE (+ z-loss) over targets inside one document and under the loss mask; the metrics also
  give CE and greedy accuracy over retrieval answer targets alone (`answer_tokens` of them; both 0 when none):
  the answer share of a mixed batch is small, so its loss would hide whether retrieval is being learnt."""
  seg_BT, mask_BT = batch["segment_ids"], batch["loss_mask"]
  w_BT = data_lib.target_weights(seg_BT, mask_BT).astype(jnp.float32)
  a_BT = w_BT * (mask_BT[:, 1:] == data_lib.ANSWER)
  logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
  targets_BT = batch["tokens"][:, 1:]
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  ce_BT = lse_BT - jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  n = jnp.maximum(w_BT.sum(), 1.0)
  ce_mean = (ce_BT * w_BT).sum() / n
  loss = ce_mean + (z_loss * (lse_BT ** 2 * w_BT).sum() / n if z_loss else 0.0)
  n_a = jnp.maximum(a_BT.sum(), 1.0)
  right_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return loss, {"ce": ce_mean, "weight": w_BT.sum(), "answer_ce": (ce_BT * a_BT).sum() / n_a,
                "answer_acc": (right_BT * a_BT).sum() / n_a, "answer_tokens": a_BT.sum()}


def make_lm_loss(model: nn.Module, z_loss: float = 0.0) -> LossFn:
  """Language-model loss for `model` (tokens, segment_ids, positions -> logits)."""
  def loss_fn(params, batch, rng):
    del rng
    logits_BTV = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"])
    return lm_loss_terms(logits_BTV, batch, z_loss)
  return loss_fn


def make_distill_loss(student: nn.Module, teacher: nn.Module, teacher_params: Callable[[Any], Any] | None = None
                      ) -> LossFn:
  """MSE between the student's and a frozen teacher's final hidden states on non-padding tokens.

  `teacher_params(params)` picks the teacher's weights from the trained tree (default: drop `alpha`).
  """
  pick = teacher_params or (lambda p: without(p, lambda path: path.endswith("alpha")))

  def loss_fn(params, batch, rng):
    del rng
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    h_s_BTM = student.apply({"params": params}, *args, return_hidden=True).astype(jnp.float32)
    h_t_BTM = teacher.apply({"params": jax.lax.stop_gradient(pick(params))}, *args, return_hidden=True)
    w_BT1 = (batch["segment_ids"] != 0).astype(jnp.float32)[..., None]
    n = jnp.maximum(w_BT1.sum() * h_s_BTM.shape[-1], 1.0)
    mse = (((h_s_BTM - h_t_BTM.astype(jnp.float32)) ** 2) * w_BT1).sum() / n
    return mse, {"mse": mse, "weight": w_BT1.sum()}
  return loss_fn
