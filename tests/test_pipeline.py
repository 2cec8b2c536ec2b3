"""`make demo` smoke: the whole pipeline on the demo config, shortened, writes a complete report."""
import json

from train import pipeline

SHORT = ["train.steps=4", "train.batch_size=2", "train.log_every=2", "train.progress=false",
         "train.checkpoint_every=0", "calibrate.steps=3", "calibrate.seq_len=256",
         "calibrate.batch_size=2",
         "midtrain.stages=[{seq_len: 256, steps: 2}, {seq_len: 512, steps: 1, batch_size: 2, "
         "rope_scaling: {factor: 2.0, original_max_position_embeddings: 256}}]",
         "evaluate.lengths=[256]", "evaluate.depths=[0.5]", "evaluate.samples=1", "evaluate.ppl_rows=1",
         "evaluate.ppl_lengths=[256]", "evaluate.tasks=[passkey, vartrack]", "pipeline.random_seeds=2",
         "pipeline.pretrain_stages=[]"]
STAGED = ["pipeline.pretrain_stages=[{seq_len: 128, steps: 3, batch_size: 2, retrieval_lengths: [96, 128], "
          "passkey_digits: [7, 20]}, {seq_len: 256, steps: 2, batch_size: 2, learning_rate: 1e-3}]"]


def test_pipeline_smoke(tmp_path):
  argv = ["--config", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path)]
  for s in SHORT:
    argv += ["--set", s]
  assert pipeline.main(argv) == 0
  report = (tmp_path / "report.md").read_text()
  assert "![alpha](calibrate/alpha.png)" in report and (tmp_path / "calibrate" / "alpha.png").is_file()
  summary = json.loads((tmp_path / "pipeline.json").read_text())
  seeds = [r["seed"] for r in summary["random_selections"]]
  names = {"full", "loza-sparse", "loza-sparse+midtrain", "alternating+midtrain"} | {
      f"random-{s}+midtrain" for s in seeds}
  assert len(seeds) == 2 and set(summary["evaluation"]) == names
  for name in names:
    assert f"| {name} |" in report
  assert "| random-sparse+midtrain (2 seeds) |" in report and "beyond @ 256" in report
  assert len(summary["selection"]["ssa_layers"]) == 2
  for r in summary["random_selections"]:
    assert len(r["ssa_layers"]) == 2 and r["ssa_layers"] != summary["selection"]["ssa_layers"]
  assert summary["alternating_selection"]["ssa_layers"] == [1, 3]
  # every sparse model mid-trains through the same stages
  assert {name: [(s["seq_len"], s["start_step"], s["end_step"]) for s in m["stages"]]
          for name, m in summary["midtrain"].items()} == {
      name: [(256, 0, 2), (512, 2, 3)] for name in ["loza", *[f"random-{s}" for s in seeds], "alternating"]}
  assert [h["model"] for h in summary["headline"]] == ["full", "loza-sparse", "loza-sparse+midtrain",
                                                       "random-sparse+midtrain (2 seeds)", "alternating+midtrain"]
  assert set(summary["headline"][3]["beyond_train"]) == {"mean", "min", "max", "std", "n"}
  assert (tmp_path / "eval" / "retrieval_heatmap.png").is_file()


def test_pipeline_pretrains_through_its_stages(tmp_path):
  argv = ["--config", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path)]
  for s in SHORT + STAGED + ["pipeline.random_seeds=1", "pipeline.alternating=false", "evaluate.tasks=[passkey]",
                             "midtrain.stages=[{seq_len: 256, steps: 1, batch_size: 2}]"]:
    argv += ["--set", s]
  assert pipeline.main(argv) == 0
  p = json.loads((tmp_path / "pipeline.json").read_text())["pretrain"]
  assert [(r["stage"], r["seq_len"], r["steps"], r["batch_size"], r["learning_rate"]) for r in p["stages"]] == [
      (0, 128, 3, 2, 3e-3), (1, 256, 2, 2, 1e-3)]
  assert p["steps"] == 5 and p["model_dir"] == str(tmp_path / "pretrain" / "stage-1" / "model")
  assert json.loads((tmp_path / "pretrain" / "stage-1" / "stages.json").read_text())[-1]["end_step"] == 2
  report = (tmp_path / "report.md").read_text()
  assert "5 steps through 2 stages" in report and "| 1 | 256 | 2 | 2 | 0.001 |" in report


