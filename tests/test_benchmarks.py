"""Benchmark scripts: ncu CSV sums (kernel_times) and CPU smoke runs of the others."""
import json

import pytest

from benchmarks.kernel_times import kernel_times

HEADER = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'


def _row(i, name, unit, value, metric="gpu__time_duration.sum"):
  return f'"{i}","{name}","{metric}","{unit}","{value}"'


def test_sums_launches_across_units_and_skips_other_lines():
  lines = ["==PROF== Connected to process 1", HEADER,
           _row(0, "fwd", "us", "1,234.5"), _row(1, "fwd", "ns", "500"), _row(2, "bwd", "ms", "2"),
           _row(3, "bwd", "ns", "9", metric="sm__cycles_elapsed.avg"), "==PROF== Disconnected"]
  times = kernel_times(lines)
  assert times.keys() == {"fwd", "bwd"}
  assert times["fwd"][0] == 2 and abs(times["fwd"][1] - 1235.0) < 1e-9
  assert times["bwd"] == [1, 2000.0]


def test_e2e_flop_model():
  """The pair counts behind the FLOP models equal a count of the attention mask itself; LoZA's ideal
  prefill ratio for the LongCat slice at 256K is the ~1.7x the paper geometry implies."""
  import numpy as np

  from benchmarks import e2e
  from benchmarks.attention import pattern_pairs
  from loza_jax.attention import SSA, Full, pattern_allows
  for pattern in (Full(), SSA(128, 1, 7), SSA(16, 2, 3), SSA(8, 0, 2)):
    for T in (100, 1024, 1500):
      pos = np.arange(T)
      assert pattern_pairs(pattern, T) == int(np.asarray(pattern_allows(pattern, pos[:, None], pos[None, :])).sum())
  cfgs = e2e.configs(2, tiny=False)
  ratio = e2e.prefill_flops(cfgs["full"], 262144) / e2e.prefill_flops(cfgs["loza"], 262144)
  assert 1.65 < ratio < 1.75


def test_e2e_runs_end_to_end_on_a_tiny_model(tmp_path):
  from benchmarks import e2e
  e2e.main(["--tiny", "--layers", "1", "--prefill", "64", "--decode", "64", "--train", "64", "--remat", "layer,none",
            "--fit", "128", "--reps", "1", "--steps", "1", "--cache-budget-gib", "0.0001",
            "--results-dir", str(tmp_path)])
  (md,) = tmp_path.glob("*-e2e.md")
  text = md.read_text()
  for section in ("## Prefill", "## Decode (one step", "## Decode attention", "## Training-step memory",
                  "## Training step"):
    assert section in text
  assert "Not measured" not in text


def test_e2e_prefill_in_chunks(tmp_path, monkeypatch):
  """--prefill-chunk: both models prefill 128 tokens in chunks of 64 (the second reads the first from the cache)."""
  from benchmarks import e2e
  starts, real = [], e2e.gen._prefill_fn
  monkeypatch.setattr(e2e.gen, "_prefill_fn", lambda cfg, start: starts.append(start) or real(cfg, start))
  e2e.main(["--tiny", "--layers", "1", "--prefill", "128", "--prefill-chunk", "64", "--decode", "", "--train", "",
            "--reps", "1", "--results-dir", str(tmp_path)])
  (js,) = tmp_path.glob("*-e2e.json")
  res = json.loads(js.read_text())
  row = res["prefill"]["128"]
  assert not res["failed"] and row["chunk"] == 64 and row["full"]["s"] > 0 and row["loza"]["s"] > 0
  assert "| 128 | 64 |" in next(tmp_path.glob("*-e2e.md")).read_text()
  assert set(starts) == {0, 64}   # the memory check and the timed runs both go chunk by chunk
  assert len(row["loza"]["chunk_s"]) == 2 and sum(row["loza"]["chunk_s"]) <= row["loza"]["s"] * 1.5


def test_compile_time_reports_a_step(capsys):
  from benchmarks import compile_time
  compile_time.main(["--config", "configs/demo_cpu.yaml", "--set", "attention.impl=xla"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["compile_s"] > 0 and out["trace_lower_s"] > 0 and out["seq_len"] == 128 and len(out["layer_types"]) == 4


def test_cpu_step_times_the_configs_step(capsys):
  from benchmarks import cpu_step
  cpu_step.main(["--config", "configs/demo_cpu.yaml", "--set", "train.batch_size=2", "--set", "data.seq_len=64",
                 "--set", "data.retrieval_lengths=[64]", "--blocks", "2", "--steps", "1"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["batch"] == 2 and out["seq_len"] == 64 and 0 < out["min_ms"] <= out["median_ms"]


def test_data_prefetch_table(capsys):
  from benchmarks import data_prefetch
  data_prefetch.main(["--config", "configs/demo_cpu.yaml", "--set", "train.batch_size=4", "--batches", "5",
                      "--step-ms", "1"])
  rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 0 ") or r.startswith("| 2 ")]
  assert len(rows) == 2 and all(r.rstrip().endswith("% |") for r in rows)


def test_context_gpu_cost_and_fit_lines(capsys, tmp_path):
  """benchmarks/context_gpu.py on the CPU: both paths give the same loss; fit reports bytes per length."""
  from benchmarks import context_gpu
  context_gpu.main(["--config", "configs/demo_cpu.yaml", "--set", "attention.impl=xla", "--set",
                    "model.num_hidden_layers=2", "--set", "attention.layer_types=[full, ssa]", "--cost-len", "128",
                    "--cost-batch", "1", "--cost-types", "loza", "--reps", "1", "--fit", "128,256",
                    "--fit-types", "loza", "--out", str(tmp_path)])
  recs = [json.loads(line) for line in (tmp_path / "context_gpu.jsonl").read_text().splitlines()]
  cost, fits = recs[0], recs[1:]
  assert cost["what"] == "cost" and cost["shard_map"]["loss"] == pytest.approx(cost["plain"]["loss"], rel=1e-6)
  assert [r["T"] for r in fits] == [128, 256] and 0 < fits[0]["need_bytes"] < fits[1]["need_bytes"]
  assert "| cost | loza | 1 x 128 |" in capsys.readouterr().out


def test_sweep_errors_replays_the_sweep_and_reports_each_output(capsys):
  """benchmarks.sweep_errors draws the GPU sweep's case (as the test does) and prints five error lines per impl."""
  from benchmarks.sweep_errors import errors, sweep_case
  _, pattern, B, T, H, K, D, E, _ = sweep_case(0)
  assert (str(pattern), B, T, H, K, D, E) == ("SSA(block_size=128, sink_blocks=1, local_blocks=3)", 1, 768, 2, 2,
                                             192, 128)
  assert errors([1.0, 2.0], [1.0, 2.0]).startswith("rel 0.000e+00, worst 0.000e+00")
  assert "worst 5.000e-01 at (1,) (got 3, ref 2)" in errors([1.0, 3.0], [1.0, 2.0])
