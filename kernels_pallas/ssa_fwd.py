"""Forward kernel: flash-style online softmax per (query tile, batch, head).

Each program loads its query tile once and visits only the key tiles the pattern needs:
the document's sink tiles that lie before the local window, the local tiles before the
diagonal (both unmasked: they are whole tiles of the same document), and finally the
diagonal tile with the causal mask. Full attention is the same loop with an unbounded window.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.tile_io import (
    LN2, LOG2E, MASK, NEG_INF, KernelConfig, causal_tile_mask, dot, load, load_parts, row_mask,
    store, visit_ranges)


def query_tile_index(cfg: KernelConfig):
  """Tile handled by this program; Full runs the longest (last) tiles first."""
  i = pl.program_id(0)
  return cfg.n_tiles - 1 - i if cfg.local is None else i


def _fwd_kernel(start_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: KernelConfig):
  tile = cfg.tile
  i = query_tile_index(cfg)
  rows_ok = row_mask(cfg, i)
  q = load_parts(q_ref, i, cfg.d_parts, tile, rows_ok)
  qk_scale = cfg.scale * LOG2E

  def visit(j, carry, masked):
    acc, m, l = carry
    keys_ok = rows_ok if masked else None          # only the diagonal tile can be the tail
    k = load_parts(k_ref, j, cfg.d_parts, tile, keys_ok)
    s = sum(dot(qp, kp, trans_b=True, precision=cfg.precision) for qp, kp in zip(q, k)) * qk_scale
    if masked:
      s = jnp.where(causal_tile_mask(tile), s, MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    v = load_parts(v_ref, j, cfg.e_parts, tile, keys_ok)
    p = p.astype(v[0].dtype)
    acc = [a * alpha[:, None] + dot(p, vp, precision=cfg.precision) for a, vp in zip(acc, v)]
    return acc, m_new, l

  s0, s1, lo = visit_ranges(cfg, i, start_ref[i])
  carry = ([jnp.zeros((tile, size), jnp.float32) for _, size in cfg.e_parts],
           jnp.full((tile,), MASK, jnp.float32), jnp.zeros((tile,), jnp.float32))
  body = functools.partial(visit, masked=False)
  carry = jax.lax.fori_loop(s0, s1, body, carry)
  carry = jax.lax.fori_loop(lo, i, body, carry)
  acc, m, l = visit(i, carry, masked=True)

  seg = load(seg_ref, pl.ds(i * tile, tile), rows_ok, (tile,), other=0)
  valid = seg != 0
  l_safe = jnp.where(valid, l, 1.0)
  inv_l = 1.0 / l_safe
  for (off, size), a in zip(cfg.e_parts, acc):
    o = jnp.where(valid[:, None], a * inv_l[:, None], 0.0).astype(o_ref.dtype)
    store(o_ref, (pl.ds(i * tile, tile), pl.ds(off, size)), o, rows_ok)
  lse = jnp.where(valid, m * LN2 + jnp.log(l_safe), NEG_INF)
  store(lse_ref, (pl.ds(i * tile, tile),), lse, rows_ok)


def forward(q_BTHD, k_BTKD, v_BTKE, seg_BT, start_BN, cfg: KernelConfig):
  """Run the forward kernel: (o_BTHE in the input dtype, lse_BHT fp32)."""
  B, T, H, D = q_BTHD.shape
  K, E = k_BTKD.shape[2], v_BTKE.shape[3]
  G, n = cfg.groups, cfg.n_tiles
  grid = (n, B, H)
  in_specs = [
      pl.BlockSpec((None, n), lambda i, b, h: (b, 0)),
      pl.BlockSpec((None, T), lambda i, b, h: (b, 0)),
      pl.BlockSpec((None, T, None, D), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, T, None, D), lambda i, b, h: (b, 0, h // G, 0)),
      pl.BlockSpec((None, T, None, E), lambda i, b, h: (b, 0, h // G, 0)),
  ]
  out_specs = [
      pl.BlockSpec((None, T, None, E), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0)),
  ]
  out_shape = [jax.ShapeDtypeStruct((B, T, H, E), q_BTHD.dtype),
               jax.ShapeDtypeStruct((B, H, T), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name="ssa_attention_fwd" if cfg.local is not None else "full_attention_fwd",
  )(start_BN, seg_BT, q_BTHD, k_BTKD, v_BTKE)
