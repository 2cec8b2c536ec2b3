"""Pallas attention kernels in interpret mode (CPU) against the XLA references.

Every case draws fresh random inputs seeded from its test id. Interpret mode starts every
output buffer as NaN, so an element the kernel never writes shows up as NaN and fails.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention
from kernels_pallas import tiling
from kernels_pallas.triton_attention import unsupported_reason
from loza_jax import attention as A

KERNEL = "pallas_triton_interpret"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


def _rng(request) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _segments(rng, B, T, block, max_docs, lead_pad=False):
  """Random aligned packing: 1..max_docs documents per row, each starting at a block multiple,
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


def _inputs(rng, B, T, H, K, D, E, dtype):
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
  return draw(B, T, H, D), draw(B, T, K, D), draw(B, T, K, E), draw(B, T, H, E), draw(B, H, T)


def _assert_close(name, got, ref, tol):
  """Relative error by norm and by max element (scaled by the reference's largest value);
  NaN or Inf anywhere fails."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert got.shape == ref.shape, f"{name}: shape {got.shape} vs {ref.shape}"
  assert np.isfinite(got).all(), f"{name}: {np.size(got) - np.isfinite(got).sum()} non-finite values"
  scale = max(np.abs(ref).max(), 1e-30)
  rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
  worst = np.abs(got - ref).max() / scale
  assert rel <= tol and worst <= 4 * tol, f"{name}: rel err {rel:.3g}, max err/max|ref| {worst:.3g}, tol {tol}"


def _assert_lse_close(got, ref, tol):
  got, ref = np.asarray(got), np.asarray(ref)
  assert not np.isnan(got).any(), "lse has NaN"
  assert ((got == -np.inf) == (ref == -np.inf)).all(), "lse = -inf on different rows than the reference"
  fin = np.isfinite(ref)
  _assert_close("lse", got[fin], ref[fin], tol)


def _value_and_grads(impl, pattern, q, k, v, seg, w_o, w_lse):
  """o, lse and d(sum(o*w_o) + sum(lse*w_lse over visible rows))/d(q, k, v)."""
  def loss(q, k, v):
    o, lse = A.attention_with_lse(q, k, v, pattern=pattern, segment_ids=seg, impl=impl)
    total = jnp.sum(o.astype(jnp.float32) * w_o)
    if w_lse is not None:
      total = total + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)
    return total, (o, lse)
  (_, (o, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, lse, grads


def _compare(request, pattern, B, T, H, K, D, E, dtype, max_docs, *, lse_cot, ref_impl="xla_dense",
             lead_pad=False):
  rng = _rng(request)
  block = pattern.block_size if isinstance(pattern, A.SSA) else 16
  seg = jnp.asarray(_segments(rng, B, T, block, max_docs, lead_pad))
  q, k, v, w_o, w_lse = _inputs(rng, B, T, H, K, D, E, dtype)
  w_lse = w_lse if lse_cot else None
  got = _value_and_grads(KERNEL, pattern, q, k, v, seg, w_o, w_lse)
  up = lambda x: x.astype(jnp.float32)
  ref = _value_and_grads(ref_impl, pattern, up(q), up(k), up(v), seg, w_o, w_lse)
  tol = TOL[dtype]
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  _assert_close("o", got[0], ref[0], tol)
  _assert_lse_close(got[1], ref[1], tol)
  for name, g, r in zip(("dq", "dk", "dv"), got[2], ref[2]):
    assert g.dtype == dtype
    _assert_close(name, g, r, tol)
  return seg, got


CASES = {
    # name: (pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot)
    "ssa_gqa_ragged_docs_lsecot": (A.SSA(16, 1, 2), 2, 150, 4, 2, 48, 32, jnp.float32, 3, True),
    "ssa_mqa_sink2": (A.SSA(16, 2, 3), 1, 200, 3, 1, 64, 64, jnp.float32, 2, False),
    "ssa_mla_dims_block32": (A.SSA(32, 1, 2), 1, 230, 2, 2, 192, 128, jnp.float32, 2, True),
    "ssa_no_sink_local1": (A.SSA(16, 0, 1), 2, 90, 2, 1, 32, 16, jnp.float32, 3, False),
    "full_gqa_docs_lsecot": (A.Full(), 2, 100, 4, 1, 32, 16, jnp.float32, 3, True),
    "ssa_bf16": (A.SSA(16, 1, 2), 2, 130, 4, 2, 64, 32, jnp.bfloat16, 3, True),
    "ssa_fp16_mha": (A.SSA(16, 1, 3), 1, 160, 2, 2, 128, 64, jnp.float16, 1, False),
    "full_bf16_mla_dims": (A.Full(), 1, 80, 2, 1, 192, 128, jnp.bfloat16, 2, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_dense_oracle(request, case):
  pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot = CASES[case]
  _compare(request, pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot=lse_cot, lead_pad=(case == "ssa_bf16"))


@pytest.mark.parametrize("pattern", [A.SSA(16, 1, 2), A.Full()], ids=["ssa", "full"])
def test_kernel_matches_xla_impl(request, pattern):
  _compare(request, pattern, 2, 120, 2, 1, 32, 32, jnp.float32, 2, lse_cot=True, ref_impl="xla")


def test_padding_rows_and_keys(request):
  """Padding queries give o = 0, lse = -inf, dq = 0; padding keys get dk = dv = 0."""
  seg, (o, lse, (dq, dk, dv)) = _compare(request, A.SSA(16, 1, 2), 1, 96, 2, 1, 32, 16, jnp.float32, 3,
                                         lse_cot=True, lead_pad=True)
  pad = np.asarray(seg[0]) == 0
  assert pad.any()
  assert (np.asarray(o)[0, pad] == 0).all() and (np.asarray(lse)[0, :, pad] == -np.inf).all()
  assert (np.asarray(dq)[0, pad] == 0).all()
  assert (np.asarray(dk)[0, pad] == 0).all() and (np.asarray(dv)[0, pad] == 0).all()


def test_full_direct_block32_matches_ssa_when_window_covers(request):
  """flash_attention with a 32-token Full tile; SSA whose window covers T equals Full."""
  rng = _rng(request)
  q, k, v, _, _ = _inputs(rng, 1, 100, 2, 2, 32, 32, jnp.float32)
  seg = jnp.asarray(_segments(rng, 1, 100, 32, 2))
  o_full, lse_full = flash_attention(q, k, v, seg, scale=0.2, block_size=32, local_blocks=None, interpret=True)
  o_ssa, lse_ssa = flash_attention(q, k, v, seg, scale=0.2, block_size=32, sink_blocks=1, local_blocks=4,
                                   interpret=True)
  o_ref, lse_ref = A.attention_with_lse(q, k, v, pattern=A.Full(), segment_ids=seg, scale=0.2, impl="xla_dense")
  _assert_close("o full", o_full, o_ref, 1e-5)
  _assert_close("o ssa", o_ssa, o_ref, 1e-5)
  _assert_lse_close(lse_full, lse_ref, 1e-5)
  _assert_lse_close(lse_ssa, lse_ref, 1e-5)


def test_nan_never_passes():
  ref = np.ones((4, 4), np.float32)
  bad = ref.copy()
  bad[1, 2] = np.nan
  with pytest.raises(AssertionError):
    _assert_close("x", bad, ref, 1e-5)
  with pytest.raises(AssertionError):
    _assert_lse_close(np.array([np.nan, 0.0]), np.array([0.0, 0.0]), 1e-5)


def _misaligned():
  seg = np.ones((2, 64), np.int32)
  seg[1, :20] = 3
  seg[1, 20:] = 4          # document 4 starts at token 20, not a multiple of 16
  return jnp.asarray(seg)


def _small_qkv(T=64):
  rng = np.random.default_rng(0)
  q, k, v, _, _ = _inputs(rng, 2, T, 2, 1, 16, 16, jnp.float32)
  return q, k, v


def test_misaligned_documents_raise_eagerly():
  q, k, v = _small_qkv()
  with pytest.raises(ValueError, match=r"batch row 1 starts at token 20, not a multiple .* block size 16"):
    A.attention_with_lse(q, k, v, pattern=A.SSA(16, 1, 2), segment_ids=_misaligned(), impl=KERNEL)


def test_repeated_segment_id_raises():
  q, k, v = _small_qkv()
  seg = np.ones((2, 64), np.int32)
  seg[0, 16:32] = 0
  seg[0, 32:] = 1          # id 1 again after padding
  with pytest.raises(ValueError, match="appears again at token 32"):
    flash_attention(q, k, v, jnp.asarray(seg), scale=1.0, block_size=16, local_blocks=2, interpret=True)


def test_misaligned_documents_raise_under_jit():
  q, k, v = _small_qkv()
  f = jax.jit(lambda q, k, v, s: flash_attention(q, k, v, s, scale=1.0, block_size=16, local_blocks=2,
                                                  interpret=True)[0])
  with pytest.raises(Exception, match="starts at token 20, not a multiple of the kernel block size 16"):
    jax.block_until_ready(f(q, k, v, _misaligned()))
  ok = jnp.asarray(np.repeat(np.array([[1] * 32 + [2] * 32]), 2, 0))
  assert np.isfinite(np.asarray(f(q, k, v, ok))).all()


@pytest.mark.parametrize("shapes, pattern, dtype, expected", [
    (((1, 8, 2, 192), (1, 8, 1, 192), (1, 8, 1, 128)), A.SSA(), jnp.bfloat16, None),
    (((1, 8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64)), A.Full(), jnp.float16, None),
    (((1, 8, 2, 72), (1, 8, 1, 72), (1, 8, 1, 64)), A.SSA(), jnp.bfloat16, "qk head dim D: head dim 72"),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 512)), A.Full(), jnp.bfloat16, "v head dim E: head dim 512"),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), A.SSA(block_size=48), jnp.bfloat16, "block size 48"),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), A.SSA(block_size=256), jnp.bfloat16, "block size 256"),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), A.Full(), jnp.int32, "dtype int32"),
])
def test_unsupported_reason(shapes, pattern, dtype, expected):
  q, k, v = (jax.ShapeDtypeStruct(s, dtype) for s in shapes)
  reason = unsupported_reason(pattern, q, k, v)
  if expected is None:
    assert reason is None
  else:
    assert reason is not None and expected in reason, reason


def test_unsupported_impl_call_raises():
  q = jnp.ones((1, 8, 2, 72), jnp.float32)
  k = jnp.ones((1, 8, 1, 72), jnp.float32)
  with pytest.raises(ValueError, match="head dim 72"):
    A.attention(q, k, k, pattern=A.Full(), impl=KERNEL)


def test_head_parts_and_tile_layout():
  assert tiling.head_parts(192) == ((0, 128), (128, 64))
  assert tiling.head_parts(64) == ((0, 64),)
  assert tiling.head_parts(240) == ((0, 128), (128, 64), (192, 32), (224, 16))
  seg = jnp.asarray([[0] * 4 + [1] * 7 + [0] + [2] * 4 + [3] * 2])      # tile 4: pad, 1, 1+pad, 2, 3
  start, end = tiling.tile_layout(seg, 4)
  assert start.tolist() == [[-1, 1, 1, 3, 4]] and end.tolist() == [[-1, 2, 2, 3, 4]]
