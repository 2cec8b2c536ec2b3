"""Time the Mosaic GPU kernels against the Triton ones and the tokamax/cuDNN anchors, one GPU.

    python -m benchmarks.mosaic_tune [--seq 131072] [--full-seq 32768] [--backward]

B=1, H=16, D=192, E=128, bf16. First checks each Mosaic variant against the XLA reference at
T=4096 (max |error| of o and lse), then prints the median ms of: the Triton forward, the Mosaic
forward with persistent CTAs (132) and with one CTA per work item, its defaults, its defaults with
the row sum taken after the tensor-core wait, tokamax's window-1024
(SSA) or causal (Full) forward, and SSA fwd+bwd with either forward. --backward instead times
SSA fwd+bwd (Mosaic forward) with each backward choice (Triton, Mosaic, Mosaic dQ + Triton
dK/dV), cuDNN's window-1024 fwd+bwd, the dQ and dK/dV kernels of each alone (the Mosaic dK/dV
also with other ring depths, each checked bit-equal to the default first, and with the sink
items, checked against the Triton sink partials), the Triton sink partials and the XLA delta.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.attention import WINDOW, _fwd_bwd, cudnn_impls, time_call, tokamax_impls
from kernels_pallas import flash, mosaic_bwd, mosaic_fwd, ssa_bwd, ssa_fwd
from loza_jax import attention as A

B, H, D, E = 1, 16, 192, 128


def inputs(T):
  keys = jax.random.split(jax.random.PRNGKey(T), 3)
  return (jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16),
          jax.random.normal(keys[1], (B, T, H, D), jnp.bfloat16),
          jax.random.normal(keys[2], (B, T, H, E), jnp.bfloat16))


def variants(q, k, v, local):
  """name -> jitted forward (o only) for the Triton and Mosaic kernels."""
  T = q.shape[1]
  cfg = flash.make_config(q, k, v, scale=D ** -0.5, block_size=128, sink_blocks=1, local_blocks=local,
                          interpret=False, forward="mosaic")
  seg = jnp.ones((B, T), jnp.int32)
  start = jnp.zeros((B, cfg.n_tiles), jnp.int32)
  items = B * H * cfg.n_tiles
  out = {"triton": jax.jit(lambda q, k, v: ssa_fwd.forward(q, k, v, seg, start, cfg)[0])}
  for label, kw in (("mosaic persistent", dict(ctas=132)), ("mosaic 1 item/CTA", dict(ctas=items)),
                    ("mosaic default", {}), ("mosaic rowsum after", dict(rowsum_first=False))):
    mc = dataclasses.replace(cfg.mosaic, **kw)
    out[label] = jax.jit(lambda q, k, v, mc=mc: mosaic_fwd.forward(q, k, v, start, mc)[0])
  return out


def check(local):
  q, k, v = inputs(4096)
  pattern = A.SSA(128, 1, 7) if local else A.Full()
  up = lambda x: x.astype(jnp.float32)
  o_ref, lse_ref = A.attention_with_lse(up(q), up(k), up(v), pattern=pattern, impl="xla")
  for label, fn in variants(q, k, v, local).items():
    if label == "triton":
      continue
    o = fn(q, k, v)
    err_o = float(jnp.max(jnp.abs(o.astype(jnp.float32) - o_ref)))
    print(f"check {'ssa' if local else 'full'} T=4096 {label}: max|o err| {err_o:.3e}", flush=True)
  _, lse = flash.flash_attention(q, k, v, scale=D ** -0.5, block_size=128, sink_blocks=1, local_blocks=local,
                                 forward="mosaic")
  print(f"check lse: max|lse err| {float(jnp.max(jnp.abs(lse - lse_ref))):.3e}", flush=True)


def _time_all(fns, prefix, table):
  """Time each {label: (jitted fn, args)}; a failing variant is reported, not fatal."""
  for label, (fn, args) in fns.items():
    try:
      ms = f"{time_call(fn, *args) * 1e3:9.3f} ms"
    except Exception as e:  # noqa: BLE001 - report a failing variant and go on
      ms = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    table.append(f"{prefix} {label:32s} {ms}")
    print(table[-1], flush=True)


def bench(T, local, table):
  q, k, v = inputs(T)
  name = "ssa" if local else "full"
  fns = variants(q, k, v, local)
  tk = tokamax_impls()
  anchor = "tokamax window1024" if local else "tokamax causal"
  if anchor in tk:
    fns[anchor] = jax.jit(tk[anchor][0])
  if local:
    for fwd in ("triton", "mosaic"):
      attn = lambda q, k, v, fwd=fwd: flash.flash_attention(q, k, v, scale=D ** -0.5, block_size=128,
                                                            sink_blocks=1, local_blocks=7, forward=fwd)[0]
      fns[f"fwd+bwd, {fwd} fwd"] = _fwd_bwd(attn)
  _time_all({label: (fn, (q, k, v)) for label, fn in fns.items()}, f"{name:4s} T={T:7d}", table)


def bench_backward(T, table):
  """SSA fwd+bwd with the Triton or the Mosaic backward, cuDNN's window fwd+bwd, and each
  backward kernel alone."""
  q, k, v = inputs(T)
  fns = {}
  for bwd in flash.BACKWARDS:
    attn = lambda q, k, v, bwd=bwd: flash.flash_attention(q, k, v, scale=D ** -0.5, block_size=128, sink_blocks=1,
                                                          local_blocks=7, forward="mosaic", backward=bwd)[0]
    fns[f"fwd+bwd, mosaic fwd, {bwd} bwd"] = (_fwd_bwd(attn), (q, k, v))
  fns["cudnn window1024 fwd+bwd"] = (_fwd_bwd(cudnn_impls()["cudnn window1024"][0]), (q, k, v))
  cfg = flash.make_config(q, k, v, scale=D ** -0.5, block_size=128, sink_blocks=1, local_blocks=7,
                          interpret=False, forward="mosaic", backward="mosaic")
  n = cfg.n_tiles
  start, end = jnp.zeros((B, n), jnp.int32), jnp.full((B, n), n - 1, jnp.int32)
  o, lse = jax.jit(lambda q, k, v: mosaic_fwd.forward(q, k, v, start, cfg.mosaic))(q, k, v)
  do = jax.random.normal(jax.random.PRNGKey(1), o.shape, o.dtype)
  dlse = jnp.zeros_like(lse)
  _, delta = jax.jit(lambda *a: ssa_bwd.dq(*a, start, cfg))(q, k, v, o, do, lse, dlse)
  fns["dq triton"] = (jax.jit(lambda *a: ssa_bwd.dq(*a, start, cfg)), (q, k, v, o, do, lse, dlse))
  fns["dq mosaic (+ delta)"] = (jax.jit(lambda *a: mosaic_bwd.dq(*a, start, cfg.mosaic)), (q, k, v, o, do, lse, dlse))
  fns["dkv triton"] = (jax.jit(lambda *a: ssa_bwd.dkv(*a, end, cfg)), (q, k, v, do, lse, delta))
  fns["dkv mosaic"] = (jax.jit(lambda *a: mosaic_bwd.dkv(*a, start, end, cfg.mosaic)[0]), (q, k, v, do, lse, delta))
  dkv_args = (q, k, v, do, lse, delta)
  base = fns["dkv mosaic"][0](*dkv_args)
  for label, kw in (("2 slots", dict(dkv_slots=2)), ("4 slots", dict(dkv_slots=4))):
    fn = jax.jit(lambda *a, mc=dataclasses.replace(cfg.mosaic, **kw): mosaic_bwd.dkv(*a, start, end, mc)[0])
    try:                                    # every variant must give the default's bits
      same = all(bool(jnp.array_equal(x, y)) for x, y in zip(fn(*dkv_args), base))
      print(f"check dkv mosaic, {label}: {'equal to' if same else 'DIFFERS from'} the default", flush=True)
    except Exception as e:  # noqa: BLE001 - reported again when timed
      print(f"check dkv mosaic, {label} FAILED: {type(e).__name__}: {str(e)[:1500]}", flush=True)
    fns[f"dkv mosaic, {label}"] = (fn, dkv_args)
  fns["sink partials triton"] = (jax.jit(lambda *a: ssa_bwd.sink_partials(*a, start, end, cfg)),
                                 (q, k, v, do, lse, delta))
  with_sink = jax.jit(lambda *a: mosaic_bwd.dkv(*a, start, end, cfg.mosaic, with_sink=True))
  try:                                      # its partials against the Triton sink kernel's
    _, got = with_sink(*dkv_args)
    want = fns["sink partials triton"][0](*dkv_args)
    err = max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want))
    print(f"check dkv mosaic + sink items: max|partial - triton| / max|triton| {err:.2e}", flush=True)
  except Exception as e:  # noqa: BLE001 - reported again when timed
    print(f"check dkv mosaic + sink items FAILED: {type(e).__name__}: {str(e)[:1500]}", flush=True)
  fns["dkv mosaic + sink items"] = (with_sink, dkv_args)
  fns["delta (xla)"] = (jax.jit(lambda o, do: jnp.einsum("bthe,bthe->bht", o.astype(jnp.float32),
                                                          do.astype(jnp.float32))), (o, do))
  _time_all(fns, f"ssa  T={T:7d}", table)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=131072)
  p.add_argument("--full-seq", type=int, default=32768)
  p.add_argument("--backward", action="store_true", help="only the backward comparison at --seq")
  args = p.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, window {WINDOW}")
  if args.backward:
    table = []
    bench_backward(args.seq, table)
    print("\n" + "\n".join(table))
    return
  for local in (7, None):
    try:
      check(local)
    except Exception as e:  # noqa: BLE001
      print(f"check FAILED: {type(e).__name__}: {str(e)[:2000]}")
  table = []
  bench(args.seq, 7, table)
  if args.full_seq:
    bench(args.full_seq, None, table)
  print("\n" + "\n".join(table))


if __name__ == "__main__":
  main()
