"""Sparsify and mid-train stages: round trips, errors, resume across a stage boundary after SIGKILL."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from loza_jax.config import load_config, replace
from loza_jax.model import build_model
from loza_jax.model_dir import load_config_file, load_model, save_model
from train.sparsify import sparsify, zigzag_layer_string

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.num_hidden_layers=4", "model.hidden_size=32", "model.intermediate_size=48",
         "model.num_attention_heads=2", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
         "model.qk_rope_head_dim=8", "model.v_head_dim=8", "attention.layer_types=null",
         "attention.block_size=8", "attention.local_blocks=2", "attention.impl=xla",
         "data.seq_len=64", "data.retrieval_fraction=0.0", "data.retrieval_lengths=[]", "train.batch_size=2",
         "train.progress=false",
         "train.log_every=1", "train.tensorboard=false", "train.async_checkpointing=false"]


def make_model(tmp_path, *extra):
  cfg = load_config("configs/demo_cpu.yaml", SMALL + list(extra))
  import flax.linen as nn
  params = nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
  save_model(tmp_path / "model", params, cfg)
  return cfg, params


def write_calibration(path, cfg, alphas):
  from train.calibrate import model_fingerprint
  path.write_text(json.dumps({"model_fingerprint": model_fingerprint(cfg),
                              "alpha": [{"sublayer": i, "alpha": a} for i, a in enumerate(alphas)],
                              "ssa": {"block_size": 8, "sink_blocks": 1, "local_blocks": 2}}))


@pytest.mark.parametrize("strategy,ratio,extra,want", [
    ("alpha", 0.5, [], [0, 2]),
    ("alpha", 0.25, [], [2]),
    ("alternating", 0.5, [], [1, 3]),
    ("manual", 0.0, ["sparsify.layers=[3]"], [3]),
    ("alpha", 1.0, [], [0, 1, 2, 3]),
])
def test_sparsify_round_trip(tmp_path, strategy, ratio, extra, want):
  cfg, params = make_model(tmp_path)
  write_calibration(tmp_path / "cal.json", cfg, [0.3, 0.9, 0.1, 0.8])
  stage = load_config("configs/demo_cpu.yaml", SMALL + [f"sparsify.strategy={strategy}", f"sparsify.ratio={ratio}",
                                                         f"sparsify.calibration={tmp_path / 'cal.json'}", *extra])
  out, rec = sparsify(stage, tmp_path / "model", tmp_path / "sparse")
  assert rec["ssa_layers"] == want
  p2, cfg2 = load_model(out)
  assert [i for i, t in enumerate(cfg2.layer_types) if t == "ssa"] == want
  assert rec["zigzag_layer_type"] == zigzag_layer_string(cfg2.layer_types)
  f0, f2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(p2)
  assert set(f0) == set(f2)
  for k in f0:
    np.testing.assert_array_equal(np.asarray(f0[k]), np.asarray(f2[k]))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 80)), jnp.int32)
  logits = build_model(cfg2).apply({"params": p2}, tokens)
  assert np.isfinite(np.asarray(logits)).all()


def test_sparsify_random_is_seeded(tmp_path):
  make_model(tmp_path)
  recs = [sparsify(load_config("configs/demo_cpu.yaml", SMALL + ["sparsify.strategy=random", f"sparsify.seed={s}"]),
                   tmp_path / "model", tmp_path / f"r{s}_{i}")[1]["ssa_layers"] for i, s in enumerate([3, 3, 4, 5, 6])]
  assert recs[0] == recs[1] and len(recs[0]) == 2
  assert any(r != recs[0] for r in recs[2:])


def test_sparsify_errors(tmp_path):
  cfg, _ = make_model(tmp_path)
  other = replace(cfg, **{"model.num_hidden_layers": 6})
  write_calibration(tmp_path / "other.json", other, [0.5] * 6)
  base = SMALL + ["sparsify.strategy=alpha"]
  with pytest.raises(ValueError, match="different model.*num_hidden_layers: calibration 6 vs model 4"):
    sparsify(load_config("configs/demo_cpu.yaml", base + [f"sparsify.calibration={tmp_path / 'other.json'}"]),
             tmp_path / "model", tmp_path / "x")
  with pytest.raises(FileNotFoundError, match="nope.json"):
    sparsify(load_config("configs/demo_cpu.yaml", base + ["sparsify.calibration=nope.json"]), tmp_path / "model",
             tmp_path / "x")
  with pytest.raises(ValueError, match="needs the calibration.json"):
    sparsify(load_config("configs/demo_cpu.yaml", base), tmp_path / "model", tmp_path / "x")
  with pytest.raises(ValueError, match=r"\[7\] out of range for 4"):
    sparsify(load_config("configs/demo_cpu.yaml", SMALL + ["sparsify.strategy=manual", "sparsify.layers=[7]"]),
             tmp_path / "model", tmp_path / "x")
  with pytest.raises(ValueError, match=r"sparsify.ratio must be in \[0, 1\]"):
    load_config("configs/demo_cpu.yaml", SMALL + ["sparsify.ratio=1.5"])
  write_calibration(tmp_path / "cal.json", cfg, [0.5] * 4)
  with pytest.raises(ValueError, match="calibration used SSA"):
    cfg = load_config("configs/demo_cpu.yaml", base + [f"sparsify.calibration={tmp_path / 'cal.json'}",
                                                       "attention.block_size=16"])
    sparsify(cfg, tmp_path / "model", tmp_path / "x")


STAGES = ("midtrain.stages=[{seq_len: 32, steps: 3, learning_rate: 0.003}, "
          "{seq_len: 64, steps: 3, learning_rate: 0.002, "
          "rope_scaling: {factor: 2.0, original_max_position_embeddings: 32}}]")


def _run_midtrain(tmp_path, run_dir, kill_at=None):
  args = [sys.executable, str(ROOT / "tests" / "resume_helper.py"), "--stage", "midtrain",
          "--config", "configs/demo_cpu.yaml",
          "--init", str(tmp_path / "sparse"), "--set", f"train.run_dir={run_dir}", "--set", STAGES,
          "--set", "train.checkpoint_every=2"]
  for s in SMALL:
    args += ["--set", s]
  if kill_at is not None:
    args += ["--kill-at", str(kill_at)]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_midtrain_resume_across_stage_boundary_after_sigkill(tmp_path):
  cfg, _ = make_model(tmp_path, "attention.layer_types=[full, ssa, full, ssa]")
  (tmp_path / "model").rename(tmp_path / "sparse")
  ref = _run_midtrain(tmp_path, tmp_path / "ref")
  assert ref.returncode == 0, ref.stderr[-3000:]
  killed = _run_midtrain(tmp_path, tmp_path / "run", kill_at=4)   # first step of stage 1 done, then SIGKILL
  assert killed.returncode == -9, killed.stderr[-3000:]
  resumed = _run_midtrain(tmp_path, tmp_path / "run")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  p_ref, c_ref = load_model(tmp_path / "ref" / "model")
  p_run, c_run = load_model(tmp_path / "run" / "model")
  for k, v in traverse_util.flatten_dict(p_ref).items():
    np.testing.assert_allclose(np.asarray(traverse_util.flatten_dict(p_run)[k]), np.asarray(v), rtol=1e-6, atol=1e-7,
                               err_msg=str(k))
  assert c_run.model.rope_scaling.factor == 2.0 and c_run.layer_types == ("full", "ssa", "full", "ssa")
  stages = json.loads((tmp_path / "run" / "stages.json").read_text())
  assert [(s["start_step"], s["end_step"], s["seq_len"]) for s in stages] == [(0, 3, 32), (3, 6, 64)]
  m_ref = [json.loads(l)["loss"] for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
  assert len(m_ref) == 6


def test_midtrain_rejects_a_stage_whose_data_cannot_be_built_before_training(tmp_path):
  from train.midtrain import midtrain
  make_model(tmp_path)
  cfg = load_config("configs/demo_cpu.yaml", SMALL + [
      "data.retrieval_fraction=0.5", "data.retrieval_tasks=[multikey]", f"train.run_dir={tmp_path / 'run'}",
      "midtrain.stages=[{seq_len: 256, steps: 1}, {seq_len: 64, steps: 1}]"])
  with pytest.raises(ValueError, match=r"midtrain.stages\[1\] \(seq_len 64\).*multikey"):
    midtrain(cfg, tmp_path / "model")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_midtrain_rejects_a_stage_mesh_that_does_not_fit_before_training(tmp_path):
  from train.midtrain import midtrain
  make_model(tmp_path, "attention.layer_types=[full, ssa, full, ssa]")
  base = SMALL + [f"train.run_dir={tmp_path / 'run'}"]
  cases = [(f"mesh: {{data: 1, context: {2 * jax.device_count()}}}", r"needs \d+ devices"),
           ("batch_size: 3", r"batch_size=3 must be divisible by mesh data x fsdp")]
  if jax.device_count() == 1:
    cases = cases[:1]
  for stage, match in cases:
    cfg = load_config("configs/demo_cpu.yaml", base + [
        f"midtrain.stages=[{{seq_len: 32, steps: 1}}, {{seq_len: 64, steps: 1, {stage}}}]"])
    with pytest.raises(ValueError, match=rf"midtrain.stages\[1\] \(seq_len 64\): .*{match}"):
      midtrain(cfg, tmp_path / "model")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_check_stage_mesh_needs_whole_blocks_per_context_chunk():
  from train.midtrain import check_stage_mesh
  cfg = load_config("configs/demo_cpu.yaml", SMALL + ["attention.layer_types=[full, ssa, full, ssa]",
                                                       "mesh.data=1", "mesh.context=2", "data.seq_len=48"])
  with pytest.raises(ValueError, match=r"T=48 over 4 chunks \(mesh.context=2, zigzag\) gives chunks of 12 tokens"):
    check_stage_mesh(cfg, 2)
  check_stage_mesh(replace(cfg, **{"data.seq_len": 64}), 2)


def test_midtrain_stage_with_its_own_context_mesh(tmp_path):
  """Stage 0 on the run's mesh (data=2), stage 1 on its own (context=2), two simulated CPU devices."""
  make_model(tmp_path, "attention.layer_types=[full, ssa, full, ssa]")
  stages = ("midtrain.stages=[{seq_len: 32, steps: 2, learning_rate: 0.003}, "
            "{seq_len: 64, steps: 2, learning_rate: 0.002, mesh: {data: 1, context: 2}}]")
  args = [sys.executable, "-m", "train.midtrain", "--config", "configs/demo_cpu.yaml",
          "--init", str(tmp_path / "model"), "--set", f"train.run_dir={tmp_path / 'run'}", "--set", stages]
  for s in SMALL:
    args += ["--set", s]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stages = json.loads((tmp_path / "run" / "stages.json").read_text())
  assert [s["mesh"] for s in stages] == [{"data": 2, "fsdp": 1, "tensor": 1, "context": 1},
                                         {"data": 1, "fsdp": 1, "tensor": 1, "context": 2}]
  assert all(np.isfinite(s["final_loss"]) for s in stages)
  assert load_config_file(tmp_path / "run" / "model").layer_types == ("full", "ssa", "full", "ssa")
