"""`make demo` smoke: the whole pipeline on the demo config, shortened, writes a complete report."""
import json

from train import pipeline

SHORT = ["train.steps=4", "train.batch_size=2", "train.log_every=2", "train.progress=false",
         "train.checkpoint_every=0", "calibrate.steps=3", "calibrate.seq_len=256",
         "calibrate.batch_size=2",
         "midtrain.stages=[{seq_len: 256, steps: 2}, {seq_len: 512, steps: 1, batch_size: 2, "
         "rope_scaling: {factor: 2.0, original_max_position_embeddings: 256}}]",
         "evaluate.lengths=[256]", "evaluate.depths=[0.5]", "evaluate.samples=1", "evaluate.ppl_rows=1",
         "evaluate.tasks=[passkey, vartrack]"]


def test_pipeline_smoke(tmp_path):
  argv = ["--config", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path)]
  for s in SHORT:
    argv += ["--set", s]
  assert pipeline.main(argv) == 0
  report = (tmp_path / "report.md").read_text()
  assert "![alpha](calibrate/alpha.png)" in report and (tmp_path / "calibrate" / "alpha.png").is_file()
  for name in ("full", "random-sparse", "loza-sparse", "loza-sparse+midtrain"):
    assert f"| {name} |" in report
  summary = json.loads((tmp_path / "pipeline.json").read_text())
  assert set(summary["evaluation"]) == {"full", "random-sparse", "loza-sparse", "loza-sparse+midtrain"}
  assert len(summary["selection"]["ssa_layers"]) == 2 and len(summary["random_selection"]["ssa_layers"]) == 2
  assert summary["selection"]["ssa_layers"] != summary["random_selection"]["ssa_layers"]
  assert [s["seq_len"] for s in summary["stages"]] == [256, 512]
  assert (tmp_path / "eval" / "retrieval_heatmap.png").is_file()


def test_random_baseline_differs_from_the_calibrated_selection():
  from loza_jax.config import load_config
  from loza_jax.sparsity import select_layers
  cfg = load_config("configs/demo_cpu.yaml", ["sparsify.seed=0"])
  chosen = list(select_layers("random", 4, 0.5, seed=0).ssa_layers)
  seed = pipeline.random_baseline_seed(cfg, chosen)
  assert seed != 0 and list(select_layers("random", 4, 0.5, seed=seed).ssa_layers) != chosen
  assert pipeline.random_baseline_seed(cfg, [9]) == 0
