"""Attention benchmark on one GPU: our SSA and Full kernels against cuDNN and tokamax anchors.

    python -m benchmarks.attention [--seqs 8192,32768,131072,262144] [--out DIR] [--quick]

B=1, H=16, D=192, E=128, bf16, random normal inputs. "ours" runs what impl="pallas_mosaic"
runs: the Mosaic GPU forward and the backward named by attention_pallas.BACKWARD; "(triton)"
rows run the Triton forward and backward. Each row: median ms per call (calls
issued back to back within a trial, warm-up and compilation excluded), effective TFLOP/s
counting only unmasked (query, key) pairs (fwd+bwd counted as 3.5x the forward, the anchors'
convention), and ratios to the anchors timed in the same process. Writes
benchmarks/results/<date>-<device>-attention.md (and a copy under --out).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import flash_attention
from loza_jax import attention as A, attention_pallas

B, H, D, E = 1, 16, 192, 128
SSA_ARGS = dict(block_size=128, sink_blocks=1, local_blocks=7)
WINDOW = 1024
SLOW_ANCHOR_LIMIT = 131072     # O(T^2) anchors are not run above this length
QUADRATIC_BWD = {"tokamax window1024"}   # its window backward visits every block


def pattern_pairs(pattern, T: int) -> int:
  """Unmasked (query, key) pairs of one head over one document of T tokens under a Full/SSA pattern."""
  if isinstance(pattern, A.Full):
    return int(T * (T + 1) // 2)
  t = np.arange(T, dtype=np.int64)
  Bs, sink, local = pattern.block_size, pattern.sink_blocks, pattern.local_blocks
  first_local = np.maximum(t // Bs - (local - 1), 0) * Bs            # first key of the local window
  sink_keys = np.minimum(sink * Bs, first_local)                     # sink keys before the window
  return int((t + 1 - first_local + sink_keys).sum())


def visible_pairs(kind: str, T: int) -> int:
  """Number of unmasked (query, key) pairs for one head of one document of length T."""
  if kind == "window":
    return int(np.minimum(np.arange(T, dtype=np.int64) + 1, WINDOW).sum())
  return pattern_pairs(A.Full() if kind == "causal" else A.SSA(**SSA_ARGS), T)


def time_call(fn, *args, trials=5, min_trial_s=0.05):
  """Median seconds per call: warm up, then trials of back-to-back calls ending in one sync."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  single = time.perf_counter() - t0
  reps = max(1, min(50, math.ceil(min_trial_s / max(single, 1e-6))))
  trials = 3 if single > 0.3 else trials
  per_call = []
  for _ in range(trials):
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / reps)
  return float(np.median(per_call))


def _fwd_bwd(attn):
  """jit(grad of sum(o)) w.r.t. q, k, v."""
  return jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))


def our_impls(scale):
  """Our kernels as pallas_mosaic runs them ("ours ssa", "ours full": Mosaic GPU forward and
  attention_pallas.BACKWARD, what impl='auto' runs on Hopper) and all on Triton ("(triton)")."""
  out = {}
  for fwd, bwd, tag in (("mosaic", attention_pallas.BACKWARD, ""), ("triton", "triton", " (triton)")):
    ssa = lambda q, k, v, fwd=fwd, bwd=bwd: flash_attention(q, k, v, scale=scale, forward=fwd, backward=bwd,
                                                            **SSA_ARGS)[0]
    full = lambda q, k, v, fwd=fwd, bwd=bwd: flash_attention(q, k, v, scale=scale, block_size=128, local_blocks=None,
                                                             forward=fwd, backward=bwd)[0]
    out[f"ours ssa{tag}"] = (ssa, "ssa")
    out[f"ours full{tag}"] = (full, "causal")
  return out


def cudnn_impls():
  def make(**kw):
    pad = lambda v: jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, D - E)))
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, pad(v), implementation="cudnn", **kw)[..., :E]
  return {"cudnn causal": (make(is_causal=True), "causal"),
          "cudnn window1024": (make(is_causal=True, local_window_size=(WINDOW - 1, 0)), "window")}


def tokamax_impls():
  try:
    import tokamax
  except Exception as e:  # noqa: BLE001 - report and carry on without the anchor
    print(f"tokamax not importable: {type(e).__name__}: {e}")
    return {}
  def make(**kw):
    return lambda q, k, v: tokamax.dot_product_attention(q, k, v, implementation="mosaic", **kw)
  return {"tokamax causal": (make(is_causal=True), "causal"),
          "tokamax window1024": (make(is_causal=True, local_window_size=(WINDOW - 1, 0)), "window")}


def version(mod):
  try:
    return importlib.import_module(mod).__version__
  except Exception as e:  # noqa: BLE001
    return f"n/a ({type(e).__name__})"


def device_slug(kind: str) -> str:
  m = re.search(r"(H100|H200|A100|B200|GH200)", kind)
  return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", kind)).lower()


