"""kernels_pallas/prefix.py: queries at an offset over keys of another length (interpret mode on CPU; the
real GPU kernel under the gpu mark) vs its dense XLA form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import prefix
from kernels_pallas.tile_io import Tiles


def _inputs(B, T, S, H, K, D=32, E=16, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, H, D), dtype), jax.random.normal(ks[1], (B, S, K, D), dtype),
          jax.random.normal(ks[2], (B, S, K, E), dtype))


# (T, S, offset): plain causal; a chunk over its whole prefix; a past block every query sees whole;
# ragged query and key lengths; a key sequence shorter than the offset's diagonal.
CASES = [(48, 48, 0), (32, 96, 64), (48, 64, 64), (40, 72, 32), (24, 40, 80), (16, 40, 16)]


@pytest.mark.parametrize("T,S,offset", CASES)
def test_prefix_matches_dense(T, S, offset):
  q, k, v = _inputs(2, T, S, 4, 2)
  o, lse = prefix.prefix_attention(q, k, v, offset=offset, scale=0.3, interpret=True)
  o_ref, lse_ref = prefix.reference(q, k, v, offset=offset, scale=0.3)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_prefix_bf16_and_wider_tiles():
  q, k, v = _inputs(1, 64, 128, 2, 2, D=48, E=32, dtype=jnp.bfloat16)
  o, lse = prefix.prefix_attention(q, k, v, offset=64, scale=0.2, interpret=True, tiles=Tiles(32, 16, 4, 2))
  o_ref, lse_ref = prefix.reference(q, k, v, offset=64, scale=0.2)
  np.testing.assert_allclose(np.float32(o), np.float32(o_ref), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-3, atol=1e-3)


def test_prefix_split_keys_merge_to_the_whole():
  """A chunk's prefix attended in two key blocks, merged by lse, equals one call over all keys."""
  from loza_jax.cache import merge
  q, k, v = _inputs(1, 32, 96, 2, 2)
  o, lse = prefix.prefix_attention(q, k, v, offset=64, scale=0.3, interpret=True)
  o1, l1 = prefix.prefix_attention(q, k[:, :64], v[:, :64], offset=64, scale=0.3, interpret=True)
  o2, l2 = prefix.prefix_attention(q, k[:, 64:], v[:, 64:], offset=0, scale=0.3, interpret=True)
  np.testing.assert_allclose(merge(o1, l1, o2, l2), o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(offset=8), "offset 8 must be"),
    (dict(offset=-16), "offset -16"),
    (dict(k=jnp.zeros((1, 32, 3, 32)), v=jnp.zeros((1, 32, 3, 16))), "kv heads 3"),
    (dict(v=jnp.zeros((1, 32, 2, 24))), "v head dim E"),
    (dict(k=jnp.zeros((1, 32, 2, 32), jnp.bfloat16)), "share one"),
])
def test_prefix_bad_input_is_named(bad, match):
  q, k, v = _inputs(1, 16, 32, 4, 2)
  args = dict(q=q, k=k, v=v, offset=16)
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    prefix.prefix_attention(args["q"], args["k"], args["v"], offset=args["offset"], scale=1.0, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("T,S,offset", [(1024, 4096, 3072), (1000, 2048, 2048), (512, 512, 0)])
def test_prefix_gpu_matches_dense(T, S, offset):
  q, k, v = _inputs(1, T, S, 4, 4, D=192, E=128, dtype=jnp.bfloat16)
  o, lse = prefix.prefix_attention(q, k, v, offset=offset, scale=192 ** -0.5)
  o_ref, lse_ref = prefix.reference(q, k, v, offset=offset, scale=192 ** -0.5)
  np.testing.assert_allclose(np.float32(o), np.float32(o_ref), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-3, atol=1e-3)


def test_expanded_past_attention_over_several_blocks():
  """A 16-token chunk after 300 cached tokens: three key blocks of 128 (the last one ragged), merged,
  equal one dense attention over every expanded past key."""
  from loza_jax.cache import expanded_past_attention
  ks = jax.random.split(jax.random.PRNGKey(1), 5)
  B, T, H, C, R, Dn, E, start = 2, 16, 2, 8, 16, 16, 16, 300
  q = jax.random.normal(ks[0], (B, T, H, Dn + R))
  ckv = jax.random.normal(ks[1], (B, 320, C))          # a cache with room past `start`: never read there
  krope = jax.random.normal(ks[2], (B, 320, R))
  w_k, w_v = jax.random.normal(ks[3], (C, H, Dn)), jax.random.normal(ks[4], (C, H, E))
  expand = lambda c, r: (jnp.concatenate([jnp.einsum("bsc,chd->bshd", c, w_k),
                                          jnp.broadcast_to(r[:, :, None], r.shape[:2] + (H, R))], -1),
                         jnp.einsum("bsc,che->bshe", c, w_v))
  o, lse = expanded_past_attention(q, ckv, krope, expand, start, 0.2, interpret=True)
  k, v = expand(ckv[:, :start], krope[:, :start])
  o_ref, lse_ref = prefix.reference(q, k, v, offset=start, scale=0.2)
  np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


def _packed_ids(rng, B, S, docs):
  """Random packing of `docs` documents per row at arbitrary (unaligned) starts, padding after the last."""
  seg = np.zeros((B, S), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, S), docs, replace=False))
    for d, (a, e) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
      seg[b, a:e] = 10 * b + d + 1
  return jnp.asarray(seg)


