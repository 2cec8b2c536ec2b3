"""Causal attention of a chunk of queries at an offset over a key sequence of another length, with its backward.

Query row i sits at position `offset + i`; key j at position j; a key is visible iff j <= offset + i and
j < S, and, with segment ids (one per key position; a query takes the id of its own position, so the keys
must cover the queries: offset + T <= S), iff it lies in the query's document (same non-zero id). Two users:
a later prefill chunk over the earlier part of its prompt (static offset, no ids, forward only), and a
context-parallel Full sublayer whose local queries attend to the all-gathered sequence (offset traced from
the device index, packed documents, trained through the custom VJP).

Each program keeps a tile of rows resident (queries for the forward and dQ, keys for dK/dV) and streams
the other side's tiles in three loops: masked tiles at the start of the query's document, wholly visible
tiles unmasked, then masked tiles across the diagonal (and, for dK/dV, past the key's document end).
Documents need not start on a tile boundary: a tile holding two documents is masked.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import tiling
from kernels_pallas.tile_io import (
  LN2,
  LOG2E,
  MASK,
  NEG_INF,
  Tiles,
  attend_tile,
  dkv_cols,
  dkv_tile,
  dq_rows,
  dq_tile,
  load,
  load_parts,
  store,
  store_parts,
)

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
FAR = 1 << 30          # a document start after every key: a padding query row sees nothing


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
  """Static parameters of one call (hashable: a custom_vjp nondiff argument)."""
  scale: float
  q_len: int           # T
  k_len: int           # S
  d_parts: tuple
  e_parts: tuple
  groups: int          # query heads per kv head
  tiles: Tiles         # forward
  bwd: Tiles           # dQ and dK/dV
  segments: bool       # segment ids given: mask by document
  interpret: bool
  precision: object = None


def default_tiles(dtype, head_dims: int, interpret: bool, backward: bool = False) -> Tiles:
  """Launch shape: whole 16-row tiles when interpreted (CPU tests); on GPU the Full forward's and backward's
  shapes (kernels_pallas/NOTES.md), smaller for fp32 operands or heads wider than 192 + 128."""
  if interpret:
    return Tiles(16, 16, 4, 2)
  if jnp.dtype(dtype) == jnp.float32:
    return Tiles(32, 32, 4, 2) if backward else Tiles(64, 32, 4, 2)
  if backward:
    return Tiles(64, 32, 4, 3)
  return Tiles(128, 64, 8, 3 if head_dims <= 320 else 2)


def input_problem(q_BTHD, k_BSKD, v_BSKE, offset, tiles: Tiles, segment_ids_BS=None) -> str | None:
  """Why the kernel cannot take these inputs, or None (a traced offset is checked by the caller)."""
  if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKE.ndim != 4:
    return f"expected rank-4 q, k, v; got {q_BTHD.shape}, {k_BSKD.shape}, {v_BSKE.shape}"
  B, T, H, D = q_BTHD.shape
  S = k_BSKD.shape[1]
  if k_BSKD.shape[0] != B or k_BSKD.shape[3] != D or v_BSKE.shape[:3] != k_BSKD.shape[:3]:
    return f"shapes disagree: q {q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKE.shape}"
  if S < 1 or T < 1:
    return f"empty query or key sequence: q {q_BTHD.shape}, k {k_BSKD.shape}"
  if H % k_BSKD.shape[2]:
    return f"kv heads {k_BSKD.shape[2]} do not divide query heads {H}"
  dtypes = {jnp.dtype(x.dtype) for x in (q_BTHD, k_BSKD, v_BSKE)}
  if len(dtypes) != 1 or dtypes.pop() not in {jnp.dtype(d) for d in SUPPORTED_DTYPES}:
    return f"q, k, v must share one of bfloat16, float16, float32; got {q_BTHD.dtype}, {k_BSKD.dtype}, {v_BSKE.dtype}"
  for name, dim in (("qk head dim D", D), ("v head dim E", v_BSKE.shape[3])):
    problem = tiling.head_dim_problem(dim)
    if problem:
      return f"{name}: {problem}"
  if tiles.rows % tiles.cols:
    return f"tile rows {tiles.rows} must be a multiple of tile cols {tiles.cols}"
  if segment_ids_BS is not None and tuple(segment_ids_BS.shape) != (B, S):
    return f"segment_ids must have the keys' shape {(B, S)}, got {tuple(segment_ids_BS.shape)}"
  if isinstance(offset, int):
    if offset < 0:
      return f"offset {offset} must be >= 0"
    if segment_ids_BS is None and offset % tiles.cols:
      return f"offset {offset} must be a multiple of the key tile ({tiles.cols})"
    if segment_ids_BS is not None and offset + T > S:
      return f"with segment ids the keys must cover the queries: offset {offset} + T {T} > S {S}"
  return None


def _row_ok(first, n: int, length: int, ragged: bool):
  return (first + jnp.arange(n) < length) if ragged else None


# ----------------------------------------------------------------------------------------
# Key-tile loops of a query tile (forward and dQ).


def _query_tile(cfg: PrefixConfig, t: Tiles, off_ref, qseg_ref, qlo_ref):
  """(r0, g0, rows_ok, qseg, loops): this program's query rows [r0, r0 + rows) at positions from g0, and the
  key-tile ranges ((lo, hi, masked), ...) it visits, in order."""
  rows, cols = t.rows, t.cols
  n_q = -(-cfg.q_len // rows)
  r0 = (n_q - 1 - pl.program_id(0)) * rows        # the longest rows first: they have the most keys
  g0 = off_ref[0] + r0
  rows_ok = _row_ok(r0, rows, cfg.q_len, cfg.q_len % rows != 0)
  e_whole = jnp.minimum(g0, cfg.k_len) // cols     # key tiles before it lie wholly before every row here
  n_all = (jnp.minimum(g0 + rows, cfg.k_len) + cols - 1) // cols
  if not cfg.segments:
    return r0, g0, rows_ok, None, ((0, e_whole, False), (e_whole, n_all, True))
  qseg = load(qseg_ref, (pl.ds(r0, rows),), rows_ok, (rows,), other=0)
  qlo = load(qlo_ref, (pl.ds(r0, rows),), rows_ok, (rows,), other=FAR)
  lo = jnp.min(qlo)                                # earliest document start among the rows
  one_doc = (jnp.min(qseg) == jnp.max(qseg)) & (jnp.min(qseg) > 0)
  a = jnp.minimum(lo // cols, n_all)
  w = jnp.clip(jnp.where(one_doc, (lo + cols - 1) // cols, n_all), a, n_all)
  b = jnp.maximum(w, e_whole)
  return r0, g0, rows_ok, qseg, ((a, w, True), (w, b, False), (b, n_all, True))


def _key_mask(cfg: PrefixConfig, g0, rows: int, k0, cols: int, qseg, kseg_ref):
  """[rows, cols]: causal, inside the key sequence and (with ids) the query's document."""
  kpos = k0 + jnp.arange(cols)
  ok = (kpos[None, :] <= g0 + jnp.arange(rows)[:, None]) & (kpos[None, :] < cfg.k_len)
  if cfg.segments:
    kseg = load(kseg_ref, (pl.ds(k0, cols),), kpos < cfg.k_len, (cols,), other=-1)
    ok = ok & (kseg[None, :] == qseg[:, None]) & (qseg[:, None] > 0)
  return ok


