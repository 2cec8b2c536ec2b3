"""pallas_tpu (splash attention + XLA sink blocks) in Pallas interpret mode on CPU against the XLA oracle.

Every case draws fresh random inputs seeded from its test id and compares o, lse, dq, dk, dv.
Calls go through the attention API's dispatch and checks (`pallas_tpu_interpret`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import aligned_segments, assert_close, assert_lse_close, compare_to_reference, random_inputs

from kernels_pallas import tpu_attention as TA
from loza_jax import attention as A

KERNEL = "pallas_tpu_interpret"


def test_registered_for_tpu():
  """impl="auto" picks pallas_tpu on TPU (highest priority there); its interpret twin runs on CPU."""
  impl = A.registered()["pallas_tpu"]
  assert impl.platforms == ("tpu",) and impl.interpretable and not impl.custom_positions
  others = [i.priority for n, i in A.registered().items() if "tpu" in i.platforms and n != "pallas_tpu"]
  assert impl.priority > max(others)


def _block(pattern):
  return pattern.block_size if isinstance(pattern, A.SSA) else 1   # Full: any packing


CASES = {
    # name: (pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot)
    "ssa_gqa_packed_ragged_lsecot": (A.SSA(128, 1, 1), 2, 384, 4, 2, 48, 32, jnp.float32, 3, True),
    "ssa_mqa_sink2": (A.SSA(128, 2, 1), 1, 512, 2, 1, 64, 64, jnp.float32, 2, False),
    "ssa_mla_dims_bf16_lsecot": (A.SSA(128, 1, 2), 1, 512, 2, 1, 192, 128, jnp.bfloat16, 2, True),
    "ssa_block256_tail": (A.SSA(256, 1, 1), 1, 700, 2, 2, 32, 32, jnp.float32, 2, False),
    "full_gqa_packed_lsecot": (A.Full(), 2, 300, 4, 2, 48, 32, jnp.float32, 3, True),
    "full_mla_dims_bf16": (A.Full(), 1, 256, 2, 1, 192, 128, jnp.bfloat16, 2, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_oracle(rng, case):
  pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot = CASES[case]
  compare_to_reference(rng, KERNEL, pattern, B, T, H, K, D, E, dtype, max_docs, lse_cot=lse_cot,
                       block=_block(pattern), lead_pad=case.startswith("ssa_gqa"))


@pytest.mark.parametrize("seed", [0] + [pytest.param(s, marks=pytest.mark.slow) for s in range(1, 5)])
def test_random_sweep(seed):
  """Seeded draws of pattern, head layout, dims, dtype, length and packing."""
  draw = np.random.default_rng(1000 + seed)
  pattern = [A.SSA(128, 1, 1), A.SSA(128, 1, 2), A.SSA(128, 2, 1), A.SSA(128, 0, 2), A.Full()][draw.integers(5)]
  K, G = int(draw.integers(1, 3)), int(draw.integers(1, 3))
  D, E = [(48, 32), (64, 64), (32, 48)][draw.integers(3)]
  dtype = [jnp.float32, jnp.bfloat16][draw.integers(2)]
  T = int(draw.integers(200, 513))
  compare_to_reference(draw, KERNEL, pattern, 1, T, K * G, K, D, E, dtype, 3, lse_cot=bool(draw.integers(2)),
                       block=_block(pattern))


def test_padding_rows_and_keys(rng):
  """Padding queries give o = 0, lse = -inf, dq = 0; padding keys get dk = dv = 0."""
  seg, (o, lse, (dq, dk, dv)), _ = compare_to_reference(rng, KERNEL, A.SSA(128, 1, 1), 1, 384, 2, 1, 32, 32,
                                                        jnp.float32, 3, lse_cot=True, lead_pad=True)
  pad = np.asarray(seg[0]) == 0
  assert pad.any()
  assert (np.asarray(o)[0, pad] == 0).all() and (np.asarray(lse)[0, :, pad] == -np.inf).all()
  assert (np.asarray(dq)[0, pad] == 0).all()
  assert (np.asarray(dk)[0, pad] == 0).all() and (np.asarray(dv)[0, pad] == 0).all()


@pytest.mark.parametrize("sink_impl, block_q", [("splash", 128), ("xla", 256)])
def test_sink_implementations_and_query_tiles(rng, sink_impl, block_q):
  """Both ways of running the sink blocks (second splash pass; plain XLA), and window query tiles other than
  the default, give the oracle's o, lse and grads."""
  B, T, H, K, D, E = 1, 512, 2, 1, 48, 32
  seg = jnp.asarray(aligned_segments(rng, B, T, 128, 2))
  q, k, v, w_o, w_lse = random_inputs(rng, B, T, H, K, D, E, jnp.float32)

  def run(fn):
    def loss(q, k, v):
      o, lse = fn(q, k, v)
      return jnp.sum(o * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse), (o, lse)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

  pattern = A.SSA(128, 2, 1)
  (_, (o, lse)), grads = run(lambda q, k, v: TA.attention_impl(
      q, k, v, pattern=pattern, segment_ids=seg, positions=None, scale=0.3, interpret=True, sink_impl=sink_impl,
      block_q=block_q))
  with jax.default_matmul_precision("highest"):
    (_, (o_r, lse_r)), grads_r = run(lambda q, k, v: A.attention_with_lse(
        q, k, v, pattern=pattern, segment_ids=seg, scale=0.3, impl="xla_dense"))
  assert_close("o", o, o_r, 1e-5)
  assert_lse_close(lse, lse_r, 1e-5)
  for name, g, r in zip(("dq", "dk", "dv"), grads, grads_r):
    assert_close(name, g, r, 1e-5)