def test_pretrain_stages_end_at_the_training_length():
  from loza_jax.config import load_config
  cfg = load_config("configs/demo_cpu.yaml", ["pipeline.pretrain_stages=[{seq_len: 128, steps: 2, "
                                              "retrieval_lengths: [128]}]"])
  import pytest
  with pytest.raises(ValueError, match=r"last stage's seq_len \(128\) must be data.seq_len \(256\)"):
    pipeline.check_pretrain_stages(cfg)
  from loza_jax.config import replace
  demo = load_config("configs/demo_cpu.yaml")   # stages inherit data.retrieval_lengths; calibrate raises seq_len
  calib = replace(demo, **{"data.seq_len": 512, "data.retrieval_lengths": (512,)})
  assert calib.pipeline.pretrain_stages == demo.pipeline.pretrain_stages
  with pytest.raises(ValueError, match=r"pretrain_stages\[1\]: data.retrieval_lengths: 512"):
    pipeline.check_pretrain_stages(calib)
  staged = pipeline.pretrain_stage_cfg(load_config("configs/demo_cpu.yaml", STAGED),
                                       load_config("configs/demo_cpu.yaml", STAGED).pipeline.pretrain_stages[0], 0,
                                       tmp := __import__("pathlib").Path("x"))
  assert (staged.data.seq_len, staged.train.batch_size, staged.data.passkey_digits, staged.train.run_dir) == (
      128, 2, (7, 20), str(tmp))


def test_random_baseline_differs_from_the_calibrated_selection():
  from loza_jax.config import load_config
  from loza_jax.sparsity import select_layers
  cfg = load_config("configs/demo_cpu.yaml", ["sparsify.seed=0"])
  chosen = list(select_layers("random", 4, 0.5, seed=0).ssa_layers)
  seed = pipeline.random_baseline_seed(cfg, chosen)
  assert seed != 0 and list(select_layers("random", 4, 0.5, seed=seed).ssa_layers) != chosen
  assert pipeline.random_baseline_seed(cfg, [9]) == 0
  seeds = pipeline.random_baseline_seeds(cfg, chosen, 3)
  assert len(seeds) == 3 and seeds[0] == seed
  assert all(list(select_layers("random", 4, 0.5, seed=s).ssa_layers) != chosen for s in seeds)


def test_random_baselines_are_distinct_selections():
  from loza_jax.config import load_config
  from loza_jax.sparsity import select_layers
  cfg = load_config("configs/demo_cpu.yaml", ["sparsify.seed=0"])
  draw = lambda s: tuple(select_layers("random", 4, 0.5, seed=s).ssa_layers)
  assert len({draw(s) for s in range(1, 4)}) < 3          # plain seeds 1-3 repeat a selection
  seeds = pipeline.random_baseline_seeds(cfg, [2, 3], 5)   # C(4, 2) = 6 selections, one taken by α
  picked = [draw(s) for s in seeds]
  assert len(seeds) == 5 and len(set(picked)) == 5 and (2, 3) not in picked
  assert pipeline.random_baseline_seeds(cfg, [2, 3], 9) == seeds   # no more distinct ones exist
  one = load_config("configs/demo_cpu.yaml", ["sparsify.ratio=0.25"])
  assert len(pipeline.random_baseline_seeds(one, [0], 3)) == 3
  assert [draw(s) for s in pipeline.random_baseline_seeds(cfg, [], 6)] == sorted(
      {draw(s) for s in range(1000)}, key=[draw(s) for s in range(1000)].index)


def test_spread_of_seeds():
  assert pipeline.spread([0.5, None, 1.0]) == {"mean": 0.75, "min": 0.5, "max": 1.0, "std": 0.25, "n": 2}
  assert pipeline.spread([None]) is None
  assert pipeline._agg_cell(pipeline.spread([0.5, 1.0])) == "0.75 ± 0.25 (0.50–1.00)"
