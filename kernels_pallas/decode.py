"""Split-K attention of latent-space queries over a cached MLA latent (decode and prefill-past).

MLA's absorbed form turns every query head into one query of width C + R against the same keys,
the cached latent `ckv` (C) and RoPE key `krope` (R); the values are `ckv` itself. So a key tile
loaded once serves all heads of a row: each program takes `rows` query rows (heads × tokens of
one batch row) and one of `splits` equal parts of the visible keys, runs an online softmax over
it, and writes a normalised partial output with its log-sum-exp; `combine` merges the parts.
Splitting the keys keeps the GPU busy when batch × heads alone gives too few programs.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.tile_io import LN2, LOG2E, MASK, NEG_INF, dot

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Static parameters of one call. `window` = (block, sink_blocks, local_blocks) for SSA, None for
  causal Full; `rows` query rows and `cols` keys per tile; `splits` parts of each row's keys."""
  scale: float
  window: tuple[int, int, int] | None
  rows: int
  cols: int
  splits: int
  c_parts: tuple                 # ((offset, size), ...) of the latent width C
  num_warps: int = 4
  num_stages: int = 2
  interpret: bool = False
  precision: object = None


def latent_parts(dim: int, widest: int = 128) -> tuple[tuple[int, int], ...]:
  """Split a latent width into equal power-of-two slices of at most `widest` (16 or more)."""
  size = min(widest, dim)
  if dim % 16 or size & (size - 1) or dim % size:
    raise ValueError(f"latent width C={dim} must be a multiple of 16 that splits into power-of-two slices "
                     f"of at most {widest}")
  return tuple((off, size) for off in range(0, dim, size))


def input_problem(q_lat_BTHC, q_rope_BTHR, ckv_BSC, krope_BSR) -> str | None:
  """Why the kernel cannot take these arrays, or None."""
  if q_lat_BTHC.ndim != 4 or q_rope_BTHR.ndim != 4 or ckv_BSC.ndim != 3 or krope_BSR.ndim != 3:
    return (f"expected q_lat [B,T,H,C], q_rope [B,T,H,R], ckv [B,S,C], krope [B,S,R]; got {q_lat_BTHC.shape}, "
            f"{q_rope_BTHR.shape}, {ckv_BSC.shape}, {krope_BSR.shape}")
  B, T, H, C = q_lat_BTHC.shape
  R = q_rope_BTHR.shape[3]
  if q_rope_BTHR.shape[:3] != (B, T, H) or ckv_BSC.shape[0] != B or ckv_BSC.shape[2] != C \
      or krope_BSR.shape != (B, ckv_BSC.shape[1], R):
    return f"shapes disagree: q_lat {q_lat_BTHC.shape}, q_rope {q_rope_BTHR.shape}, ckv {ckv_BSC.shape}, " \
           f"krope {krope_BSR.shape}"
  for x in (q_lat_BTHC, q_rope_BTHR, ckv_BSC, krope_BSR):
    if jnp.dtype(x.dtype) not in {jnp.dtype(d) for d in SUPPORTED_DTYPES}:
      return f"dtype {x.dtype} is not one of bfloat16, float16, float32"
  try:
    latent_parts(C)
  except ValueError as e:
    return str(e)
  if R % 16 or R & (R - 1) or R > 256:
    return f"RoPE width R={R} must be a power of two in [16, 256]"
  return None


