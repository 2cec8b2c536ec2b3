"""Per-output errors of the Mosaic sweep's cases through each attention impl and backward choice, for diagnosis.

Usage: PYTHONPATH=.:tests python -m benchmarks.sweep_errors [--cases 0,1,2,3] [--impls pallas_mosaic,...]
           [--vary KEY=VALUE,... ...]

Replays the inputs `tests/test_kernels_gpu.py::test_mosaic_random_sweep[case]` draws (its rng, same draws), runs
o, lse and the q/k/v gradients (with an lse cotangent) through each impl, and prints, per output against the
dense oracle in fp32: the relative error by norm, the worst element over the largest reference value, where it
is, and its two values. Unlike the test, it never stops at the first failure. On a GPU by default; any impl
name of the registry works (e.g. `pallas_mosaic_interpret` on CPU). Impls `mosaic:<backward>` run the Mosaic
forward with that backward choice (kernels_pallas.flash.BACKWARDS). Each `--vary` reruns the cases with some of
the drawn sizes replaced (keys B, T, H, K, D, E, sink, local, docs), to isolate which one a failure needs, e.g.
`--cases 1 --impls mosaic:mosaic --vary local=2 --vary H=2 --vary D=128,E=128 --vary docs=1`.
"""
from __future__ import annotations

import argparse
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from attention_checks import aligned_segments, random_inputs, value_and_grads

from loza_jax import attention as A, attention_pallas

HEAD_DIMS = [(192, 128), (64, 64), (128, 128), (192, 128)]   # D, E of each sweep case


def sweep_case(case: int):
  """(rng after the case's draws, pattern, B, T, H, K, D, E, document block) as the sweep test draws them."""
  rng = np.random.default_rng(zlib.crc32(f"tests/test_kernels_gpu.py::test_mosaic_random_sweep[{case}]".encode()))
  D, E = HEAD_DIMS[case]
  block = int(rng.choice([64, 128]))
  K = int(rng.choice([1, 2, 4]))
  H = K * int(rng.integers(1, 4))
  T = block * int(rng.integers(4, 40))
  pattern = A.SSA(block, int(rng.integers(0, 3)), int(rng.integers(1, 8))) if case != 2 else A.Full()
  B = int(rng.integers(1, 3))
  return rng, pattern, B, T, H, K, D, E, block if case != 2 else 128


def errors(got, ref) -> str:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  fin = np.isfinite(ref)
  note = ""
  if not fin.all():
    note = f" (-inf rows: {int((~fin).sum())}, same in both: {bool(np.array_equal(~np.isfinite(got), ~fin))})"
    got, ref = got[fin], ref[fin]
  d = np.abs(got - ref)
  at = np.unravel_index(np.argmax(d), d.shape)
  rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
  return (f"rel {rel:.3e}, worst {d.max() / max(np.abs(ref).max(), 1e-30):.3e} at {tuple(int(i) for i in at)} "
          f"(got {got[at]:.4g}, ref {ref[at]:.4g}), non-finite {int((~np.isfinite(got)).sum())}{note}")


def impl_name(name: str) -> str:
  """Registry name; `mosaic:<backward>` registers the Mosaic forward with that backward."""
  if not name.startswith("mosaic:"):
    return name
  backward = name.split(":", 1)[1]
  interpret = jax.default_backend() != "gpu"
  A.register(A.Impl(f"sweep_mosaic_{backward}", functools.partial(
      attention_pallas.mosaic_impl, interpret=interpret, backward=backward),
      platforms=("cpu", "gpu"), priority=-30, check=functools.partial(attention_pallas.mosaic_reason,
                                                                      interpret=interpret)))
  return f"sweep_mosaic_{backward}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", default="0,1,2,3")
  ap.add_argument("--impls", default="pallas_mosaic,mosaic:mosaic,mosaic:mosaic_dq,pallas_triton,xla")
  ap.add_argument("--vary", action="append", default=[], metavar="KEY=VALUE,...",
                  help="also run each case with these sizes replaced (repeatable)")
  args = ap.parse_args(argv)
  impls = [impl_name(n) for n in args.impls.split(",")]
  for case in (int(c) for c in args.cases.split(",")):
    for vary in [""] + args.vary:
      run_case(case, vary, impls)


def run_case(case: int, vary: str, impls: list[str]):
  """One sweep case (with `vary`'s replacements) through each impl: five error lines per impl."""
  rng, pattern, B, T, H, K, D, E, block = sweep_case(case)
  sizes = dict(B=B, T=T, H=H, K=K, D=D, E=E, docs=3)
  if isinstance(pattern, A.SSA):
    sizes.update(sink=pattern.sink_blocks, local=pattern.local_blocks)
  for item in filter(None, vary.split(",")):
    key, value = item.split("=")
    if key not in sizes:
      raise ValueError(f"--vary: unknown key {key!r}; one of {sorted(sizes)}")
    sizes[key] = int(value)
  if isinstance(pattern, A.SSA):
    pattern = A.SSA(block, sizes["sink"], sizes["local"])
  B, T, H, K, D, E = (sizes[k] for k in "B T H K D E".split())
  seg = jnp.asarray(aligned_segments(rng, B, T, block, sizes["docs"]))
  q, k, v, w_o, w_lse = random_inputs(rng, B, T, H, K, D, E, jnp.bfloat16)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref = value_and_grads("xla_dense", pattern, up(q), up(k), up(v), seg, w_o, w_lse)
  print(f"case {case}{' (' + vary + ')' if vary else ''}: {pattern} B={B} T={T} H={H} K={K} D={D} E={E} "
        f"docs<={sizes['docs']}", flush=True)
  for impl in impls:
    got = value_and_grads(impl, pattern, q, k, v, seg, w_o, w_lse)
    for name, g, r in zip(("o", "lse", "dq", "dk", "dv"), (got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
      print(f"  {impl:24s} {name:3s} {errors(g, r)}", flush=True)


if __name__ == "__main__":
  main()
