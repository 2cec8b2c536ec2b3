"""XLA attention implementations vs the dense oracle, and the SSA pattern vs a brute-force rule."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loza_jax import attention as A, attention_xla as X


def brute_force_visible(t_pos, s_pos, B, sink, local):
  """The SSA rule, written independently: one (t, s) pair at a time."""
  if s_pos > t_pos:
    return False
  q_block = t_pos // B
  k_block = s_pos // B
  in_sink = k_block < sink
  in_local = q_block - local < k_block <= q_block
  return in_sink or in_local


def make_segments(rng, B, T, n_docs_max=3, with_padding=True):
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    n_docs = rng.integers(1, n_docs_max + 1)
    cuts = np.sort(rng.choice(np.arange(1, T), size=n_docs - 1, replace=False)) if n_docs > 1 else []
    bounds = [0, *cuts, T]
    for d in range(n_docs):
      seg[b, bounds[d]:bounds[d + 1]] = d + 1
    if with_padding and rng.random() < 0.5:
      seg[b, T - rng.integers(1, max(2, T // 5)):] = 0
  return jnp.asarray(seg)


def rand(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def lse_close(l1, l2, tol):
  l1, l2 = np.asarray(l1), np.asarray(l2)
  assert np.array_equal(np.isfinite(l1), np.isfinite(l2)), "fully masked rows disagree"
  f = np.isfinite(l1)
  assert rel_err(l1[f], l2[f]) <= tol


@pytest.mark.parametrize("B,sink,local", [(4, 1, 2), (3, 2, 3), (8, 1, 1), (5, 0, 2)])
def test_ssa_mask_matches_brute_force(B, sink, local):
  T = 50
  pat = A.SSA(B, sink, local)
  t = jnp.arange(T)[:, None]
  s = jnp.arange(T)[None, :]
  got = np.asarray(A.pattern_allows(pat, t, s))
  want = np.array([[brute_force_visible(i, j, B, sink, local) for j in range(T)] for i in range(T)])
  np.testing.assert_array_equal(got, want)
  assert got.sum(1).max() <= pat.max_keys


CASES = [
    # T, H, K, D, E, pattern, chunk
    (37, 4, 4, 16, 16, A.SSA(4, 1, 2), 16),
    (64, 4, 2, 24, 8, A.SSA(8, 2, 3), 16),
    (45, 6, 1, 12, 20, A.SSA(4, 1, 3), 8),
    (29, 2, 2, 8, 8, A.SSA(16, 1, 7), 8),
    (37, 4, 4, 16, 16, A.Full(), 16),
    (64, 4, 2, 24, 8, A.Full(), 16),
    (45, 6, 1, 12, 20, A.Full(), 8),
]


def _impls(chunk):
  return {"xla_dense": X.xla_dense, "xla": functools.partial(X.xla, chunk=chunk)}


def _run(fn, q, k, v, pat, seg, scale):
  seg_n, pos = A._normalise(q, seg, None)
  return fn(q, k, v, pattern=pat, segment_ids=seg_n, positions=pos, scale=scale)


@pytest.mark.parametrize("T,H,K,D,E,pat,chunk", CASES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_xla_matches_dense(rng, T, H, K, D, E, pat, chunk, dtype, tol):
  Bsz = 2
  q, k, v = rand(rng, (Bsz, T, H, D), dtype), rand(rng, (Bsz, T, K, D), dtype), rand(rng, (Bsz, T, K, E), dtype)
  seg = make_segments(rng, Bsz, T)
  scale = D ** -0.5
  impls = _impls(chunk)
  o_ref, lse_ref = _run(impls["xla_dense"], q, k, v, pat, seg, scale)
  o, lse = _run(impls["xla"], q, k, v, pat, seg, scale)
  assert o.dtype == dtype and o.shape == (Bsz, T, H, E) and lse.shape == (Bsz, H, T)
  assert not np.isnan(np.asarray(o, np.float32)).any()
  assert rel_err(o, o_ref) <= tol
  lse_close(lse, lse_ref, 1e-5)
  # Padding queries output exactly zero and lse = -inf.
  pad = np.asarray(seg) == 0
  assert np.all(np.asarray(o, np.float32)[pad] == 0)
  assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[pad]))

  w_o = rand(rng, o.shape, jnp.float32)
  w_l = rand(rng, lse.shape, jnp.float32)

  def loss(fn):
    def f(q, k, v):
      o, lse = _run(fn, q, k, v, pat, seg, scale)
      return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_l)
    return f

  g_ref = jax.grad(loss(impls["xla_dense"]), argnums=(0, 1, 2))(q, k, v)
  g = jax.grad(loss(impls["xla"]), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", g, g_ref):
    assert a.dtype == dtype, name
    assert not np.isnan(np.asarray(a, np.float32)).any(), name
    assert rel_err(a, b) <= tol, name


@pytest.mark.parametrize("impl", ["xla", "xla_dense"])
def test_ssa_equals_full_within_budget_and_differs_beyond(rng, impl):
  pat = A.SSA(8, 1, 3)  # 32 keys visible
  H, D = 2, 16
  T = 32
  q, k, v = (rand(rng, (1, 96, H, D), jnp.float32) for _ in range(3))
  o_ssa = A.attention(q[:, :T], k[:, :T], v[:, :T], pattern=pat, impl=impl)
  o_full = A.attention(q[:, :T], k[:, :T], v[:, :T], pattern=A.Full(), impl=impl)
  np.testing.assert_allclose(o_ssa, o_full, rtol=1e-5, atol=1e-6)
  o_ssa = np.asarray(A.attention(q, k, v, pattern=pat, impl=impl))
  o_full = np.asarray(A.attention(q, k, v, pattern=A.Full(), impl=impl))
  o_win = np.asarray(X.xla_dense(q, k, v, pattern=A.SSA(8, 0, 3), segment_ids=jnp.ones((1, 96), jnp.int32),
                                 positions=jnp.arange(96)[None], scale=D ** -0.5)[0])
  late = slice(40, 96)  # queries whose window excludes the sink
  assert np.abs(o_ssa[:, late] - o_full[:, late]).max() > 1e-3, "SSA degraded to Full"
  assert np.abs(o_ssa[:, late] - o_win[:, late]).max() > 1e-3, "SSA lost its sink block"


def test_segments_are_document_relative(rng):
  """A document packed after another gives the same outputs as when it stands alone."""
  pat = A.SSA(4, 1, 2)
  H, D = 2, 8
  a_len, b_len = 13, 30
  q, k, v = (rand(rng, (1, a_len + b_len, H, D), jnp.float32) for _ in range(3))
  seg = jnp.asarray([[1] * a_len + [2] * b_len])
  for impl in ("xla", "xla_dense"):
    packed = A.attention(q, k, v, pattern=pat, segment_ids=seg, impl=impl)
    alone = A.attention(q[:, a_len:], k[:, a_len:], v[:, a_len:], pattern=pat, impl=impl)
    np.testing.assert_allclose(packed[:, a_len:], alone, rtol=1e-5, atol=1e-6)


def test_xla_ssa_memory_is_linear():
  """The blockwise SSA program never builds a T x T array (checked on the lowered HLO's shapes)."""
  T, pat = 4096, A.SSA(16, 1, 3)
  q = jax.ShapeDtypeStruct((1, T, 2, 8), jnp.float32)
  seg = jnp.ones((1, T), jnp.int32)
  hlo = jax.jit(lambda q, k, v: A.attention(q, k, v, pattern=pat, segment_ids=seg, impl="xla")).lower(q, q, q).as_text()
  assert f"{T},{T}" not in hlo.replace(" ", "") and f"{T}x{T}" not in hlo


def test_xla_full_memory_is_linear():
  T = 4096
  q = jax.ShapeDtypeStruct((1, T, 2, 8), jnp.float32)
  f = lambda q, k, v: A.attention(q, k, v, pattern=A.Full(), impl="xla").sum()
  hlo = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, q, q).as_text()
  assert f"{T}x{T}" not in hlo and f"{T},{T}" not in hlo.replace(" ", "")


