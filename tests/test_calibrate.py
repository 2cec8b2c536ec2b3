"""Calibration trains α only, keeps α in [0, 1], and ranks pattern-insensitive layers lowest."""
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from loza_jax.config import load_config, replace
from loza_jax.model import build_model
from train.calibrate import calibrate, clipped_alphas
from train.checkpoint import save_model

SMALL = ["model.num_hidden_layers=4", "model.hidden_size=64", "model.intermediate_size=96",
         "model.num_attention_heads=2", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
         "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.initializer_range=0.2",
         "attention.layer_types=null", "attention.block_size=8", "attention.local_blocks=2", "attention.impl=xla",
         "data.seq_len=128", "data.retrieval_fraction=0.0", "train.batch_size=2", "train.progress=false",
         "train.log_every=5", "train.checkpoint_every=0",
         "calibrate.learning_rate=0.05", "calibrate.alpha_l1=0.05"]
PLANTED = (1, 3)


def planted_model(tmp_path):
  """Random model whose sublayers PLANTED have zero value projections: full == SSA there (both 0)."""
  cfg = load_config("configs/demo_cpu.yaml", SMALL)
  import jax.numpy as jnp
  params = jax.device_get(build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
  import flax.linen as nn
  params = nn.unbox(params)
  m = cfg.model
  for i in PLANTED:
    w = np.array(params[f"layers_{i}"]["self_attn"]["kv_b_proj"]["kernel"])
    w = w.reshape(w.shape[0], m.kv_heads, m.qk_nope_head_dim + m.v_head_dim)
    w[..., m.qk_nope_head_dim:] = 0.0
    params[f"layers_{i}"]["self_attn"]["kv_b_proj"]["kernel"] = w.reshape(w.shape[0], -1)
  save_model(tmp_path / "model", params, cfg)
  return cfg, params


@pytest.mark.parametrize("objective", ["distill", "lm"])
def test_calibration_moves_only_alpha_and_ranks_planted_lowest(tmp_path, objective):
  cfg, params = planted_model(tmp_path)
  stage = replace(cfg, **{"calibrate.steps": 40 if objective == "distill" else 20, "calibrate.objective": objective,
                          "train.run_dir": str(tmp_path / f"cal_{objective}")})
  summary, final = calibrate(stage, tmp_path / "model", return_params=True)
  flat0 = traverse_util.flatten_dict(params, sep="/")
  flat1 = traverse_util.flatten_dict(final, sep="/")
  alphas = {k: v for k, v in flat1.items() if k.endswith("alpha")}
  assert len(alphas) == 4
  assert set(flat1) - set(alphas) == set(flat0)
  for k, v in flat0.items():
    np.testing.assert_array_equal(np.asarray(flat1[k]), np.asarray(v), err_msg=k)   # bit-identical
  a = np.array([float(np.asarray(alphas[f"layers_{i}/self_attn/alpha"])) for i in range(4)])
  assert np.all((a >= 0.0) & (a <= 1.0))
  assert np.any(a < 1.0)                          # α actually trained
  np.testing.assert_allclose(a, [r["alpha"] for r in summary["alpha"]], rtol=1e-6)
  if objective == "distill":
    planted = a[list(PLANTED)]
    others = np.delete(a, list(PLANTED))
    assert planted.max() < others.min() - 0.2, a
    assert sorted(summary["ranking"][:2]) == list(PLANTED)
    assert summary["selected_ssa"] == list(PLANTED)
  out = tmp_path / f"cal_{objective}"
  written = json.loads((out / "calibration.json").read_text())
  assert written["selected_ssa"] == summary["selected_ssa"]
  assert written["trajectory"]["steps"] and len(written["trajectory"]["alpha"][0]) == 4
  assert (out / "alpha.png").stat().st_size > 1000
  assert any((out / "tb").iterdir())


def test_clipped_alphas_follow_sublayer_order_after_a_pytree_round_trip():
  """jit returns dicts with sorted keys (layers_10 before layers_2); α must stay in sublayer order."""
  flat = {f"layers_{i}": {"self_attn": {"alpha": np.float32(i / 20)}} for i in range(12)}
  np.testing.assert_allclose(np.asarray(clipped_alphas(jax.jit(lambda p: p)(flat))), np.arange(12) / 20, rtol=1e-6)
  longcat = {f"layers_{i}": {f"self_attn_{j}": {"alpha": np.float32((2 * i + j) / 30)} for j in (0, 1)}
             for i in range(6)}
  np.testing.assert_allclose(np.asarray(clipped_alphas(jax.jit(lambda p: p)(longcat))), np.arange(12) / 30,
                             rtol=1e-6)


def test_clipped_alphas_order_and_clip():
  params = {"layers_0": {"self_attn": {"alpha": np.float32(1.7)}}, "layers_1": {"self_attn": {"alpha": np.float32(-0.5)}},
            "layers_2": {"self_attn": {"alpha": np.float32(0.25)}}}
  np.testing.assert_allclose(np.asarray(clipped_alphas(params)), [1.0, 0.0, 0.25])