def _fwd_kernel(off_ref, qseg_ref, qlo_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: PrefixConfig):
  rows, cols = cfg.tiles.rows, cfg.tiles.cols
  r0, g0, rows_ok, qseg, loops = _query_tile(cfg, cfg.tiles, off_ref, qseg_ref, qlo_ref)
  q = load_parts(q_ref, r0, rows, cfg.d_parts, rows_ok)
  qk_scale = cfg.scale * LOG2E

  def visit(c, carry, masked):
    k0 = c * cols
    keys_ok = _row_ok(k0, cols, cfg.k_len, masked and cfg.k_len % cols != 0)   # only a masked tile can be the tail
    k = load_parts(k_ref, k0, cols, cfg.d_parts, keys_ok)
    mask = _key_mask(cfg, g0, rows, k0, cols, qseg, kseg_ref) if masked else None
    return attend_tile(q, k, lambda: load_parts(v_ref, k0, cols, cfg.e_parts, keys_ok), carry, qk_scale,
                       cfg.precision, mask)

  carry = ([jnp.zeros((rows, size), jnp.float32) for _, size in cfg.e_parts],
           jnp.full((rows,), MASK, jnp.float32), jnp.zeros((rows,), jnp.float32))
  for lo, hi, masked in loops:
    carry = jax.lax.fori_loop(lo, hi, functools.partial(visit, masked=masked), carry)
  acc, m, l = carry
  seen = m > 0.5 * MASK                             # some key unmasked (a masked score is exactly MASK)
  l_safe = jnp.where(seen, l, 1.0)
  inv_l = 1.0 / l_safe
  store_parts(o_ref, r0, rows, cfg.e_parts, [jnp.where(seen[:, None], a * inv_l[:, None], 0.0) for a in acc],
              rows_ok)
  store(lse_ref, (pl.ds(r0, rows),), jnp.where(seen, m * LN2 + jnp.log(l_safe), NEG_INF), rows_ok)


