"""`make demo` smoke: the whole pipeline on the demo config, shortened, writes a complete report."""
import json

import pytest

from loza_jax.config import load_config
from train import pipeline

# The demo config at 256 tokens with blocks of 16 (an SSA window of 64 keys), whatever the shipped demo uses.
AT_256 = ["data.seq_len=256", "attention.block_size=16", "data.retrieval_lengths=[128, 192, 256]"]
SHORT = AT_256 + ["train.steps=4", "train.batch_size=2", "train.log_every=2", "train.progress=false",
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
  for s in SHORT + ["pipeline.target_full_beyond=0.85"]:
    argv += ["--set", s]
  # A 4-step model does not retrieve: --require-full-beyond stops right after its evaluation (exit 3) ...
  assert pipeline.main(argv + ["--require-full-beyond", "0.99"]) == 3
  assert {p.stem for p in (tmp_path / "done").glob("*.json")} == {"run", "pretrain", "evaluate-full"}
  # ... and the same command without the bar continues the run from there: each mid-trained model is evaluated
  # right after its mid-training (a run cut short keeps its numbers), the rest after the last one.
  assert pipeline.main(argv + ["--until", "midtrain"]) == 0
  done = {p.stem for p in (tmp_path / "done").glob("*.json")}
  assert {"evaluate-loza-sparse_midtrain", "evaluate-alternating_midtrain"} <= done
  assert "evaluate-loza-sparse" not in done and not (tmp_path / "report.md").exists()
  # ... and the comparison of the full and mid-trained models is written then, before the other evaluations
  head = (tmp_path / "headline.md").read_text()
  assert "| random-sparse+midtrain (2 seeds) |" in head and "| loza-sparse+midtrain |" in head
  assert "| loza-sparse |" not in head and head.count("\n- ") == 4 and "(target ≥ 0.85)" in head
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
  assert "### Targets" in report and "## 6. Throughput" in report and len(summary["targets"]) == 4
  assert "(target ≥ 0.85)" in summary["targets"][0]
  assert (tmp_path / "eval" / "perplexity_by_length_position.png").is_file()
  assert {"pretrain", "calibrate", "sparsify-loza", "midtrain-loza", "evaluate-full"} <= {
      p.stem for p in (tmp_path / "done").glob("*.json")}


def test_pipeline_pretrains_through_its_stages(tmp_path, capsys):
  argv = ["--config", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path)]
  for s in SHORT + STAGED + ["pipeline.random_seeds=1", "pipeline.alternating=false", "evaluate.tasks=[passkey]",
                             "midtrain.stages=[{seq_len: 256, steps: 1, batch_size: 2}]"]:
    argv += ["--set", s]
  assert pipeline.main(argv) == 0
  out = capsys.readouterr()
  log = out.out + out.err
  assert "pretraining stage 0 of 2: 3 steps of 2 x 128 tokens" in log
  assert "pretraining stage 1 of 2: 2 steps of 2 x 256 tokens" in log
  p = json.loads((tmp_path / "pipeline.json").read_text())["pretrain"]
  assert [(r["stage"], r["seq_len"], r["steps"], r["batch_size"], r["learning_rate"]) for r in p["stages"]] == [
      (0, 128, 3, 2, 3e-3), (1, 256, 2, 2, 1e-3)]
  assert p["steps"] == 5 and p["model_dir"] == str(tmp_path / "pretrain" / "stage-1" / "model")
  assert json.loads((tmp_path / "pretrain" / "stage-1" / "stages.json").read_text())[-1]["end_step"] == 2
  report = (tmp_path / "report.md").read_text()
  assert "5 steps through 2 stages" in report and "| 1 | 256 | 2 | 2 | 0.001 |" in report


def test_pretrain_stages_end_at_the_training_length():
  from loza_jax.config import load_config
  cfg = load_config("configs/demo_cpu.yaml", AT_256 + ["pipeline.pretrain_stages=[{seq_len: 128, steps: 2, "
                                                       "retrieval_lengths: [128]}]"])
  import pytest
  with pytest.raises(ValueError, match=r"last stage's seq_len \(128\) must be data.seq_len \(256\)"):
    pipeline.check_pretrain_stages(cfg)
  from loza_jax.config import replace
  two = load_config("configs/demo_cpu.yaml", AT_256 + STAGED)   # stages inherit data.retrieval_lengths
  calib = replace(two, **{"data.seq_len": 512, "data.retrieval_lengths": (512,)})
  assert calib.pipeline.pretrain_stages == two.pipeline.pretrain_stages
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


