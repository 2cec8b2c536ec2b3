"""The committed pretrained demo model (assets/demo_pretrained, what `make demo` starts from): it unpacks to the
demo config's model, says how it was made, and retrieves passkeys from beyond the SSA window."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from loza_jax.config import load_config, to_dict
from loza_jax.model_dir import load_config_file
from train.evaluate import evaluate
from train.pipeline import beyond_at

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "assets" / "demo_pretrained"
_spec = importlib.util.spec_from_file_location("pack_params", ROOT / "tools" / "pack_params.py")
pack_params = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pack_params)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return pack_params.unpack(PACK, tmp_path_factory.mktemp("demo") / "model")


def test_demo_model_matches_the_demo_config_and_names_its_source(model_dir):
  want = load_config(str(ROOT / "configs/demo_cpu.yaml"))
  got = load_config_file(model_dir)
  assert to_dict(got)["model"] == to_dict(want)["model"]
  assert to_dict(got)["attention"] == to_dict(want)["attention"]
  source = json.loads((PACK / "manifest.json").read_text())["source"]
  assert "demo_cpu.yaml" in source and "commit" in source, source
  assert (model_dir / "source.txt").read_text().strip() == source   # what the pipeline's report quotes


def test_demo_model_retrieves_beyond_the_ssa_window(model_dir, tmp_path):
  cfg = load_config(str(ROOT / "configs/demo_cpu.yaml"), [f"train.run_dir={tmp_path}"])
  cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, samples=3, depths=(0.1, 0.3),
                                                              ppl_rows=1, ppl_lengths=(128,)))
  res = evaluate(cfg, [str(model_dir)], ["full"], progress=False)["results"]["full"]
  beyond = beyond_at(res["cases"], 128)
  assert beyond["n"] >= 4 and beyond["acc"] >= 0.75, beyond
