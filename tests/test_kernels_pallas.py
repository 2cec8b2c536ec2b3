"""Pallas attention kernels in interpret mode (CPU) against the XLA references.

Every case draws fresh random inputs seeded from its test id. Interpret mode starts every
output buffer as NaN, so an element the kernel never writes shows up as NaN and fails.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import aligned_segments, assert_close, assert_lse_close, compare_to_reference, random_inputs

from kernels_pallas import flash_attention, tiling
from kernels_pallas.tile_io import Tiles
from loza_jax import attention as A
from loza_jax.attention_pallas import triton_reason as unsupported_reason

KERNEL = "pallas_triton_interpret"


def _compare(rng, pattern, B, T, H, K, D, E, dtype, max_docs, **kw):
  seg, got, _ = compare_to_reference(rng, KERNEL, pattern, B, T, H, K, D, E, dtype, max_docs, **kw)
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
def test_kernel_matches_dense_oracle(rng, case):
  pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot = CASES[case]
  _compare(rng, pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot=lse_cot, lead_pad=(case == "ssa_bf16"))


@pytest.mark.parametrize("pattern", [A.SSA(16, 1, 2), A.Full()], ids=["ssa", "full"])
def test_kernel_matches_xla_impl(rng, pattern):
  _compare(rng, pattern, 2, 120, 2, 1, 32, 32, jnp.float32, 2, lse_cot=True, ref_impl="xla")


def test_padding_rows_and_keys(rng):
  """Padding queries give o = 0, lse = -inf, dq = 0; padding keys get dk = dv = 0."""
  seg, (o, lse, (dq, dk, dv)) = _compare(rng, A.SSA(16, 1, 2), 1, 96, 2, 1, 32, 16, jnp.float32, 3,
                                         lse_cot=True, lead_pad=True)
  pad = np.asarray(seg[0]) == 0
  assert pad.any()
  assert (np.asarray(o)[0, pad] == 0).all() and (np.asarray(lse)[0, :, pad] == -np.inf).all()
  assert (np.asarray(dq)[0, pad] == 0).all()
  assert (np.asarray(dk)[0, pad] == 0).all() and (np.asarray(dv)[0, pad] == 0).all()


def test_full_direct_block32_matches_ssa_when_window_covers(rng):
  """flash_attention with a 32-token Full tile; SSA whose window covers T equals Full."""
  q, k, v, _, _ = random_inputs(rng, 1, 100, 2, 2, 32, 32, jnp.float32)
  seg = jnp.asarray(aligned_segments(rng, 1, 100, 32, 2))
  o_full, lse_full = flash_attention(q, k, v, seg, scale=0.2, block_size=32, local_blocks=None, interpret=True)
  o_ssa, lse_ssa = flash_attention(q, k, v, seg, scale=0.2, block_size=32, sink_blocks=1, local_blocks=4,
                                   interpret=True)
  o_ref, lse_ref = A.attention_with_lse(q, k, v, pattern=A.Full(), segment_ids=seg, scale=0.2, impl="xla_dense")
  assert_close("o full", o_full, o_ref, 1e-5)
  assert_close("o ssa", o_ssa, o_ref, 1e-5)
  assert_lse_close(lse_full, lse_ref, 1e-5)
  assert_lse_close(lse_ssa, lse_ref, 1e-5)


SUB_TILES = {
    "rows32_cols16": dict(fwd=Tiles(32, 16, 4, 2), dq=Tiles(16, 32, 4, 2), dkv=Tiles(16, 16, 4, 2)),
    "rows16_cols32": dict(fwd=Tiles(16, 32, 4, 2), dq=Tiles(32, 16, 4, 2), dkv=Tiles(32, 16, 4, 2)),
}


@pytest.mark.parametrize("local", [2, None], ids=["ssa_sink2", "full"])
@pytest.mark.parametrize("tiles", list(SUB_TILES))
def test_sub_tiles_match_oracle(rng, tiles, local):
  """Kernels streaming tiles smaller than the 32-token block (the GPU launch shapes)."""
  B, T, H, K, D, E = 2, 230, 4, 2, 48, 32
  seg = jnp.asarray(aligned_segments(rng, B, T, 32, 3))
  q, k, v, w_o, w_lse = random_inputs(rng, B, T, H, K, D, E, jnp.float32)
  pattern = A.SSA(32, 2, local) if local else A.Full()

  def loss(fn):
    def f(q, k, v):
      o, lse = fn(q, k, v)
      return jnp.sum(o * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse), (o, lse)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)

  (_, (o, lse)), grads = loss(lambda q, k, v: flash_attention(
      q, k, v, seg, scale=0.3, block_size=32, sink_blocks=2, local_blocks=local, interpret=True,
      tiles=SUB_TILES[tiles]))
  (_, (o_ref, lse_ref)), grads_ref = loss(lambda q, k, v: A.attention_with_lse(
      q, k, v, pattern=pattern, segment_ids=seg, scale=0.3, impl="xla_dense"))
  assert_close("o", o, o_ref, 1e-5)
  assert_lse_close(lse, lse_ref, 1e-5)
  for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref):
    assert_close(name, g, r, 1e-5)


def test_bad_tiles_raise():
  q, k, v = _small_qkv()
  with pytest.raises(ValueError, match="must be a power of two >= 16 dividing block size 32"):
    flash_attention(q, k, v, scale=1.0, block_size=32, local_blocks=2, interpret=True,
                    tiles=dict(fwd=Tiles(64, 32, 4, 2)))


def test_nan_never_passes():
  ref = np.ones((4, 4), np.float32)
  bad = ref.copy()
  bad[1, 2] = np.nan
  with pytest.raises(AssertionError):
    assert_close("x", bad, ref, 1e-5)
  with pytest.raises(AssertionError):
    assert_lse_close(np.array([np.nan, 0.0]), np.array([0.0, 0.0]), 1e-5)


def _misaligned():
  seg = np.ones((2, 64), np.int32)
  seg[1, :20] = 3
  seg[1, 20:] = 4          # document 4 starts at token 20, not a multiple of 16
  return jnp.asarray(seg)


def _small_qkv(T=64):
  rng = np.random.default_rng(0)
  q, k, v, _, _ = random_inputs(rng, 2, T, 2, 1, 16, 16, jnp.float32)
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