def test_explicit_impl_errors_and_auto():
  q = jnp.ones((1, 8, 2, 4))
  with pytest.raises(ValueError, match="unknown attention impl 'nope'"):
    A.attention(q, q, q, pattern=A.Full(), impl="nope")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="pallas_triton.*cannot run here"):
      A.attention(q, q, q, pattern=A.Full(), impl="pallas_triton")
    assert A.resolve_impl("auto", A.Full(), q, q, q).name == "xla"
  with pytest.raises(ValueError, match="must divide"):
    A.attention(q, jnp.ones((1, 8, 3, 4)), jnp.ones((1, 8, 3, 4)), pattern=A.Full())
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    A.attention(q, q, q, pattern=A.Full(), segment_ids=jnp.ones((1, 7), jnp.int32))
  with pytest.raises(ValueError, match="pattern must be"):
    A.attention(q, q, q, pattern="ssa")
  with pytest.raises(ValueError, match="SSA"):
    A.SSA(0, 1, 7)


def test_registry_respects_packing_and_lse():
  """An impl that cannot express packing or return lse is skipped by auto where it would be wrong."""
  calls = []

  def fake(q, k, v, *, pattern, segment_ids, positions, scale):
    calls.append(1)
    return X.xla(q, k, v, pattern=pattern, segment_ids=segment_ids, positions=positions, scale=scale)[0], None

  platform = jax.default_backend()
  A.register(A.Impl("fake_unpacked", fake, platforms=(platform,), priority=99, returns_lse=False,
                    packed_documents=False))
  try:
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 24, 2, 8)), jnp.float32)
    seg = jnp.ones((1, 24), jnp.int32)
    assert A.resolve_impl("auto", A.Full(), q, q, q, packed=False).name == "fake_unpacked"
    assert A.resolve_impl("auto", A.Full(), q, q, q, packed=True).name != "fake_unpacked"
    assert A.resolve_impl("auto", A.Full(), q, q, q, packed=False, need_lse=True).name != "fake_unpacked"
    o = A.attention(q, q, q, pattern=A.Full())
    assert calls == [1]
    np.testing.assert_allclose(o, A.attention(q, q, q, pattern=A.Full(), segment_ids=seg, impl="xla"), rtol=1e-6)
    A.attention(q, q, q, pattern=A.Full(), segment_ids=seg)
    assert calls == [1]                              # packed call went elsewhere
    with pytest.raises(ValueError, match="cannot express packed documents"):
      A.attention(q, q, q, pattern=A.Full(), segment_ids=seg, impl="fake_unpacked")
    with pytest.raises(ValueError, match="returns no log-sum-exp"):
      A.attention_with_lse(q, q, q, pattern=A.Full(), impl="fake_unpacked")
  finally:
    A._REGISTRY.pop("fake_unpacked")
  if platform == "cpu":
    with pytest.raises(ValueError, match="'tokamax' cannot run here"):
      A.attention(q, q, q, pattern=A.Full(), impl="tokamax")


def test_interpret_mode_is_a_flag_of_an_impl():
  """'<name>_interpret' selects an interpretable impl in interpret mode (not a second registry entry);
  reason() says why an impl cannot take a call, and an unknown name lists what exists."""
  reg = A.registered()
  assert not any(name.endswith(A.INTERPRET_SUFFIX) for name in reg)
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  for name in ("pallas_triton", "pallas_mosaic"):
    impl = A.lookup(f"{name}_interpret")
    assert reg[name].interpretable and not reg[name].interpret
    assert impl.interpret and impl.name == f"{name}_interpret" and impl.priority < 0 and "cpu" in impl.platforms
    assert A.reason(impl, A.Full(), q, q, q, platform="cpu") is None
  assert "runs on ('gpu',)" in A.reason("pallas_triton", A.Full(), q, q, q, platform="cpu")
  assert "ignores `positions`" in A.reason("pallas_triton_interpret", A.Full(), q, q, q, positions=True)
  assert A.reason("xla", A.SSA(16, 1, 1), q, q, q, positions=True) is None
  with pytest.raises(ValueError, match="unknown attention impl 'xla_interpret'.*interpret mode"):
    A.lookup("xla_interpret")