def _value_and_grads(fn, q, k, v, w_o, w_lse):
  def loss(q, k, v):
    o, lse = fn(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse), (o, lse)
  (_, (o, lse)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (o, lse, *g)


def _check_grads(T, S, offset, H, K, D, E, dtype, seed, docs, tol, interpret, traced=True, tiles=None):
  rng = np.random.default_rng(seed)
  q, k, v = _inputs(2, T, S, H, K, D, E, dtype, seed)
  w_o = jnp.asarray(rng.standard_normal((2, T, H, E)), jnp.float32)
  w_lse = jnp.asarray(rng.standard_normal((2, H, T)), jnp.float32)
  seg = _packed_ids(rng, 2, S, docs) if docs else None
  off = jnp.int32(offset) if traced else offset
  kw = dict(tiles=tiles, bwd_tiles=tiles) if tiles else {}
  got = _value_and_grads(lambda q, k, v: prefix.prefix_attention(
      q, k, v, offset=off, scale=0.3, segment_ids_BS=seg, interpret=interpret, **kw), q, k, v, w_o, w_lse)
  up = lambda x: x.astype(jnp.float32)
  ref = _value_and_grads(lambda q, k, v: prefix.reference(q, k, v, offset=offset, scale=0.3, segment_ids_BS=seg),
                         up(q), up(k), up(v), w_o, w_lse)
  np.testing.assert_array_equal(np.isinf(got[1]), np.isinf(ref[1]))
  for name, g, r in zip(("o", "lse", "dq", "dk", "dv"), got, ref):
    g, r = np.float64(np.where(np.isfinite(g), g, 0)), np.float64(np.where(np.isfinite(r), r, 0))
    err = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
    assert err <= tol, f"{name}: rel err {err:.2e} > {tol}"


# (T, S, offset, docs): one chunk of a context-parallel row (the keys are the whole row) with packed
# documents at unaligned starts, ragged lengths, GQA; no ids; the first chunk; the last chunk.
GRAD_CASES = [(32, 96, 32, 3), (40, 88, 48, 4), (48, 64, 16, 0), (32, 96, 0, 2), (32, 96, 64, 5)]


@pytest.mark.parametrize("T,S,offset,docs", GRAD_CASES)
def test_prefix_grads_match_dense(T, S, offset, docs):
  """Outputs, lse and the gradients of q, k, v (with an lse cotangent) against the dense form, offset traced."""
  _check_grads(T, S, offset, 4, 2, 32, 16, jnp.float32, T + offset + docs, docs, 1e-5, interpret=True)


def test_prefix_static_offset_with_ids_must_fit_the_keys():
  q, k, v = _inputs(1, 32, 48, 2, 2)
  with pytest.raises(ValueError, match="keys must cover the queries: offset 32 \\+ T 32 > S 48"):
    prefix.prefix_attention(q, k, v, offset=32, scale=1.0, segment_ids_BS=jnp.ones((1, 48), jnp.int32),
                            interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("T,S,offset,docs", [(1024, 4096, 2048, 3), (1000, 2048, 1024, 0), (2048, 2048, 0, 5)])
def test_prefix_gpu_grads_match_dense(T, S, offset, docs):
  _check_grads(T, S, offset, 4, 2, 192, 128, jnp.bfloat16, T + docs, docs, 2e-2, interpret=False)
