"""Mosaic GPU kernels (kernels_pallas/mosaic_fwd.py, mosaic_bwd.py) in the GPU interpreter (CPU).

Forward values and lse come from the Mosaic kernel; gradients from pallas_mosaic's backward
(attention_pallas.BACKWARD) or from the other backward choices, all interpreted, against the
dense XLA oracle with fresh random inputs per case. The
interpreter starts buffers as NaN and raises on out-of-bounds reads, so unwritten outputs and
bad tile addressing fail; it also checks that every barrier phase is observed.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import TOL, assert_close, assert_lse_close, compare_to_reference, random_inputs

from kernels_pallas import flash, flash_attention, mosaic_bwd, mosaic_fwd, ssa_bwd, tiling
from loza_jax import attention as A, attention_pallas

unsupported_reason = attention_pallas.mosaic_reason
unsupported_reason_interpret = functools.partial(attention_pallas.mosaic_reason, interpret=True)

KERNEL = "pallas_mosaic_interpret"
BACKWARD_IMPL = "test_mosaic_backward_interpret_{}"

# Mosaic forward with the backward choices that pallas_mosaic (KERNEL, whose gradients the
# forward test checks) does not run, interpreted.
OTHER_BACKWARDS = [b for b in flash.BACKWARDS if b != attention_pallas.BACKWARD]
for _bwd in OTHER_BACKWARDS:
  A.register(A.Impl(BACKWARD_IMPL.format(_bwd),
                    functools.partial(attention_pallas.mosaic_impl, interpret=True, backward=_bwd),
                    platforms=("cpu", "gpu"), priority=-30, check=unsupported_reason_interpret))

CASES = {
    # name: (pattern, B, T, H, K, D, E, dtype, max_docs)
    "ssa_mla_block128_gqa_docs": (A.SSA(128, 1, 2), 1, 640, 2, 1, 192, 128, jnp.bfloat16, 2),
    "ssa_block64_sink2_docs": (A.SSA(64, 2, 2), 2, 512, 2, 2, 64, 64, jnp.float16, 3),
    "full_d128_docs": (A.Full(), 1, 384, 2, 1, 128, 128, jnp.bfloat16, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mosaic_forward_matches_dense_oracle(rng, case):
  pattern, B, T, H, K, D, E, dtype, max_docs = CASES[case]
  block = pattern.block_size if isinstance(pattern, A.SSA) else 64
  compare_to_reference(rng, KERNEL, pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot=True, block=block,
                       lead_pad=case.startswith("ssa_block64"))


@pytest.mark.parametrize("backward", OTHER_BACKWARDS)
@pytest.mark.parametrize("case", ["ssa_mla_block128_gqa_docs"])
def test_mosaic_backward_matches_dense_oracle(rng, case, backward):
  """The Mosaic forward with each backward choice other than pallas_mosaic's against the oracle."""
  pattern, B, T, H, K, D, E, dtype, max_docs = CASES[case]
  block = pattern.block_size if isinstance(pattern, A.SSA) else 64
  compare_to_reference(rng, BACKWARD_IMPL.format(backward), pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot=True,
                       block=block, lead_pad=case.startswith("ssa_block64"))


@pytest.mark.parametrize("pattern", [A.SSA(128, 1, 2), A.Full()], ids=["ssa", "full"])
def test_mosaic_one_document_per_row(rng, pattern):
  """segment_ids=None: no padding masks; every block sees its own row from block 0."""
  q, k, v, _, _ = random_inputs(rng, 1, 512, 2, 1, 192, 128, jnp.bfloat16)
  o, lse = A.attention_with_lse(q, k, v, pattern=pattern, impl=KERNEL)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    o_ref, lse_ref = A.attention_with_lse(up(q), up(k), up(v), pattern=pattern, impl="xla_dense")
  assert_close("o", o, o_ref, TOL[jnp.dtype(jnp.bfloat16)])
  assert_lse_close(lse, lse_ref, 1e-5)


@pytest.mark.parametrize("ctas", [1, 3])
def test_persistent_ctas_cover_every_item(rng, ctas):
  """Fewer CTAs than work items: each loops over several items (the key/value ring carries
  across items); the result equals one CTA per item."""
  q, k, v, _, _ = random_inputs(rng, 2, 512, 2, 1, 192, 128, jnp.bfloat16)
  start = jnp.zeros((2, 4), jnp.int32)
  cfg = mosaic_fwd.MosaicConfig(scale=0.1, tile=128, sink=1, local=2, d_parts=mosaic_fwd.d_parts(192),
                                groups=2, interpret=True)
  o_one, lse_one = mosaic_fwd.forward(q, k, v, start, cfg)
  o_few, lse_few = mosaic_fwd.forward(q, k, v, start, dataclasses.replace(cfg, ctas=ctas))
  np.testing.assert_array_equal(np.asarray(o_few), np.asarray(o_one))
  np.testing.assert_array_equal(np.asarray(lse_few), np.asarray(lse_one))
  assert np.isfinite(np.asarray(o_one, np.float32)).all()


