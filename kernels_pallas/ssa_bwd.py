"""Backward kernels.

- dQ: per (query rows, batch, head), over the same key tiles the forward visited.
- dK/dV: per (key rows, batch, kv head), over the query blocks that see the key rows through
  the local window (at most `local` blocks; all later blocks of the document for Full),
  summing the query heads of the group.
- Sink dK/dV: the sink blocks are seen by every later query block of their document. That
  work is split over chunks of `local + 1` query blocks; each program writes an fp32 partial
  for one (chunk, sink rows) and XLA adds the partials into the sink blocks. A chunk this short
  never holds sink visits of two documents: a document starting inside it has fewer than
  `local` blocks there, and a query block only reaches past its window after `local` blocks.

Inputs: lse with +inf on rows that see nothing (so p = exp(s - lse) = 0 there). The dQ
kernel also computes delta = rowsum(dO * O) - dlse, which folds the lse cotangent into
dS = P * (dP - delta), and writes it for the dK/dV kernels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.ssa_fwd import key_tile_loops, query_row_tile
from kernels_pallas.tile_io import (
  LOG2E,
  KernelConfig,
  causal_mask,
  dkv_cols,
  dkv_tile,
  dq_rows,
  dq_tile,
  load_parts,
  row_mask,
  store,
  store_parts,
)

# ----------------------------------------------------------------------------------------
# dQ


def _dq_kernel(start_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dlse_ref, dq_ref, delta_ref, *, cfg):
  rows, cols = cfg.dq.rows, cfg.dq.cols
  r0 = query_row_tile(cfg, rows)
  rows_ok = row_mask(cfg, r0, rows)
  q, do, lse2, delta = dq_rows(q_ref, do_ref, o_ref, lse_ref, dlse_ref, r0, rows, cfg.d_parts, cfg.e_parts, rows_ok)
  qk_scale = cfg.scale * LOG2E
  n, tile_of, diag = key_tile_loops(cfg, r0, rows, cols, start_ref[r0 // cfg.tile])

  def visit(c, dq, masked):
    k0 = (c if masked else tile_of(c)) * cols
    keys_ok = row_mask(cfg, k0, cols) if masked else None
    k = load_parts(k_ref, k0, cols, cfg.d_parts, keys_ok)
    v = load_parts(v_ref, k0, cols, cfg.e_parts, keys_ok)
    return dq_tile(dq, q, do, lse2, delta, k, v, qk_scale, cfg.precision,
                   (lambda: causal_mask(r0, rows, k0, cols)) if masked else None)

  dq = [jnp.zeros((rows, size), jnp.float32) for _, size in cfg.d_parts]
  dq = jax.lax.fori_loop(0, n, functools.partial(visit, masked=False), dq)
  dq = jax.lax.fori_loop(*diag, functools.partial(visit, masked=True), dq)
  store_parts(dq_ref, r0, rows, cfg.d_parts, [a * cfg.scale for a in dq], rows_ok)
  store(delta_ref, (pl.ds(r0, rows),), delta, rows_ok)


def dq(q, k, v, o, do, lse_BHT, dlse_BHT, start_BN, cfg: KernelConfig):
  """(dQ_BTHD in the query dtype, delta_BHT = rowsum(dO * O) - dlse in fp32)."""
  B, T, H, D = q.shape
  E = v.shape[3]
  G, n = cfg.groups, cfg.n_tiles
  rows_spec = lambda X, kv=False: pl.BlockSpec((None, T, None, X), lambda i, b, h: (b, 0, h // G if kv else h, 0))
  row_vec = pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))
  in_specs = [pl.BlockSpec((None, n), lambda i, b, h: (b, 0)), rows_spec(D), rows_spec(D, True),
              rows_spec(E, True), rows_spec(E), rows_spec(E), row_vec, row_vec]
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg), grid=(-(-T // cfg.dq.rows), B, H), in_specs=in_specs,
      out_specs=[rows_spec(D), row_vec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      compiler_params=cfg.dq.params(), interpret=cfg.interpret, name="attention_bwd_dq",
  )(start_BN, q, k, v, o, do, lse_BHT, dlse_BHT)


# ----------------------------------------------------------------------------------------
# dK / dV: shared step (transposed scores: rows are keys, columns are queries).


def _kv_step(k, v, k0, q_ref, do_ref, lse_ref, delta_ref, c, g, carry, *, cfg, masked):
  """Add the contribution of query rows [c*cols, (c+1)*cols) of head g to (dk parts, dv parts)
  of the resident key rows [k0, k0 + rows)."""
  dk, dv = carry
  rows, cols = cfg.dkv.rows, cfg.dkv.cols
  q0 = c * cols
  rows_ok = row_mask(cfg, q0, cols)
  q, do, lse2, delta = dkv_cols(q_ref, do_ref, lse_ref, delta_ref, g, q0, cols, cfg.d_parts, cfg.e_parts, rows_ok)
  return dkv_tile((dk, dv), k, v, q, do, lse2, delta, cfg.scale * LOG2E, cfg.precision,
                  (lambda: causal_mask(q0, cols, k0, rows, transposed=True)) if masked else None)


def _zeros_kv(cfg):
  rows = cfg.dkv.rows
  return ([jnp.zeros((rows, s), jnp.float32) for _, s in cfg.d_parts],
          [jnp.zeros((rows, s), jnp.float32) for _, s in cfg.e_parts])


def _dkv_kernel(end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg):
  rows, cols, tile = cfg.dkv.rows, cfg.dkv.cols, cfg.tile
  k0 = pl.program_id(0) * rows       # Full: the first key rows see the most queries, so they start first
  j = k0 // tile
  per_block = tile // cols
  keys_ok = row_mask(cfg, k0, rows)
  k = load_parts(k_ref, k0, rows, cfg.d_parts, keys_ok)
  v = load_parts(v_ref, k0, rows, cfg.e_parts, keys_ok)
  end = end_ref[j]
  hi = end if cfg.local is None else jnp.minimum(j + cfg.local - 1, end)   # last query block (incl.)
  step = functools.partial(_kv_step, k, v, k0, q_ref, do_ref, lse_ref, delta_ref, cfg=cfg)

  def per_head(g, carry):
    carry = jax.lax.fori_loop(k0 // cols, (j + 1) * per_block,
                              lambda c, cr: step(c, g, cr, masked=True), carry)
    return jax.lax.fori_loop((j + 1) * per_block, (hi + 1) * per_block,
                             lambda c, cr: step(c, g, cr, masked=False), carry)

  dk, dv = jax.lax.fori_loop(0, cfg.groups, per_head, _zeros_kv(cfg))
  store_parts(dk_ref, k0, rows, cfg.d_parts, [a * cfg.scale for a in dk], keys_ok)
  store_parts(dv_ref, k0, rows, cfg.e_parts, dv, keys_ok)


def _kv_in_specs(T, n, D, E, G, split):
  """BlockSpecs for (meta, q, k, v, do, lse, delta); split(*program ids) -> (b, kv head)."""
  bk = lambda f: (lambda *a: f(*split(*a)))
  return [
      pl.BlockSpec((None, n), bk(lambda b, kh: (b, 0))),
      pl.BlockSpec((None, T, None, G, D), bk(lambda b, kh: (b, 0, kh, 0, 0))),
      pl.BlockSpec((None, T, None, D), bk(lambda b, kh: (b, 0, kh, 0))),
      pl.BlockSpec((None, T, None, E), bk(lambda b, kh: (b, 0, kh, 0))),
      pl.BlockSpec((None, T, None, G, E), bk(lambda b, kh: (b, 0, kh, 0, 0))),
      pl.BlockSpec((None, None, G, T), bk(lambda b, kh: (b, kh, 0, 0))),
      pl.BlockSpec((None, None, G, T), bk(lambda b, kh: (b, kh, 0, 0))),
  ]


def _grouped(q, do, lse_BHT, delta_BHT, K):
  """Views with the query heads of one kv head adjacent: [B,T,K,G,*] and [B,K,G,T]."""
  B, T, H, D = q.shape
  G = H // K
  return (q.reshape(B, T, K, G, D), do.reshape(B, T, K, G, do.shape[3]),
          lse_BHT.reshape(B, K, G, T), delta_BHT.reshape(B, K, G, T))


def dkv(q, k, v, do, lse_BHT, delta_BHT, end_BN, cfg: KernelConfig):
  """(dK_BTKD, dV_BTKE) in the key/value dtype, without the sink visits."""
  B, T, K, D = k.shape
  E = v.shape[3]
  G, n = cfg.groups, cfg.n_tiles
  qg, dog, lseg, deltag = _grouped(q, do, lse_BHT, delta_BHT, K)
  in_specs = _kv_in_specs(T, n, D, E, G, lambda j, b, kh: (b, kh))
  out_specs = [pl.BlockSpec((None, T, None, D), lambda j, b, kh: (b, 0, kh, 0)),
               pl.BlockSpec((None, T, None, E), lambda j, b, kh: (b, 0, kh, 0))]
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg), grid=(-(-T // cfg.dkv.rows), B, K), in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cfg.dkv.params(), interpret=cfg.interpret, name="attention_bwd_dkv",
  )(end_BN, qg, k, v, dog, lseg, deltag)


# ----------------------------------------------------------------------------------------
# Sink dK / dV partials.


def sink_chunk(cfg: KernelConfig) -> int:
  """Query blocks per sink program (see module docstring for why local + 1 is the limit)."""
  return cfg.local + 1


def _sink_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pk_ref, pv_ref, *, cfg):
  rows, cols, tile, C = cfg.dkv.rows, cfg.dkv.cols, cfg.tile, sink_chunk(cfg)
  per_block = tile // cols
  c, slot = pl.program_id(0), pl.program_id(1)
  r, sub = slot // (tile // rows), slot % (tile // rows)     # sink block and key rows inside it
  first = c * C
  start, end = start_ref[first], end_ref[first]
  exists = (start >= 0) & (start + r <= end)                    # the document has this sink block
  k0 = jnp.where(exists, start + r, 0) * tile + sub * rows
  lo = jnp.maximum(first, start + cfg.local + r)                # first query block past its window
  hi = jnp.where(start >= 0, jnp.minimum(first + C - 1, end), -1)
  keys_ok = row_mask(cfg, k0, rows)
  k = load_parts(k_ref, k0, rows, cfg.d_parts, keys_ok)
  v = load_parts(v_ref, k0, rows, cfg.e_parts, keys_ok)
  step = functools.partial(_kv_step, k, v, k0, q_ref, do_ref, lse_ref, delta_ref, cfg=cfg, masked=False)

  def per_head(g, carry):
    return jax.lax.fori_loop(lo * per_block, (hi + 1) * per_block, lambda i, cr: step(i, g, cr), carry)

  dk, dv = jax.lax.fori_loop(0, cfg.groups, per_head, _zeros_kv(cfg))
  store_parts(pk_ref, 0, rows, cfg.d_parts, [a * cfg.scale for a in dk], None)
  store_parts(pv_ref, 0, rows, cfg.e_parts, dv, None)


def sink_partials(q, k, v, do, lse_BHT, delta_BHT, start_BN, end_BN, cfg: KernelConfig):
  """fp32 partial dK, dV of the sink blocks: [B, K, chunks, sink, tile, D/E]."""
  B, T, K, D = k.shape
  E = v.shape[3]
  G, n, tile, rows = cfg.groups, cfg.n_tiles, cfg.tile, cfg.dkv.rows
  nc = -(-n // sink_chunk(cfg))
  sub = tile // rows
  qg, dog, lseg, deltag = _grouped(q, do, lse_BHT, delta_BHT, K)
  split = lambda c, r, bk: (bk // K, bk % K)
  in_specs = _kv_in_specs(T, n, D, E, G, split)
  in_specs.insert(0, pl.BlockSpec((None, n), lambda c, r, bk: (bk // K, 0)))
  out_index = lambda c, r, bk: (bk // K, bk % K, c, r // sub, r % sub, 0)
  out_specs = [pl.BlockSpec((None, None, None, None, rows, D), out_index),
               pl.BlockSpec((None, None, None, None, rows, E), out_index)]
  out_shape = [jax.ShapeDtypeStruct((B, K, nc, cfg.sink, tile, D), jnp.float32),
               jax.ShapeDtypeStruct((B, K, nc, cfg.sink, tile, E), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_sink_kernel, cfg=cfg), grid=(nc, cfg.sink * sub, B * K), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, compiler_params=cfg.dkv.params(),
      interpret=cfg.interpret, name="ssa_attention_bwd_sink",
  )(start_BN, end_BN, qg, k, v, dog, lseg, deltag)


def add_sink_partials(d_BTKX, partial_BKCSTX, start_BN, end_BN, cfg: KernelConfig):
  """Add the per-chunk sink partials into the sink tiles of each chunk's document (fp32 sum,
  one rounding to the output dtype)."""
  B, T, K, X = d_BTKX.shape
  tile, C = cfg.tile, sink_chunk(cfg)
  nc = partial_BKCSTX.shape[2]
  doc_BC = start_BN[:, ::C][:, :nc]                                  # document start of each chunk
  # Chunks of one document are consecutive: give each run of equal starts one segment.
  new = jnp.concatenate([jnp.ones((B, 1), bool), doc_BC[:, 1:] != doc_BC[:, :-1]], axis=1)
  rank_BC = jnp.cumsum(new, axis=1) - 1
  uniq_BC = jnp.full((B, nc), -1, jnp.int32).at[jnp.arange(B)[:, None], rank_BC].set(doc_BC)

  def per_row(d_TKX, part_KCSTX, rank_C, uniq_C, end_N):
    sums = jax.ops.segment_sum(jnp.moveaxis(part_KCSTX, 1, 0), rank_C, num_segments=nc,
                               indices_are_sorted=True)                        # [C, K, S, tile, X]
    rows = (uniq_C[:, None, None] + jnp.arange(cfg.sink)[None, :, None]) * tile + jnp.arange(tile)
    sink_tile = uniq_C[:, None] + jnp.arange(cfg.sink)[None, :]                 # [C, S]
    inside = (uniq_C[:, None] >= 0) & (sink_tile <= end_N[jnp.maximum(uniq_C, 0)][:, None])
    rows = jnp.where(inside[:, :, None], rows, T)                                # [C, S, tile]; T = drop
    add = jnp.moveaxis(sums, 1, 3)                                               # [C, S, tile, K, X]
    cur = d_TKX.at[rows].get(mode="fill", fill_value=0).astype(jnp.float32)
    return d_TKX.at[rows].set((cur + add).astype(d_TKX.dtype), mode="drop")

  return jax.vmap(per_row)(d_BTKX, partial_BKCSTX, rank_BC, uniq_BC, end_BN)
