"""Mixture of experts: routers (LongCat-Flash softmax, DeepSeek-V3 grouped sigmoid) and expert dispatch.

Expert weights are stacked per expert: gate/up [X, M, I], down [X, I, M] (X routed experts).
LongCat-Flash adds Z zero-computation experts with ids X..X+Z-1 whose output is their input.
Two dispatches compute the same thing: `experts_dense` (every expert on every token; a small
reference for tests) and `experts_ragged` (sort the T·K token-expert assignments by expert and
run grouped matmuls with `jax.lax.ragged_dot`; memory O(T·K·max(M, I))).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from loza_jax.config import ModelConfig
from loza_jax.layers import SwiGLU, constrain, dtype_of


def softmax_topk_router(logits_TX, bias_X, top_k: int, scaling: float):
  """LongCat-Flash: softmax scores; choose top-k of score + bias; weight = score · scaling."""
  scores_TX = jax.nn.softmax(logits_TX.astype(jnp.float32), axis=-1)
  _, idx_TK = jax.lax.top_k(scores_TX + bias_X.astype(jnp.float32), top_k)
  w_TK = jnp.take_along_axis(scores_TX, idx_TK, axis=-1) * scaling
  return w_TK, idx_TK


def grouped_sigmoid_router(logits_TX, bias_X, top_k: int, n_group: int, topk_group: int,
                           norm_topk_prob: bool, scaling: float):
  """DeepSeek-V3: sigmoid scores; keep the topk_group groups with the best top-2 sums of score + bias;
  choose top-k of score + bias inside them; weight = score (renormalised if norm_topk_prob) · scaling."""
  scores_TX = jax.nn.sigmoid(logits_TX.astype(jnp.float32))
  choice_TX = scores_TX + bias_X.astype(jnp.float32)
  T, X = choice_TX.shape
  if n_group > 1:
    per_group = X // n_group
    grouped_TGE = choice_TX.reshape(T, n_group, per_group)
    group_score_TG = jax.lax.top_k(grouped_TGE, min(2, per_group))[0].sum(-1)
    _, group_idx = jax.lax.top_k(group_score_TG, topk_group)
    keep_TG = jax.nn.one_hot(group_idx, n_group, dtype=jnp.int32).sum(1) > 0
    keep_TX = jnp.repeat(keep_TG, per_group, axis=1)
    choice_TX = jnp.where(keep_TX, choice_TX, -jnp.inf)
  _, idx_TK = jax.lax.top_k(choice_TX, top_k)
  w_TK = jnp.take_along_axis(scores_TX, idx_TK, axis=-1)
  if norm_topk_prob:
    w_TK = w_TK / (w_TK.sum(-1, keepdims=True) + 1e-20)
  return w_TK * scaling, idx_TK


def _swiglu_experts(x, gate, up, down, matmul):
  h = jax.nn.silu(matmul(x, gate)) * matmul(x, up)
  return matmul(h.astype(x.dtype), down)


def experts_dense(x_TM, w_TK, idx_TK, gate_XMI, up_XMI, down_XIM, num_zero: int = 0):
  """Reference dispatch: run all X experts on all T tokens, combine with the routing weights."""
  X = gate_XMI.shape[0]
  combine_TX = jnp.einsum("tk,tkx->tx", w_TK.astype(jnp.float32),
                          jax.nn.one_hot(idx_TK, X + num_zero, dtype=jnp.float32))
  mm = lambda a, w: jnp.einsum("tm,xmi->txi", a, w, preferred_element_type=jnp.float32)
  h_TXI = jax.nn.silu(mm(x_TM, gate_XMI)) * mm(x_TM, up_XMI)
  y_TXM = jnp.einsum("txi,xim->txm", h_TXI.astype(x_TM.dtype), down_XIM, preferred_element_type=jnp.float32)
  out_TM = jnp.einsum("tx,txm->tm", combine_TX[:, :X], y_TXM)
  if num_zero:
    out_TM = out_TM + combine_TX[:, X:].sum(-1, keepdims=True) * x_TM.astype(jnp.float32)
  return out_TM.astype(x_TM.dtype)


def experts_ragged(x_TM, w_TK, idx_TK, gate_XMI, up_XMI, down_XIM, num_zero: int = 0):
  """Sort-based dispatch: group the T·K (token, expert) rows by expert, grouped matmuls via ragged_dot.

  Zero experts have the largest ids, so their rows sort last, fall outside every group (ragged_dot
  leaves them 0) and take the token itself as output.
  """
  T, K = idx_TK.shape
  X = gate_XMI.shape[0]
  flat_idx = idx_TK.reshape(T * K)
  order = jnp.argsort(flat_idx, stable=True)
  token_of_row = order // K
  x_RM = jnp.take(x_TM, token_of_row, axis=0)
  group_sizes = jnp.bincount(flat_idx, length=X + num_zero)[:X].astype(jnp.int32)
  mm = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32)
  y_RM = _swiglu_experts(x_RM, gate_XMI, up_XMI, down_XIM, mm)
  if num_zero:
    y_RM = jnp.where((jnp.take(flat_idx, order) < X)[:, None], y_RM, x_RM.astype(jnp.float32))
  y_TKM = jnp.zeros_like(y_RM).at[order].set(y_RM).reshape(T, K, -1)
  out_TM = jnp.einsum("tk,tkm->tm", w_TK.astype(jnp.float32), y_TKM)
  return out_TM.astype(x_TM.dtype)


DISPATCH = {"dense": experts_dense, "ragged": experts_ragged}


class Router(nn.Module):
  """Linear router (fp32 kernel [M, X+Z]) plus the expert-score correction bias [X+Z] (kept fp32)."""
  num_choices: int
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x_TM):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                               ("embed", None)),
                        (x_TM.shape[-1], self.num_choices), jnp.float32)
    bias = self.param("e_score_correction_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                      (self.num_choices,), jnp.float32)
    logits_TX = jnp.dot(x_TM.astype(jnp.float32), kernel.astype(jnp.float32))
    return logits_TX, bias


class Experts(nn.Module):
  """The X routed experts' stacked SwiGLU weights and the dispatch chosen by model.moe_impl."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_TM, w_TK, idx_TK):
    c = self.cfg
    X, I, M = c.n_routed_experts, c.moe_intermediate_size, x_TM.shape[-1]
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), axes)
    gate = self.param("gate_proj", init(("experts", "embed", "expert_mlp")), (X, M, I), pdt)
    up = self.param("up_proj", init(("experts", "embed", "expert_mlp")), (X, M, I), pdt)
    down = self.param("down_proj", init(("experts", "expert_mlp", "embed")), (X, I, M), pdt)
    if c.moe_impl not in DISPATCH:
      raise ValueError(f"model.moe_impl: {c.moe_impl!r} is not one of {sorted(DISPATCH)}")
    run = lambda x, w, idx: DISPATCH[c.moe_impl](x, w, idx, gate.astype(dt), up.astype(dt), down.astype(dt),
                                                 c.zero_expert_num)
    return in_chunks(run, c.moe_token_chunk, x_TM.astype(dt), w_TK, idx_TK)


