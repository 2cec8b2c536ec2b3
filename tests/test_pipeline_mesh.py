"""The whole pipeline runs unchanged with a `mesh` section: on two simulated CPU devices (data or fsdp
parallel) every training run's loss curve matches the one-device run's (same data order)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.seq_len=256", "attention.block_size=16", "data.retrieval_lengths=[128, 192, 256]",
        "train.log_every=1", "train.progress=false", "train.checkpoint_every=0", "train.batch_size=2",
        "pipeline.pretrain_stages=[{seq_len: 128, steps: 3, batch_size: 2, retrieval_lengths: [96, 128]}, "
        "{seq_len: 256, steps: 2, batch_size: 2}]",
        "calibrate.steps=2", "calibrate.seq_len=256", "calibrate.batch_size=2",
        "midtrain.stages=[{seq_len: 256, steps: 2, batch_size: 2}]",
        "evaluate.lengths=[256]", "evaluate.depths=[0.5]", "evaluate.samples=1", "evaluate.ppl_rows=1",
        "evaluate.ppl_lengths=[256]", "evaluate.tasks=[passkey]", "pipeline.random_seeds=1",
        "pipeline.alternating=false"]


def run_pipeline(run_dir: Path, devices: int, mesh: list[str]) -> None:
  args = [sys.executable, "-m", "train.pipeline", "--config", "configs/demo_cpu.yaml", "--run-dir", str(run_dir)]
  for s in TINY + mesh:
    args += ["--set", s]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"}
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]


def loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
  """(step, loss) of every training run under run_dir, keyed by its metrics file's relative path."""
  curves = {}
  for path in sorted(run_dir.rglob("metrics.jsonl")):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curves[str(path.relative_to(run_dir))] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  return curves


@pytest.mark.slow
@pytest.mark.parametrize("axis", ["data", "fsdp"])
def test_pipeline_on_two_devices_matches_one(tmp_path, axis):
  run_pipeline(tmp_path / "one", 1, [])
  run_pipeline(tmp_path / "two", 2, [f"mesh.{axis}=2"])
  one, two = loss_curves(tmp_path / "one"), loss_curves(tmp_path / "two")
  assert set(one) == set(two) and len(one) >= 4      # pretrain stages, calibrate, midtrain (α and random)
  for name in one:
    steps1, loss1 = zip(*one[name])
    steps2, loss2 = zip(*two[name])
    assert steps1 == steps2, name
    np.testing.assert_allclose(loss2, loss1, rtol=2e-4, err_msg=name)
  sel = lambda d: json.loads((d / "pipeline.json").read_text())["selection"]["ssa_layers"]
  assert sel(tmp_path / "one") == sel(tmp_path / "two")
