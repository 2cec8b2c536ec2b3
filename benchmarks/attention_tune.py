"""Time each attention kernel alone over candidate launch shapes (Tiles) on one GPU.

    python -m benchmarks.attention_tune [--seq 131072] [--full-seq 32768]

B=1, H=16, D=192, E=128, bf16, SSA(128, 1, 7) and causal Full. Prints one line per
(kernel, candidate): median ms, or the compile error. Used to pick kernels_pallas defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp

from benchmarks.attention import time_call
from kernels_pallas import flash, ssa_bwd, ssa_fwd
from kernels_pallas.tile_io import Tiles

B, H, D, E = 1, 16, 192, 128

FWD = [Tiles(128, 64, 8, 3), Tiles(128, 64, 8, 4), Tiles(128, 128, 8, 2), Tiles(128, 64, 8, 2)]
DQ = [Tiles(128, 64, 8, 2), Tiles(128, 64, 8, 3), Tiles(64, 32, 4, 3), Tiles(64, 64, 4, 3)]
DKV = [Tiles(64, 32, 4, 3), Tiles(64, 32, 4, 4), Tiles(64, 32, 8, 3), Tiles(128, 64, 8, 2)]


def inputs(T):
  keys = jax.random.split(jax.random.PRNGKey(T), 4)
  q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
  k = jax.random.normal(keys[1], (B, T, H, D), jnp.bfloat16)
  v = jax.random.normal(keys[2], (B, T, H, E), jnp.bfloat16)
  do = jax.random.normal(keys[3], (B, T, H, E), jnp.bfloat16)
  return q, k, v, do


def tune(T, local, rows_out):
  q, k, v, do = inputs(T)
  base = flash.make_config(q, k, v, scale=D ** -0.5, block_size=128, sink_blocks=1, local_blocks=local,
                           interpret=False)
  n = base.n_tiles
  seg = jnp.ones((B, T), jnp.int32)
  start = jnp.zeros((B, n), jnp.int32)
  end = jnp.full((B, n), n - 1, jnp.int32)
  o, lse = jax.jit(lambda q, k, v: ssa_fwd.forward(q, k, v, seg, start, base))(q, k, v)
  dlse = jnp.zeros_like(lse)
  _, delta = jax.jit(lambda *a: ssa_bwd.dq(*a, start, base))(q, k, v, o, do, lse, dlse)
  name = "ssa" if local else "full"
  jobs = [("fwd", t, lambda c: jax.jit(lambda q, k, v: ssa_fwd.forward(q, k, v, seg, start, c)), (q, k, v))
          for t in FWD]
  jobs += [("dq", t, lambda c: jax.jit(lambda *a: ssa_bwd.dq(*a, start, c)), (q, k, v, o, do, lse, dlse))
           for t in DQ]
  jobs += [("dkv", t, lambda c: jax.jit(lambda *a: ssa_bwd.dkv(*a, end, c)), (q, k, v, do, lse, delta))
           for t in DKV]
  if local:
    jobs += [("sink", t, lambda c: jax.jit(lambda *a: ssa_bwd.sink_partials(*a, start, end, c)),
              (q, k, v, do, lse, delta)) for t in DKV]
  for kernel, t, make, args in jobs:
    field = "dkv" if kernel == "sink" else kernel
    cfg = dataclasses.replace(base, **{field: t})
    try:
      ms = time_call(make(cfg), *args) * 1e3
      msg = f"{ms:9.3f} ms"
    except Exception as e:  # noqa: BLE001 - a candidate that does not compile is reported, not fatal
      ms, msg = float("nan"), f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    rows_out.append((name, T, kernel, t, ms))
    print(f"{name:4s} T={T:7d} {kernel:4s} rows={t.rows:3d} cols={t.cols:3d} warps={t.num_warps} "
          f"stages={t.num_stages}: {msg}", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=131072)
  p.add_argument("--full-seq", type=int, default=0)
  args = p.parse_args(argv)
  rows = []
  tune(args.seq, 7, rows)
  if args.full_seq:
    tune(args.full_seq, None, rows)
  print("\nbest per kernel:")
  for (name, T, kernel), group in itertools.groupby(rows, key=lambda r: r[:3]):
    ok = [r for r in group if r[4] == r[4]]
    if ok:
      best = min(ok, key=lambda r: r[4])
      print(f"{name} T={T} {kernel}: {best[3]} {best[4]:.3f} ms")


if __name__ == "__main__":
  main()