def test_without_sink_the_result_differs(rng):
  """Mutation check: the same call with the sink part dropped must fail the comparison (packed rows)."""
  seg = np.zeros((1, 512), np.int32)
  seg[0, :128], seg[0, 128:500] = 1, 2                 # document 2: 3 blocks, the last two see its sink block
  seg = jnp.asarray(seg)
  q, k, v, _, _ = random_inputs(rng, 1, 512, 2, 1, 32, 32, jnp.float32)
  ref, _ = A.attention_with_lse(q, k, v, pattern=A.SSA(128, 1, 1), segment_ids=seg, impl="xla_dense")
  no_sink, _ = TA.attention_impl(q, k, v, pattern=A.SSA(128, 0, 1), segment_ids=seg, positions=None,
                                 scale=32 ** -0.5, interpret=True)
  with pytest.raises(AssertionError):
    assert_close("o", no_sink, ref, 1e-5)
  # The difference sits exactly in document 2's blocks past the first (the query blocks with sink visits).
  diff = np.abs(np.asarray(no_sink - ref)).max(axis=(0, 2, 3))
  assert diff[256:500].min() > 1e-4 and diff[:256].max() < 1e-5 and diff[500:].max() == 0


# ----------------------------------------------------------------------------------------
# Splash mask tables.


@pytest.mark.parametrize("n_tokens, block, local, block_q", [
    (1024, 128, 3, 128), (1024, 256, 2, 128), (1536, 256, 1, 128), (768, 128, None, 128), (512, 128, 7, 128),
    (2048, 128, 7, 512), (2048, 128, 1, 512), (2048, 256, 2, 512), (2048, 512, 3, 1024), (1024, 128, None, 512),
    (1024, 128, 2, 256)])
def test_mask_tables_match_splash_builder(n_tokens, block, local, block_q):
  """Our directly built tables equal what splash's own (all-tile-pairs) builder makes, for query tiles of
  one or more blocks."""
  fwd, dkv = TA.splash_built_infos(n_tokens, block, local, block_q)
  ours_fwd, ours_dq, ours_dkv = TA.mask_infos(n_tokens, block, local, block_q)
  for ours, theirs in ((ours_fwd, fwd), (ours_dq, fwd), (ours_dkv, dkv)):
    for name in ("data_next", "block_mask", "q_sequence"):
      a, b = getattr(ours, name), getattr(theirs, name)
      assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), name
    assert ours.mask_next is None and ours.partial_mask_blocks is None


