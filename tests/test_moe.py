"""MoE routers and expert dispatch: numpy loop references, dense vs ragged_dot agreement, gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loza_jax import moe
from loza_jax.config import ModelConfig


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _topk(v, k):
  return list(np.argsort(-v, kind="stable")[:k])


def ref_softmax_router(logits, bias, k, scaling):
  scores = _softmax(logits.astype(np.float64))
  idx = np.array([_topk(s + b, k) for s, b in zip(scores, np.broadcast_to(bias, scores.shape))])
  return np.take_along_axis(scores, idx, -1) * scaling, idx


def ref_grouped_router(logits, bias, k, n_group, topk_group, norm, scaling):
  scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
  X = scores.shape[1]
  per = X // n_group
  ws, idxs = [], []
  for s in scores:
    choice = s + bias
    group_score = [sum(sorted(choice[g * per:(g + 1) * per])[-2:]) for g in range(n_group)]
    groups = _topk(np.array(group_score), topk_group)
    allowed = [e for e in range(X) if e // per in groups]
    idx = sorted(allowed, key=lambda e: -choice[e])[:k]
    w = s[idx]
    if norm:
      w = w / (w.sum() + 1e-20)
    ws.append(w * scaling)
    idxs.append(idx)
  return np.array(ws), np.array(idxs)


def ref_experts(x, w, idx, gate, up, down):
  """Token-by-token loop; experts with id >= X are identity."""
  X = gate.shape[0]
  out = np.zeros_like(x, dtype=np.float64)
  for t in range(x.shape[0]):
    for j, e in enumerate(idx[t]):
      if e >= X:
        y = x[t]
      else:
        g, u = x[t] @ gate[e], x[t] @ up[e]
        y = (g / (1 + np.exp(-g)) * u) @ down[e]
      out[t] += w[t, j] * y
  return out


def _sorted_pairs(w, idx):
  order = np.argsort(idx, axis=-1)
  return np.take_along_axis(w, order, -1), np.take_along_axis(idx, order, -1)


@pytest.mark.parametrize("T,X,k", [(1, 4, 1), (9, 6, 3), (33, 8, 2)])
def test_softmax_router_matches_reference(T, X, k):
  rng = np.random.default_rng(T)
  logits, bias = rng.normal(size=(T, X)).astype(np.float32), (0.1 * rng.normal(size=X)).astype(np.float32)
  w, idx = moe.softmax_topk_router(jnp.asarray(logits), jnp.asarray(bias), k, 2.5)
  w_ref, idx_ref = ref_softmax_router(logits, bias, k, 2.5)
  w, idx = _sorted_pairs(np.asarray(w), np.asarray(idx))
  w_ref, idx_ref = _sorted_pairs(w_ref, idx_ref)
  np.testing.assert_array_equal(idx, idx_ref)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5)


@pytest.mark.parametrize("n_group,topk_group,norm", [(1, 1, False), (4, 2, True), (8, 3, True), (2, 1, False)])
def test_grouped_sigmoid_router_matches_reference(n_group, topk_group, norm):
  rng = np.random.default_rng(n_group * 10 + topk_group)
  T, X, k = 17, 16, 3
  logits, bias = rng.normal(size=(T, X)).astype(np.float32), (0.2 * rng.normal(size=X)).astype(np.float32)
  w, idx = moe.grouped_sigmoid_router(jnp.asarray(logits), jnp.asarray(bias), k, n_group, topk_group, norm, 1.7)
  w_ref, idx_ref = ref_grouped_router(logits, bias, k, n_group, topk_group, norm, 1.7)
  w, idx = _sorted_pairs(np.asarray(w), np.asarray(idx))
  w_ref, idx_ref = _sorted_pairs(w_ref, idx_ref)
  np.testing.assert_array_equal(idx, idx_ref)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5)


def test_group_limit_excludes_other_groups():
  # Expert 0 has the best single score but its group's top-2 sum loses: it must not be chosen.
  logits = np.full((1, 8), -4.0, np.float32)
  logits[0, 0] = 4.0          # group 0: {0: high, 1: low}
  logits[0, [2, 3]] = 3.0     # group 1: two good experts
  _, idx = moe.grouped_sigmoid_router(jnp.asarray(logits), jnp.zeros(8), 2, 4, 1, False, 1.0)
  assert sorted(np.asarray(idx)[0].tolist()) == [2, 3]


def _expert_case(seed, T, X, Z, K, M=12, I=10, dtype=np.float32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(T, M)).astype(dtype)
  gate, up = (0.3 * rng.normal(size=(2, X, M, I))).astype(dtype)
  down = (0.3 * rng.normal(size=(X, I, M))).astype(dtype)
  idx = np.stack([rng.choice(X + Z, size=K, replace=False) for _ in range(T)]).astype(np.int32)
  w = rng.uniform(0.1, 1.0, size=(T, K)).astype(np.float32)
  return x, w, idx, gate, up, down


@pytest.mark.parametrize("impl", ["dense", "ragged"])
@pytest.mark.parametrize("T,X,Z,K", [(1, 3, 0, 1), (13, 4, 2, 3), (40, 8, 0, 2), (7, 2, 3, 4)])
def test_dispatch_matches_loop_reference(impl, T, X, Z, K):
  x, w, idx, gate, up, down = _expert_case(T + X + Z, T, X, Z, K)
  out = moe.DISPATCH[impl](*map(jnp.asarray, (x, w, idx, gate, up, down)), Z)
  ref = ref_experts(x, w, idx, gate, up, down)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_dense_and_ragged_agree_with_gradients():
  x, w, idx, gate, up, down = _expert_case(3, 29, 6, 2, 3)

  def loss(impl, x, w, gate, up, down):
    y = moe.DISPATCH[impl](x, w, jnp.asarray(idx), gate, up, down, 2)
    return jnp.sum(jnp.sin(y))

  args = tuple(map(jnp.asarray, (x, w, gate, up, down)))
  gd = jax.grad(lambda *a: loss("dense", *a), argnums=(0, 1, 2, 3, 4))(*args)
  gr = jax.grad(lambda *a: loss("ragged", *a), argnums=(0, 1, 2, 3, 4))(*args)
  for a, b in zip(gd, gr):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_ragged_bf16_close_to_fp32_and_finite():
  x, w, idx, gate, up, down = _expert_case(5, 64, 8, 0, 2, M=32, I=16)
  ref = moe.experts_ragged(*map(jnp.asarray, (x, w, idx, gate, up, down)))
  args = [jnp.asarray(a, jnp.bfloat16) for a in (x, w)] + [jnp.asarray(idx)] + \
         [jnp.asarray(a, jnp.bfloat16) for a in (gate, up, down)]
  out = moe.experts_ragged(*args)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
  assert err < 2e-2, err


@pytest.mark.parametrize("router", ["softmax", "grouped_sigmoid"])
def test_moe_module_dense_equals_ragged_under_jit(router):
  kw = dict(architecture="longcat_flash", zero_expert_num=2) if router == "softmax" else \
      dict(architecture="deepseek_v3", n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True)
  c = ModelConfig(hidden_size=16, q_lora_rank=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                  routed_scaling_factor=2.0, initializer_range=0.3, **kw)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 16))
  layer = moe.MoE(c, router)
  params = layer.init(jax.random.PRNGKey(1), x)
  out_r = jax.jit(layer.apply)(params, x)
  out_d = moe.MoE(dataclasses.replace(c, moe_impl="dense"), router).apply(params, x)
  assert float(jnp.max(jnp.abs(out_r))) > 1e-3
  np.testing.assert_allclose(np.asarray(out_r), np.asarray(out_d), rtol=1e-5, atol=1e-6)


def test_unknown_router_and_impl_raise():
  c = ModelConfig(architecture="deepseek_v3", hidden_size=16, n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=8)
  with pytest.raises(ValueError, match="router"):
    moe.MoE(c, "relu").init(jax.random.PRNGKey(0), jnp.ones((1, 2, 16)))
  with pytest.raises(ValueError, match="moe_impl"):
    ModelConfig(architecture="deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                moe_impl="loop")


@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_token_chunks_change_nothing(impl):
  """model.moe_token_chunk runs the experts on token chunks (ragged tail included): same output and grads."""
  import dataclasses

  from loza_jax.config import ModelConfig
  from loza_jax.moe import MoE
  c = ModelConfig(architecture="longcat_flash", hidden_size=16, q_lora_rank=8, n_routed_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=8, zero_expert_num=2, moe_impl=impl)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 13, 16))
  params = MoE(c, "softmax").init(jax.random.PRNGKey(0), x)
  loss = lambda cfg: (lambda p, x: jnp.sum(MoE(cfg, "softmax").apply(p, x) ** 2))
  chunked = dataclasses.replace(c, moe_token_chunk=5)
  for f in (lambda cfg: loss(cfg)(params, x), lambda cfg: jax.grad(loss(cfg), argnums=1)(params, x)):
    np.testing.assert_allclose(f(chunked), f(c), rtol=1e-5, atol=1e-6)
