"""The Linen MLA model: shapes, blend endpoints, α gradients, packed documents, dtypes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from loza_jax.config import load_config
from loza_jax.model import alpha_paths, build_model

SMALL = ["model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=96",
         "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=12",
         "attention.block_size=4", "attention.local_blocks=2", "attention.impl=xla"]


def cfg_with(types, *extra):
  return load_config("configs/demo_cpu.yaml", SMALL + [f"attention.layer_types=[{', '.join(types)}]", *extra])


def init(cfg, tokens):
  return nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"])


def set_alpha(params, value):
  flat = traverse_util.flatten_dict(params)
  flat = {k: (jnp.full_like(v, value) if k[-1] == "alpha" else v) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat)


def without_alpha(params):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] != "alpha"})


@pytest.fixture
def tokens(rng):
  return jnp.asarray(rng.integers(0, 256, (2, 40)), jnp.int32)


def test_forward_shapes_and_hidden(tokens):
  cfg = cfg_with(["full", "ssa"])
  params = init(cfg, tokens)
  model = build_model(cfg)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 40, 256) and logits.dtype == jnp.float32
  hidden = model.apply({"params": params}, tokens, return_hidden=True)
  assert hidden.shape == (2, 40, 64)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_blend_endpoints_equal_full_and_ssa(tokens, granularity):
  g = f"attention.granularity={granularity}"
  blend_cfg = cfg_with(["blend", "blend"], g)
  params = init(blend_cfg, tokens)
  assert len(alpha_paths(params)) == 2
  shapes = {p: traverse_util.flatten_dict(params)[p].shape for p in alpha_paths(params)}
  assert all(s == (() if granularity == "layer" else (4,)) for s in shapes.values())
  run = lambda cfg, p: build_model(cfg).apply({"params": p}, tokens)
  base = without_alpha(params)
  full = run(cfg_with(["full", "full"], g), base)
  ssa = run(cfg_with(["ssa", "ssa"], g), base)
  assert np.abs(np.asarray(full - ssa)).max() > 1e-4  # T=40 > (1+2)*4 keys: the patterns differ
  np.testing.assert_allclose(run(blend_cfg, set_alpha(params, 1.0)), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(blend_cfg, set_alpha(params, 0.0)), ssa, rtol=1e-5, atol=1e-5)
  # alpha is clipped to [0, 1]
  np.testing.assert_allclose(run(blend_cfg, set_alpha(params, 3.0)), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(blend_cfg, set_alpha(params, -2.0)), ssa, rtol=1e-5, atol=1e-5)


def test_alpha_gradient_is_finite_and_nonzero(tokens):
  cfg = cfg_with(["blend", "full"])
  params = set_alpha(init(cfg, tokens), 0.5)
  model = build_model(cfg)

  def loss(p):
    logits = model.apply({"params": p}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  g = jax.grad(loss)(params)
  ga = np.asarray(g["layers_0"]["self_attn"]["alpha"])
  assert np.isfinite(ga).all() and np.abs(ga).sum() > 0


def test_packed_documents_are_independent(rng):
  cfg = cfg_with(["ssa", "full"])
  a = jnp.asarray(rng.integers(0, 256, (1, 13)), jnp.int32)
  b = jnp.asarray(rng.integers(0, 256, (1, 27)), jnp.int32)
  params = init(cfg, a)
  model = build_model(cfg)
  packed = model.apply({"params": params}, jnp.concatenate([a, b], 1),
                       jnp.asarray([[1] * 13 + [2] * 27], jnp.int32))
  np.testing.assert_allclose(packed[:, 13:], model.apply({"params": params}, b), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(packed[:, :13], model.apply({"params": params}, a), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra", [["model.q_lora_rank=24"], ["model.tie_word_embeddings=false"],
                                   ["model.num_key_value_heads=2"], ["model.dtype=bfloat16"],
                                   ["model.remat=true"], ["model.rope_scaling={factor: 4.0, mscale_all_dim: 1.0}"]])
def test_variants_run(tokens, extra):
  cfg = cfg_with(["full", "ssa"], *extra)
  params = init(cfg, tokens)
  logits = build_model(cfg).apply({"params": params}, tokens)
  assert logits.shape == (2, 40, 256) and np.isfinite(np.asarray(logits)).all()
  names = set(traverse_util.flatten_dict(params))
  if "model.q_lora_rank=24" in extra:
    assert ("layers_0", "self_attn", "q_a_proj", "kernel") in names
  if "model.tie_word_embeddings=false" in extra:
    assert ("lm_head",) in names


def test_every_param_has_logical_axes(tokens):
  cfg = cfg_with(["blend", "full"], "model.q_lora_rank=24", "attention.granularity=head")
  boxed = build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == x.value.ndim