def _dq_kernel(off_ref, qseg_ref, qlo_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dlse_ref,
               dq_ref, delta_ref, *, cfg: PrefixConfig):
  rows, cols = cfg.bwd.rows, cfg.bwd.cols
  r0, g0, rows_ok, qseg, loops = _query_tile(cfg, cfg.bwd, off_ref, qseg_ref, qlo_ref)
  q, do, lse2, delta = dq_rows(q_ref, do_ref, o_ref, lse_ref, dlse_ref, r0, rows, cfg.d_parts, cfg.e_parts, rows_ok)
  qk_scale = cfg.scale * LOG2E

  def visit(c, dq, masked):
    k0 = c * cols
    keys_ok = _row_ok(k0, cols, cfg.k_len, masked and cfg.k_len % cols != 0)   # only a masked tile can be the tail
    k = load_parts(k_ref, k0, cols, cfg.d_parts, keys_ok)
    v = load_parts(v_ref, k0, cols, cfg.e_parts, keys_ok)
    return dq_tile(dq, q, do, lse2, delta, k, v, qk_scale, cfg.precision,
                   (lambda: _key_mask(cfg, g0, rows, k0, cols, qseg, kseg_ref)) if masked else None)

  dq = [jnp.zeros((rows, size), jnp.float32) for _, size in cfg.d_parts]
  for lo, hi, masked in loops:
    dq = jax.lax.fori_loop(lo, hi, functools.partial(visit, masked=masked), dq)
  store_parts(dq_ref, r0, rows, cfg.d_parts, [a * cfg.scale for a in dq], rows_ok)
  store(delta_ref, (pl.ds(r0, rows),), delta, rows_ok)


# ----------------------------------------------------------------------------------------
# dK / dV: per (key rows, batch, kv head), over the query tiles that see them, the group's heads summed.


