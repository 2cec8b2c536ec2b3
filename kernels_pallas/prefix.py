"""Causal attention of a chunk of queries at a static offset over a key sequence of another length.

Query row i sits at position `offset + i`; key j at position j; a key is visible iff j <= offset + i
(and j < S). With offset >= S every key is visible to every query: the earlier part of a prompt seen by a
later prefill chunk. With S = offset + T it is the chunk's whole causal prefix. Forward only (inference);
one document per row, so there are no segment ids. Each program keeps a tile of query rows and streams
the key tiles wholly before its first row unmasked, then the tiles that cross its diagonal masked.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import tiling
from kernels_pallas.tile_io import LN2, LOG2E, MASK, NEG_INF, Tiles, attend_tile, load_parts, store, store_parts

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
  """Static parameters of one call."""
  scale: float
  offset: int          # position of query row 0
  q_len: int           # T
  k_len: int           # S
  d_parts: tuple
  e_parts: tuple
  groups: int          # query heads per kv head
  tiles: Tiles
  interpret: bool
  precision: object = None


def default_tiles(dtype, head_dims: int, interpret: bool) -> Tiles:
  """Launch shape: whole 16-row tiles when interpreted (CPU tests); on GPU the Full forward's shape
  (kernels_pallas/NOTES.md), smaller for fp32 operands or heads wider than 192 + 128."""
  if interpret:
    return Tiles(16, 16, 4, 2)
  if jnp.dtype(dtype) == jnp.float32:
    return Tiles(64, 32, 4, 2)
  return Tiles(128, 64, 8, 3 if head_dims <= 320 else 2)


def input_problem(q_BTHD, k_BSKD, v_BSKE, offset: int, tiles: Tiles) -> str | None:
  """Why the kernel cannot take these inputs, or None."""
  if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKE.ndim != 4:
    return f"expected rank-4 q, k, v; got {q_BTHD.shape}, {k_BSKD.shape}, {v_BSKE.shape}"
  B, T, H, D = q_BTHD.shape
  if k_BSKD.shape[0] != B or k_BSKD.shape[3] != D or v_BSKE.shape[:3] != k_BSKD.shape[:3]:
    return f"shapes disagree: q {q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKE.shape}"
  if k_BSKD.shape[1] < 1 or T < 1:
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
  if offset < 0 or offset % tiles.cols:
    return f"offset {offset} must be >= 0 and a multiple of the key tile ({tiles.cols})"
  return None


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: PrefixConfig):
  rows, cols = cfg.tiles.rows, cfg.tiles.cols
  n_q = -(-cfg.q_len // rows)
  r0 = (n_q - 1 - pl.program_id(0)) * rows        # the longest rows first: they have the most keys
  g0 = r0 + cfg.offset                              # position of this program's first query row
  rows_ok = (r0 + jnp.arange(rows) < cfg.q_len) if cfg.q_len % rows else None
  q = load_parts(q_ref, r0, rows, cfg.d_parts, rows_ok)
  qk_scale = cfg.scale * LOG2E
  k_end = jnp.minimum(g0 + rows, cfg.k_len)        # keys past this are invisible to every row here
  n_whole = jnp.minimum(g0, cfg.k_len) // cols      # key tiles wholly visible to every row
  n_all = (k_end + cols - 1) // cols

  def visit(c, carry, masked):
    k0 = c * cols
    keys_ok = (k0 + jnp.arange(cols) < cfg.k_len) if masked and cfg.k_len % cols else None
    k = load_parts(k_ref, k0, cols, cfg.d_parts, keys_ok)
    mask = None
    if masked:
      kpos = k0 + jnp.arange(cols)
      mask = (kpos[None, :] <= g0 + jnp.arange(rows)[:, None]) & (kpos[None, :] < cfg.k_len)
    return attend_tile(q, k, lambda: load_parts(v_ref, k0, cols, cfg.e_parts, keys_ok), carry, qk_scale,
                       cfg.precision, mask)

  carry = ([jnp.zeros((rows, size), jnp.float32) for _, size in cfg.e_parts],
           jnp.full((rows,), MASK, jnp.float32), jnp.zeros((rows,), jnp.float32))
  carry = jax.lax.fori_loop(0, n_whole, functools.partial(visit, masked=False), carry)
  acc, m, l = jax.lax.fori_loop(n_whole, n_all, functools.partial(visit, masked=True), carry)
  inv_l = 1.0 / l                                   # every row sees key 0, so l > 0
  store_parts(o_ref, r0, rows, cfg.e_parts, [a * inv_l[:, None] for a in acc], rows_ok)
  store(lse_ref, (pl.ds(r0, rows),), m * LN2 + jnp.log(l), rows_ok)


def prefix_attention(q_BTHD, k_BSKD, v_BSKE, *, offset: int, scale: float, tiles: Tiles | None = None,
                     interpret: bool = False):
  """Attention of queries at positions offset..offset+T-1 over keys 0..S-1, causal -> (o_BTHE in the
  input dtype, lse_BHT fp32, natural log)."""
  B, T, H, D = q_BTHD.shape
  S, K, E = k_BSKD.shape[1], k_BSKD.shape[2], v_BSKE.shape[3]
  tiles = tiles or default_tiles(q_BTHD.dtype, D + E, interpret)
  problem = input_problem(q_BTHD, k_BSKD, v_BSKE, offset, tiles)
  if problem:
    raise ValueError(f"prefix_attention: {problem}")
  cfg = PrefixConfig(scale=float(scale), offset=int(offset), q_len=T, k_len=S, d_parts=tiling.head_parts(D),
                     e_parts=tiling.head_parts(E), groups=H // K, tiles=tiles, interpret=interpret,
                     precision=jax.lax.Precision.HIGHEST if q_BTHD.dtype == jnp.float32 else None)
  G = cfg.groups
  o, lse = pl.pallas_call(
      functools.partial(_kernel, cfg=cfg),
      grid=(-(-T // tiles.rows), B, H),
      in_specs=[pl.BlockSpec((None, T, None, D), lambda i, b, h: (b, 0, h, 0)),
                pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
                pl.BlockSpec((None, S, None, E), lambda i, b, h: (b, 0, h // G, 0))],
      out_specs=[pl.BlockSpec((None, T, None, E), lambda i, b, h: (b, 0, h, 0)),
                 pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, T, H, E), q_BTHD.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      compiler_params=tiles.params(), interpret=interpret, name="prefix_attention_fwd",
  )(q_BTHD, k_BSKD, v_BSKE)
  return o, lse


def reference(q_BTHD, k_BSKD, v_BSKE, *, offset: int, scale: float):
  """Dense XLA form of prefix_attention (fp32 softmax), for tests."""
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  k = jnp.repeat(k_BSKD, H // K, axis=2).astype(jnp.float32)
  v = jnp.repeat(v_BSKE, H // K, axis=2).astype(jnp.float32)
  s = jnp.einsum("bthd,bshd->bhts", q_BTHD.astype(jnp.float32), k, precision="highest") * scale
  ok = jnp.arange(S)[None, :] <= offset + jnp.arange(T)[:, None]
  s = jnp.where(ok, s, NEG_INF)
  lse = jax.nn.logsumexp(s, axis=-1)
  o = jnp.einsum("bhts,bshe->bthe", jnp.exp(s - lse[..., None]), v, precision="highest")
  return o.astype(q_BTHD.dtype), lse
