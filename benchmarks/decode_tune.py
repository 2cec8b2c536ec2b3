"""Decode attention of one full MLA sublayer at LongCat widths: the split-K kernel's tile and split
choices vs the XLA absorbed form and the HBM floor (latent cache bytes ÷ copy bandwidth measured here).

    python -m benchmarks.decode_tune [--settings 131072x113,131072x1,262144x56] [--out DIR]

Every candidate is checked against the XLA form before it is timed (as chained calls in one executable,
`benchmarks.e2e.chained_time`); prints one table, fastest first per setting, and writes it (plus JSON)
under --out.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from benchmarks.e2e import ceilings, chained_time
from kernels_pallas import decode
from loza_jax import cache as kc
from loza_jax.attention import Full

H, C, R = 64, 512, 64


def candidates(base: decode.DecodeConfig, B: int, N: int, per_wave: int = 264):
  """The default; then its tiles with splits giving whole waves of programs (`per_wave` resident at
  once: 2 per SM of an H100/H200 at this tile's registers); then tiles × warps/stages at the same
  programs per row; then fewer/more splits."""
  seen = {base}
  row_blocks = -(-N // base.rows)
  waves = [(base.rows, base.cols, base.num_warps, base.num_stages, None, w) for w in (2, 4, 6, 8)]
  grid = [(r, c, w, st, 1, None) for r in (16, 32, 64) for c in (32, 64) for w, st in ((4, 2), (8, 2), (4, 3))]
  grid += [(base.rows, base.cols, base.num_warps, base.num_stages, m, None) for m in (0.25, 0.5, 2, 4)]
  yield base
  for rows, cols, warps, stages, mult, n_waves in waves + grid:
    if n_waves is None:
      splits = max(1, round(base.splits * mult * rows / base.rows))
    else:
      splits = max(1, round(n_waves * per_wave / (B * row_blocks)))
    cfg = decode.DecodeConfig(base.scale, None, rows, cols, splits, base.c_parts, warps, stages)
    if cfg not in seen:
      seen.add(cfg)
      yield cfg


def inputs(S: int, B: int) -> tuple:
  """(q_lat, q_rope, ckv, krope, q_pos, k_pos): B rows of one decode query each over S cached keys, bf16."""
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  return (jax.random.normal(ks[0], (B, 1, H, C), jnp.bfloat16), jax.random.normal(ks[1], (B, 1, H, R), jnp.bfloat16),
          jax.random.normal(ks[2], (B, S, C), jnp.bfloat16), jax.random.normal(ks[3], (B, S, R), jnp.bfloat16),
          jnp.full((B, 1), S - 1, jnp.int32), jnp.broadcast_to(jnp.arange(S), (B, S)))


def run_setting(S: int, B: int, bw: float, limit: int) -> list[dict]:
  floor = B * S * (C + R) * 2 / bw
  args = inputs(S, B)
  ref_f = lambda *a: kc.latent_attention(*a, Full(), 0.07, impl="xla")[0]
  ref = jax.jit(ref_f)(*args)
  rows = [{"impl": "xla", "s": chained_time(ref_f, args)}]
  base = decode.default_config(B, H, S, C, 0.07, None, jnp.bfloat16, False)
  for i, cfg in enumerate(candidates(base, B, H)):
    if i >= limit:
      break
    f = lambda *a, cfg=cfg: decode.latent_attention(*a, scale=0.07, cfg=cfg)[0]
    name = f"r{cfg.rows} c{cfg.cols} w{cfg.num_warps} st{cfg.num_stages} sp{cfg.splits}" + (" *" if i == 0 else "")
    try:
      out = jax.jit(f)(*args)
      err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
      if err > 2e-2:
        rows.append({"impl": name, "s": None, "error": f"rel err {err:.3g}"})
        continue
      rows.append({"impl": name, "s": chained_time(f, args), "rel_err": err})
    except Exception as e:  # noqa: BLE001 - a tile that does not compile is reported, not fatal
      rows.append({"impl": name, "s": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
  for r in rows:
    r.update(ctx=S, batch=B, floor_s=floor)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--settings", default="131072x113,131072x1,262144x56")
  p.add_argument("--limit", type=int, default=40, help="candidates timed per setting (default first)")
  p.add_argument("--out", default=None)
  p.add_argument("--once", action="store_true",
                 help="run the default kernel twice on the first setting, untimed (for a profiler: skip launch 1)")
  args = p.parse_args(argv)
  if args.once:
    S, B = (int(x) for x in args.settings.split(",")[0].split("x"))
    a = inputs(S, B)
    fn = jax.jit(lambda *x: decode.latent_attention(*x, scale=0.07, interpret=jax.default_backend() != "gpu")[0])
    for _ in range(2):
      fn(*a).block_until_ready()
    return
  bw = ceilings(False)["hbm_bytes_per_s"]
  results = []
  for s in args.settings.split(","):
    S, B = (int(x) for x in s.split("x"))
    results += run_setting(S, B, bw, args.limit)
    print(f"done {s}", flush=True)
  lines = [f"device {jax.devices()[0].device_kind}, copy bandwidth {bw / 1e12:.2f} TB/s", "",
           "ctx | batch | impl | ms | floor ms | x floor", "---|---|---|---|---|---"]
  for (S, B) in dict.fromkeys((r["ctx"], r["batch"]) for r in results):
    group = [r for r in results if (r["ctx"], r["batch"]) == (S, B)]
    group.sort(key=lambda r: (r["s"] is None, r["s"] or 0))
    for r in group:
      ms = "–" if r["s"] is None else f"{r['s'] * 1e3:.3f}"
      x = "–" if r["s"] is None else f"{r['s'] / r['floor_s']:.2f}"
      lines.append(f"{S} | {B} | {r['impl']} | {ms} | {r['floor_s'] * 1e3:.3f} | {x}" +
                   (f" ({r['error']})" if "error" in r else ""))
  text = "\n".join(lines)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_tune.md"), "w") as fh:
      fh.write(text + "\n")
    with open(os.path.join(args.out, "decode_tune.json"), "w") as fh:
      json.dump(results, fh, indent=1)
  print(text)


if __name__ == "__main__":
  main()