def _dkv_kernel(off_ref, qseg_ref, kseg_ref, kend_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg: PrefixConfig):
  rows, cols = cfg.bwd.rows, cfg.bwd.cols
  k0 = pl.program_id(0) * rows
  off = off_ref[0]
  n_c = -(-cfg.q_len // cols)
  keys_ok = _row_ok(k0, rows, cfg.k_len, cfg.k_len % rows != 0)
  k = load_parts(k_ref, k0, rows, cfg.d_parts, keys_ok)
  v = load_parts(v_ref, k0, rows, cfg.e_parts, keys_ok)
  # Query tiles [c0, c1) cross the diagonal; a query row r sees key k0 + i only if off + r >= k0 + i.
  c0 = jnp.clip(jnp.maximum(k0 - off, 0) // cols, 0, n_c)
  c1 = jnp.clip((k0 + rows - off + cols - 1) // cols, c0, n_c)
  kseg = None
  if cfg.segments:
    kseg = load(kseg_ref, (pl.ds(k0, rows),), keys_ok, (rows,), other=0)
    kend = load(kend_ref, (pl.ds(k0, rows),), keys_ok, (rows,), other=-1)   # document end, exclusive
    one_doc = (jnp.min(kseg) == jnp.max(kseg)) & (jnp.min(kseg) > 0)
    c3 = jnp.clip((jnp.max(kend) - off + cols - 1) // cols, c0, n_c)      # past every document here
    c1 = jnp.minimum(c1, c3)
    c2 = jnp.clip(jnp.where(one_doc, (jnp.min(kend) - off) // cols, c1), c1, c3)
  else:
    c3 = n_c
    c2 = jnp.clip(cfg.q_len // cols, c1, c3)

  def step(c, g, carry, masked):
    q0 = c * cols
    rows_ok = _row_ok(q0, cols, cfg.q_len, cfg.q_len % cols != 0)
    q, do, lse2, delta = dkv_cols(q_ref, do_ref, lse_ref, delta_ref, g, q0, cols, cfg.d_parts, cfg.e_parts, rows_ok)

    def mask():
      qpos = off + q0 + jnp.arange(cols)
      ok = (k0 + jnp.arange(rows))[:, None] <= qpos[None, :]
      if cfg.segments:
        qseg = load(qseg_ref, (pl.ds(q0, cols),), rows_ok, (cols,), other=0)
        ok = ok & (kseg[:, None] == qseg[None, :]) & (qseg[None, :] > 0)
      return ok

    return dkv_tile(carry, k, v, q, do, lse2, delta, cfg.scale * LOG2E, cfg.precision, mask if masked else None)

  def per_head(g, carry):
    for lo, hi, masked in ((c0, c1, True), (c1, c2, False), (c2, c3, True)):
      carry = jax.lax.fori_loop(lo, hi, lambda c, cr, masked=masked: step(c, g, cr, masked), carry)
    return carry

  zeros = ([jnp.zeros((rows, s), jnp.float32) for _, s in cfg.d_parts],
           [jnp.zeros((rows, s), jnp.float32) for _, s in cfg.e_parts])
  dk, dv = jax.lax.fori_loop(0, cfg.groups, per_head, zeros)
  store_parts(dk_ref, k0, rows, cfg.d_parts, [a * cfg.scale for a in dk], keys_ok)
  store_parts(dv_ref, k0, rows, cfg.e_parts, dv, keys_ok)


# ----------------------------------------------------------------------------------------
# Launches and the custom VJP.


def _meta_specs(T: int, S: int):
  """BlockSpecs of (offset_B1, qseg_BT, qlo_BT, kseg_BS, kend_BS) for a (tile, b, head) grid."""
  return [pl.BlockSpec((None, 1), lambda i, b, h: (b, 0)), pl.BlockSpec((None, T), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, T), lambda i, b, h: (b, 0)), pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, S), lambda i, b, h: (b, 0))]


def _forward(q, k, v, meta, cfg: PrefixConfig):
  B, T, H, D = q.shape
  S, E, G = k.shape[1], v.shape[3], cfg.groups
  off, qseg, qlo, kseg, _ = meta
  specs = _meta_specs(T, S)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(-(-T // cfg.tiles.rows), B, H),
      in_specs=specs[:4] + [pl.BlockSpec((None, T, None, D), lambda i, b, h: (b, 0, h, 0)),
                            pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
                            pl.BlockSpec((None, S, None, E), lambda i, b, h: (b, 0, h // G, 0))],
      out_specs=[pl.BlockSpec((None, T, None, E), lambda i, b, h: (b, 0, h, 0)),
                 pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, T, H, E), q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      compiler_params=cfg.tiles.params(), interpret=cfg.interpret, name="prefix_attention_fwd",
  )(off, qseg, qlo, kseg, q, k, v)


def _backward(q, k, v, o, lse, do, dlse, meta, cfg: PrefixConfig):
  B, T, H, D = q.shape
  S, K, E, G = k.shape[1], k.shape[2], v.shape[3], cfg.groups
  off, qseg, qlo, kseg, kend = meta
  specs = _meta_specs(T, S)
  rows_spec = lambda X, n, kv=False: pl.BlockSpec((None, n, None, X), lambda i, b, h: (b, 0, h // G if kv else h, 0))
  row_vec = pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))
  dq, delta = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg), grid=(-(-T // cfg.bwd.rows), B, H),
      in_specs=specs[:4] + [rows_spec(D, T), rows_spec(D, S, True), rows_spec(E, S, True), rows_spec(E, T),
                            rows_spec(E, T), row_vec, row_vec],
      out_specs=[rows_spec(D, T), row_vec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      compiler_params=cfg.bwd.params(), interpret=cfg.interpret, name="prefix_attention_bwd_dq",
  )(off, qseg, qlo, kseg, q, k, v, o, do, lse, dlse)
  grouped = lambda x: x.reshape(B, T, K, G, x.shape[3])
  head_rows = lambda x: x.reshape(B, K, G, T)
  kv_rows = lambda X: pl.BlockSpec((None, S, None, X), lambda j, b, kh: (b, 0, kh, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg), grid=(-(-S // cfg.bwd.rows), B, K),
      in_specs=[specs[0], specs[1], specs[3], specs[4],
                pl.BlockSpec((None, T, None, G, D), lambda j, b, kh: (b, 0, kh, 0, 0)), kv_rows(D), kv_rows(E),
                pl.BlockSpec((None, T, None, G, E), lambda j, b, kh: (b, 0, kh, 0, 0)),
                pl.BlockSpec((None, None, G, T), lambda j, b, kh: (b, kh, 0, 0)),
                pl.BlockSpec((None, None, G, T), lambda j, b, kh: (b, kh, 0, 0))],
      out_specs=[kv_rows(D), kv_rows(E)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cfg.bwd.params(), interpret=cfg.interpret, name="prefix_attention_bwd_dkv",
  )(off, qseg, kseg, kend, grouped(q), k, v, grouped(do), head_rows(lse), head_rows(delta))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, meta, cfg):
  return _forward(q, k, v, meta, cfg)


def _attention_fwd(q, k, v, meta, cfg):
  o, lse = _forward(q, k, v, meta, cfg)
  return (o, lse), (q, k, v, o, lse, meta)


def _attention_bwd(cfg, res, cot):
  q, k, v, o, lse, meta = res
  do, dlse = cot
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)          # rows that see nothing: p = 0
  dq, dk, dv = _backward(q, k, v, o, lse, do.astype(q.dtype), dlse.astype(jnp.float32), meta, cfg)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def document_bounds(segment_ids_BS):
  """(start_BS, end_BS): first index and one past the last index of the run of equal ids holding each key."""
  B, S = segment_ids_BS.shape
  idx = jnp.arange(S, dtype=jnp.int32)
  first = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]], axis=1)
  last = jnp.concatenate([segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1], jnp.ones((B, 1), bool)], axis=1)
  start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)
  end = jax.lax.cummin(jnp.where(last, idx + 1, S), axis=1, reverse=True)
  return start, end


def _meta(offset, B: int, T: int, S: int, segment_ids_BS):
  """Inputs the kernels read besides q, k, v: offset_B1, qseg_BT, qlo_BT, kseg_BS, kend_BS."""
  off = jnp.broadcast_to(jnp.asarray(offset, jnp.int32).reshape(1, 1), (B, 1))
  if segment_ids_BS is None:
    return off, jnp.ones((B, T), jnp.int32), jnp.zeros((B, T), jnp.int32), jnp.ones((B, S), jnp.int32), \
        jnp.full((B, S), S, jnp.int32)
  kseg = jnp.asarray(segment_ids_BS).astype(jnp.int32)
  start, end = document_bounds(kseg)
  at_queries = lambda x: jax.lax.dynamic_slice_in_dim(x, jnp.asarray(offset, jnp.int32), T, axis=1)
  qseg = at_queries(kseg)
  return (off, qseg, jnp.where(qseg != 0, at_queries(start), FAR).astype(jnp.int32), kseg,
          jnp.where(kseg != 0, end, -1).astype(jnp.int32))


def prefix_attention(q_BTHD, k_BSKD, v_BSKE, *, offset, scale: float, segment_ids_BS=None,
                     tiles: Tiles | None = None, bwd_tiles: Tiles | None = None, interpret: bool = False):
  """Attention of queries at positions offset..offset+T-1 over keys 0..S-1, causal -> (o_BTHE in the input
  dtype, lse_BHT fp32, natural log; rows that see no key give 0 and -inf). Differentiable in q, k, v.

  offset: an int, or a traced int32 scalar (then with segment ids the caller guarantees offset + T <= S).
  segment_ids_BS: int [B, S] per key position, 0 = padding; a query's id is that of its position.
  """
  B, T, H, D = q_BTHD.shape
  S, K, E = k_BSKD.shape[1], k_BSKD.shape[2], v_BSKE.shape[3]
  tiles = tiles or default_tiles(q_BTHD.dtype, D + E, interpret)
  bwd_tiles = bwd_tiles or default_tiles(q_BTHD.dtype, D + E, interpret, backward=True)
  problem = input_problem(q_BTHD, k_BSKD, v_BSKE, offset, tiles, segment_ids_BS)
  if problem:
    raise ValueError(f"prefix_attention: {problem}")
  cfg = PrefixConfig(scale=float(scale), q_len=T, k_len=S, d_parts=tiling.head_parts(D),
                     e_parts=tiling.head_parts(E), groups=H // K, tiles=tiles, bwd=bwd_tiles,
                     segments=segment_ids_BS is not None, interpret=interpret,
                     precision=jax.lax.Precision.HIGHEST if q_BTHD.dtype == jnp.float32 else None)
  return _attention(q_BTHD, k_BSKD, v_BSKE, _meta(offset, B, T, S, segment_ids_BS), cfg)


def reference(q_BTHD, k_BSKD, v_BSKE, *, offset, scale: float, segment_ids_BS=None):
  """Dense XLA form of prefix_attention (fp32 softmax), for tests."""
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  k = jnp.repeat(k_BSKD, H // K, axis=2).astype(jnp.float32)
  v = jnp.repeat(v_BSKE, H // K, axis=2).astype(jnp.float32)
  s = jnp.einsum("bthd,bshd->bhts", q_BTHD.astype(jnp.float32), k, precision="highest") * scale
  ok = (jnp.arange(S)[None, :] <= offset + jnp.arange(T)[:, None])[None]
  if segment_ids_BS is not None:
    qseg = jax.lax.dynamic_slice_in_dim(segment_ids_BS, offset, T, axis=1)
    ok = ok & (qseg[:, :, None] == segment_ids_BS[:, None, :]) & (qseg[:, :, None] != 0)
  s = jnp.where(ok[:, None], s, NEG_INF)
  lse = jax.nn.logsumexp(s, axis=-1)
  seen = jnp.isfinite(lse)
  p = jnp.where(seen[..., None], jnp.exp(s - jnp.where(seen, lse, 0.0)[..., None]), 0.0)
  o = jnp.einsum("bhts,bshe->bthe", p, v, precision="highest")
  return o.astype(q_BTHD.dtype), lse