def run(seqs, quick, after_each=lambda rows: None):
  """Time every impl at every length; `after_each(rows)` runs after each length."""
  scale = D ** -0.5
  found = {**our_impls(scale), **cudnn_impls(), **({} if quick else tokamax_impls())}
  order = ["ours ssa", "ours ssa (triton)", "cudnn window1024", "tokamax window1024", "ours full",
           "ours full (triton)", "cudnn causal", "tokamax causal"]
  impls = {name: found[name] for name in order if name in found}
  rows = []                                # (name, T, mode, ms, tflops)
  for T in seqs:
    keys = jax.random.split(jax.random.PRNGKey(T), 3)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, H, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, H, E), jnp.bfloat16)
    for name, (attn, kind) in impls.items():
      if kind == "causal" and T > SLOW_ANCHOR_LIMIT:
        continue
      flops = 2.0 * B * H * visible_pairs(kind, T) * (D + E)
      for mode, fn, mult in (("fwd", jax.jit(attn), 1.0), ("fwd+bwd", _fwd_bwd(attn), 3.5)):
        if mode == "fwd+bwd" and name in QUADRATIC_BWD and T > SLOW_ANCHOR_LIMIT:
          continue
        try:
          t = time_call(fn, q, k, v)
          rows.append((name, T, mode, t * 1e3, mult * flops / t / 1e12))
        except Exception as e:  # noqa: BLE001 - one failing anchor must not stop the run
          rows.append((name, T, mode, float("nan"), float("nan")))
          print(f"{name} T={T} {mode} FAILED: {type(e).__name__}: {str(e)[:300]}")
        print(f"{name:20s} T={T:7d} {mode:8s} {rows[-1][3]:10.3f} ms {rows[-1][4]:7.1f} TFLOP/s", flush=True)
    del q, k, v
    after_each(rows)
  return rows


def ratios(rows):
  """Per (T, mode): our time over each anchor's, plus the target checks."""
  get = {(n, T, m): ms for n, T, m, ms, _ in rows}
  out = []
  for T in sorted({r[1] for r in rows}):
    for mode in ("fwd", "fwd+bwd"):
      ssa, full = get.get(("ours ssa", T, mode)), get.get(("ours full", T, mode))
      causal = [get.get((a, T, mode)) for a in ("cudnn causal", "tokamax causal")]
      causal = [c for c in causal if c is not None and not math.isnan(c)]
      line = {"T": T, "mode": mode, "ssa_ms": ssa, "ssa_ms_per_1k": ssa / (T / 1024) if ssa else None}
      for a in ("cudnn window1024", "tokamax window1024", "cudnn causal", "tokamax causal"):
        ref = get.get((a, T, mode))
        line[f"ssa/{a}"] = ssa / ref if ssa and ref and not math.isnan(ref) else None
      line["best causal / ssa"] = min(causal) / ssa if causal and ssa else None
      line["full / best causal"] = full / min(causal) if causal and full else None
      out.append(line)
  return out


def auto_choices() -> str:
  """What impl="auto" of loza_jax.attention picks here, at the benchmark's shapes."""
  q = jax.ShapeDtypeStruct((B, 1024, H, D), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((B, 1024, H, E), jnp.bfloat16)
  pick = lambda pattern, packed: A.resolve_impl("auto", pattern, q, q, v, packed=packed).name
  return (f"impl='auto' here: SSA -> {pick(A.SSA(), True)}; Full with packed documents -> "
          f"{pick(A.Full(), True)}; Full with one document per row -> {pick(A.Full(), False)}")


def fmt(x, spec=".3f"):
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(rows, rat, cmd, seconds) -> str:
  dev = jax.devices()[0]
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
  except OSError:
    smi = "nvidia-smi not available"
  lines = [f"# Attention benchmark, {datetime.date.today().isoformat()}", "",
           f"- command: `{cmd}`",
           f"- device: {dev.device_kind} ({smi})",
           f"- versions: python {sys.version.split()[0]}, jax {version('jax')}, jaxlib {version('jaxlib')}, "
           f"triton {version('triton')}, tokamax {version('tokamax')}",
           f"- shapes: B={B}, H={H}, D={D}, E={E}, bf16; SSA block 128, sink 1, local 7; windows {WINDOW}",
           "- timing: median ms per call over trials of back-to-back calls (warm-up excluded); "
           "TFLOP/s counts unmasked pairs only, fwd+bwd as 3.5x fwd",
           f"- wall time of the run: {seconds:.0f} s",
           f"- ours: Mosaic GPU forward, backward={attention_pallas.BACKWARD!r}; (triton): Triton forward and backward",
           f"- {auto_choices()}", "",
           "| impl | T | mode | ms | TFLOP/s |", "|---|---|---|---|---|"]
  lines += [f"| {n} | {T} | {m} | {fmt(ms)} | {fmt(tf, '.1f')} |" for n, T, m, ms, tf in rows]
  lines += ["", "Ratios (same run; < 1 means ours is faster for ssa/anchor):", "",
            "| T | mode | SSA ms | SSA ms/1K tok | ssa/cudnn win | ssa/tokamax win | best causal/ssa | full/best causal |",
            "|---|---|---|---|---|---|---|---|"]
  for r in rat:
    lines.append(f"| {r['T']} | {r['mode']} | {fmt(r['ssa_ms'])} | {fmt(r['ssa_ms_per_1k'], '.4f')} | "
                 f"{fmt(r['ssa/cudnn window1024'])} | {fmt(r['ssa/tokamax window1024'])} | "
                 f"{fmt(r['best causal / ssa'], '.1f')} | {fmt(r['full / best causal'])} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seqs", default="8192,32768,131072,262144")
  p.add_argument("--out", default=None, help="also copy the results file into this folder")
  p.add_argument("--quick", action="store_true", help="skip tokamax")
  args = p.parse_args(argv)
  t0 = time.time()
  cmd = "python -m benchmarks.attention " + " ".join(argv if argv is not None else sys.argv[1:])
  name = f"{datetime.date.today().isoformat()}-{device_slug(jax.devices()[0].device_kind)}-attention.md"
  os.makedirs("benchmarks/results", exist_ok=True)
  path = os.path.join("benchmarks/results", name)

  def write(rows):
    text = report(rows, ratios(rows), cmd, time.time() - t0)
    with open(path, "w") as f:
      f.write(text)
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      shutil.copy(path, os.path.join(args.out, name))
    return text

  rows = run([int(s) for s in args.seqs.split(",")], args.quick, after_each=write)
  print(write(rows))


if __name__ == "__main__":
  main()
