"""Rotary position embeddings with YaRN scaling (DeepSeek-V3 / HuggingFace semantics)."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from loza_jax.config import RopeScaling


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN magnitude correction 0.1·mscale·ln(scale) + 1 (1 when scale <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
  return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(rs: RopeScaling, dim: int, base: float) -> tuple[float, float]:
  """Dims [low, high] between which YaRN ramps from extrapolation to interpolation."""
  low = _correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings)
  high = _correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings)
  if rs.truncate:
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, dim - 1)


def inv_frequencies(dim: int, base: float, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
  """(inv_freq [dim/2] float64, attention_factor applied to cos/sin)."""
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  inv_extra = 1.0 / pos_freqs
  if scaling is None:
    return inv_extra, 1.0
  inv_inter = 1.0 / (scaling.factor * pos_freqs)
  low, high = yarn_correction_range(scaling, dim, base)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  extra_weight = 1.0 - ramp
  inv_freq = inv_inter * (1.0 - extra_weight) + inv_extra * extra_weight
  if scaling.attention_factor is not None:
    factor = scaling.attention_factor
  elif scaling.mscale and scaling.mscale_all_dim:
    factor = yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
  else:
    factor = yarn_get_mscale(scaling.factor)
  return inv_freq, float(factor)


def softmax_scale(qk_head_dim: int, scaling: RopeScaling | None) -> float:
  """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V3)."""
  scale = qk_head_dim ** -0.5
  if scaling is not None and scaling.mscale_all_dim:
    m = yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
    scale *= m * m
  return scale


def apply_rope(x_BTHR, positions_BT, inv_freq, attention_factor: float = 1.0, interleave: bool = True):
  """Rotate the last dim of x by position·inv_freq; fp32 math, output in x's dtype.

  interleave=True rotates pairs (x[2i], x[2i+1]) (DeepSeek-V3 weight layout); False rotates
  the halves (x[i], x[i + R/2]) as in Llama.
  """
  ang = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, R/2]
  cos = (jnp.cos(ang) * attention_factor)[:, :, None, :]
  sin = (jnp.sin(ang) * attention_factor)[:, :, None, :]
  xf = x_BTHR.astype(jnp.float32)
  if interleave:
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
  else:
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
  r1 = x1 * cos - x2 * sin
  r2 = x2 * cos + x1 * sin
  # Output in half-split layout either way: q·k is invariant as q and k share it.
  return jnp.concatenate([r1, r2], axis=-1).astype(x_BTHR.dtype)
