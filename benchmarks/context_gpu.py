"""Context parallelism on one GPU: the cost of the `shard_map` path at context = 1, and the longest trainable row.

Usage: python -m benchmarks.context_gpu [--config configs/proxy_h200.yaml] [--set KEY=VALUE ...]
           [--cost-len 8192] [--cost-batch 4] [--fit 65536,131072,...] [--run-fit] [--reps 5] [--out DIR]

cost: one loss + gradient step (the config's model, random weights, rows of 4 packed documents) timed through
the plain path and through the context-parallel path forced at context = 1 (`context.force_shard_map`: the
zig-zag relayout, the SSA halo exchange and, for Full sublayers, the latent all-gather with its XLA chunked
attention), for all-full, all-SSA and alternating (LoZA 50%) layer types, in one process.
fit: per row length, the bytes XLA's memory analysis gives that step (batch 1, remat per layer) against the
bytes the process may use; --run-fit also runs the longest fitting LoZA step once. Prints JSON lines, then a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.e2e import device_bytes_limit, needed_bytes
from loza_jax import context, sharding as shd
from loza_jax.config import MeshConfig, load_config, replace
from loza_jax.model import build_model

TYPES = {"full": "full", "ssa": "ssa", "loza": None}   # loza: SSA at odd sublayers


def with_types(cfg, kind: str):
  n = cfg.model.num_attention_sublayers
  types = [TYPES[kind]] * n if TYPES[kind] else ["ssa" if i % 2 else "full" for i in range(n)]
  return replace(cfg, **{"attention.layer_types": tuple(types)})


def batch(B: int, T: int, docs: int = 4, vocab: int = 256):
  tokens = jax.random.randint(jax.random.PRNGKey(T), (B, T), 0, vocab)
  seg = jnp.asarray(np.repeat(np.arange(1, docs + 1), T // docs)[None].repeat(B, 0), jnp.int32)
  return tokens, seg


def step_fn(cfg):
  """(loss + gradient function, random params). Call it once per path: jit caches a trace per function, and the
  path (`context.force_shard_map`) is chosen when the function is traced."""
  model = build_model(cfg)

  def loss(p, tokens, seg):
    logp = jax.nn.log_softmax(model.apply({"params": p}, tokens, seg)[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256), jnp.int32))["params"]))()
  return jax.value_and_grad(loss), params


def mesh_scope(forced: bool):
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(shd.make_mesh(MeshConfig(data=1, fsdp=1, context=1), jax.devices()[:1])))
  stack.enter_context(nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES))
  if forced:
    stack.enter_context(context.force_shard_map())
  return stack


def cost(cfg, B: int, T: int, reps: int) -> dict:
  """Median step seconds, plain vs forced shard_map at context = 1, and the losses (identical up to rounding)."""
  tokens, seg = batch(B, T, vocab=cfg.model.vocab_size)
  out = {}
  for name, forced in (("plain", False), ("shard_map", True)):
    fn, params = step_fn(cfg)
    with mesh_scope(forced):
      step = jax.jit(fn).lower(params, tokens, seg).compile()
      loss, _ = jax.block_until_ready(step(params, tokens, seg))
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, tokens, seg))
        times.append(time.perf_counter() - t0)
    out[name] = {"s": float(np.median(times)), "loss": float(loss)}
  out["ratio"] = out["shard_map"]["s"] / out["plain"]["s"]
  return out


def fit(cfg, T: int):
  """(bytes a batch-1 step of T tokens needs with remat per layer, and a function that runs the compiled step
  once more after a warm-up and returns its seconds)."""
  positions = max(T, cfg.model.max_position_embeddings)
  cfg = replace(cfg, **{"model.remat": True, "model.max_position_embeddings": positions})
  fn, params = step_fn(cfg)
  tokens, seg = batch(1, T, vocab=cfg.model.vocab_size)
  with mesh_scope(False):
    step = jax.jit(fn).lower(params, tokens, seg).compile()
  need, limit = needed_bytes(step), device_bytes_limit()

  def run() -> float:
    jax.block_until_ready(step(params, tokens, seg))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, tokens, seg))
    return time.perf_counter() - t0

  return {"need_bytes": need, "limit_bytes": limit, "fits": None if limit is None else need <= limit}, run


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/proxy_h200.yaml")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--cost-len", type=int, default=8192)
  ap.add_argument("--cost-batch", type=int, default=4)
  ap.add_argument("--cost-types", default="full,ssa,loza")
  ap.add_argument("--fit", default="", help="row lengths whose batch-1 LoZA step memory is analysed")
  ap.add_argument("--fit-types", default="loza,full")
  ap.add_argument("--run-fit", action="store_true", help="also run the longest fitting step of each layer type")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  base = load_config(args.config, args.set)
  rows = []

  def emit(rec):
    rows.append(rec)
    print(json.dumps(rec), flush=True)
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, "context_gpu.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")

  dev = jax.devices()[0].device_kind
  for kind in filter(None, args.cost_types.split(",")):
    emit({"what": "cost", "types": kind, "B": args.cost_batch, "T": args.cost_len, "device": dev,
          **cost(with_types(base, kind), args.cost_batch, args.cost_len, args.reps)})
  for kind in filter(None, args.fit_types.split(",")):
    lengths = [int(x) for x in args.fit.split(",") if x]
    fits = {T: fit(with_types(base, kind), T) for T in lengths}
    longest = max((T for T, (r, _) in fits.items() if r["fits"]), default=None)
    for T, (r, run) in fits.items():
      if args.run_fit and T == longest:
        r["s"] = run()
      emit({"what": "fit", "types": kind, "T": T, "device": dev, **r})
  print("\n| what | layer types | B x T | plain / need | shard_map / limit | ratio / fits |\n|---|---|---|---|---|---|")
  for r in rows:
    if r["what"] == "cost":
      print(f"| cost | {r['types']} | {r['B']} x {r['T']} | {r['plain']['s'] * 1e3:.1f} ms | "
            f"{r['shard_map']['s'] * 1e3:.1f} ms | {r['ratio']:.3f} |")
    else:
      lim = "–" if r["limit_bytes"] is None else f"{r['limit_bytes'] / 2**30:.1f} GiB"
      ran = f", step {r['s']:.2f} s" if "s" in r else ""
      print(f"| fit | {r['types']} | 1 x {r['T']} | {r['need_bytes'] / 2**30:.1f} GiB | {lim} | {r['fits']}{ran} |")


if __name__ == "__main__":
  main()