PROXY_TINY = [   # configs/proxy_h200.yaml shrunk to seconds of CPU: same stages, ratios, baselines and YaRN views
    "model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=2", "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.num_hidden_layers=4",
    "model.dtype=float32", "attention.block_size=16", "attention.local_blocks=3",
    "data.seq_len=128", "data.retrieval_lengths=[96, 128]", "data.passkey_digits=[7, 12]",
    "train.checkpoint_every=0", "train.log_every=1",
    "calibrate.steps=2", "calibrate.seq_len=256", "calibrate.batch_size=2",
    "midtrain.stages=[{seq_len: 128, steps: 2, batch_size: 2}]", "evaluate.pad_to=256",
    "evaluate.lengths=[128, 256]", "evaluate.ppl_lengths=[128, 256]", "evaluate.depths=[0.5]", "evaluate.samples=1",
    "evaluate.ppl_rows=1", "evaluate.ppl_buckets=2", "evaluate.batch_size=2", "pipeline.random_seeds=2",
    "pipeline.eval_rope_scaling={factor: 2.0, original_max_position_embeddings: 128}",
    "pipeline.pretrain_stages=[{seq_len: 96, steps: 2, batch_size: 2, retrieval_lengths: [96]}, "
    "{seq_len: 128, steps: 2, batch_size: 2}]"]


def _proxy_argv(run_dir, *extra):
  argv = ["--config", "configs/proxy_h200.yaml", "--run-dir", str(run_dir), *extra]
  for s in PROXY_TINY:
    argv += ["--set", s]
  return argv


def _refuse(monkeypatch, *names):
  """Make the named stage functions of train.pipeline fail if called: a resumed run must skip them."""
  for name in names:
    monkeypatch.setattr(pipeline if name != "pretrain" else pipeline.pretrain_lib, name,
                        lambda *a, name=name, **k: pytest.fail(f"{name} ran again"))


def test_proxy_config_is_the_paper_geometry():
  cfg = load_config("configs/proxy_h200.yaml")
  pipeline.check_pipeline(cfg)
  m, a = cfg.model, cfg.attention
  assert (a.block_size, a.sink_blocks, a.local_blocks, m.qk_head_dim, m.v_head_dim, m.dtype, a.impl) == (
      128, 1, 7, 192, 128, "bfloat16", "auto")
  assert cfg.data.seq_len >= 8192 and cfg.pipeline.pretrain_stages[-1].seq_len == cfg.data.seq_len
  assert (a.sink_blocks + a.local_blocks) * a.block_size <= cfg.data.seq_len // 8   # most needles are `beyond`
  assert cfg.pipeline.ratios == (0.25, 0.5, 0.75) and cfg.pipeline.random_seeds == 3 and cfg.pipeline.alternating
  assert cfg.evaluate.lengths == (4096, 8192, 16384, 32768) and m.max_position_embeddings > 32768
  assert cfg.data.source == "stdlib" and cfg.data.tokenizer == "byte"   # nothing to download
  with pytest.raises(ValueError, match="must include sparsify.ratio=0.5"):
    pipeline.check_pipeline(load_config("configs/proxy_h200.yaml", ["pipeline.ratios=[0.25, 0.75]"]))


def test_once_writes_its_marker_last(tmp_path):
  calls = []

  def work():
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("killed")
    return {"model_dir": tmp_path / "m"}

  with pytest.raises(RuntimeError):
    pipeline.once(tmp_path, "step", work)
  assert not pipeline.done_marker(tmp_path, "step").exists()        # a failed step leaves no marker
  half = pipeline.done_marker(tmp_path, "step").with_suffix(".json.tmp")   # what a killed write leaves
  half.parent.mkdir(parents=True, exist_ok=True)
  half.write_text("{half")
  first = pipeline.once(tmp_path, "step", work)
  again = pipeline.once(tmp_path, "step", work)
  assert len(calls) == 2 and first == again and again["model_dir"] == str(tmp_path / "m") and "wall_s" in again


def test_a_run_directory_resumes_only_its_own_run(tmp_path):
  cfg = load_config("configs/proxy_h200.yaml")
  pipeline.check_same_run(tmp_path, cfg, None)
  pipeline.check_same_run(tmp_path, cfg, None)
  with pytest.raises(ValueError, match=r"another run \(midtrain.stages differs\)"):
    pipeline.check_same_run(tmp_path, load_config("configs/proxy_h200.yaml", ["midtrain.stages=[{seq_len: 8192, "
                                                                               "steps: 1}]"]), None)
  with pytest.raises(ValueError, match=r"another run \(init differs\)"):
    pipeline.check_same_run(tmp_path, cfg, "some/model")


