"""GPU: impl="auto" dispatch and the optional tokamax impl for Full layers vs the XLA reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loza_jax import attention as A

pytestmark = pytest.mark.gpu


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_auto_dispatch_on_gpu():
  q = jnp.zeros((1, 256, 16, 192), jnp.bfloat16)
  v = jnp.zeros((1, 256, 16, 128), jnp.bfloat16)
  hopper = str(jax.devices()[0].compute_capability).startswith("9")
  ours = "pallas_mosaic" if hopper else "pallas_triton"
  assert A.resolve_impl("auto", A.SSA(), q, q, v, packed=True).name == ours
  assert A.resolve_impl("auto", A.Full(), q, q, v, packed=True).name == ours
  tokamax_ok = A._reason(A.registered()["tokamax"], A.Full(), q, q, v, "gpu", packed=False) is None
  want = "tokamax" if tokamax_ok else ours
  assert A.resolve_impl("auto", A.Full(), q, q, v, packed=False).name == want
  assert A.resolve_impl("auto", A.Full(), q, q, v, packed=False, need_lse=True).name == ours
  ragged = jnp.zeros((1, 300, 16, 192), jnp.bfloat16)     # T not a multiple of 128: the Triton forward
  assert A.resolve_impl("auto", A.SSA(), ragged, ragged, ragged[..., :128], packed=True).name == "pallas_triton"


@pytest.mark.parametrize("T,H,K", [(4096, 16, 16), (2000, 8, 2)])
def test_tokamax_full_matches_xla(T, H, K):
  try:
    import tokamax  # noqa: F401
  except ImportError:
    pytest.skip("tokamax not installed")
  rng = np.random.default_rng(T + H)
  q = jnp.asarray(rng.standard_normal((2, T, H, 192)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((2, T, K, 192)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((2, T, K, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((2, T, H, 128)), jnp.float32)
  f32 = lambda x: x.astype(jnp.float32)

  def loss(impl, cast):
    return lambda q, k, v: jnp.sum(A.attention(cast(q), cast(k), cast(v), pattern=A.Full(), impl=impl)
                                   .astype(jnp.float32) * w)

  o = jax.jit(lambda q, k, v: A.attention(q, k, v, pattern=A.Full(), impl="tokamax"))(q, k, v)
  ref = jax.jit(lambda q, k, v: A.attention(f32(q), f32(k), f32(v), pattern=A.Full(), impl="xla"))(q, k, v)
  assert not np.isnan(np.asarray(o, np.float32)).any()
  assert _rel(o, ref) < 2e-2
  g = jax.jit(jax.grad(loss("tokamax", lambda x: x), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss("xla", f32), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 2e-2
