"""End-to-end speed of a LongCat-Flash-geometry slice, full attention vs LoZA (50% SSA sublayers).

    python -m benchmarks.e2e [--layers 2] [--prefill 32768,131072,262144] [--prefill-models full,loza] [--prefill-chunk N]
                             [--decode 32768,131072,262144] [--train 32768,131072] [--remat layer,none]
                             [--fit 262144,...] [--out DIR] [--tiny]

The MoE keeps LongCat's per-token expert work (12 experts of width 2048) with 12 experts in all, so
every token runs every expert and the dense dispatch does no wasted work.
One process, one set of random bf16 weights shared by both layouts (full: every MLA sublayer full;
LoZA: sublayers 1, 3, ... SSA with blocks of 128, 1 sink + 7 local blocks). Measures:
- prefill (whole prompt in one chunk through the attention kernels, or --prefill-chunk tokens at a time with
  earlier chunks read from the cache; experts on token chunks): time, tokens/s, the full/LoZA ratio and the
  ideal ratio from the FLOP model below; a prefill whose compiled memory exceeds the device's is reported as
  not measured, with the bytes it needs;
- decode: one on-device step (absorbed MLA over the latent cache, SSA over its ring) at batch 1 and
  at the largest batch whose full-model cache fits --cache-budget-gib; KV-cache bytes per sequence;
  the HBM floor of a step (weights + cache read once at the bandwidth measured in this run);
- decode attention alone for one full vs one SSA sublayer (the cost SSA removes), as device time
  of calls chained in one executable (`chained_time`);
- a training step (forward + backward of every weight; --remat `layer` recomputes each layer,
  `none` nothing; the loss is on the final hidden states so the LM head is left out): tokens/s and
  model TFLOP/s per device; --fit only analyses a step's memory (a step that does not fit can spend
  minutes in XLA's rematerialization pass).
FLOP model: 2·(weights touched per token) + 2·H·(D+E) per visible (query, key) pair; fwd+bwd as
3× the matmuls and 3.5× the attention forward (no credit for rematerialisation).
Writes benchmarks/results/<date>-<device>-e2e.md (and a copy under --out); prints the tables last.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.attention import device_slug, pattern_pairs, version
from loza_jax import cache as kc, generate as gen
from loza_jax.attention import SSA, Full
from loza_jax.config import Config, from_dict, replace
from loza_jax.model import build_model

SLICE = dict(architecture="longcat_flash", vocab_size=131072, hidden_size=6144, num_attention_heads=64,
             q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
             intermediate_size=12288, n_routed_experts=12, num_experts_per_tok=12, moe_intermediate_size=2048,
             zero_expert_num=0, moe_impl="dense", routed_scaling_factor=6.0, mla_scale_q_lora=True, mla_scale_kv_lora=True,
             max_position_embeddings=1 << 21, dtype="bfloat16", param_dtype="bfloat16", moe_token_chunk=16384,
             rope_theta=10_000_000.0)
TINY = dict(SLICE, vocab_size=256, hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, intermediate_size=96, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, moe_token_chunk=64, dtype="float32",
            param_dtype="float32")


def configs(layers: int, tiny: bool) -> dict[str, Config]:
  m = dict(TINY if tiny else SLICE, num_hidden_layers=layers)
  att = dict(block_size=16 if tiny else 128, sink_blocks=1, local_blocks=7 if not tiny else 2,
             impl="xla" if tiny else "auto")
  full = from_dict(Config, {"model": m, "attention": dict(att, layer_types=["full"] * 2 * layers)})
  loza = replace(full, **{"attention.layer_types": tuple("ssa" if i % 2 else "full" for i in range(2 * layers))})
  return {"full": full, "loza": loza}


# ----------------------------------------------------------------------------------------
# FLOP and byte model.


def matmul_flops_per_token(cfg: Config) -> float:
  """2 × weights a token multiplies through (MLA projections, dense MLPs, top-k experts, router); no head."""
  m = cfg.model
  H, M = m.num_attention_heads, m.hidden_size
  mla = (M * m.q_lora_rank + m.q_lora_rank * H * m.qk_head_dim + M * (m.kv_lora_rank + m.qk_rope_head_dim)
         + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim) + H * m.v_head_dim * M)
  mlp = 3 * M * m.intermediate_size
  moe = m.num_experts_per_tok * 3 * M * m.moe_intermediate_size + M * (m.n_routed_experts + m.zero_expert_num)
  return 2.0 * m.num_hidden_layers * (2 * mla + 2 * mlp + moe)


def attention_flops(cfg: Config, T: int) -> float:
  """Forward attention FLOPs of every sublayer over one T-token sequence."""
  m, a = cfg.model, cfg.attention
  ssa = SSA(a.block_size, a.sink_blocks, a.local_blocks)
  per_pair = 2.0 * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim)
  return sum(per_pair * pattern_pairs(Full() if t == "full" else ssa, T) for t in cfg.layer_types)


def prefill_flops(cfg: Config, T: int) -> float:
  return T * matmul_flops_per_token(cfg) + attention_flops(cfg, T)


def train_flops(cfg: Config, T: int) -> float:
  return 3 * T * matmul_flops_per_token(cfg) + 3.5 * attention_flops(cfg, T)


def param_bytes(params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------
# Timing.


def timed(fn, reps: int) -> float:
  """Median seconds of fn() (which blocks) over reps runs after one warm-up."""
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def chained_time(f, args, k: int = 16, reps: int = 5) -> float:
  """Device seconds per call of f(*args) -> array: k calls chained in one executable, each one's first
  argument nudged by the sum of the previous output (so no call can be hoisted, merged or sliced),
  so the host's dispatch of a sub-millisecond call is not counted, as inside a decode step."""
  def chain(x, *rest):
    dep = jnp.zeros((), jnp.float32)
    for _ in range(k):
      dep = jnp.sum(f(x + (dep * 1e-30).astype(x.dtype), *rest).astype(jnp.float32))
    return dep
  fn = jax.jit(chain)
  return timed(lambda: fn(*args).block_until_ready(), reps) / k