def in_chunks(fn, chunk: int, *xs_T):
  """fn over token chunks of `chunk` rows (bounded memory; each chunk rematerialised in the backward).

  0 or a chunk no smaller than T runs fn once on everything.
  """
  T = xs_T[0].shape[0]
  if not chunk or T <= chunk:
    return fn(*xs_T)
  n = -(-T // chunk)
  pad = lambda x: jnp.pad(x, [(0, n * chunk - T)] + [(0, 0)] * (x.ndim - 1)).reshape(n, chunk, *x.shape[1:])
  out = jax.lax.map(jax.checkpoint(lambda args: fn(*args)), tuple(pad(x) for x in xs_T))
  return out.reshape(n * chunk, *out.shape[2:])[:T]


class MoE(nn.Module):
  """Routed experts (+ zero experts for LongCat-Flash, + shared experts for DeepSeek-V3).

  `router`: "softmax" (LongCat-Flash) or "grouped_sigmoid" (DeepSeek-V3).
  """
  cfg: ModelConfig
  router: str

  @nn.compact
  def __call__(self, x_BTM):
    c = self.cfg
    B, T, M = x_BTM.shape
    X, Z, I = c.n_routed_experts, c.zero_expert_num, c.moe_intermediate_size
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    x_TM = x_BTM.reshape(B * T, M)
    router_logits_TX, bias_X = Router(X + Z, c.initializer_range, name="router")(x_TM)
    if self.router == "softmax":
      w_TK, idx_TK = softmax_topk_router(router_logits_TX, bias_X, c.num_experts_per_tok, c.routed_scaling_factor)
    elif self.router == "grouped_sigmoid":
      w_TK, idx_TK = grouped_sigmoid_router(router_logits_TX, bias_X, c.num_experts_per_tok, c.n_group,
                                            c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
    else:
      raise ValueError(f"MoE.router must be 'softmax' or 'grouped_sigmoid', got {self.router!r}")

    out_TM = Experts(c, name="experts")(x_TM.astype(dt), w_TK, idx_TK)
    out_BTM = out_TM.reshape(B, T, M)
    if c.n_shared_experts:
      out_BTM = out_BTM + SwiGLU(I * c.n_shared_experts, dt, pdt, c.initializer_range, name="shared_experts")(x_BTM)
    return constrain(out_BTM, ("batch", "length", "act_embed"))