@pytest.mark.parametrize("ctas,dkv_slots", [(1, 3), (3, 2), (2, 4)])
def test_backward_persistent_ctas_cover_every_item(rng, ctas, dkv_slots):
  """The dQ and dK/dV kernels with CTAs looping over several items (rings, exchange buffers
  and their barrier phases carry across items, local and sink items of dK/dV) equal one CTA
  per item."""
  q, k, v, _, _ = random_inputs(rng, 2, 512, 2, 1, 192, 128, jnp.bfloat16)
  o, do = (jnp.asarray(rng.standard_normal((2, 512, 2, 128)), jnp.bfloat16) for _ in range(2))
  lse = jnp.asarray(rng.standard_normal((2, 2, 512)) + 4.0, jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((2, 2, 512)), jnp.float32)
  start, end = jnp.zeros((2, 4), jnp.int32), jnp.full((2, 4), 3, jnp.int32)
  cfg = mosaic_fwd.MosaicConfig(scale=0.1, tile=128, sink=1, local=2, d_parts=mosaic_fwd.d_parts(192),
                                groups=2, interpret=True)
  few = dataclasses.replace(cfg, ctas=ctas, dkv_slots=dkv_slots)
  dq_one, delta_one = mosaic_bwd.dq(q, k, v, o, do, lse, dlse, start, cfg)
  dq_few, delta_few = mosaic_bwd.dq(q, k, v, o, do, lse, dlse, start, few)
  (dk_one, dv_one), sink_one = mosaic_bwd.dkv(q, k, v, do, lse, delta_one, start, end, cfg, with_sink=True)
  (dk_few, dv_few), sink_few = mosaic_bwd.dkv(q, k, v, do, lse, delta_one, start, end, few, with_sink=True)
  pairs = ((dq_one, dq_few), (delta_one, delta_few), (dk_one, dk_few), (dv_one, dv_few), *zip(sink_one, sink_few))
  for one, more in pairs:
    assert np.isfinite(np.asarray(one, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(more), np.asarray(one))
  want = jnp.einsum("bthe,bthe->bht", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  np.testing.assert_allclose(np.asarray(delta_one), np.asarray(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape,dtype,block,reason", [
    ((1, 256, 2, 1, 192, 64), jnp.bfloat16, 128, "E == 128"),
    ((1, 200, 2, 1, 64, 64), jnp.bfloat16, 64, "multiple of the block size"),
    ((1, 256, 2, 1, 64, 64), jnp.float32, 64, "bf16/fp16"),
    ((1, 256, 2, 1, 96, 64), jnp.bfloat16, 64, "qk head dim"),
    ((1, 256, 2, 1, 64, 64), jnp.bfloat16, 32, "block size 64 or 128"),
])
def test_unsupported_inputs_are_named(rng, shape, dtype, block, reason):
  B, T, H, K, D, E = shape
  q, k, v, _, _ = random_inputs(rng, B, T, H, K, D, E, dtype)
  msg = unsupported_reason_interpret(A.SSA(block, 1, 2), q, k, v)
  assert msg is not None and reason in msg, msg
  with pytest.raises(ValueError, match="cannot run here"):
    A.attention(q, k, v, pattern=A.SSA(block, 1, 2), impl=KERNEL)


def test_gpu_impl_names_hopper_on_cpu(rng):
  if jax.default_backend() == "gpu":
    pytest.skip("checks the CPU refusal")
  q, k, v, _, _ = random_inputs(rng, 1, 256, 2, 1, 64, 64, jnp.bfloat16)
  assert "Hopper" in unsupported_reason(A.SSA(128, 1, 2), q, k, v)
  with pytest.raises(ValueError, match="pallas_mosaic"):
    A.attention(q, k, v, pattern=A.SSA(128, 1, 2), impl="pallas_mosaic")


def test_unknown_backward_is_named(rng):
  q, k, v, _, _ = random_inputs(rng, 1, 256, 2, 1, 64, 64, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"backward must be one of .*'mosaic_dq'.*got 'cudnn'"):
    flash_attention(q, k, v, scale=0.1, block_size=64, interpret=True, forward="mosaic", backward="cudnn")


@pytest.mark.parametrize("T,local,sink,block", [(1024, 2, 1, 128), (768, 1, 2, 64)])
def test_dkv_sink_items_match_the_triton_sink_partials(rng, T, local, sink, block):
  """The Mosaic dK/dV kernel's sink items give the Triton sink kernel's fp32 partials (same
  layout, chunks and documents), and its local results do not change with them."""
  B, H, K, D, E = 1, 4, 2, 192, 128
  q, k, v, _, _ = random_inputs(rng, B, T, H, K, D, E, jnp.bfloat16)
  do = jnp.asarray(rng.standard_normal((B, T, H, E)), jnp.bfloat16)
  lse = jnp.asarray(rng.standard_normal((B, H, T)) + 5.0, jnp.float32)
  delta = jnp.asarray(rng.standard_normal((B, H, T)), jnp.float32)
  seg = np.ones((B, T), np.int32)
  seg[:, T // 2:] = 2                      # two documents, the second starting at a block boundary
  start, end = tiling.tile_layout(jnp.asarray(seg), block)
  cfg = flash.make_config(q, k, v, scale=0.1, block_size=block, sink_blocks=sink, local_blocks=local,
                          interpret=True, backward="mosaic")
  assert flash.needs_sink_pass(cfg)
  (dk, dv), (pk, pv) = mosaic_bwd.dkv(q, k, v, do, lse, delta, start, end, cfg.mosaic, with_sink=True)
  (dk0, dv0), none = mosaic_bwd.dkv(q, k, v, do, lse, delta, start, end, cfg.mosaic)
  assert none is None
  np.testing.assert_array_equal(np.asarray(dk), np.asarray(dk0))
  np.testing.assert_array_equal(np.asarray(dv), np.asarray(dv0))
  want_k, want_v = ssa_bwd.sink_partials(q, k, v, do, lse, delta, start, end, cfg)
  for got, want in ((pk, want_k), (pv, want_v)):
    assert got.shape == want.shape and np.isfinite(np.asarray(got)).all()
    assert float(jnp.max(jnp.abs(want))) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))
