"""Mesh resolution, logical-axis specs, and a 2x2x2 sharded train step vs one device (8 simulated CPUs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loza_jax import sharding as shd
from loza_jax.config import MeshConfig

ROOT = Path(__file__).resolve().parents[1]


def test_mesh_shape_resolution():
  assert shd.mesh_shape(MeshConfig(data=-1, fsdp=2), 8) == (4, 2, 1, 1)
  assert shd.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2, 1)
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    shd.mesh_shape(MeshConfig(data=2, fsdp=2), 8)
  with pytest.raises(ValueError, match="does not divide"):
    shd.mesh_shape(MeshConfig(data=-1, tensor=3), 8)
  with pytest.raises(ValueError, match="mesh.fsdp"):
    MeshConfig(fsdp=0)
  with pytest.raises(ValueError, match="at most one axis"):
    MeshConfig(data=-1, fsdp=-1)


def test_spec_for_replicates_indivisible_dims():
  mesh = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 2, "tensor": 2, "context": 1}})()
  assert tuple(shd.spec_for(("embed", "mlp"), (64, 128), mesh)) == ("fsdp", "tensor")
  assert tuple(shd.spec_for(("embed", "mlp"), (63, 128), mesh)) == (None, "tensor")
  assert tuple(shd.spec_for(("vocab", "embed"), (256, 32), mesh)) == ("tensor", "fsdp")
  assert tuple(shd.spec_for(("norm",), (32,), mesh)) == (None,)


def test_sharded_step_matches_single_device(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_step_check.py"), str(tmp_path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
  np.testing.assert_allclose(r["loss_sharded"], r["loss_single"], rtol=1e-5)
  np.testing.assert_allclose(r["gnorm_sharded"], r["gnorm_single"], rtol=1e-4)
  assert r["max_param_change"] > 1e-3, "the step must move the params"
  assert r["max_param_diff"] < 1e-2 * r["max_param_change"], "within 1% of one Adam step (fp32 reduction order)"
  specs = r["specs"]
  assert specs["embed_tokens/embedding"] == "P('tensor', 'fsdp')"
  assert specs["layers_0/mlp/gate_proj/kernel"] == "P('fsdp', 'tensor')"
  assert specs["layers_0/self_attn/q_proj/kernel"] == "P('fsdp', 'tensor')"
  assert r["mu_spec"] == "P('fsdp', 'tensor')", "optimizer state is sharded like its param"
  assert r["restored_step"] == 1 and r["max_restore_diff"] == 0.0
  assert r["restored_mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "context": 1}
  assert r["restored_spec"] == "P('fsdp', 'tensor')", "restored onto the 8-way fsdp mesh"