@pytest.mark.parametrize("n_tokens, block, sink", [(512, 128, 1), (512, 128, 2), (1024, 256, 2)])
def test_sink_tables_match_splash_builder(n_tokens, block, sink):
  """The sink pass's block-diagonal tables equal splash's builder run on the dense mask they stand for."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
    splash_attention_mask_info as splash_info,
  )
  q_blk = np.arange(n_tokens)[:, None] // block
  kv_run = np.arange(n_tokens * sink)[None, :] // (sink * block)
  mask = splash_mask.MultiHeadMask((splash_mask.NumpyMask(q_blk == kv_run),))
  fwd, _ = splash_info.process_mask(mask, (TA.TILE, TA.TILE), head_shards=1, q_seq_shards=1)
  dkv, _ = splash_info.process_mask_dkv(mask, (TA.TILE, TA.TILE), head_shards=1, q_seq_shards=1)
  ours_fwd, _, ours_dkv = TA.sink_mask_infos(n_tokens, block, sink)
  for ours, theirs in ((ours_fwd, fwd), (ours_dkv, dkv)):
    for name in ("data_next", "block_mask"):
      a, b = getattr(ours, name), getattr(theirs, name)
      assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), name
    for name in ("mask_next", "partial_mask_blocks", "q_sequence"):
      assert getattr(ours, name) is None and getattr(theirs, name) is None, name


def test_mask_tables_cheap_at_256k():
  """T = 262144, block 128, window 7 blocks: the tables take milliseconds and are cached."""
  t0 = time.perf_counter()
  fwd = TA.window_mask_info(262144, 128, 7, 512)
  dkv = TA.window_mask_info_dkv(262144, 128, 7)
  sink = TA.sink_mask_info(262144, 128, 1), TA.sink_mask_info_dkv(262144, 128, 1)
  took = time.perf_counter() - t0
  assert fwd.data_next.shape == (1, 512, 10) and dkv.data_next.shape == (1, 7, 2048)
  assert sink[0].data_next.shape == (1, 2048, 1) and sink[1].data_next.shape == (1, 1, 2048)
  assert took < 1.0, f"mask tables took {took:.3f} s"
  assert TA.mask_infos(262144, 128, 7, 512) is TA.mask_infos(262144, 128, 7, 512)


@pytest.mark.parametrize("device_kind", ["TPU v5p", "TPU v6 lite"])
@pytest.mark.parametrize("pattern", [A.SSA(128, 1, 7), A.Full()], ids=["ssa", "full"])
def test_lowers_for_tpu(monkeypatch, device_kind, pattern):
  """Forward and backward lower for a TPU without one: every splash kernel goes through the Pallas to
  Mosaic TPU lowering (the TPU compiler itself does not run here). D 192 / E 128, bf16, packed rows."""
  from jax._src import mesh as mesh_lib
  original = TA.unsupported_reason
  monkeypatch.setattr(TA, "unsupported_reason",
                      lambda p, q, k, v, interpret=False: original(p, q, k, v, interpret=True))
  B, T, H, K, D, E = 1, 2048, 4, 2, 192, 128
  seg = np.ones((B, T), np.int32)
  seg[:, 1024:] = 2
  seg = jnp.asarray(seg)

  def loss(q, k, v):
    o, lse = TA.attention_impl(q, k, v, pattern=pattern, segment_ids=seg, positions=None, scale=D ** -0.5)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  shapes = ((B, T, H, D), (B, T, K, D), (B, T, K, E))
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  kernels = 6 if isinstance(pattern, A.SSA) else 3      # fwd, dq, dkv per splash pass (SSA: window + sink)
  assert text.count("tpu_custom_call") == kernels


# ----------------------------------------------------------------------------------------
# What it refuses, and how.


def _sds(shapes, dtype):
  return (jax.ShapeDtypeStruct(s, dtype) for s in shapes)


@pytest.mark.parametrize("shapes, pattern, dtype, expected", [
    (((1, 8, 4, 192), (1, 8, 1, 192), (1, 8, 1, 128)), A.SSA(), jnp.bfloat16, None),
    (((1, 8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64)), A.Full(), jnp.float32, None),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), A.SSA(block_size=256), jnp.bfloat16, None),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), A.SSA(block_size=64), jnp.bfloat16, "block size 64"),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), A.SSA(block_size=192), jnp.bfloat16, "multiple of 128"),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), A.Full(), jnp.float16, "dtype float16"),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), A.Full(), jnp.int32, "dtype int32"),
    (((1, 8, 3, 64), (1, 8, 2, 64), (1, 8, 2, 64)), A.Full(), jnp.float32, "do not divide"),
    (((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), "causal", jnp.float32, "is not Full() or SSA"),
])
def test_unsupported_reason(shapes, pattern, dtype, expected):
  q, k, v = _sds(shapes, dtype)
  reason = TA.unsupported_reason(pattern, q, k, v, interpret=True)
  assert reason is None if expected is None else (reason is not None and expected in reason), reason


def test_duck_typed_patterns():
  """Plain objects with the SSA fields work like SSA; nothing here needs loza_jax's classes."""
  ssa = types.SimpleNamespace(block_size=256, sink_blocks=2, local_blocks=3)
  assert TA.pattern_fields(ssa) == (256, 2, 3)
  assert TA.pattern_fields(A.Full()) == (TA.TILE, 0, None)
  assert TA.pattern_fields(object()) is None


