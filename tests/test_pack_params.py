"""tools/pack_params.py: a model directory survives pack -> unpack (rounded to bf16), across several parts."""
import importlib.util
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from loza_jax.config import load_config, to_dict
from loza_jax.model_dir import load_model, save_model

_spec = importlib.util.spec_from_file_location("pack_params", Path(__file__).parents[1] / "tools" / "pack_params.py")
pack_params = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pack_params)


@pytest.fixture
def model_dir(tmp_path):
  rng = np.random.default_rng(0)
  params = {"embed": {"embedding": rng.normal(0, 0.02, (256, 64)).astype(np.float32)},
            "layers_0": {"mlp": {"kernel": rng.normal(0, 0.1, (64, 96)).astype(np.float32)},
                         "norm": {"scale": (1 + rng.normal(0, 0.01, (64,))).astype(np.float32)}}}
  cfg = load_config("configs/demo_cpu.yaml")
  save_model(tmp_path / "model", params, cfg)
  return tmp_path / "model", params, cfg


def test_pack_unpack_round_trip_in_parts(model_dir, tmp_path):
  src, params, cfg = model_dir
  m = pack_params.pack(src, tmp_path / "pack", part_mib=0.01)   # ~10 KiB parts: several of them
  assert len(m["parts"]) > 1
  out = pack_params.unpack(tmp_path / "pack", tmp_path / "again")
  got, got_cfg = load_model(out)
  assert to_dict(got_cfg) == to_dict(cfg)
  want = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(params)):
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g, w)
    assert np.abs(g - x).max() <= np.abs(x).max() * 2 ** -8   # bf16 rounding, no more


def test_unpack_names_a_missing_or_damaged_part(model_dir, tmp_path):
  src, _, _ = model_dir
  m = pack_params.pack(src, tmp_path / "pack", part_mib=0.01)
  last = tmp_path / "pack" / m["parts"][-1]
  data = last.read_bytes()
  last.unlink()
  with pytest.raises(FileNotFoundError, match=m["parts"][-1]):
    pack_params.unpack(tmp_path / "pack", tmp_path / "x")
  first = tmp_path / "pack" / m["parts"][0]
  last.write_bytes(data)
  first.write_bytes(first.read_bytes()[:-1] + bytes([first.read_bytes()[-1] ^ 1]))
  with pytest.raises(ValueError, match="damaged"):
    pack_params.unpack(tmp_path / "pack", tmp_path / "y")
