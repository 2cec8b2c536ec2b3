"""Milliseconds per training step of a config on this machine, with the data held fixed.

Usage: python -m benchmarks.cpu_step [--config configs/demo_cpu.yaml] [--set KEY=VALUE ...] [--blocks 6 --steps 8]
Builds the config's trainer, compiles its step, runs 3 warm-up steps, then `blocks` blocks of `steps` steps on
one random batch of the config's shape, and prints one JSON line: the fastest and the median block's ms per
step. Compare settings (e.g. --set attention.impl=xla_dense) in the same session, one after the other: a
shared machine's speed drifts by more than the effects measured.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from loza_jax.config import load_config
from train.trainer import Trainer


def step_ms(cfg, blocks: int = 6, steps: int = 8) -> dict:
  trainer = Trainer(cfg)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.model.vocab_size, (B, T)), jnp.int32),
           "segment_ids": jnp.ones((B, T), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
           "loss_mask": jnp.ones((B, T), jnp.float32)}
  step, state = trainer.compiled_step(), trainer.init_state()
  times = []
  with jax.set_mesh(trainer.mesh):
    for _ in range(3):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    for _ in range(blocks):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - t0) / steps * 1e3)
  return {"min_ms": round(min(times), 1), "median_ms": round(float(np.median(times)), 1), "batch": B, "seq_len": T,
          "impl": cfg.attention.impl, "device": jax.devices()[0].device_kind}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/demo_cpu.yaml")
  p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
  p.add_argument("--blocks", type=int, default=6)
  p.add_argument("--steps", type=int, default=8)
  args = p.parse_args(argv)
  print(json.dumps(step_ms(load_config(args.config, args.set), args.blocks, args.steps)))


if __name__ == "__main__":
  main()
