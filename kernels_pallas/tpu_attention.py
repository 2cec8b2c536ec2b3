"""TPU attention for the registry (`pallas_tpu`): JAX's splash attention kernels run the causal
window and the per-document sink blocks as two passes, merged by log-sum-exp.

Full is causal splash attention with segment ids. SSA's window (each query sees its own block and
the `local_blocks - 1` blocks before it, causally) is a static mask, shift-invariant because
documents start at multiples of the block. Its sink blocks are not static when documents are
packed: their keys are gathered per query block and run as a second splash pass with a static
block-diagonal table (sink_impl="xla": a plain XLA attention instead). Splash's forward and its
dQ / dK-dV kernels are wrapped in one custom VJP that also takes an lse cotangent. The splash
tables are built here in vectorised numpy (splash's own builder visits every tile pair) and
cached per static shape. docs/tpu.md explains the choice.

Nothing here imports loza_jax: patterns are read duck-typed (`block_size`, `sink_blocks`,
`local_blocks`; Full has none). Positions are derived from the segment ids (register with
custom_positions=False).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as splash,
  splash_attention_mask as splash_mask,
  splash_attention_mask_info as splash_info,
)

from kernels_pallas import tiling

TILE = 128                      # splash query / key tile: the TPU lane width, splash's minimum key tile
DTYPES = ("bfloat16", "float32")
_NEG = -1e30                    # finite stand-in for -inf in the XLA sink softmax (NaN-free gradients)
SINK_IMPL = "splash"            # the sink blocks: a second splash pass ("splash") or plain XLA ("xla")
WINDOW_BLOCK_Q = 512            # window / causal pass: query tile of forward and dQ (whole blocks); docs/tpu.md


# ----------------------------------------------------------------------------------------
# Pattern and call checks.


def pattern_fields(pattern) -> tuple[int, int, int | None] | None:
  """(block_size, sink_blocks, local_blocks) of an SSA-like pattern, (TILE, 0, None) for Full, None otherwise."""
  names = ("block_size", "sink_blocks", "local_blocks")
  if all(hasattr(pattern, n) for n in names):
    return tuple(getattr(pattern, n) for n in names)
  if type(pattern).__name__ == "Full" and not any(hasattr(pattern, n) for n in names):
    return (TILE, 0, None)
  return None


def unsupported_reason(pattern, q, k, v, *, interpret: bool = False) -> str | None:
  """Why pallas_tpu cannot take this call (on this machine unless interpret), or None."""
  if not interpret and jax.default_backend() != "tpu":
    return f"pallas_tpu needs a TPU (backend is {jax.default_backend()!r}); use pallas_tpu_interpret on CPU"
  fields = pattern_fields(pattern)
  if fields is None:
    return f"pattern {pattern!r} is not Full() or SSA(...)"
  block, _, _ = fields
  if block % TILE:
    return (f"pallas_tpu: SSA block size {block} is not a multiple of {TILE} (the splash kernels' tile, the "
            f"TPU lane width); use impl='xla' for smaller blocks")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if jnp.dtype(x.dtype).name not in DTYPES:
      return f"pallas_tpu: {name} has dtype {jnp.dtype(x.dtype).name}; the kernels take {' or '.join(DTYPES)}"
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    return f"pallas_tpu: expected rank-4 q, k, v; got {q.shape}, {k.shape}, {v.shape}"
  if q.shape[2] % k.shape[2]:
    return f"pallas_tpu: kv heads {k.shape[2]} do not divide query heads {q.shape[2]}"
  return None


# ----------------------------------------------------------------------------------------
# Splash mask tables, built directly (O(tiles * window)) and cached per static shape.


@dataclasses.dataclass(frozen=True)
class WindowMask:
  """Token mask splash evaluates inside its kernels: causal, and (local set) key block >= query block - (local - 1)."""
  block: int
  local: int | None

  def __call__(self, q_ids, kv_ids):
    causal = q_ids >= kv_ids
    if self.local is None:
      return causal
    return causal & (kv_ids // self.block >= q_ids // self.block - (self.local - 1))


def _downcast(x: np.ndarray) -> np.ndarray:
  """Smallest of int8/int16/int32 holding x (splash keeps these tables in scalar memory)."""
  top = int(x.max()) if x.size else 0
  for dt in (np.int8, np.int16):
    if top <= np.iinfo(dt).max:
      return x.astype(dt)
  return x.astype(np.int32)


def _info(block_mask, data_next, n_tokens) -> splash_info.MaskInfo:
  return splash_info.MaskInfo(data_next=_downcast(data_next)[None], mask_next=None,
                              block_mask=_downcast(block_mask)[None], partial_mask_blocks=None,
                              q_sequence=np.arange(n_tokens, dtype=np.int32))


def _window_pairs(n_tokens: int, block: int, local: int | None, block_q: int):
  """Tile geometry of the window: per query tile i (block_q tokens) the key tiles (TILE tokens) lo_i..hi_i it
  reaches, and for key tile j the query tiles first_j..last_j reaching it (both ranges are contiguous)."""
  n_q, n_k = n_tokens // block_q, n_tokens // TILE
  q0 = np.arange(n_q) * block_q
  k0 = np.arange(n_k) * TILE
  hi = (q0 + block_q - 1) // TILE
  first = k0 // block_q
  if local is None:
    return np.zeros(n_q, np.int64), hi, first, np.full(n_k, n_q - 1)
  lo = np.maximum(0, (q0 // block - (local - 1)) * block // TILE)
  last = np.minimum(n_q - 1, (((k0 + TILE - 1) // block + local) * block - 1) // block_q)
  return lo, hi, first, last


def _pair_kind(q_tile, k_tile, block: int, local: int | None, block_q: int):
  """2 where every query of the tile pair sees every key of it, else 1 (the pairs given are all visible)."""
  q0, q1 = q_tile * block_q, q_tile * block_q + block_q - 1
  k0, k1 = k_tile * TILE, k_tile * TILE + TILE - 1
  full = k1 <= q0
  if local is not None:
    full &= k0 // block >= q1 // block - (local - 1)
  return np.where(full, 2, 1)


def window_mask_info(n_tokens: int, block: int, local: int | None, block_q: int = TILE) -> splash_info.MaskInfo:
  """Forward / dQ table: row i lists the key tiles of query tile i (1 = partly visible, 2 = all visible)."""
  lo, hi, _, _ = _window_pairs(n_tokens, block, local, block_q)
  count = hi - lo + 1
  j = np.arange(count.max())[None, :]
  cols = lo[:, None] + j
  valid = j < count[:, None]
  rows = np.arange(len(lo))[:, None]
  block_mask = np.where(valid, _pair_kind(rows, cols, block, local, block_q), 0).astype(np.int32)
  return _info(block_mask, np.where(valid, cols, 0).astype(np.int32), n_tokens)


def window_mask_info_dkv(n_tokens: int, block: int, local: int | None, block_q: int = TILE) -> splash_info.MaskInfo:
  """dK/dV table: column j lists the query tiles that see key tile j, padded at the top."""
  _, _, first, last = _window_pairs(n_tokens, block, local, block_q)
  count = last - first + 1
  width = count.max()
  p = np.arange(width)[:, None]
  rows = first[None, :] + p - (width - count[None, :])
  valid = p >= width - count[None, :]
  cols = np.arange(len(first))[None, :]
  block_mask = np.where(valid, _pair_kind(rows, cols, block, local, block_q), 0).astype(np.int32)
  return _info(block_mask, np.where(valid, rows, 0).astype(np.int32), n_tokens)


@functools.lru_cache(maxsize=64)
def mask_infos(n_tokens: int, block: int, local: int | None, block_q: int = TILE):
  """(forward, dQ, dK/dV) splash tables for one static shape; built once, then cached."""
  fwd = window_mask_info(n_tokens, block, local, block_q)
  return fwd, fwd, window_mask_info_dkv(n_tokens, block, local, block_q)


class SplashWindowMask(splash_mask._ComputableMask):
  """The same window as a splash mask object, for checking our tables against splash's own builder."""

  def __init__(self, n_tokens: int, block: int, local: int | None):
    self.key = (n_tokens, block, local)
    super().__init__((n_tokens, n_tokens), WindowMask(block, local))

  def __eq__(self, other):
    return isinstance(other, SplashWindowMask) and self.key == other.key

  def __hash__(self):
    return hash(self.key)


