"""HF import/export: CLI, bit-exact round trips, ZigZag sparsity, recorded transformers checks, clear errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from hf_fixtures import FIXTURES, NAMES, TOLERANCE, load, logits, rel_err
from safetensors.numpy import load_file, save_file

from loza_jax.config import to_dict
from loza_jax.convert import config_from_hf, config_to_hf, export_hf, import_hf, load_model, read_hf_params, write_hf
from loza_jax.convert.__main__ import main as cli

ROOT = Path(__file__).resolve().parents[1]


def _flat(params):
  return traverse_util.flatten_dict(params)


def assert_bit_exact(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), f"{'/'.join(k)} differs"


def _sparse_sets(n):
  return ["--set", "attention.layer_types=[" + ",".join("ssa" if i % 2 else "full" for i in range(n)) + "]",
          "--set", "attention.block_size=16", "--set", "attention.local_blocks=3"]


@pytest.mark.parametrize("name", NAMES)
def test_cli_import_then_forward_matches_transformers(name, tmp_path, capsys):
  assert cli(["import", "--hf", str(FIXTURES / name), "--out", str(tmp_path / "ckpt")]) == 0
  assert "GB/s" in capsys.readouterr().out
  params, cfg = load_model(tmp_path / "ckpt")
  ref_cfg, ref_params, tokens, ref = load(name)
  assert to_dict(cfg) == to_dict(ref_cfg)
  assert_bit_exact(params, ref_params)
  assert rel_err(logits(cfg, params, tokens, **{"attention.impl": "xla"}), ref) <= TOLERANCE


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sparse", [False, True])
def test_export_reimport_bit_exact(name, sparse, tmp_path):
  cfg0, _, _, _ = load(name)
  sets = _sparse_sets(cfg0.model.num_attention_sublayers) if sparse else []
  assert cli(["import", "--hf", str(FIXTURES / name), "--out", str(tmp_path / "a"), *sets]) == 0
  # A small shard limit forces several shards and exercises the index on the way back in.
  assert cli(["export", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "hf"), "--max-shard-size", "150KB"]) == 0
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and all((tmp_path / "hf" / s).is_file() for s in shards)
  assert cli(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b")]) == 0
  pa, ca = load_model(tmp_path / "a")
  pb, cb = load_model(tmp_path / "b")
  assert to_dict(ca) == to_dict(cb)
  assert_bit_exact(pa, pb)


@pytest.mark.parametrize("name", NAMES)
def test_exported_config_is_the_one_transformers_accepted(name, tmp_path):
  """export_check.json is written by tools/make_hf_fixtures.py after loading our export in transformers."""
  check = json.loads((FIXTURES / name / "export_check.json").read_text())
  for variant in ("hf_full", "hf_sparse"):
    assert check[variant]["loaded"] and check[variant]["field_differences"] == {}, check[variant]
  assert check["hf_full"]["model_loaded"] and check["hf_full"]["logits_max_rel_err_vs_fixture"] <= TOLERANCE
  cfg, params, _, _ = load(name)
  extra = ["--zero-expert-weights", "zeros"] if cfg.model.architecture == "longcat_flash" else []
  import_hf(FIXTURES / name, tmp_path / "full")
  sparse_sets = tuple(_sparse_sets(cfg.model.num_attention_sublayers)[1::2])
  import_hf(FIXTURES / name, tmp_path / "sparse", overrides=sparse_sets)
  assert cli(["export", "--ckpt", str(tmp_path / "full"), "--out", str(tmp_path / "hf_full"), *extra]) == 0
  assert cli(["export", "--ckpt", str(tmp_path / "sparse"), "--out", str(tmp_path / "hf_sparse")]) == 0
  for variant in ("hf_full", "hf_sparse"):
    ours = json.loads((tmp_path / variant / "config.json").read_text())
    recorded = json.loads((FIXTURES / name / f"exported_{variant}_config.json").read_text())
    assert ours == recorded, "exporter output changed since the transformers check; rerun tools/make_hf_fixtures.py"


def test_zigzag_sparsity_block():
  cfg, _, _, _ = load("longcat_flash_tiny")
  sparse = config_from_hf({**json.loads((FIXTURES / "longcat_flash_tiny" / "config.json").read_text()),
                           "streaming_sparse_attention": {"layer_type": "0110", "sink_size": 128,
                                                          "recent_size": 896, "sparsity": 0.5}})
  assert sparse.attention.layer_types == ("full", "ssa", "ssa", "full")
  assert (sparse.attention.block_size, sparse.attention.sink_blocks, sparse.attention.local_blocks) == (128, 1, 7)
  hf = config_to_hf(sparse)
  assert hf["streaming_sparse_attention"] == {"layer_type": "0110", "sink_size": 128, "recent_size": 896,
                                              "sparsity": 0.5}
  assert "streaming_sparse_attention" not in config_to_hf(cfg)


def test_blend_model_export_is_refused(tmp_path):
  import_hf(FIXTURES / "deepseek_v3_tiny", tmp_path / "ckpt", overrides=("attention.layer_types=[blend,full,ssa]",))
  params, _ = load_model(tmp_path / "ckpt")
  assert sum(k[-1] == "alpha" for k in _flat(params)) == 1
  with pytest.raises(ValueError, match="blend.*sparsify"):
    export_hf(tmp_path / "ckpt", tmp_path / "hf")


def test_bf16_round_trip_keeps_router_fp32(tmp_path):
  import_hf(FIXTURES / "longcat_flash_tiny", tmp_path / "a", overrides=("model.param_dtype=bfloat16",))
  params, _ = load_model(tmp_path / "a")
  flat = _flat(params)
  assert flat[("layers_0", "mlp", "router", "kernel")].dtype == np.float32
  assert flat[("layers_0", "self_attn_0", "q_a_proj", "kernel")].dtype == ml_dtypes.bfloat16
  export_hf(tmp_path / "a", tmp_path / "hf")
  tensors = {}
  for f in (tmp_path / "hf").glob("*.safetensors"):
    tensors.update(load_file(f))
  assert tensors["model.layers.0.mlp.router.classifier.weight"].dtype == np.float32
  assert tensors["model.layers.0.mlps.0.up_proj.weight"].dtype == ml_dtypes.bfloat16
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  import_hf(tmp_path / "hf", tmp_path / "b")
  assert_bit_exact(params, load_model(tmp_path / "b")[0])


def test_zero_expert_placeholders_are_written_on_request_and_skipped_on_import(tmp_path):
  cfg, params, _, _ = load("longcat_flash_tiny")
  write_hf(params, cfg, tmp_path / "omit")
  write_hf(params, cfg, tmp_path / "zeros", zero_expert_weights="zeros")
  names = lambda d: set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
  extra = names(tmp_path / "zeros") - names(tmp_path / "omit")
  assert extra == {f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in (0, 1) for e in (4, 5)
                   for p in ("gate_proj", "up_proj")}
  back, stats = read_hf_params(tmp_path / "zeros", cfg)
  assert sum(stats.skipped.values()) == len(extra)
  assert_bit_exact(back, params)


# ----------------------------------------------------------------------------------------
# Errors: each names what is wrong.


def _broken_copy(name, tmp_path, edit):
  """Copy a single-file fixture, let `edit(tensors)` change its tensors, re-save."""
  src, dst = FIXTURES / name, tmp_path / "broken"
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  tensors = load_file(src / "model.safetensors")
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return dst


def _import_error(hf_dir, tmp_path) -> str:
  with pytest.raises(ValueError) as e:
    import_hf(hf_dir, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  return str(e.value)


def test_missing_tensor_is_named(tmp_path):
  d = _broken_copy("deepseek_v3_tiny", tmp_path,
                   lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight"))
  msg = _import_error(d, tmp_path)
  assert "missing tensors (1)" in msg and "model.layers.2.mlp.experts.5.down_proj.weight" in msg


def test_extra_tensor_is_named(tmp_path):
  def edit(t):
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones(4, np.float32)
  msg = _import_error(_broken_copy("longcat_flash_tiny", tmp_path, edit), tmp_path)
  assert "unexpected tensors (1)" in msg and "model.layers.0.self_attn.q_norm.weight" in msg


def test_wrong_shape_is_named(tmp_path):
  def edit(t):
    t["model.layers.1.self_attn.1.kv_b_proj.weight"] = t["model.layers.1.self_attn.1.kv_b_proj.weight"][:, :-1].copy()
  msg = _import_error(_broken_copy("longcat_flash_tiny", tmp_path, edit), tmp_path)
  assert "wrong shapes (1)" in msg
  assert "model.layers.1.self_attn.1.kv_b_proj.weight [128, 23] (expected [128, 24])" in msg


def test_all_problems_reported_together(tmp_path):
  def edit(t):
    t.pop("lm_head.weight")
    t["model.layers.0.extra.weight"] = np.ones(2, np.float32)
  msg = _import_error(_broken_copy("deepseek_v3_tiny", tmp_path, edit), tmp_path)
  assert "lm_head.weight" in msg and "model.layers.0.extra.weight" in msg


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v2", None])
def test_unsupported_architecture_is_named(model_type, tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(FIXTURES / "deepseek_v3_tiny", d)
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = model_type
  cfg["architectures"] = ["LlamaForCausalLM"]
  (d / "config.json").write_text(json.dumps(cfg))
  msg = _import_error(d, tmp_path)
  assert f"model_type {model_type!r}" in msg and "LlamaForCausalLM" in msg and "deepseek_v3" in msg


def test_unsupported_config_fields_are_listed(tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(FIXTURES / "deepseek_v3_tiny", d)
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(hidden_act="gelu", sliding_window=4096, scoring_func="softmax",
             rope_parameters={**cfg["rope_parameters"], "rope_type": "longrope"})
  (d / "config.json").write_text(json.dumps(cfg))
  msg = _import_error(d, tmp_path)
  for part in ("sliding_window", "hidden_act='gelu'", "scoring_func='softmax'", "'longrope'"):
    assert part in msg, part
  # The escape hatch accepts a key that does not change the forward pass.
  cfg.update(hidden_act="silu", scoring_func="sigmoid", rope_parameters=json.loads(
      (FIXTURES / "deepseek_v3_tiny" / "config.json").read_text())["rope_parameters"])
  (d / "config.json").write_text(json.dumps(cfg))
  import_hf(d, tmp_path / "ok", ignore_config_keys=("sliding_window",))


def test_cli_reports_errors_on_stderr(tmp_path, capsys):
  assert cli(["import", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
  assert "config.json not found" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path):
  res = subprocess.run([sys.executable, "-m", "loza_jax.convert", "export", "--ckpt", str(tmp_path / "none"),
                        "--out", str(tmp_path / "hf")], capture_output=True, text=True, cwd=ROOT)
  assert res.returncode == 2 and "config.yaml not found" in res.stderr
