"""The split-K latent decode kernel (interpret mode on CPU; real GPU under the gpu mark) vs the XLA form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import decode
from loza_jax import cache as kc
from loza_jax.attention import SSA, Full


def inputs(rng, B, T, H, S, C=64, R=16, dtype=jnp.float32):
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return f(B, T, H, C), f(B, T, H, R), f(B, S, C), f(B, S, R)


def xla(args, q_pos, k_pos, pattern, scale=0.3):
  return kc.latent_attention(*args, jnp.asarray(q_pos), jnp.asarray(k_pos), pattern, scale, impl="xla")


def kernel(args, q_pos, k_pos, pattern, scale=0.3, interpret=True, **cfg):
  window = None if isinstance(pattern, Full) else (pattern.block_size, pattern.sink_blocks, pattern.local_blocks)
  conf = None
  if cfg:
    B, T, H, C = args[0].shape
    base = decode.default_config(B, T * H, args[2].shape[1], C, scale, window, args[0].dtype, interpret)
    conf = decode.DecodeConfig(**{**base.__dict__, **cfg})
  return decode.latent_attention(*args, jnp.asarray(q_pos), jnp.asarray(k_pos), scale=scale, window=window,
                                 interpret=interpret, cfg=conf)


def close(got, want, tol=1e-5):
  (o, lse), (o_ref, lse_ref) = got, want
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=tol, rtol=tol)


@pytest.mark.parametrize("splits,cols,rows", [(1, 64, 8), (3, 32, 8), (4, 16, 2)])
def test_full_decode_ragged_lengths(rng, splits, cols, rows):
  """Rows at different lengths (one sees a single key); splits that end past a row's last key."""
  B, H, S = 3, 4, 200                            # S is not a multiple of the key tile: masked tail loads
  args = inputs(rng, B, 1, H, S)
  q_pos = np.array([[0], [117], [199]])
  k_pos = np.broadcast_to(np.arange(S), (B, S))
  close(kernel(args, q_pos, k_pos, Full(), splits=splits, cols=cols, rows=rows), xla(args, q_pos, k_pos, Full()))


def test_full_prefill_rows_over_past_cache(rng):
  """T > 1 query tokens (a prefill chunk against earlier keys), 3 heads: rows padded to the tile."""
  B, T, H, S = 2, 3, 3, 96
  args = inputs(rng, B, T, H, S)
  q_pos = np.array([[96, 97, 98], [40, 41, 42]])
  k_pos = np.broadcast_to(np.arange(S), (B, S))
  close(kernel(args, q_pos, k_pos, Full(), splits=2, rows=4), xla(args, q_pos, k_pos, Full()))


@pytest.mark.parametrize("splits", [1, 3])
def test_ssa_ring(rng, splits):
  """A wrapped ring (slot order ≠ position order), an unfilled ring (−1 slots) and an empty row."""
  pattern = SSA(16, 1, 3)
  B, H, W = 3, 4, 64
  args = inputs(rng, B, 1, H, W)
  last = np.array([300, 30, 0])
  k_pos = np.asarray(kc.ring_positions(jnp.asarray(last)[:, None], W, 16, 48))
  k_pos = np.where(k_pos > last[:, None], -1, k_pos)
  k_pos[1, 31:] = -1                       # row 1 holds only positions 0..30
  k_pos[2] = -1                            # row 2 holds nothing: output 0, lse −inf
  q_pos = last[:, None]
  got, want = kernel(args, q_pos, k_pos, pattern, splits=splits, cols=16), xla(args, q_pos, k_pos, pattern)
  close(got, want)
  assert np.all(np.asarray(got[0])[2] == 0) and np.all(np.isneginf(np.asarray(got[1])[2]))


def test_bf16(rng):
  args = inputs(rng, 2, 1, 4, 128, C=128, R=64, dtype=jnp.bfloat16)
  q_pos, k_pos = np.array([[127], [60]]), np.broadcast_to(np.arange(128), (2, 128))
  close(kernel(args, q_pos, k_pos, Full(), splits=2), xla(args, q_pos, k_pos, Full()), tol=2e-2)


def test_split_combine_weights_by_lse(rng):
  """A kernel whose splits were merged without their lse weights would fail: splits must matter."""
  args = inputs(rng, 1, 1, 2, 128)
  q_pos, k_pos = np.array([[127]]), np.arange(128)[None]
  o_parts, lse_parts = decode.partials(args[0].reshape(1, 2, -1), args[1].reshape(1, 2, -1), args[2], args[3],
                                       jnp.full((1, 2), 127), None,
                                       decode.DecodeConfig(0.3, None, 2, 32, 4, decode.latent_parts(64), interpret=True))
  assert not np.allclose(np.asarray(lse_parts[0, 0]), np.asarray(lse_parts[0, 1]))
  naive = np.asarray(o_parts).mean(axis=1)
  want = np.asarray(xla(args, q_pos, k_pos, Full())[0]).reshape(naive.shape)
  assert np.abs(naive - want).max() > 1e-3
  np.testing.assert_allclose(np.asarray(decode.combine(o_parts, lse_parts)[0]), want, atol=1e-5)


def test_impl_selection():
  """xla names keep the XLA form, interpret names run the kernel interpreted, others follow the backend."""
  assert kc.latent_impl("xla") is None and kc.latent_impl("xla_dense") is None
  assert kc.latent_impl("pallas_triton_interpret") == "interpret"
  assert kc.latent_impl("auto") == ("kernel" if jax.default_backend() == "gpu" else None)


def test_bad_input(rng):
  q, qr, ckv, kr = inputs(rng, 1, 1, 2, 64, C=40)
  with pytest.raises(ValueError, match="latent width C=40"):
    decode.latent_attention(q, qr, ckv, kr, jnp.zeros((1, 1), jnp.int32), None, scale=1.0, interpret=True)
  q, qr, ckv, kr = inputs(rng, 1, 1, 2, 64)
  with pytest.raises(ValueError, match="shapes disagree"):
    decode.latent_attention(q, qr, ckv[:, :, :32], kr, jnp.zeros((1, 1), jnp.int32), None, scale=1.0,
                            interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,length", [(1, 4096, 4000), (5, 2048, 1000), (16, 1024, 1023)])
def test_gpu_kernel_matches_xla(rng, B, S, length):
  """LongCat widths (64 heads, C 512, R 64) in bf16 on the GPU, default tiles and splits."""
  args = inputs(rng, B, 1, 64, S, C=512, R=64, dtype=jnp.bfloat16)
  q_pos = np.full((B, 1), length - 1) - np.arange(B)[:, None]
  k_pos = np.broadcast_to(np.arange(S), (B, S))
  close(kernel(args, q_pos, k_pos, Full(), scale=0.07, interpret=False),
        xla(args, q_pos, k_pos, Full(), scale=0.07), tol=2e-2)
  ring = SSA(128, 1, 7)
  W = 1024
  args = inputs(rng, B, 1, 64, W, C=512, R=64, dtype=jnp.bfloat16)
  last = np.full((B,), 5000)
  k_pos = np.asarray(kc.ring_positions(jnp.asarray(last)[:, None], W, 128, 896))
  close(kernel(args, last[:, None], k_pos, ring, scale=0.07, interpret=False),
        xla(args, last[:, None], k_pos, ring, scale=0.07), tol=2e-2)