def ceilings(tiny: bool) -> dict:
  """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured here."""
  n = (1 << 20) if tiny else (1 << 30)
  x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16)
  copy = jax.jit(lambda x: x * 1.0001)
  t = timed(lambda: copy(x).block_until_ready(), 10)
  k = 256 if tiny else 8192
  a = jax.random.normal(jax.random.PRNGKey(1), (k, k), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  tm = timed(lambda: mm(a).block_until_ready(), 10)
  return {"hbm_bytes_per_s": 2 * n * 2 / t, "matmul_flop_per_s": 2 * k**3 / tm}


def random_cache(cfg: Config, batch: int, ctx: int, capacity: int, key) -> kc.Cache:
  """A cache holding `ctx` tokens per row of random latents, SSA rings placed as decode would leave them.

  Built from the cache's shapes only, so an empty cache never sits beside the random one (at the
  largest batch the two would not fit together)."""
  shapes = jax.eval_shape(lambda: kc.init_cache(cfg, batch, capacity, jnp.bfloat16))
  a = cfg.attention
  sink, local = a.sink_blocks * a.block_size, a.local_blocks * a.block_size
  layers = []
  for i, e in enumerate(shapes.layers):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    new = {"ckv": jax.random.normal(k1, e["ckv"].shape, e["ckv"].dtype),
           "krope": jax.random.normal(k2, e["krope"].shape, e["krope"].dtype)}
    if "pos" in e:
      p = kc.ring_positions(jnp.full((1, 1), ctx - 1), e["pos"].shape[1], sink, local)
      new["pos"] = jnp.broadcast_to(jnp.where((p >= 0) & (p < ctx), p, -1), e["pos"].shape).astype(jnp.int32)
    layers.append(new)
  return kc.Cache(jnp.full((batch,), ctx, jnp.int32), tuple(layers))


def needed_bytes(compiled) -> int:
  """Device bytes a compiled call needs when run: arguments, outputs (less what aliases them), temporaries."""
  ma = compiled.memory_analysis()
  return ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes


def device_bytes_limit() -> int | None:
  """Bytes this process may allocate on the device (None where the backend does not say)."""
  return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def prefill_bytes(cfg: Config, params, T: int, chunk: int | None = None) -> int:
  """Device bytes a T-token prefill in chunks of `chunk` (default: one chunk) needs: the larger of its first
  chunk and its last, which attends to the longest past (XLA's memory analysis of the compiled calls;
  nothing runs)."""
  chunk = chunk or T
  cache = jax.eval_shape(lambda: kc.init_cache(cfg, 1, T, jnp.bfloat16))
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
  need = lambda start: needed_bytes(gen._prefill_fn(cfg, start).lower(
      params, cache, sds((1, min(chunk, T - start)), jnp.int32), sds((1,), jnp.int32),
      sds((1, cfg.model.vocab_size), jnp.float32)).compile())
  return max(need(start) for start in {0, (T - 1) // chunk * chunk})


def bench_prefill(cfgs, params, T: int, reps: int, chunk: int | None = None) -> dict:
  """Prefill of one T-token prompt per model, in one chunk or in chunks of `chunk` tokens (each chunk attends to
  its own keys through the attention kernels and to the earlier ones through the cache); a model whose calls
  would not fit in device memory raises MemoryError with the bytes it needs (recorded as not measured) before
  anything is allocated."""
  chunk = chunk or T
  out = {"chunk": chunk}
  tokens = jax.random.randint(jax.random.PRNGKey(T), (1, T), 0, next(iter(cfgs.values())).model.vocab_size)
  limit = device_bytes_limit()
  for name, cfg in cfgs.items():
    need = prefill_bytes(cfg, params, T, chunk)
    if limit and need > limit:
      raise MemoryError(f"{name} prefill at {T} in chunks of {chunk} needs {need / 2**30:.1f} GiB, the device has "
                        f"{limit / 2**30:.1f} GiB")

    chunk_s: list[float] = []
    mark = [0.0]

    def tick(start, last, cache):
      """Wait for each chunk and print its time as it ends: a run stopped part-way still tells how far it got,
      and the times show how a chunk's cost grows with the past it attends to."""
      jax.block_until_ready((last, cache))
      now = time.perf_counter()
      chunk_s.append(now - mark[0])
      mark[0] = now
      print(f"  {name} prefill {T}: chunk at {start} took {chunk_s[-1]:.2f} s", flush=True)

    def run():
      cache = kc.init_cache(cfg, 1, T, jnp.bfloat16)
      chunk_s.clear()
      mark[0] = time.perf_counter()
      last, cache = gen.prefill(params, cfg, cache, tokens, np.array([T]), chunk=chunk, on_chunk=tick)
      jax.block_until_ready((last, cache))
    s = timed(run, reps)
    out[name] = {"s": s, "tok_per_s": T / s, "tflops": prefill_flops(cfg, T) / s / 1e12, "need_bytes": need,
                 "chunk_s": [round(x, 4) for x in chunk_s]}   # the last timed run's chunks
  if {"full", "loza"} <= set(out):
    out["ratio"] = out["full"]["s"] / out["loza"]["s"]
    out["ideal"] = prefill_flops(cfgs["full"], T) / prefill_flops(cfgs["loza"], T)
  return out


def bench_decode(cfgs, params, ctx: int, batch: int, steps: int, bw: float) -> dict:
  out = {}
  for name, cfg in cfgs.items():
    cache = random_cache(cfg, batch, ctx, ctx + steps + 2, jax.random.PRNGKey(ctx))
    row_bytes = kc.cache_bytes(cache)
    toks = jnp.zeros((batch,), jnp.int32) + 7
    compiled = gen.compiled_decode_step(params, cfg, cache, toks)      # timed below; its memory is reported
    step = functools.partial(compiled, params)
    logits, cache = step(cache, toks)                                  # warm-up
    jax.block_until_ready(logits)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      logits, cache = step(cache, toks)
      jax.block_until_ready(logits)
      times.append(time.perf_counter() - t0)
    s = float(np.median(times))
    read = param_bytes(params) + batch * sum(
        x.size // batch * x.dtype.itemsize for e, t in zip(cache.layers, cfg.layer_types) for x in e.values())
    out[name] = {"s": s, "cache_bytes_per_seq": row_bytes, "floor_s": read / bw, "tok_per_s": batch / s,
                 "step_temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
    del cache
  out["ratio"] = out["full"]["s"] / out["loza"]["s"]
  out["bytes_saved"] = 1 - out["loza"]["cache_bytes_per_seq"] / out["full"]["cache_bytes_per_seq"]
  return out


def bench_decode_attention(cfg: Config, ctx: int, batch: int, bw: float) -> dict:
  """One sublayer's decode attention (absorbed form) over a full latent cache vs an SSA ring, through
  the XLA form and through what the model runs (cfg.attention.impl: the Pallas kernel on GPU)."""
  m, a = cfg.model, cfg.attention
  H, C, R = m.num_attention_heads, m.kv_lora_rank, m.qk_rope_head_dim
  key = jax.random.PRNGKey(3)
  q_lat = jax.random.normal(key, (batch, 1, H, C), jnp.bfloat16)
  q_rope = jax.random.normal(key, (batch, 1, H, R), jnp.bfloat16)
  q_pos = jnp.full((batch, 1), ctx - 1, jnp.int32)
  ssa = SSA(a.block_size, a.sink_blocks, a.local_blocks)
  out = {}
  for name, S, pattern in (("full", ctx, Full()), ("ssa", kc.ssa_slots(cfg), ssa)):
    ckv = jax.random.normal(key, (batch, S, C), jnp.bfloat16)
    krope = jax.random.normal(key, (batch, S, R), jnp.bfloat16)
    k_pos = jnp.broadcast_to(jnp.arange(S) if name == "full" else
                             jnp.where(jnp.arange(S) < a.block_size, jnp.arange(S),
                                       ctx - S + jnp.arange(S)), (batch, S))
    out[name] = {"floor_s": batch * S * (C + R) * 2 / bw}
    for label, impl in (("xla_s", "xla"), ("s", a.impl)):
      fn = lambda *xs, impl=impl: kc.latent_attention(*xs, pattern, 0.1, impl=impl)[0]
      out[name][label] = chained_time(fn, (q_lat, q_rope, ckv, krope, q_pos, k_pos))
  out["ratio"] = out["full"]["s"] / out["ssa"]["s"]
  return out


REMAT = {"layer": {"model.remat": True},                        # every decoder layer recomputed
         "none": {"model.remat": False, "model.moe_token_chunk": 0}}   # nothing recomputed (more memory)


def train_step(cfg: Config, remat: str):
  """Jitted loss + grad of one row (the loss on the final hidden states: the LM head is excluded)."""
  model = build_model(replace(cfg, **REMAT[remat]))
  loss = lambda p, tokens: jnp.mean(jnp.square(model.apply({"params": p}, tokens,
                                                           return_hidden=True).astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss))


def bench_train(cfgs, params, T: int, reps: int, remat: str = "layer") -> dict:
  """One fwd+bwd step per model; TFLOP/s counts model FLOPs (train_flops), never recomputation."""
  out = {"remat": remat}
  tokens = jax.random.randint(jax.random.PRNGKey(T + 1), (1, T), 0, next(iter(cfgs.values())).model.vocab_size)
  for name, cfg in cfgs.items():
    step = train_step(cfg, remat)
    s = timed(lambda: jax.block_until_ready(step(params, tokens)), reps)
    out[name] = {"s": s, "tok_per_s": T / s, "tflops": train_flops(cfg, T) / s / 1e12}
  out["ratio"] = out["full"]["s"] / out["loza"]["s"]
  return out


def train_fit(cfgs, params, T: int, remat: str = "layer") -> dict:
  """Device bytes a T-token training step needs per model (XLA's memory analysis; nothing runs)."""
  limit = device_bytes_limit()
  out = {"remat": remat, "limit_bytes": limit}
  for name, cfg in cfgs.items():
    need = needed_bytes(train_step(cfg, remat).lower(params, jax.ShapeDtypeStruct((1, T), jnp.int32)).compile())
    out[name] = {"need_bytes": need, "fits": None if limit is None else need <= limit}
  return out


def largest_batch(cfg: Config, ctx: int, budget: float) -> int:
  """Most rows whose full-model bf16 latent cache at `ctx` tokens fits in `budget` bytes."""
  m = cfg.model
  per_row = ctx * (m.kv_lora_rank + m.qk_rope_head_dim) * 2 * m.num_attention_sublayers
  return max(1, int(budget // per_row))


# ----------------------------------------------------------------------------------------


def report(res: dict, cmd: str, seconds: float) -> str:
  f = lambda x, s=".3f": "–" if x is None else format(x, s)
  dev = jax.devices()[0]
  c = res["ceilings"]
  lines = [f"# End-to-end benchmark, {datetime.date.today().isoformat()}", "",
           f"- command: `{cmd}`", f"- device: {dev.device_kind}",
           f"- versions: python {sys.version.split()[0]}, jax {version('jax')}, jaxlib {version('jaxlib')}, "
           f"flax {version('flax')}, triton {version('triton')}",
           f"- slice: {res['slice']}", f"- measured here: copy {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
           f"bf16 matmul {c['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s", f"- wall time of the run: {seconds:.0f} s", ""]
  ms = lambda r, k: f"{r[k]['s'] * 1e3:.2f}"
  sections = [
      ("prefill", "Prefill (batch 1; TFLOP/s count the FLOP model's work, whatever the chunking)",
       "T | chunk | full s | LoZA s | full tok/s | LoZA tok/s | full TFLOP/s | LoZA TFLOP/s | speed-up | ideal (FLOPs)",
       lambda k, r: [k, r.get("chunk", k), *(f"{r[m]['s']:.3f}" if m in r else "–" for m in ("full", "loza")),
                     *(f"{r[m]['tok_per_s']:.0f}" if m in r else "–" for m in ("full", "loza")),
                     *(f"{r[m]['tflops']:.0f}" if m in r else "–" for m in ("full", "loza")),
                     f"{r['ratio']:.2f}x" if "ratio" in r else "–", f"{r['ideal']:.2f}x" if "ideal" in r else "–"]),
      ("decode", "Decode (one step, all rows at the context)",
       "ctx | batch | full ms | LoZA ms | speed-up | full floor ms | LoZA floor ms | KV bytes/seq full | LoZA | saved",
       lambda k, r: [*k, ms(r, "full"), ms(r, "loza"), f"{r['ratio']:.2f}x", f"{r['full']['floor_s'] * 1e3:.2f}",
                     f"{r['loza']['floor_s'] * 1e3:.2f}", f"{r['full']['cache_bytes_per_seq'] / 2**20:.1f} MiB",
                     f"{r['loza']['cache_bytes_per_seq'] / 2**20:.1f} MiB", f"{r['bytes_saved'] * 100:.0f}%"]),
      ("decode_attention", "Decode attention of one sublayer (absorbed MLA: the model's impl; XLA form beside it)",
       "ctx | batch | full ms | full XLA ms | full floor ms | SSA ms | SSA XLA ms | SSA floor ms | full/SSA",
       lambda k, r: [*k, f"{r['full']['s'] * 1e3:.3f}", f"{r['full']['xla_s'] * 1e3:.3f}",
                     f"{r['full']['floor_s'] * 1e3:.3f}", f"{r['ssa']['s'] * 1e3:.3f}", f"{r['ssa']['xla_s'] * 1e3:.3f}",
                     f"{r['ssa']['floor_s'] * 1e3:.3f}", f"{r['ratio']:.1f}x"]),
      ("fit", "Training-step memory (XLA's analysis of the compiled step, batch 1; nothing runs)",
       "T | remat | full GiB | LoZA GiB | device GiB | full fits | LoZA fits",
       lambda k, r: [*k, f"{r['full']['need_bytes'] / 2**30:.1f}", f"{r['loza']['need_bytes'] / 2**30:.1f}",
                     "–" if r["limit_bytes"] is None else f"{r['limit_bytes'] / 2**30:.1f}",
                     r["full"]["fits"], r["loza"]["fits"]]),
      ("train", "Training step (fwd+bwd, batch 1, LM head excluded; remat: `layer` recomputes each decoder "
                "layer, `none` nothing; TFLOP/s counts model FLOPs only)",
       "T | remat | full s | LoZA s | full tok/s | LoZA tok/s | full TFLOP/s | LoZA TFLOP/s | speed-up",
       lambda k, r: [*k, f(r["full"]["s"]), f(r["loza"]["s"]), f"{r['full']['tok_per_s']:.0f}",
                     f"{r['loza']['tok_per_s']:.0f}", f"{r['full']['tflops']:.0f}", f"{r['loza']['tflops']:.0f}",
                     f"{r['ratio']:.2f}x"]),
  ]
  for key, title, header, row in sections:
    done = {k: r for k, r in res[key].items() if r is not None}
    if done:
      lines += [f"## {title}", "", f"| {header} |", "|" + "---|" * (header.count("|") + 1)]
      lines += ["| " + " | ".join(str(x) for x in row(k, r)) + " |" for k, r in done.items()] + [""]
  if res.get("failed"):
    lines += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in res["failed"].items()]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--prefill", default="32768,131072,262144")
  p.add_argument("--prefill-models", default="full,loza", help="models to prefill (e.g. loza alone at 1M)")
  p.add_argument("--prefill-chunk", type=int, default=0,
                 help="prefill in chunks of this many tokens (a multiple of attention.block_size); 0: one chunk")
  p.add_argument("--decode", default="32768,131072,262144")
  p.add_argument("--train", default="32768,131072")
  p.add_argument("--fit", default="", help="training lengths whose step memory is only analysed (not run)")
  p.add_argument("--remat", default="layer", help=f"training-step remat modes, comma-separated: {sorted(REMAT)}")
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--steps", type=int, default=10, help="decode steps timed per setting")
  p.add_argument("--cache-budget-gib", type=float, default=80.0,
                 help="full-model KV cache the largest decode batch may hold")
  p.add_argument("--out", default=None, help="also copy the results into this folder")
  p.add_argument("--results-dir", default="benchmarks/results")
  p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test of the script)")
  args = p.parse_args(argv)
  bad = set(args.remat.split(",")) - set(REMAT)
  if bad:
    p.error(f"--remat: unknown mode(s) {sorted(bad)}; choose from {sorted(REMAT)}")
  bad = set(args.prefill_models.split(",")) - {"full", "loza"}
  if bad:
    p.error(f"--prefill-models: unknown model(s) {sorted(bad)}; choose from full, loza")
  t0 = time.time()
  cmd = "python -m benchmarks.e2e " + " ".join(argv if argv is not None else sys.argv[1:])
  ints = lambda s: [int(x) for x in s.split(",") if x]
  cfgs = configs(args.layers, args.tiny)
  model = build_model(cfgs["full"])
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))()
  res = {"slice": {k: v for k, v in cfgs["full"].model.__dict__.items() if k in SLICE} | {"layers": args.layers},
         "ceilings": ceilings(args.tiny), "prefill": {}, "decode": {}, "decode_attention": {}, "train": {}, "fit": {}}
  res["slice"]["weights_GB"] = round(param_bytes(params) / 1e9, 2)
  name = f"{datetime.date.today().isoformat()}-{'cpu-tiny' if args.tiny else device_slug(jax.devices()[0].device_kind)}-e2e"

  def write():
    text = report(res, cmd, time.time() - t0)
    for d in [args.results_dir] + ([args.out] if args.out else []):
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, name + ".md"), "w") as fh:
        fh.write(text)
      with open(os.path.join(d, name + ".json"), "w") as fh:
        json.dump({k: {str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v for k, v in res.items()},
                  fh, indent=1, default=str)
    return text

  bw = res["ceilings"]["hbm_bytes_per_s"]
  res["failed"] = {}

  def attempt(what, fn, *a):
    """fn(*a), or None with the error recorded (an out-of-memory setting must not end the run)."""
    try:
      return fn(*a)
    except Exception as e:  # noqa: BLE001
      res["failed"][what] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      print("failed", what, res["failed"][what], flush=True)
      return None

  for ctx in ints(args.decode):
    for b in sorted({1, largest_batch(cfgs["full"], ctx, args.cache_budget_gib * 2**30)}):
      res["decode"][(ctx, b)] = attempt(f"decode {ctx} x{b}", bench_decode, cfgs, params, ctx, b, args.steps, bw)
      print("decode", ctx, b, res["decode"][(ctx, b)], flush=True)
      res["decode_attention"][(ctx, b)] = attempt(f"decode attention {ctx} x{b}", bench_decode_attention,
                                                  cfgs["full"], ctx, b, bw)
      print("decode attention", ctx, b, res["decode_attention"][(ctx, b)], flush=True)
      write()
  for T in ints(args.fit):
    for mode in args.remat.split(","):
      res["fit"][(T, mode)] = attempt(f"fit {T} remat={mode}", train_fit, cfgs, params, T, mode)
      print("fit", T, mode, res["fit"][(T, mode)], flush=True)
      write()
  for T in ints(args.prefill):
    chosen = {m: cfgs[m] for m in args.prefill_models.split(",")}
    res["prefill"][T] = attempt(f"prefill {T}", bench_prefill, chosen, params, T, args.reps, args.prefill_chunk)
    print("prefill", T, res["prefill"][T], flush=True)
    write()
  for T in ints(args.train):
    for mode in args.remat.split(","):
      res["train"][(T, mode)] = attempt(f"train {T} remat={mode}", bench_train, cfgs, params, T, args.reps, mode)
      print("train", T, mode, res["train"][(T, mode)], flush=True)
      write()
  print(write())


if __name__ == "__main__":
  main()
