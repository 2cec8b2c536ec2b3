"""How long a training loop waits for data, with and without the prefetch thread (data.prefetch_batches).

Usage: python -m benchmarks.data_prefetch [--config configs/proxy_h200.yaml] [--step-ms 10] [--batches 300]
        [--set KEY=VALUE ...]
Draws batches of the config's data (default: the proxy's first pretraining stage, 32 rows of 128 tokens)
with a stand-in step between them that sleeps `--step-ms` (releasing the GIL, as a loop waiting on an
accelerator does), for data.prefetch_batches 0 and 2, and prints steps/s and the share of time spent in next().
"""
from __future__ import annotations

import argparse
import time

from loza_jax.config import load_config
from train.iterators import train_iterator

STAGE0 = ["data.seq_len=128", "data.retrieval_lengths=[96, 112, 128]", "train.batch_size=32"]


def measure(config: str, overrides: list[str], prefetch: int, batches: int, step_s: float) -> dict:
  it = train_iterator(load_config(config, [*overrides, f"data.prefetch_batches={prefetch}"]))
  next(it)                                   # corpus, tokenizer and the first pack out of the way
  wait, t = 0.0, time.perf_counter()
  for _ in range(batches):
    t0 = time.perf_counter()
    next(it)
    wait += time.perf_counter() - t0
    end = time.perf_counter() + step_s
    while time.perf_counter() < end:
      time.sleep(0.001)
  total = time.perf_counter() - t
  return {"prefetch_batches": prefetch, "steps_per_s": batches / total, "waiting": wait / total}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/proxy_h200.yaml")
  p.add_argument("--set", action="append", default=None, help="config override; default: the proxy's stage 0")
  p.add_argument("--step-ms", type=float, default=10.0)
  p.add_argument("--batches", type=int, default=300)
  args = p.parse_args(argv)
  overrides = STAGE0 if args.set is None else args.set
  print("| data.prefetch_batches | steps/s | time waiting for data |\n|---|---|---|")
  for n in (0, 2):
    r = measure(args.config, overrides, n, args.batches, args.step_ms / 1e3)
    print(f"| {n} | {r['steps_per_s']:.1f} | {r['waiting']:.0%} |")


if __name__ == "__main__":
  main()
