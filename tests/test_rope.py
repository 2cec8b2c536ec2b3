"""YaRN inverse frequencies, attention factor and softmax scale vs the published formulas."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from loza_jax import rope
from loza_jax.config import RopeScaling


def formula_inv_freq(dim, base, factor, orig, beta_fast, beta_slow):
  """YaRN (Peng et al. 2023) as in DeepSeek-V3: ramp between the correction dims of beta_fast/slow."""
  def corr_dim(rot):
    return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
  lo = max(math.floor(corr_dim(beta_fast)), 0)
  hi = min(math.ceil(corr_dim(beta_slow)), dim - 1)
  out = []
  for i in range(dim // 2):
    theta = base ** (-2 * i / dim)
    ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)       # 0 = keep (extrapolate), 1 = interpolate
    out.append(theta / factor * ramp + theta * (1 - ramp))
  return np.array(out)


@pytest.mark.parametrize("dim,base,factor,orig", [(64, 10000.0, 40.0, 4096), (16, 10000.0, 4.0, 256),
                                                  (64, 1e6, 8.0, 8192)])
def test_yarn_inv_freq(dim, base, factor, orig):
  rs = RopeScaling(factor=factor, original_max_position_embeddings=orig, beta_fast=32, beta_slow=1,
                   mscale=1.0, mscale_all_dim=1.0)
  inv, att = rope.inv_frequencies(dim, base, rs)
  np.testing.assert_allclose(inv, formula_inv_freq(dim, base, factor, orig, 32, 1), rtol=1e-12)
  assert att == pytest.approx(1.0)  # mscale == mscale_all_dim: the magnitude corrections cancel


def test_yarn_attention_factor_and_softmax_scale():
  rs = RopeScaling(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.0)
  _, att = rope.inv_frequencies(64, 10000.0, rs)
  assert att == pytest.approx(0.1 * math.log(40.0) + 1.0)
  rs = RopeScaling(factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707)
  assert rope.softmax_scale(192, rs) == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40.0) + 1.0) ** 2)
  assert rope.softmax_scale(192, None) == pytest.approx(192 ** -0.5)
  _, att = rope.inv_frequencies(64, 10000.0, RopeScaling(factor=4.0, mscale=2.0, mscale_all_dim=1.0))
  assert att == pytest.approx((0.2 * math.log(4.0) + 1) / (0.1 * math.log(4.0) + 1))


def test_no_scaling_is_plain_rope():
  inv, att = rope.inv_frequencies(8, 10000.0, None)
  np.testing.assert_allclose(inv, [10000.0 ** (-i / 4) for i in range(4)])
  assert att == 1.0


@pytest.mark.parametrize("interleave", [True, False])
def test_apply_rope_is_a_relative_rotation(rng, interleave):
  """q·k after RoPE depends only on the position difference, and norms are preserved."""
  R = 16
  inv, _ = rope.inv_frequencies(R, 10000.0, None)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, R)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, R)), jnp.float32)
  def dot(pq, pk):
    rq = rope.apply_rope(q, jnp.array([[pq]]), inv, 1.0, interleave)
    rk = rope.apply_rope(k, jnp.array([[pk]]), inv, 1.0, interleave)
    return float(jnp.sum(rq * rk)), float(jnp.linalg.norm(rq))
  d1, n1 = dot(7, 3)
  d2, _ = dot(104, 100)
  assert d1 == pytest.approx(d2, rel=1e-4)
  assert n1 == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
  d3, _ = dot(9, 3)
  assert abs(d3 - d1) > 1e-4


def test_yarn_validation():
  with pytest.raises(ValueError, match="rope_scaling.type"):
    RopeScaling(type="linear")
  with pytest.raises(ValueError, match="rope_scaling.factor"):
    RopeScaling(factor=0.5)
