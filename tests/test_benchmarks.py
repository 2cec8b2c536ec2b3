"""benchmarks/kernel_times.py: per-kernel sums of an ncu CSV log."""
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
