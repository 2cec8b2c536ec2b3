"""Sum the per-kernel durations of an `ncu --csv --metrics gpu__time_duration.sum` log.

    python -m benchmarks.kernel_times kernels.csv

Prints one row per kernel name (launches, total µs), largest first, then the total: the time
each piece of a profiled step takes, kernels serialised by ncu.
"""
from __future__ import annotations

import collections
import csv
import sys

UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def kernel_times(lines) -> dict:
  """{kernel name: [launches, total µs]} from ncu's CSV rows (other lines are skipped)."""
  rows = [line for line in lines if line.startswith('"')]
  out = collections.defaultdict(lambda: [0, 0.0])
  for row in csv.DictReader(rows):
    if row.get("Metric Name") != "gpu__time_duration.sum":
      continue
    scale = UNITS[row["Metric Unit"]]
    entry = out[row["Kernel Name"]]
    entry[0] += 1
    entry[1] += float(row["Metric Value"].replace(",", "")) * scale
  return dict(out)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  with open(argv[0]) as f:
    times = kernel_times(f)
  total = sum(us for _, us in times.values())
  for name, (n, us) in sorted(times.items(), key=lambda kv: -kv[1][1]):
    print(f"{us:10.1f} µs  {n:3d}x  {name[:110]}")
  print(f"{total:10.1f} µs  total")


if __name__ == "__main__":
  main()