def test_needs_a_tpu_unless_interpreted():
  q, k, v = _sds(((1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64)), jnp.bfloat16)
  if jax.default_backend() != "tpu":
    assert "needs a TPU" in TA.unsupported_reason(A.Full(), q, k, v)
    assert "runs on ('tpu',)" in A.reason("pallas_tpu", A.Full(), q, k, v)
  assert A.reason(KERNEL, A.Full(), q, k, v, platform="cpu") is None


def test_explicit_positions_refused():
  q = jnp.zeros((1, 128, 2, 32), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), (1, 128))
  with pytest.raises(ValueError, match="ignores `positions`"):
    A.attention(q, q, q, pattern=A.SSA(128, 1, 1), positions=pos, impl=KERNEL)


def test_unsupported_call_raises():
  q = jnp.zeros((1, 128, 2, 32), jnp.float32)
  with pytest.raises(ValueError, match="block size 64 is not a multiple of 128"):
    A.attention(q, q, q, pattern=A.SSA(64, 1, 1), impl=KERNEL)


def _misaligned():
  seg = np.ones((1, 256), np.int32)
  seg[0, 200:] = 2            # document 2 starts at token 200, not a multiple of 128
  return jnp.asarray(seg)


def test_misaligned_documents_raise():
  q = jnp.zeros((1, 256, 2, 32), jnp.float32)
  with pytest.raises(ValueError, match="starts at token 200, not a multiple of the kernel block size 128"):
    A.attention(q, q, q, pattern=A.SSA(128, 1, 1), segment_ids=_misaligned(), impl=KERNEL)


def test_repeated_segment_id_raises():
  q = jnp.zeros((1, 256, 2, 32), jnp.float32)
  seg = np.ones((1, 256), np.int32)
  seg[0, 64:128], seg[0, 128:] = 2, 1          # id 1 again after id 2: refused for Full as well
  with pytest.raises(ValueError, match="appears again at token 128"):
    A.attention(q, q, q, pattern=A.Full(), segment_ids=jnp.asarray(seg), impl=KERNEL)


def test_misaligned_documents_raise_under_jit():
  q = jnp.zeros((1, 256, 1, 32), jnp.float32)
  f = jax.jit(lambda q, s: A.attention(q, q, q, pattern=A.SSA(128, 1, 1), segment_ids=s, impl=KERNEL))
  with pytest.raises(Exception, match="starts at token 200, not a multiple of the kernel block size 128"):
    jax.block_until_ready(f(q, _misaligned()))


def test_package_does_not_import_loza_jax():
  code = ("import sys, kernels_pallas.tpu_attention; "
          "bad = [m for m in sys.modules if m.startswith('loza_jax')]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
