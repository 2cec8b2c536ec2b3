"""Helpers shared by the kernel tests: aligned random packings, inputs, and error checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loza_jax import attention as A

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 2e-2}


def aligned_segments(rng, B, T, block, max_docs, lead_pad=False):
  """Random packing: 1..max_docs documents per row, each starting at a multiple of `block`,
  ragged lengths, padding (id 0) after each document up to the next block boundary."""
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    pos = block if (lead_pad and b == 0) else 0
    n_docs = int(rng.integers(1, max_docs + 1))
    for d in range(n_docs):
      if pos >= T:
        break
      remaining = T - pos
      length = remaining if d == n_docs - 1 else int(rng.integers(1, remaining + 1))
      if d == n_docs - 1 and rng.random() < 0.5:
        length = max(1, remaining - int(rng.integers(0, block)))  # trailing padding
      seg[b, pos:pos + length] = 10 * b + d + 1
      pos += -(-length // block) * block
  return seg


def random_inputs(rng, B, T, H, K, D, E, dtype):
  """q, k, v and random output/lse weights (standard normal, never zeros)."""
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
  return draw(B, T, H, D), draw(B, T, K, D), draw(B, T, K, E), draw(B, T, H, E), draw(B, H, T)


def assert_close(name, got, ref, tol):
  """Relative error by norm and by max element (over the reference's largest magnitude);
  NaN or Inf anywhere fails."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert got.shape == ref.shape, f"{name}: shape {got.shape} vs {ref.shape}"
  assert np.isfinite(got).all(), f"{name}: {np.size(got) - np.isfinite(got).sum()} non-finite values"
  scale = max(np.abs(ref).max(), 1e-30)
  rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
  worst = np.abs(got - ref).max() / scale
  assert rel <= tol and worst <= 4 * tol, f"{name}: rel err {rel:.3g}, max err/max|ref| {worst:.3g}, tol {tol}"
  return rel


def assert_lse_close(got, ref, tol):
  """Same -inf rows as the reference; finite entries close."""
  got, ref = np.asarray(got), np.asarray(ref)
  assert not np.isnan(got).any(), "lse has NaN"
  assert ((got == -np.inf) == (ref == -np.inf)).all(), "lse = -inf on different rows than the reference"
  fin = np.isfinite(ref)
  return assert_close("lse", got[fin], ref[fin], tol)


def value_and_grads(impl, pattern, q, k, v, seg, w_o, w_lse):
  """o, lse and d(sum(o*w_o) + sum(lse*w_lse over visible rows))/d(q, k, v)."""
  def loss(q, k, v):
    o, lse = A.attention_with_lse(q, k, v, pattern=pattern, segment_ids=seg, impl=impl)
    total = jnp.sum(o.astype(jnp.float32) * w_o)
    if w_lse is not None:
      total = total + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)
    return total, (o, lse)
  (_, (o, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, lse, grads


def compare_to_reference(rng, kernel_impl, pattern, B, T, H, K, D, E, dtype, max_docs, *, lse_cot,
                         ref_impl="xla_dense", lead_pad=False, block=None):
  """Kernel vs reference (fp32 inputs, highest matmul precision): o, lse, dq, dk, dv.
  Returns (segment_ids, kernel results, {name: relative error})."""
  block = block or (pattern.block_size if isinstance(pattern, A.SSA) else 16)
  seg = jnp.asarray(aligned_segments(rng, B, T, block, max_docs, lead_pad))
  q, k, v, w_o, w_lse = random_inputs(rng, B, T, H, K, D, E, dtype)
  w_lse = w_lse if lse_cot else None
  got = value_and_grads(kernel_impl, pattern, q, k, v, seg, w_o, w_lse)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref = value_and_grads(ref_impl, pattern, up(q), up(k), up(v), seg, w_o, w_lse)
  tol = TOL[jnp.dtype(dtype)]
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  errs = {"o": assert_close("o", got[0], ref[0], tol), "lse": assert_lse_close(got[1], ref[1], tol)}
  for name, g, r in zip(("dq", "dk", "dv"), got[2], ref[2]):
    assert g.dtype == dtype
    errs[name] = assert_close(name, g, r, tol)
  return seg, got, errs
