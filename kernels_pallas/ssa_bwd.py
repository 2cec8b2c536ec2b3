"""Backward kernels.

- dQ: per (query tile, batch, head), over the same key tiles the forward visited.
- dK/dV: per (key tile, batch, kv head), over the query tiles that see the key tile through
  the local window (at most `local` tiles; all later tiles of the document for Full), summing
  the query heads of the group.
- Sink dK/dV: the sink tiles are seen by every later query tile of their document. That work
  is split over chunks of `local + 1` query tiles; each program writes an fp32 partial for one
  (chunk, sink slot) and XLA adds the partials into the sink tiles. A chunk this short never
  holds sink visits of two documents: a document starting inside it has fewer than `local`
  tiles there, and a query tile only reaches past its window after `local` tiles.

Inputs: lse with +inf on rows that see nothing (so p = exp(s - lse) = 0 there), and
delta = rowsum(dO * O) - dlse, which folds the lse cotangent into dS = P * (dP - delta).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.ssa_fwd import query_tile_index
from kernels_pallas.tile_io import (
    LOG2E, KernelConfig, causal_tile_mask, dot, load, load_parts, row_mask, store, visit_ranges)


def _params(cfg):
  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------------------
# dQ


def _dq_kernel(start_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg):
  tile = cfg.tile
  i = query_tile_index(cfg)
  rows_ok = row_mask(cfg, i)
  q = load_parts(q_ref, i, cfg.d_parts, tile, rows_ok)
  do = load_parts(do_ref, i, cfg.e_parts, tile, rows_ok)
  lse2 = load(lse_ref, (pl.ds(i * tile, tile),), rows_ok, (tile,), other=float("inf")) * LOG2E
  delta = load(delta_ref, (pl.ds(i * tile, tile),), rows_ok, (tile,))
  qk_scale = cfg.scale * LOG2E

  def visit(j, dq, masked):
    keys_ok = rows_ok if masked else None
    k = load_parts(k_ref, j, cfg.d_parts, tile, keys_ok)
    v = load_parts(v_ref, j, cfg.e_parts, tile, keys_ok)
    s = sum(dot(qp, kp, trans_b=True, precision=cfg.precision) for qp, kp in zip(q, k)) * qk_scale
    if masked:
      s = jnp.where(causal_tile_mask(tile), s, float("-inf"))
    p = jnp.exp2(s - lse2[:, None])
    dp = sum(dot(dp_, vp, trans_b=True, precision=cfg.precision) for dp_, vp in zip(do, v))
    ds = (p * (dp - delta[:, None])).astype(k[0].dtype)
    return [a + dot(ds, kp, precision=cfg.precision) for a, kp in zip(dq, k)]

  s0, s1, lo = visit_ranges(cfg, i, start_ref[i])
  dq = [jnp.zeros((tile, size), jnp.float32) for _, size in cfg.d_parts]
  body = functools.partial(visit, masked=False)
  dq = jax.lax.fori_loop(s0, s1, body, dq)
  dq = jax.lax.fori_loop(lo, i, body, dq)
  dq = visit(i, dq, masked=True)
  for (off, size), a in zip(cfg.d_parts, dq):
    store(dq_ref, (pl.ds(i * tile, tile), pl.ds(off, size)), (a * cfg.scale).astype(dq_ref.dtype), rows_ok)


def dq(q, k, v, do, lse_BHT, delta_BHT, start_BN, cfg: KernelConfig):
  """dQ_BTHD in the query dtype."""
  B, T, H, D = q.shape
  E = v.shape[3]
  G, n = cfg.groups, cfg.n_tiles
  in_specs = [
      pl.BlockSpec((None, n), lambda i, b, h: (b, 0)),
      pl.BlockSpec((None, T, None, D), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, T, None, D), lambda i, b, h: (b, 0, h // G, 0)),
      pl.BlockSpec((None, T, None, E), lambda i, b, h: (b, 0, h // G, 0)),
      pl.BlockSpec((None, T, None, E), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0)),
      pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0)),
  ]
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg), grid=(n, B, H), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, T, None, D), lambda i, b, h: (b, 0, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=_params(cfg),
      interpret=cfg.interpret, name="attention_bwd_dq",
  )(start_BN, q, k, v, do, lse_BHT, delta_BHT)


# ----------------------------------------------------------------------------------------
# dK / dV: shared tile step (transposed scores: rows are keys, columns are queries).


def _kv_step(k, v, q_ref, do_ref, lse_ref, delta_ref, i, g, carry, *, cfg, masked, rows_ok):
  """Accumulate one (key tile, query tile i, head g) contribution into (dk parts, dv parts)."""
  dk, dv = carry
  tile = cfg.tile
  q = load_parts(q_ref, i, cfg.d_parts, tile, rows_ok, lead=(g,))
  do = load_parts(do_ref, i, cfg.e_parts, tile, rows_ok, lead=(g,))
  lse2 = load(lse_ref, (g, pl.ds(i * tile, tile)), rows_ok, (tile,), other=float("inf")) * LOG2E
  delta = load(delta_ref, (g, pl.ds(i * tile, tile)), rows_ok, (tile,))
  st = sum(dot(kp, qp, trans_b=True, precision=cfg.precision) for kp, qp in zip(k, q)) * (cfg.scale * LOG2E)
  if masked:
    st = jnp.where(causal_tile_mask(tile, transposed=True), st, float("-inf"))
  pt = jnp.exp2(st - lse2[None, :])
  dv = [a + dot(pt.astype(dp_.dtype), dp_, precision=cfg.precision) for a, dp_ in zip(dv, do)]
  dpt = sum(dot(vp, dp_, trans_b=True, precision=cfg.precision) for vp, dp_ in zip(v, do))
  dst = (pt * (dpt - delta[None, :])).astype(q[0].dtype)
  dk = [a + dot(dst, qp, precision=cfg.precision) for a, qp in zip(dk, q)]
  return dk, dv


def _zeros_kv(cfg):
  return ([jnp.zeros((cfg.tile, s), jnp.float32) for _, s in cfg.d_parts],
          [jnp.zeros((cfg.tile, s), jnp.float32) for _, s in cfg.e_parts])


def _dkv_kernel(end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg):
  tile = cfg.tile
  j = pl.program_id(0)            # Full: tile 0 sees the most query tiles, so it starts first
  keys_ok = row_mask(cfg, j)
  k = load_parts(k_ref, j, cfg.d_parts, tile, keys_ok)
  v = load_parts(v_ref, j, cfg.e_parts, tile, keys_ok)
  end = end_ref[j]
  hi = end if cfg.local is None else jnp.minimum(j + cfg.local - 1, end)  # last query tile (incl.)
  step = functools.partial(_kv_step, k, v, q_ref, do_ref, lse_ref, delta_ref, cfg=cfg)

  def per_head(g, carry):
    carry = step(j, g, carry, masked=True, rows_ok=keys_ok)
    return jax.lax.fori_loop(j + 1, hi + 1, lambda i, c: step(i, g, c, masked=False, rows_ok=row_mask(cfg, i)),
                             carry)

  dk, dv = jax.lax.fori_loop(0, cfg.groups, per_head, _zeros_kv(cfg))
  for (off, size), a in zip(cfg.d_parts, dk):
    store(dk_ref, (pl.ds(j * tile, tile), pl.ds(off, size)), (a * cfg.scale).astype(dk_ref.dtype), keys_ok)
  for (off, size), a in zip(cfg.e_parts, dv):
    store(dv_ref, (pl.ds(j * tile, tile), pl.ds(off, size)), a.astype(dv_ref.dtype), keys_ok)


def _kv_in_specs(T, n, D, E, G, tiles_index):
  """BlockSpecs for (meta, q, k, v, do, lse, delta) with grid (tile, b, kv-head-ish)."""
  return [
      pl.BlockSpec((None, n), lambda *a: (tiles_index(*a)[0], 0)),
      pl.BlockSpec((None, T, None, G, D), lambda *a: (tiles_index(*a)[0], 0, tiles_index(*a)[1], 0, 0)),
      pl.BlockSpec((None, T, None, D), lambda *a: (tiles_index(*a)[0], 0, tiles_index(*a)[1], 0)),
      pl.BlockSpec((None, T, None, E), lambda *a: (tiles_index(*a)[0], 0, tiles_index(*a)[1], 0)),
      pl.BlockSpec((None, T, None, G, E), lambda *a: (tiles_index(*a)[0], 0, tiles_index(*a)[1], 0, 0)),
      pl.BlockSpec((None, None, G, T), lambda *a: (tiles_index(*a)[0], tiles_index(*a)[1], 0, 0)),
      pl.BlockSpec((None, None, G, T), lambda *a: (tiles_index(*a)[0], tiles_index(*a)[1], 0, 0)),
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
      functools.partial(_dkv_kernel, cfg=cfg), grid=(n, B, K), in_specs=in_specs, out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(cfg), interpret=cfg.interpret, name="attention_bwd_dkv",
  )(end_BN, qg, k, v, dog, lseg, deltag)


# ----------------------------------------------------------------------------------------
# Sink dK / dV partials.


def sink_chunk(cfg: KernelConfig) -> int:
  """Query tiles per sink program (see module docstring for why local + 1 is the limit)."""
  return cfg.local + 1


def _sink_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pk_ref, pv_ref, *, cfg):
  tile, C = cfg.tile, sink_chunk(cfg)
  c, r = pl.program_id(0), pl.program_id(1)
  first = c * C
  start, end = start_ref[first], end_ref[first]
  jr = jnp.where(start >= 0, start + r, 0)                      # the sink key tile
  lo = jnp.maximum(first, start + cfg.local + r)                # first query tile past its window
  hi = jnp.where(start >= 0, jnp.minimum(first + C - 1, end), -1)
  keys_ok = row_mask(cfg, jr)
  k = load_parts(k_ref, jr, cfg.d_parts, tile, keys_ok)
  v = load_parts(v_ref, jr, cfg.e_parts, tile, keys_ok)
  step = functools.partial(_kv_step, k, v, q_ref, do_ref, lse_ref, delta_ref, cfg=cfg, masked=False)

  def per_head(g, carry):
    return jax.lax.fori_loop(lo, hi + 1, lambda i, cr: step(i, g, cr, rows_ok=row_mask(cfg, i)), carry)

  dk, dv = jax.lax.fori_loop(0, cfg.groups, per_head, _zeros_kv(cfg))
  for (off, size), a in zip(cfg.d_parts, dk):
    store(pk_ref, (slice(None), pl.ds(off, size)), a * cfg.scale)
  for (off, size), a in zip(cfg.e_parts, dv):
    store(pv_ref, (slice(None), pl.ds(off, size)), a)


def sink_partials(q, k, v, do, lse_BHT, delta_BHT, start_BN, end_BN, cfg: KernelConfig):
  """fp32 partial dK, dV of the sink tiles: [B, K, chunks, sink, tile, D/E]."""
  B, T, K, D = k.shape
  E = v.shape[3]
  G, n, tile = cfg.groups, cfg.n_tiles, cfg.tile
  nc = -(-n // sink_chunk(cfg))
  qg, dog, lseg, deltag = _grouped(q, do, lse_BHT, delta_BHT, K)
  split = lambda c, r, bk: (bk // K, bk % K)
  in_specs = _kv_in_specs(T, n, D, E, G, split)
  in_specs.insert(0, pl.BlockSpec((None, n), lambda c, r, bk: (bk // K, 0)))
  out_specs = [pl.BlockSpec((None, None, None, None, tile, D), lambda c, r, bk: (bk // K, bk % K, c, r, 0, 0)),
               pl.BlockSpec((None, None, None, None, tile, E), lambda c, r, bk: (bk // K, bk % K, c, r, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct((B, K, nc, cfg.sink, tile, D), jnp.float32),
               jax.ShapeDtypeStruct((B, K, nc, cfg.sink, tile, E), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_sink_kernel, cfg=cfg), grid=(nc, cfg.sink, B * K), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, compiler_params=_params(cfg),
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
