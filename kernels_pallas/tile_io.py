"""Small helpers used inside the Pallas kernels: masked tile loads/stores and visit ranges."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASK = -1e30          # finite "minus infinity" for masked scores in the forward
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Launch shape of one kernel: `rows` stay resident per program (queries for the forward and
  dQ, keys for dK/dV), `cols` are the tiles its loop streams; both divide the block size."""
  rows: int
  cols: int
  num_warps: int
  num_stages: int

  def params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static parameters of one attention call (hashable; used as a custom_vjp nondiff arg)."""
  scale: float
  tile: int                      # pattern block size: document alignment and visit ranges
  sink: int                      # sink blocks (0 for Full)
  local: int | None              # local blocks; None = Full causal
  seq_len: int                   # T
  n_tiles: int                   # ceil(T / tile) blocks
  d_parts: tuple                 # ((offset, size), ...) of the qk head dim
  e_parts: tuple                 # same for the v head dim
  groups: int                    # query heads per kv head
  interpret: bool
  fwd: Tiles
  dq: Tiles
  dkv: Tiles                     # also used by the sink-partial kernel
  precision: object = None       # dot precision: HIGHEST for fp32 inputs
  mosaic: object = None          # mosaic_fwd.MosaicConfig of the Mosaic GPU kernels, if any runs
  mosaic_fwd: bool = False       # forward on Mosaic GPU
  mosaic_dq: bool = False        # dQ on Mosaic GPU
  mosaic_dkv: bool = False       # dK/dV (local and sink visits) on Mosaic GPU

  @property
  def ragged(self) -> bool:
    """T is not a multiple of the tile: tail loads and stores need masks."""
    return self.seq_len % self.tile != 0


def row_mask(cfg: KernelConfig, first_row, n: int):
  """Which of rows [first_row, first_row + n) lie inside the sequence; None if T is
  block-aligned (then every tile is whole)."""
  if not cfg.ragged:
    return None
  return first_row + jnp.arange(n) < cfg.seq_len


def load(ref, idx, mask_rows=None, shape=None, other=0.0):
  """Load ref[idx]; rows where `mask_rows` is False read as `other`."""
  view = ref.at[idx]
  if mask_rows is None:
    return plgpu.load(view)
  m = mask_rows if len(shape) == 1 else jnp.broadcast_to(mask_rows[:, None], shape)
  return plgpu.load(view, mask=m, other=other)


def store(ref, idx, value, mask_rows=None):
  """Store value at ref[idx]; rows where `mask_rows` is False are left untouched."""
  view = ref.at[idx]
  if mask_rows is None:
    plgpu.store(view, value)
    return
  m = mask_rows if value.ndim == 1 else jnp.broadcast_to(mask_rows[:, None], value.shape)
  plgpu.store(view, value, mask=m)


def load_parts(ref, first_row, n, parts, mask_rows, lead=()):
  """Column slices `parts` of rows [first_row, first_row + n) of ref[T, *lead, dim]."""
  return [load(ref, (pl.ds(first_row, n), *lead, pl.ds(off, size)), mask_rows, (n, size)) for off, size in parts]


def store_parts(ref, first_row, n, parts, values, mask_rows, lead=()):
  """Store each value of `values` into its column slice of rows [first_row, first_row + n)."""
  for (off, size), val in zip(parts, values):
    store(ref, (pl.ds(first_row, n), *lead, pl.ds(off, size)), val.astype(ref.dtype), mask_rows)


def dot(a, b, trans_b=False, precision=None):
  """fp32-accumulating tile product."""
  return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def visit_ranges(cfg: KernelConfig, i, start):
  """Key tiles a query tile i of a document starting at tile `start` visits, diagonal excluded:
  sink [start, sink_end) and local [lo, i). A padding tile (start < 0) visits none."""
  start = jnp.where(start < 0, i, start)
  if cfg.local is None:
    return start, start, start
  lo = jnp.maximum(i - (cfg.local - 1), start)
  sink_end = jnp.minimum(start + cfg.sink, lo)
  return start, sink_end, lo


def causal_mask(q0, nq: int, k0, nk: int, transposed: bool = False):
  """Causal mask [nq, nk] (or [nk, nq] if transposed) of query rows from q0, key rows from k0."""
  q = q0 + jnp.arange(nq)
  k = k0 + jnp.arange(nk)
  if transposed:
    return k[:, None] <= q[None, :]
  return k[None, :] <= q[:, None]


def attend_tile(q, k, load_v, carry, qk_scale: float, precision=None, mask=None):
  """One key tile of a forward's online softmax (base 2): scores of the query parts `q` against the key
  parts `k` (masked where `mask` is False), the running max and sum, and acc += P·V, with V loaded by
  `load_v()` after the scores. carry = (acc parts, m, l)."""
  acc, m, l = carry
  s = sum(dot(qp, kp, trans_b=True, precision=precision) for qp, kp in zip(q, k)) * qk_scale
  if mask is not None:
    s = jnp.where(mask, s, MASK)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l = l * alpha + jnp.sum(p, axis=1)
  v = load_v()
  p = p.astype(v[0].dtype)
  acc = [a * alpha[:, None] + dot(p, vp, precision=precision) for a, vp in zip(acc, v)]
  return acc, m_new, l


def dq_rows(q_ref, do_ref, o_ref, lse_ref, dlse_ref, r0, rows: int, d_parts, e_parts, rows_ok):
  """A dQ program's resident query rows: (q parts, dO parts, lse in base 2 (+inf past the sequence),
  delta = rowsum(dO·O) − dlse)."""
  q = load_parts(q_ref, r0, rows, d_parts, rows_ok)
  do = load_parts(do_ref, r0, rows, e_parts, rows_ok)
  o = load_parts(o_ref, r0, rows, e_parts, rows_ok)
  lse2 = load(lse_ref, (pl.ds(r0, rows),), rows_ok, (rows,), other=math.inf) * LOG2E
  dlse = load(dlse_ref, (pl.ds(r0, rows),), rows_ok, (rows,))
  delta = sum(jnp.sum(g.astype(jnp.float32) * op.astype(jnp.float32), axis=1) for g, op in zip(do, o)) - dlse
  return q, do, lse2, delta


def dkv_cols(q_ref, do_ref, lse_ref, delta_ref, g, q0, cols: int, d_parts, e_parts, rows_ok):
  """A dK/dV program's streamed query tile of head g (grouped [T, G, *] and [G, T] views): (q parts, dO parts,
  lse in base 2 (+inf past the sequence), delta)."""
  q = load_parts(q_ref, q0, cols, d_parts, rows_ok, lead=(g,))
  do = load_parts(do_ref, q0, cols, e_parts, rows_ok, lead=(g,))
  lse2 = load(lse_ref, (g, pl.ds(q0, cols)), rows_ok, (cols,), other=math.inf) * LOG2E
  delta = load(delta_ref, (g, pl.ds(q0, cols)), rows_ok, (cols,))
  return q, do, lse2, delta


def dq_tile(dq, q, do, lse2, delta, k, v, qk_scale: float, precision=None, mask=None):
  """One key tile of a dQ kernel (base 2): P from the saved lse2, dS = P·(dP − delta), dq parts += dS·K (unscaled).
  `mask()` gives the [rows, cols] visibility, built after the scores; None: the whole tile is visible."""
  s = sum(dot(qp, kp, trans_b=True, precision=precision) for qp, kp in zip(q, k)) * qk_scale
  if mask is not None:
    s = jnp.where(mask(), s, -math.inf)
  p = jnp.exp2(s - lse2[:, None])
  dp = sum(dot(g, vp, trans_b=True, precision=precision) for g, vp in zip(do, v))
  ds = (p * (dp - delta[:, None])).astype(k[0].dtype)
  return [a + dot(ds, kp, precision=precision) for a, kp in zip(dq, k)]


def dkv_tile(carry, k, v, q, do, lse2, delta, qk_scale: float, precision=None, mask=None):
  """One query tile of a dK/dV kernel, transposed (rows are keys): dv parts += Pᵀ·dO, dk parts += dSᵀ·Q
  (unscaled). `mask()` gives the [keys, queries] visibility, built after the scores; None: all visible."""
  dk, dv = carry
  st = sum(dot(kp, qp, trans_b=True, precision=precision) for kp, qp in zip(k, q)) * qk_scale
  if mask is not None:
    st = jnp.where(mask(), st, -math.inf)
  pt = jnp.exp2(st - lse2[None, :])
  dv = [a + dot(pt.astype(gp.dtype), gp, precision=precision) for a, gp in zip(dv, do)]
  dpt = sum(dot(vp, gp, trans_b=True, precision=precision) for vp, gp in zip(v, do))
  dst = (pt * (dpt - delta[None, :])).astype(q[0].dtype)
  dk = [a + dot(dst, qp, precision=precision) for a, qp in zip(dk, q)]
  return dk, dv
