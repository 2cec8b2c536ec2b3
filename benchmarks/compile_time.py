"""Seconds to trace, lower and compile one training step of a config (nothing runs).

Usage: python -m benchmarks.compile_time [--config configs/proxy_h200.yaml] [--set KEY=VALUE ...]
Builds the trainer of the config (with its overrides) and compiles its jitted step on abstract inputs of the
config's batch: where the seconds before a run's first step go. XLA's own options come from XLA_FLAGS
(e.g. --xla_gpu_autotune_level=0); run the script once per setting to compare them. Prints one line.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from loza_jax.config import load_config
from train.trainer import Trainer


def compile_seconds(cfg) -> dict:
  trainer = Trainer(cfg)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  spec = lambda dt: jax.ShapeDtypeStruct((B, T), dt, sharding=trainer._batch_shardings()["tokens"])
  batch = {"tokens": spec(jnp.int32), "segment_ids": spec(jnp.int32), "positions": spec(jnp.int32),
           "loss_mask": spec(jnp.float32)}
  t0 = time.perf_counter()
  with jax.set_mesh(trainer.mesh):
    lowered = trainer.compiled_step().lower(trainer.abstract_state, batch)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {"trace_lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), "batch": B, "seq_len": T,
          "impl": cfg.attention.impl, "layer_types": list(cfg.layer_types), "device": jax.devices()[0].device_kind,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/proxy_h200.yaml")
  p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
  args = p.parse_args(argv)
  print(json.dumps(compile_seconds(load_config(args.config, args.set))))


if __name__ == "__main__":
  main()