def default_config(B: int, N: int, S: int, C: int, scale: float, window, dtype, interpret: bool,
                   programs: int = 264) -> DecodeConfig:
  """Tiles and split count: enough programs (`programs`, about two per SM of an H100/H200) to fill
  the GPU; interpret mode uses one wide tile per program (fewest grid steps on CPU)."""
  fp32 = jnp.dtype(dtype) == jnp.float32
  if interpret:
    rows = 1 << max(0, (N - 1).bit_length())
    return DecodeConfig(scale, window, rows, 64, 1, latent_parts(C), interpret=True,
                        precision=jax.lax.Precision.HIGHEST if fp32 else None)
  rows = 16 if fp32 else 32
  cols = 32 if fp32 else 64
  row_blocks = -(-N // rows)
  splits = max(1, min(-(-programs // (B * row_blocks)), -(-S // cols)))
  return DecodeConfig(scale, window, rows, cols, splits, latent_parts(C), num_warps=4, num_stages=2,
                      precision=jax.lax.Precision.HIGHEST if fp32 else None)


def _visible(cfg: DecodeConfig, q_pos_N1, k_idx_1K, k_pos_1K):
  """Mask [rows, cols]: keys the pattern lets each query row see (k_pos: cached positions, −1 empty)."""
  if cfg.window is None:
    return k_idx_1K <= q_pos_N1
  block, sink, local = cfg.window
  qb, kb = q_pos_N1 // block, k_pos_1K // block
  return (k_pos_1K >= 0) & (k_pos_1K <= q_pos_N1) & ((kb < sink) | (kb >= qb - (local - 1)))


def _kernel(*refs, cfg: DecodeConfig, S: int, N: int):
  if cfg.window is None:
    qpos_ref, q_ref, qr_ref, ckv_ref, kr_ref, o_ref, lse_ref = refs
    kpos_ref = None
  else:
    qpos_ref, kpos_ref, q_ref, qr_ref, ckv_ref, kr_ref, o_ref, lse_ref = refs
  rows, cols = cfg.rows, cfg.cols
  r0 = pl.program_id(0) * rows
  split = pl.program_id(1)
  row_ok = None if N % rows == 0 else r0 + jnp.arange(rows) < N
  load_rows = lambda ref, idx, n: plgpu.load(
      ref.at[idx], **({} if row_ok is None else dict(mask=jnp.broadcast_to(row_ok[:, None], (rows, n)), other=0)))
  q_pos = plgpu.load(qpos_ref.at[pl.ds(r0, rows)], **({} if row_ok is None else dict(mask=row_ok, other=-1)))
  q = [load_rows(q_ref, (pl.ds(r0, rows), pl.ds(off, size)), size) for off, size in cfg.c_parts]
  R = qr_ref.shape[1]
  qr = load_rows(qr_ref, (pl.ds(r0, rows), pl.ds(0, R)), R)

  # Keys [lo, hi) of this split: Full sees indices <= its row's position, an SSA ring every slot.
  end = jnp.minimum(jnp.max(q_pos) + 1, S) if cfg.window is None else S
  per = ((end + cfg.splits - 1) // cfg.splits + cols - 1) // cols * cols
  lo = split * per
  hi = jnp.minimum(lo + per, end)
  n_tiles = jnp.maximum(hi - lo + cols - 1, 0) // cols
  qk_scale = cfg.scale * LOG2E
  ragged = S % cols != 0

  def visit(c, carry):
    acc, m, l = carry
    k0 = lo + c * cols
    k_idx = k0 + jnp.arange(cols)
    in_cache = k_idx < S
    load_keys = lambda ref, off, n: plgpu.load(
        ref.at[pl.ds(k0, cols), pl.ds(off, n)],
        **(dict(mask=jnp.broadcast_to(in_cache[:, None], (cols, n)), other=0) if ragged else {}))
    kv = [load_keys(ckv_ref, off, size).astype(q[0].dtype) for off, size in cfg.c_parts]
    kr = load_keys(kr_ref, 0, R).astype(qr.dtype)
    s = dot(qr, kr, trans_b=True, precision=cfg.precision)
    for qp, kp in zip(q, kv):
      s += dot(qp, kp, trans_b=True, precision=cfg.precision)
    k_pos = None
    if kpos_ref is not None:
      k_pos = plgpu.load(kpos_ref.at[pl.ds(k0, cols)], **(dict(mask=in_cache, other=-1) if ragged else {}))[None, :]
    ok = _visible(cfg, q_pos[:, None], k_idx[None, :], k_pos) & (k_idx < hi)[None, :]
    s = jnp.where(ok, s * qk_scale, MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(ok, jnp.exp2(s - m_new[:, None]), 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    p = p.astype(kv[0].dtype)
    acc = [a * alpha[:, None] + dot(p, vp, precision=cfg.precision) for a, vp in zip(acc, kv)]
    return acc, m_new, l

  carry = ([jnp.zeros((rows, size), jnp.float32) for _, size in cfg.c_parts],
           jnp.full((rows,), MASK, jnp.float32), jnp.zeros((rows,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, n_tiles, visit, carry)

  seen = l > 0
  inv_l = 1.0 / jnp.where(seen, l, 1.0)
  store_kw = {} if row_ok is None else dict(mask=row_ok)
  for (off, size), a in zip(cfg.c_parts, acc):
    plgpu.store(o_ref.at[pl.ds(r0, rows), pl.ds(off, size)], a * inv_l[:, None],
                **({} if row_ok is None else dict(mask=jnp.broadcast_to(row_ok[:, None], (rows, size)))))
  plgpu.store(lse_ref.at[pl.ds(r0, rows)], jnp.where(seen, m * LN2 + jnp.log(jnp.where(seen, l, 1.0)), NEG_INF),
              **store_kw)


def partials(q_lat_BNC, q_rope_BNR, ckv_BSC, krope_BSR, q_pos_BN, k_pos_BS, cfg: DecodeConfig):
  """Run the kernel: per split, (o_BPNC fp32 normalised, lse_BPN fp32); P = cfg.splits."""
  B, N, C = q_lat_BNC.shape
  S, R = ckv_BSC.shape[1], krope_BSR.shape[2]
  P = cfg.splits
  grid = (-(-N // cfg.rows), P, B)
  row = lambda n, d: pl.BlockSpec((None, n, d), lambda r, s, b: (b, 0, 0))
  in_specs = [pl.BlockSpec((None, N), lambda r, s, b: (b, 0))]
  args = [q_pos_BN.astype(jnp.int32)]
  if cfg.window is not None:
    in_specs.append(pl.BlockSpec((None, S), lambda r, s, b: (b, 0)))
    args.append(k_pos_BS.astype(jnp.int32))
  in_specs += [row(N, C), row(N, R), row(S, C), row(S, R)]
  args += [q_lat_BNC, q_rope_BNR, ckv_BSC, krope_BSR]
  out_specs = [pl.BlockSpec((None, None, N, C), lambda r, s, b: (b, s, 0, 0)),
               pl.BlockSpec((None, None, N), lambda r, s, b: (b, s, 0))]
  out_shape = [jax.ShapeDtypeStruct((B, P, N, C), jnp.float32), jax.ShapeDtypeStruct((B, P, N), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_kernel, cfg=cfg, S=S, N=N),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name="latent_decode_attention",
  )(*args)


def combine(o_BPNC, lse_BPN):
  """Merge the splits' normalised outputs by their log-sum-exps: (o_BNC, lse_BN)."""
  if o_BPNC.shape[1] == 1:
    return o_BPNC[:, 0], lse_BPN[:, 0]
  m = jnp.max(lse_BPN, axis=1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_BPN - m)
  tot = jnp.sum(w, axis=1)
  o = jnp.einsum("bpn,bpnc->bnc", w, o_BPNC) / jnp.where(tot > 0, tot, 1.0)[..., None]
  lse = jnp.where(tot > 0, m[:, 0] + jnp.log(jnp.where(tot > 0, tot, 1.0)), NEG_INF)
  return o, lse


def latent_attention(q_lat_BTHC, q_rope_BTHR, ckv_BSC, krope_BSR, q_pos_BT, k_pos_BS, *, scale: float,
                     window=None, interpret: bool = False, cfg: DecodeConfig | None = None):
  """Latent attention through the kernel: (o_BTHC fp32, lse_BHT fp32), the contract of the XLA form.

  `window` = (block, sink_blocks, local_blocks) for an SSA ring (then `k_pos_BS` holds each slot's
  position, −1 = empty); None for causal Full over cache index = position (`k_pos_BS` unused).
  """
  problem = input_problem(q_lat_BTHC, q_rope_BTHR, ckv_BSC, krope_BSR)
  if problem:
    raise ValueError(f"latent decode kernel: {problem}")
  B, T, H, C = q_lat_BTHC.shape
  S = ckv_BSC.shape[1]
  if cfg is None:
    cfg = default_config(B, T * H, S, C, scale, window, q_lat_BTHC.dtype, interpret)
  q_pos_BN = jnp.repeat(q_pos_BT, H, axis=1)
  o_BPNC, lse_BPN = partials(q_lat_BTHC.reshape(B, T * H, C), q_rope_BTHR.reshape(B, T * H, -1), ckv_BSC,
                             krope_BSR, q_pos_BN, k_pos_BS, cfg)
  o_BNC, lse_BN = combine(o_BPNC, lse_BPN)
  return o_BNC.reshape(B, T, H, C), jnp.transpose(lse_BN.reshape(B, T, H), (0, 2, 1))
