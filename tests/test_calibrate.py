"""Calibration trains α only, keeps α in [0, 1], and ranks pattern-insensitive layers lowest."""
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from loza_jax.config import load_config, replace
from loza_jax.model import build_model
from loza_jax.model_dir import save_model
from train import data as data_lib
from train.calibrate import (
  alpha_separation,
  calibrate,
  calibration_config,
  clipped_alphas,
  make_calibration_loss,
  markdown,
  summarise,
  with_alphas,
)
from train.sparsify import read_calibration

SMALL = ["model.num_hidden_layers=4", "model.hidden_size=64", "model.intermediate_size=96",
         "model.num_attention_heads=2", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
         "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.initializer_range=0.2",
         "attention.layer_types=null", "attention.block_size=8", "attention.local_blocks=2", "attention.impl=xla",
         "data.seq_len=128", "data.retrieval_fraction=0.0", "data.retrieval_lengths=[]", "train.batch_size=2",
         "train.progress=false",
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
  # distill on every token of text rows; lm on the answers of retrieval tasks only
  mix = ({"calibrate.loss_mask": "all", "calibrate.retrieval_fraction": 0.0} if objective == "distill" else
         {"calibrate.loss_mask": "answer", "calibrate.retrieval_fraction": 1.0,
          "data.retrieval_tasks": ("passkey", "multikey")})
  stage = replace(cfg, **{"calibrate.steps": 40 if objective == "distill" else 20, "calibrate.objective": objective,
                          "calibrate.seq_len": 512, "train.run_dir": str(tmp_path / f"cal_{objective}"), **mix})
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
  assert written["loss_mask"] == mix["calibrate.loss_mask"]
  sep = written["separation"]
  chosen = set(written["selected_ssa"])
  assert sep["highest_ssa_alpha"] == max(a[i] for i in chosen)
  assert sep["lowest_full_alpha"] == min(a[i] for i in range(4) if i not in chosen)
  assert sep["gap"] == pytest.approx(sep["lowest_full_alpha"] - sep["highest_ssa_alpha"])
  assert "α separation at that boundary" in (out / "calibration.md").read_text()
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
  params = {"layers_0": {"self_attn": {"alpha": np.float32(1.7)}},
            "layers_1": {"self_attn": {"alpha": np.float32(-0.5)}},
            "layers_2": {"self_attn": {"alpha": np.float32(0.25)}}}
  np.testing.assert_allclose(np.asarray(clipped_alphas(params)), [1.0, 0.0, 0.25])


def _mask_setup(objective, loss_mask):
  cfg = load_config("configs/demo_cpu.yaml", SMALL + ["model.num_hidden_layers=2"])
  cal = calibration_config(replace(cfg, **{"calibrate.objective": objective, "calibrate.loss_mask": loss_mask}), cfg)
  import jax.numpy as jnp
  params = build_model(replace(cal, **{"attention.layer_types": None})).init(
      jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32))["params"]
  params = traverse_util.flatten_dict(with_alphas(params, cal), sep="/")
  params = traverse_util.unflatten_dict({k: (v * 0 + 0.3 if k.endswith("alpha") else v) for k, v in params.items()},
                                        sep="/")
  return cal, params


@pytest.mark.parametrize("objective", ["distill", "lm"])
def test_answer_mask_ignores_non_answer_tokens(objective):
  """With loss_mask=answer only answer positions count: changing later non-answer tokens leaves the loss, and
  prompt tokens that are LM targets too (data.retrieval_loss=all: loss_mask 1) are not answer positions."""
  rng = np.random.default_rng(0)
  T, answer = 64, slice(30, 38)
  tokens = rng.integers(0, 256, (1, T)).astype(np.int32)
  mask = np.ones((1, T), np.int32)
  mask[:, answer] = data_lib.ANSWER
  batch = {"tokens": tokens, "segment_ids": np.ones((1, T), np.int32), "positions": np.arange(T)[None],
           "loss_mask": mask}
  other = dict(batch, tokens=tokens.copy())
  other["tokens"][:, 40:] = (tokens[:, 40:] + 1) % 256    # only tokens after the answer change
  losses = {}
  for loss_mask in ("answer", "all"):
    cal, params = _mask_setup(objective, loss_mask)
    fn = jax.jit(make_calibration_loss(cal, objective, 0.0, loss_mask))
    l1, m1 = fn(params, batch, jax.random.PRNGKey(0))
    l2, _ = fn(params, other, jax.random.PRNGKey(0))
    losses[loss_mask] = (float(l1), float(l2))
    assert float(l1) > 0
    if loss_mask == "answer":
      assert float(m1["weight"]) == answer.stop - answer.start   # the positions that predict answer tokens
  assert losses["answer"][0] == losses["answer"][1]
  assert losses["all"][0] != losses["all"][1]
  assert losses["answer"][0] != losses["all"][0]


def test_alpha_separation_and_nan_alpha_is_an_error(tmp_path):
  sep = alpha_separation(np.array([0.9, 0.2, 0.3, 0.8]), [1, 2])
  assert sep == {"highest_ssa_alpha": 0.3, "lowest_full_alpha": 0.8, "gap": pytest.approx(0.5)}
  assert alpha_separation(np.array([0.5, 0.4]), [])["gap"] is None
  cfg = load_config("configs/demo_cpu.yaml", SMALL)
  with pytest.raises(ValueError, match=r"calibrate: α of sublayers \[2\] is not a finite number"):
    summarise(cfg, np.array([0.9, 0.2, np.nan, 0.8]), {"steps": [], "alpha": []}, "m", {})
  good = summarise(cfg, np.array([0.9, 0.2, 0.3, 0.8]), {"steps": [], "alpha": []}, "m", {})
  assert good["separation"]["gap"] == pytest.approx(0.5) and "0.500" in markdown(good)
  path = tmp_path / "calibration.json"
  path.write_text(json.dumps(good))
  assert read_calibration(path, cfg)["selected_ssa"] == [1, 2]
  good["alpha"][3]["alpha"] = float("nan")
  path.write_text(json.dumps(good))
  with pytest.raises(ValueError, match=r"calibration.json: α of sublayers \[3\] is NaN"):
    read_calibration(path, cfg)
