"""DeepSeek-V3 and LongCat-Flash against transformers' logits (committed fixtures), SSA/blend layouts, sharding."""
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_fixtures import NAMES, TOLERANCE, load, logits, rel_err

from loza_jax.config import replace
from loza_jax.model import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("impl", ["xla", "xla_dense"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, impl):
  cfg, params, tokens, ref = load(name)
  n = cfg.model.num_attention_sublayers
  out = logits(cfg, params, tokens, **{"attention.impl": impl, "attention.layer_types": ("full",) * n})
  assert out.shape == ref.shape
  assert rel_err(out, ref) <= TOLERANCE, f"{name}/{impl}: max rel err {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_dense_moe_dispatch_matches_transformers(name):
  cfg, params, tokens, ref = load(name)
  out = logits(cfg, params, tokens, **{"model.moe_impl": "dense", "attention.impl": "xla"})
  assert rel_err(out, ref) <= TOLERANCE


def test_parity_check_detects_a_missing_lora_scale():
  """Negative control: LongCat without its kv LoRA scale is measurably wrong."""
  cfg, params, tokens, ref = load("longcat_flash_tiny")
  out = logits(cfg, params, tokens, **{"model.mla_scale_kv_lora": False, "attention.impl": "xla"})
  assert rel_err(out, ref) > 100 * TOLERANCE


def test_parity_check_detects_ignored_correction_bias():
  """Negative control: dropping DeepSeek-V3's expert-score correction bias changes routing and logits."""
  cfg, params, tokens, ref = load("deepseek_v3_tiny")
  zeroed = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if "e_score_correction_bias" in jax.tree_util.keystr(p) else x, params)
  out = logits(cfg, zeroed, tokens, **{"attention.impl": "xla"})
  assert rel_err(out, ref) > 100 * TOLERANCE


@pytest.mark.parametrize("name", ["longcat_flash_tiny", "deepseek_v3_tiny"])
def test_ssa_sublayers_follow_layer_types(name):
  cfg, params, tokens, ref = load(name)
  n = cfg.model.num_attention_sublayers
  sparse = {"attention.layer_types": tuple("ssa" if i % 2 else "full" for i in range(n)),
            "attention.block_size": 4, "attention.sink_blocks": 1, "attention.local_blocks": 2,
            "attention.impl": "xla"}
  T = tokens.shape[1]
  # Sequences inside the SSA window (sink + local blocks = 12 tokens) see everything: equal to full.
  short = logits(cfg, params, tokens[:, :12], **sparse)
  assert rel_err(short, ref[:, :12]) <= TOLERANCE
  # Longer ones are sparse: differ after the window, and match the dense oracle implementation.
  long_xla = logits(cfg, params, tokens, **sparse)
  long_dense = logits(cfg, params, tokens, **{**sparse, "attention.impl": "xla_dense"})
  assert T > 12 and rel_err(long_xla[:, 12:], ref[:, 12:]) > 100 * TOLERANCE
  assert rel_err(long_xla, long_dense) <= TOLERANCE


def test_blend_alpha_one_equals_full_and_zero_equals_ssa():
  cfg, params, tokens, ref = load("longcat_flash_tiny")
  n = cfg.model.num_attention_sublayers
  common = {"attention.block_size": 4, "attention.sink_blocks": 1, "attention.local_blocks": 2,
            "attention.impl": "xla"}
  blend_cfg = replace(cfg, **{**common, "attention.layer_types": ("blend",) * n})
  init = nn.unbox(build_model(blend_cfg).init(jax.random.PRNGKey(0), jnp.asarray(tokens[:, :8]))["params"])
  alpha_paths = [k for k in traverse_util.flatten_dict(init) if k[-1] == "alpha"]
  assert len(alpha_paths) == n

  def with_alphas(value):
    flat = traverse_util.flatten_dict(params)
    flat.update({k: np.full((), value, np.float32) for k in alpha_paths})
    return traverse_util.unflatten_dict(flat)

  full = logits(blend_cfg, with_alphas(1.0), tokens)
  assert rel_err(full, ref) <= TOLERANCE
  ssa = logits(blend_cfg, with_alphas(0.0), tokens)
  ssa_ref = logits(cfg, params, tokens, **{**common, "attention.layer_types": ("ssa",) * n})
  assert rel_err(ssa, ssa_ref) <= TOLERANCE


@pytest.mark.parametrize("name", ["longcat_flash_tiny", "deepseek_v3_tiny"])
def test_remat_and_jit_give_same_logits(name):
  cfg, params, tokens, ref = load(name)
  c = replace(cfg, **{"model.remat": True, "attention.impl": "xla"})
  out = jax.jit(build_model(c).apply)({"params": params}, jnp.asarray(tokens))
  assert rel_err(out, ref) <= TOLERANCE


def test_packed_documents_match_separate_runs():
  cfg, params, tokens, _ = load("deepseek_v3_tiny")
  a, b = tokens[0, :15], tokens[1, :25]
  packed = np.concatenate([a, b])[None]
  seg = np.concatenate([np.full(15, 1), np.full(25, 2)])[None].astype(np.int32)
  model = build_model(replace(cfg, **{"attention.impl": "xla"}))
  out = np.asarray(model.apply({"params": params}, jnp.asarray(packed), jnp.asarray(seg)))
  sep_a = logits(cfg, params, a[None], **{"attention.impl": "xla"})
  sep_b = logits(cfg, params, b[None], **{"attention.impl": "xla"})
  assert rel_err(out[:, :15], sep_a) <= TOLERANCE and rel_err(out[:, 15:], sep_b) <= TOLERANCE


SHARDED_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from hf_fixtures import NAMES, load, rel_err
from loza_jax.config import replace
from loza_jax.model import build_model

# Logical axis -> mesh axis rules for a (data, fsdp, tensor) = (2, 2, 2) mesh, incl. the MoE axes.
RULES = (("batch", "data"), ("length", None), ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
         ("heads", "tensor"), ("kv_heads", "tensor"), ("q_lora", None), ("kv_lora", None), ("norm", None),
         ("experts", "data"), ("expert_mlp", "tensor"), ("act_embed", None), ("act_heads", "tensor"),
         ("act_kv_heads", "tensor"))
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
result = {"devices": jax.device_count()}
for name in NAMES:
  cfg, params, tokens, ref = load(name)
  cfg = replace(cfg, **{"attention.impl": "xla"})
  model = build_model(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(tokens))["params"])
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
  placed = jax.device_put(params, shardings)
  n_split = sum(len(a.sharding.device_set) > 1 and not a.sharding.is_fully_replicated
                for a in jax.tree_util.tree_leaves(placed))
  tok = jax.device_put(jnp.asarray(tokens), NamedSharding(mesh, P("data", None)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    out = jax.jit(lambda p, t: model.apply({"params": p}, t))(placed, tok)
  unsharded = np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray(tokens)))
  result[name] = {"vs_unsharded": rel_err(np.asarray(out), unsharded), "vs_transformers": rel_err(out, ref),
                  "sharded_params": int(n_split), "out_devices": len(out.sharding.device_set)}
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def sharded_results():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
  res = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(ROOT / "tests")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
  lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
  assert res.returncode == 0 and lines, f"sharded run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("name", NAMES)
def test_sharded_on_8_cpu_devices_matches_unsharded(sharded_results, name):
  assert sharded_results["devices"] == 8
  r = sharded_results[name]
  assert r["sharded_params"] > 10, r          # experts, projections and embeddings are really split
  assert r["out_devices"] == 8
  assert r["vs_unsharded"] <= 1e-5, r
  assert r["vs_transformers"] <= TOLERANCE, r
