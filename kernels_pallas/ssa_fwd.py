"""Forward kernel: flash-style online softmax per (query tile, batch, head).

Each program loads its query rows once (a tile of the pattern block, or the whole block) and
visits only the key tiles the pattern needs: the document's sink tiles that lie before the
local window and the local tiles before the diagonal block (one unmasked loop: they are whole
tiles of the same document), then the diagonal block with the causal mask. Full attention is the same loop with an unbounded window.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.tile_io import (
  LN2,
  LOG2E,
  MASK,
  NEG_INF,
  KernelConfig,
  attend_tile,
  causal_mask,
  load,
  load_parts,
  row_mask,
  store,
  store_parts,
  visit_ranges,
)


def query_row_tile(cfg: KernelConfig, rows: int):
  """First query row of this program; Full runs the longest (last) row tiles first."""
  p = pl.program_id(0)
  if cfg.local is None:
    p = -(-cfg.seq_len // rows) - 1 - p
  return p * rows


def key_tile_loops(cfg: KernelConfig, r0, rows: int, cols: int, start):
  """For query rows [r0, r0 + rows) of block i: (n, tile_of, diag). The unmasked key tiles
  (units of `cols` rows) are tile_of(c) for c in [0, n): the sink tiles, then the local tiles
  before the diagonal block, in one loop so the software pipeline fills once. `diag` is the
  masked range over the diagonal block."""
  i = r0 // cfg.tile
  per_block = cfg.tile // cols
  s0, s1, lo = visit_ranges(cfg, i, start)
  n_sink = (s1 - s0) * per_block
  n = n_sink + (i - lo) * per_block
  if cfg.local is None or cfg.sink == 0:          # no sink tiles: plain affine addressing
    tile_of = lambda c: lo * per_block + c
  else:
    tile_of = lambda c: jnp.where(c < n_sink, s0 * per_block + c, lo * per_block + (c - n_sink))
  diag_end = (r0 + rows + cols - 1) // cols
  return n, tile_of, (i * per_block, diag_end)


def _fwd_kernel(start_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: KernelConfig):
  rows, cols = cfg.fwd.rows, cfg.fwd.cols
  r0 = query_row_tile(cfg, rows)
  rows_ok = row_mask(cfg, r0, rows)
  q = load_parts(q_ref, r0, rows, cfg.d_parts, rows_ok)
  qk_scale = cfg.scale * LOG2E

  n, tile_of, diag = key_tile_loops(cfg, r0, rows, cols, start_ref[r0 // cfg.tile])

  def visit(c, carry, masked):
    k0 = (c if masked else tile_of(c)) * cols
    keys_ok = row_mask(cfg, k0, cols) if masked else None    # only the diagonal block can be the tail
    k = load_parts(k_ref, k0, cols, cfg.d_parts, keys_ok)
    return attend_tile(q, k, lambda: load_parts(v_ref, k0, cols, cfg.e_parts, keys_ok), carry, qk_scale,
                       cfg.precision, causal_mask(r0, rows, k0, cols) if masked else None)

  carry = ([jnp.zeros((rows, size), jnp.float32) for _, size in cfg.e_parts],
           jnp.full((rows,), MASK, jnp.float32), jnp.zeros((rows,), jnp.float32))
  carry = jax.lax.fori_loop(0, n, functools.partial(visit, masked=False), carry)
  acc, m, l = jax.lax.fori_loop(*diag, functools.partial(visit, masked=True), carry)

  seg = load(seg_ref, (pl.ds(r0, rows),), rows_ok, (rows,), other=0)
  valid = seg != 0
  l_safe = jnp.where(valid, l, 1.0)
  inv_l = 1.0 / l_safe
  store_parts(o_ref, r0, rows, cfg.e_parts, [jnp.where(valid[:, None], a * inv_l[:, None], 0.0) for a in acc],
              rows_ok)
  store(lse_ref, (pl.ds(r0, rows),), jnp.where(valid, m * LN2 + jnp.log(l_safe), NEG_INF), rows_ok)


def forward(q_BTHD, k_BTKD, v_BTKE, seg_BT, start_BN, cfg: KernelConfig):
  """Run the forward kernel: (o_BTHE in the input dtype, lse_BHT fp32)."""
  B, T, H, D = q_BTHD.shape
  E = v_BTKE.shape[3]
  G, n = cfg.groups, cfg.n_tiles
  grid = (-(-T // cfg.fwd.rows), B, H)
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
      compiler_params=cfg.fwd.params(), interpret=cfg.interpret,
      name="ssa_attention_fwd" if cfg.local is not None else "full_attention_fwd",
  )(start_BN, seg_BT, q_BTHD, k_BTKD, v_BTKE)
