"""Checkpoints: corrupt-latest fallback, mismatch errors naming the parameter, model export/load."""
import logging

import jax
import numpy as np
import pytest
from flax import traverse_util

from loza_jax.model_dir import CheckpointMismatchError, load_model, save_model
from tests.trainer_utils import tiny_cfg
from train import data
from train.checkpoint import Checkpointer
from train.trainer import Trainer


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run directory with checkpoints at steps 2 and 4."""
  run = tmp_path_factory.mktemp("ckpt") / "run"
  cfg = tiny_cfg(run, ["train.steps=4", "train.checkpoint_every=2"])
  tr = Trainer(cfg)
  tr.fit(iter(data.build_dataset(cfg, 4)))
  return cfg, run, _flat(tr.state.params)


def _copy_run(trained, tmp_path):
  import shutil
  cfg, run, params = trained
  dst = tmp_path / "run"
  shutil.copytree(run, dst)
  return tiny_cfg(dst, ["train.steps=4", "train.checkpoint_every=2"]), dst, params


def test_corrupt_latest_falls_back_to_previous(trained, tmp_path, caplog):
  """Without checksums (a run killed between a save and its checksum) orbax's read error moves the step aside."""
  cfg, run, _ = _copy_run(trained, tmp_path)
  (run / "checkpoints" / "4.sha256.json").unlink()
  for f in (run / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  tr = Trainer(cfg)
  ckpt = Checkpointer(run / "checkpoints")
  with caplog.at_level(logging.ERROR):
    step = tr.restore_or_init(None, ckpt)
  assert step == 2
  assert any("step 4" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
  moved = list((run / "checkpoints.corrupt").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("4-") and any(moved[0].rglob("*")), "nothing is deleted"
  assert ckpt.all_steps() == [2] and (run / "checkpoints" / "2.sha256.json").is_file()
  ckpt.close()


def test_shape_mismatch_names_the_parameter(trained, tmp_path):
  _, run, _ = _copy_run(trained, tmp_path)
  cfg = tiny_cfg(run, ["model.intermediate_size=96"])
  ckpt = Checkpointer(run / "checkpoints")
  with pytest.raises(CheckpointMismatchError, match=r"params/layers_0/mlp/down_proj/kernel.*\(64, 32\).*\(96, 32\)"
                     r".*model.intermediate_size: 64 -> 96"):
    Trainer(cfg).restore_or_init(None, ckpt)
  assert ckpt.all_steps() == [2, 4], "a mismatch must not touch the checkpoints"
  ckpt.close()


def test_missing_parameter_is_named(trained, tmp_path):
  _, run, _ = _copy_run(trained, tmp_path)
  cfg = tiny_cfg(run, ["attention.layer_types=[blend, full]"])
  with pytest.raises(ValueError, match=r"params/layers_0/self_attn/alpha.*missing from the checkpoint"):
    Trainer(cfg).restore_or_init(None, Checkpointer(run / "checkpoints"))


def test_save_and_load_model(trained, tmp_path):
  cfg, _, params = trained
  tr = Trainer(cfg)
  state = tr.init_state()
  out = save_model(tmp_path / "model", state.params, cfg)
  loaded, cfg2 = load_model(out)
  assert cfg2 == cfg
  for k, v in _flat(state.params).items():
    np.testing.assert_array_equal(v, _flat(loaded)[k])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
  placed, _ = load_model(out, abstract)
  assert jax.tree.leaves(placed)[0].sharding == jax.tree.leaves(state.params)[0].sharding
  wrong = Trainer(tiny_cfg(tmp_path, ["model.hidden_size=48"]))
  with pytest.raises(ValueError, match=r"params/|embed_tokens/embedding"):
    load_model(out, wrong._abstract_params)
  with pytest.raises(FileExistsError):
    save_model(out, state.params, cfg)
  with pytest.raises(FileNotFoundError, match="config.yaml"):
    load_model(tmp_path / "nowhere")
  assert params  # the module fixture trained something