@pytest.mark.slow
def test_proxy_experiment_end_to_end_in_calls(tmp_path, monkeypatch):
  """The experiment command on a tiny proxy: --until stops after a stage, the next call skips what is done."""
  assert pipeline.main(_proxy_argv(tmp_path, "--until", "calibrate")) == 0
  done = {p.stem for p in (tmp_path / "done").glob("*.json")}
  assert done == {"run", "pretrain-0", "pretrain-1", "evaluate-full", "calibrate"}
  assert not (tmp_path / "report.md").exists()

  with monkeypatch.context() as m:
    _refuse(m, "pretrain", "calibrate")
    assert pipeline.main(_proxy_argv(tmp_path)) == 0
  summary = json.loads((tmp_path / "pipeline.json").read_text())
  seeds = [r["seed"] for r in summary["random_selections"]]
  names = ["full", "full+yarn", "loza-sparse", "loza-sparse+midtrain", "loza-sparse+midtrain+yarn",
           "loza-25%+midtrain", "loza-75%+midtrain", *[f"random-{s}+midtrain" for s in seeds], "alternating+midtrain"]
  assert list(summary["evaluation"]) == names and len(seeds) == 2
  assert {k: len(v["ssa_layers"]) for k, v in summary["alpha_selections"].items()} == {
      "loza-25": 1, "loza": 2, "loza-75": 3}
  assert [h["model"] for h in summary["headline"]] == names[:7] + ["random-sparse+midtrain (2 seeds)",
                                                                   "alternating+midtrain"]
  assert [h["sparsity"] for h in summary["headline"]] == [0, 0, 0.5, 0.5, 0.5, 0.25, 0.75, 0.5, 0.5]
  stages = {n: [(s["seq_len"], s["start_step"], s["end_step"]) for s in m["stages"]]
            for n, m in summary["midtrain"].items()}
  assert set(map(str, stages.values())) == {str([(128, 0, 2)])} and len(stages) == 6
  runs = {r["run"]: r for r in summary["throughput"]}
  assert {"pretrain 0", "pretrain 1", "calibrate", "midtrain loza 0", "midtrain loza-75 0"} <= set(runs)
  assert runs["pretrain 1"]["tflops_per_device"] > 0 and runs["calibrate"]["tokens_per_s"] > 0
  assert 0 <= runs["pretrain 0"]["data_share"] < 1
  assert all(0 <= r["answer_acc"] <= 1 for r in summary["pretrain"]["stages"])   # passkey tasks in every stage
  assert len(summary["targets"]) == 4 and set(summary["timings"]) == set(pipeline.STAGES)
  report = (tmp_path / "report.md").read_text()
  for needle in ["### Targets", "## 6. Throughput", "| full+yarn |", "| loza-sparse+midtrain+yarn |",
                 "| loza-75%+midtrain |", "YaRN ×2",
                 "![perplexity_by_length_position.png](eval/perplexity_by_length_position.png)",
                 "![alpha](calibrate/alpha.png)", "| midtrain loza-25 0 | 128 | 2 |"]:
    assert needle in report, needle
  for plot in ["retrieval_heatmap.png", "perplexity_by_position.png", "perplexity_by_length_position.png"]:
    assert (tmp_path / "eval" / plot).is_file()

  with monkeypatch.context() as m:   # everything done: a third call only rewrites the report
    _refuse(m, "pretrain", "calibrate", "sparsify", "midtrain", "evaluate")
    (tmp_path / "report.md").unlink()
    assert pipeline.main(_proxy_argv(tmp_path)) == 0
  assert (tmp_path / "report.md").read_text() == report


def test_pretrain_stage_weight_decay_overrides_the_train_section():
  """A stage's weight_decay replaces train.weight_decay for that stage only; left out, the train section's holds."""
  from pathlib import Path

  from loza_jax.config import load_config
  cfg = load_config("configs/demo_cpu.yaml", [
      "train.weight_decay=0.1", "pipeline.pretrain_stages=[{seq_len: 128, steps: 2, weight_decay: 0.0}, "
      "{seq_len: 128, steps: 2}]"])
  first, second = cfg.pipeline.pretrain_stages
  assert pipeline.pretrain_stage_cfg(cfg, first, 0, Path("x")).train.weight_decay == 0.0
  assert pipeline.pretrain_stage_cfg(cfg, second, 1, Path("y")).train.weight_decay == 0.1
  with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
    load_config("configs/demo_cpu.yaml", ["pipeline.pretrain_stages=[{seq_len: 128, steps: 2, weight_decay: -1}]"])