def splash_built_infos(n_tokens: int, block: int, local: int | None, block_q: int = TILE):
  """(forward, dK/dV) tables from splash's own builder (loops over all tile pairs: small T only)."""
  mask = splash_mask.MultiHeadMask((SplashWindowMask(n_tokens, block, local),))
  fwd, _ = splash_info.process_mask(mask, (block_q, TILE), head_shards=1, q_seq_shards=1)
  dkv, _ = splash_info.process_mask_dkv(mask, (block_q, TILE), head_shards=1, q_seq_shards=1)
  return fwd, dkv


# ----------------------------------------------------------------------------------------
# Sink tables: each query block sees its own gathered run of `sink` blocks (block diagonal).


def sink_mask_info(n_tokens: int, block: int, sink: int) -> splash_info.MaskInfo:
  """Forward / dQ table of the sink pass: query tile i sees gathered tiles (i // m) * S*m + [0, S*m)."""
  n, m = n_tokens // TILE, block // TILE
  width = sink * m
  cols = (np.arange(n) // m * width)[:, None] + np.arange(width)[None, :]
  info = _info(np.full((n, width), 2, np.int32), cols.astype(np.int32), n_tokens)
  return info._replace(q_sequence=None)


def sink_mask_info_dkv(n_tokens: int, block: int, sink: int) -> splash_info.MaskInfo:
  """dK/dV table of the sink pass: gathered tile c is seen by query tiles (c // (S*m)) * m + [0, m)."""
  n, m = n_tokens // TILE, block // TILE
  rows = (np.arange(n * sink) // (sink * m) * m)[None, :] + np.arange(m)[:, None]
  info = _info(np.full(rows.shape, 2, np.int32), rows.astype(np.int32), n_tokens)
  return info._replace(q_sequence=None)


@functools.lru_cache(maxsize=64)
def sink_mask_infos(n_tokens: int, block: int, sink: int):
  """(forward, dQ, dK/dV) tables of the sink pass for one static shape, cached."""
  fwd = sink_mask_info(n_tokens, block, sink)
  return fwd, fwd, sink_mask_info_dkv(n_tokens, block, sink)


# ----------------------------------------------------------------------------------------
# One splash pass (forward and backward) behind a custom VJP that takes o and lse cotangents.


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one splash pass: the window (or causal) pass, or the sink pass (sink > 0)."""
  n_tokens: int
  block: int
  local: int | None
  sink: int
  interpret: bool
  block_q: int = TILE          # query tile of the forward and dQ kernels
  block_q_dkv: int = TILE      # query tile of the dK/dV kernel (it streams queries: small tiles read less)

  @property
  def block_sizes(self) -> splash.BlockSizes:
    bq = self.block_q
    return splash.BlockSizes(block_q=bq, block_kv=TILE, block_kv_compute=TILE, block_q_dkv=self.block_q_dkv,
                             block_kv_dkv=TILE, block_kv_dkv_compute=TILE, block_q_dq=bq, block_kv_dq=TILE)

  @property
  def mask_function(self):
    return None if self.sink else WindowMask(self.block, self.local)

  def tables(self):
    """(forward, dQ, dK/dV) tables as arrays."""
    if self.sink:
      infos = sink_mask_infos(self.n_tokens, self.block, self.sink)
    else:
      fwd, dq, _ = mask_infos(self.n_tokens, self.block, self.local, self.block_q)
      infos = (fwd, dq, mask_infos(self.n_tokens, self.block, self.local, self.block_q_dkv)[2])
    return [jax.tree.map(jnp.asarray, info) for info in infos]


def _splash_fwd_row(cfg, q_HTD, k_KSD, v_KSE, qseg_T, kvseg_S):
  """Splash forward for one batch row -> (o_HTE, lse_HT); q is already scaled."""
  fwd, _, _ = cfg.tables()
  o, (lse,) = splash._splash_attention_forward(
      fwd, q_HTD, k_KSD, v_KSE, splash.SegmentIds(qseg_T, kvseg_S), None, mask_value=splash.DEFAULT_MASK_VALUE,
      is_mqa=False, block_sizes=cfg.block_sizes, residual_checkpoint_name=None, save_residuals=True,
      mask_function=cfg.mask_function, interpret=cfg.interpret)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def splash_row(cfg, q_HTD, k_KSD, v_KSE, qseg_T, kvseg_S):
  """(o_HTE, lse_HT) of one splash pass for one row, differentiable in o and lse."""
  return _splash_fwd_row(cfg, q_HTD, k_KSD, v_KSE, qseg_T, kvseg_S)


def _splash_row_fwd(cfg, q_HTD, k_KSD, v_KSE, qseg_T, kvseg_S):
  o, lse = _splash_fwd_row(cfg, q_HTD, k_KSD, v_KSE, qseg_T, kvseg_S)
  return (o, lse), (q_HTD, k_KSD, v_KSE, qseg_T, kvseg_S, o, lse)


def _splash_row_bwd(cfg, res, cot):
  """Splash dK/dV and dQ kernels with delta = rowsum(dO * O) - dlse, so the lse cotangent enters."""
  q, k, v, qseg, kvseg, o, lse = res
  do, dlse = cot
  _, dq_info, dkv_info = cfg.tables()
  delta = jnp.einsum("hte,hte->ht", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  ids = splash.SegmentIds(qseg, kvseg)
  common = dict(is_mqa=False, mask_value=splash.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
                q_layout=splash.QKVLayout.HEAD_DIM_MINOR, k_layout=splash.QKVLayout.HEAD_DIM_MINOR,
                v_layout=splash.QKVLayout.HEAD_DIM_MINOR, mask_function=cfg.mask_function, interpret=cfg.interpret)
  _, dk, dv = splash._splash_attention_bwd_dkv(q, k, v, ids, None, lse, do, delta, bq=cfg.block_q_dkv, bkv=TILE,
                                               bkv_compute=TILE, mask_info=dkv_info, use_fused_bwd_kernel=False,
                                               **common)
  dq = splash._splash_attention_bwd_dq(q, k, v, ids, None, lse, do, delta, bq=cfg.block_q, bkv=TILE,
                                       mask_info=dq_info, **common)
  return dq, dk, dv, None, None


splash_row.defvjp(_splash_row_fwd, _splash_row_bwd)


def splash_pass(q_BTHD, k_BSKD, v_BSKE, qseg_BT, kvseg_BS, cfg: _Config):
  """One splash pass over the batch: (o_BTHE, lse_BHT); rows without visible keys are not cleaned."""
  to_heads = lambda x: jnp.swapaxes(x, 1, 2)
  o, lse = jax.vmap(functools.partial(splash_row, cfg))(to_heads(q_BTHD), to_heads(k_BSKD), to_heads(v_BSKE),
                                                        qseg_BT, kvseg_BS)
  return to_heads(o), lse


def window_block_q(block: int, block_q: int = WINDOW_BLOCK_Q) -> int:
  """Query tile of the window pass's forward and dQ kernels: block_q rounded down to whole blocks (at least one)."""
  return block * max(1, block_q // block)


def window_attention(q_BTHD, k_BTKD, v_BTKE, seg_BT, block: int, local: int | None, interpret: bool,
                     block_q: int = TILE):
  """Window (local set) or causal (local None) part: (o_BTHE, lse_BHT), padding rows not yet cleaned.
  T must be a multiple of block_q, and block_q of the block; the dK/dV kernel runs on TILE query tiles."""
  cfg = _Config(q_BTHD.shape[1], block, local, 0, interpret, block_q)
  return splash_pass(q_BTHD, k_BTKD, v_BTKE, seg_BT, seg_BT, cfg)


# ----------------------------------------------------------------------------------------
# The sink part (a second splash pass, or plain XLA) and the merge.


def sink_layout(seg_BT, block: int, sink: int, local: int):
  """Per query block n: token indices of its document's first `sink` blocks (idx_BNS) and which of
  them it sees (seen_BNS: sink blocks strictly before its window; none for padding blocks)."""
  T = seg_BT.shape[1]
  start_BN, _ = tiling.tile_layout(seg_BT, block)
  offs_S = jnp.arange(sink * block)
  idx_BNS = jnp.clip(start_BN[..., None] * block + offs_S, 0, T - 1)
  query_block_BN = jnp.arange(T // block) - start_BN
  seen_BNS = (start_BN[..., None] >= 0) & (offs_S // block <= query_block_BN[..., None] - local)
  return idx_BNS, seen_BNS


_gather_rows = jax.vmap(lambda x, i: x[i])


def sink_attention_splash(q_BTHD, k_BTKD, v_BTKE, seg_BT, block: int, sink: int, local: int, interpret: bool):
  """Sink part as a second splash pass: keys gathered per query block (S = T * sink tokens), a static
  block-diagonal table, and kv segment ids 1 (seen) / 2 (not seen) against q ids 1 (real) / 0 (padding).
  Returns (o_BTHE, lse_BHT with -inf where a query sees no sink key)."""
  B, T = seg_BT.shape
  idx_BNS, seen_BNS = sink_layout(seg_BT, block, sink, local)
  idx_BS = idx_BNS.reshape(B, -1)
  real_BT = seg_BT != 0
  qseg_BT = real_BT.astype(jnp.int32)
  kvseg_BS = jnp.where(seen_BNS.reshape(B, -1), 1, 2).astype(jnp.int32)
  cfg = _Config(T, block, None, sink, interpret)
  o, lse = splash_pass(q_BTHD, _gather_rows(k_BTKD, idx_BS), _gather_rows(v_BTKE, idx_BS), qseg_BT, kvseg_BS, cfg)
  has_BT = real_BT & jnp.repeat(seen_BNS[:, :, 0], block, axis=1)
  return o, jnp.where(has_BT[:, None, :], lse, -jnp.inf)


def sink_attention_xla(q_BTHD, k_BTKD, v_BTKE, seg_BT, block: int, sink: int, local: int):
  """Sink part in plain XLA (reference, and an alternative): each query block against its gathered
  sink keys. Returns (o_BTHE fp32, lse_BHT with -inf where none). T is a multiple of `block`."""
  B, T, H, D = q_BTHD.shape
  K, E, N, G = k_BTKD.shape[2], v_BTKE.shape[-1], T // block, H // k_BTKD.shape[2]
  idx_BNS, seen_BNS = sink_layout(seg_BT, block, sink, local)
  k_BNSKD, v_BNSKE = _gather_rows(k_BTKD, idx_BNS), _gather_rows(v_BTKE, idx_BNS)
  q_BNCKGD = q_BTHD.reshape(B, N, block, K, G, D)
  s = jnp.einsum("bnckgd,bnskd->bnkgcs", q_BNCKGD, k_BNSKD, preferred_element_type=jnp.float32)
  real_BNC = seg_BT.reshape(B, N, block) != 0
  mask = seen_BNS[:, :, None, None, None, :] & real_BNC[:, :, None, None, :, None]
  s = jnp.where(mask, s, _NEG)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m) * mask
  l = jnp.sum(p, axis=-1)
  has = l > 0
  o = jnp.einsum("bnkgcs,bnske->bnkgce", p.astype(v_BTKE.dtype), v_BNSKE, preferred_element_type=jnp.float32)
  o = o / jnp.where(has, l, 1.0)[..., None]
  lse = jnp.where(has, m[..., 0] + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
  o_BTHE = jnp.moveaxis(o, 4, 2).reshape(B, T, H, E)
  lse_BHT = jnp.moveaxis(lse, 1, 3).reshape(B, H, T)
  return o_BTHE, lse_BHT


def merge(o1_BTHE, lse1_BHT, o2_BTHE, lse2_BHT):
  """Softmax-merge two partial attentions over disjoint keys; lse2 may be -inf (no keys), lse1 finite."""
  has_BHT = jnp.isfinite(lse2_BHT)
  lse2 = jnp.where(has_BHT, lse2_BHT, lse1_BHT)
  lse = jnp.where(has_BHT, jnp.logaddexp(lse1_BHT, lse2), lse1_BHT)
  w1 = jnp.swapaxes(jnp.exp(lse1_BHT - lse), 1, 2)[..., None]
  w2 = jnp.swapaxes(jnp.where(has_BHT, jnp.exp(lse2 - lse), 0.0), 1, 2)[..., None]
  return o1_BTHE.astype(jnp.float32) * w1 + o2_BTHE * w2, lse


# ----------------------------------------------------------------------------------------
# Entry points.


def _check_layout(seg_BT, tile: int) -> None:
  if isinstance(seg_BT, jax.core.Tracer):
    tiling.check_layout_traced(seg_BT, tile)
  else:
    tiling.check_layout_eager(seg_BT, tile)


def _pad_tokens(x, n: int, axis: int = 1):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, pad)


def attention_impl(q, k, v, *, pattern, segment_ids, positions, scale, interpret: bool = False,
                   sink_impl: str = SINK_IMPL, block_q: int = WINDOW_BLOCK_Q):
  """(o_BTHE, lse_BHT): splash window (or causal) attention, plus the sink blocks for SSA (a second
  splash pass, or sink_impl="xla"), merged by log-sum-exp.

  positions are ignored: document positions follow from the segment ids (documents must start at
  multiples of the SSA block and each id must be one run; checked)."""
  del positions
  why = unsupported_reason(pattern, q, k, v, interpret=interpret)
  if why:
    raise ValueError(why)
  if sink_impl not in ("splash", "xla"):
    raise ValueError(f"sink_impl must be 'splash' or 'xla', got {sink_impl!r}")
  block, sink, local = pattern_fields(pattern)
  B, T, H, _ = q.shape
  seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  _check_layout(seg, 1 if local is None else block)
  bq = window_block_q(block, block_q)
  Tp = -(-T // bq) * bq
  q_s = (q.astype(jnp.float32) * scale).astype(q.dtype)
  q_s, k_p, v_p, seg_p = _pad_tokens(q_s, Tp), _pad_tokens(k, Tp), _pad_tokens(v, Tp), _pad_tokens(seg, Tp)
  o, lse = window_attention(q_s, k_p, v_p, seg_p, block, local, interpret, bq)
  if local is not None and sink > 0:
    if sink_impl == "splash":
      part = sink_attention_splash(q_s, k_p, v_p, seg_p, block, sink, local, interpret)
    else:
      part = sink_attention_xla(q_s, k_p, v_p, seg_p, block, sink, local)
    o, lse = merge(o, lse, *part)
  real_BT = seg_p != 0
  o = jnp.where(real_BT[..., None, None], o, 0).astype(q.dtype)
  lse = jnp.where(real_BT[:, None, :], lse, -jnp.inf).astype(jnp.float32)
  return o[:, :T], lse[:, :, :T]


def attention_impl_interpret(q, k, v, *, pattern, segment_ids, positions, scale):
  """attention_impl in Pallas interpret mode (runs on CPU; slow, for tests)."""
  return attention_impl(q, k, v, pattern=pattern, segment_ids=segment_ids, positions=positions, scale=scale,
                        interpret=True)


def unsupported_reason_interpret(pattern, q, k, v) -> str | None:
  """unsupported_reason in interpret mode (any backend)."""
  return unsupported_reason(pattern, q, k, v, interpret=True)
