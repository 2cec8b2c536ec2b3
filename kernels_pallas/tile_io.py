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
class KernelConfig:
  """Static parameters of one attention call (hashable; used as a custom_vjp nondiff arg)."""
  scale: float
  tile: int                      # query and key tile = pattern block size
  sink: int                      # sink blocks (0 for Full)
  local: int | None              # local blocks; None = Full causal
  seq_len: int                   # T
  n_tiles: int                   # ceil(T / tile)
  d_parts: tuple                 # ((offset, size), ...) of the qk head dim
  e_parts: tuple                 # same for the v head dim
  groups: int                    # query heads per kv head
  interpret: bool
  precision: object = None       # dot precision: HIGHEST for fp32 inputs
  num_warps: int = 8
  num_stages: int = 2

  @property
  def ragged(self) -> bool:
    """T is not a multiple of the tile: tail loads and stores need masks."""
    return self.seq_len % self.tile != 0


def row_mask(cfg: KernelConfig, tile_index):
  """Rows of tile `tile_index` that lie inside the sequence, or None if T is tile-aligned."""
  if not cfg.ragged:
    return None
  return tile_index * cfg.tile + jnp.arange(cfg.tile) < cfg.seq_len


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


def load_parts(ref, rows, parts, tile, mask_rows, lead=()):
  """Load the column slices `parts` of rows [rows*tile, rows*tile+tile) of ref[(*lead?), T, dim]."""
  out = []
  for off, size in parts:
    idx = (pl.ds(rows * tile, tile), *lead, pl.ds(off, size))
    out.append(load(ref, idx, mask_rows, (tile, size)))
  return out


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


def causal_tile_mask(tile: int, transposed: bool = False):
  """Diagonal-tile causal mask [q, k] (or [k, q] if transposed): key index <= query index."""
  r = jnp.arange(tile)
  if transposed:
    return r[:, None] <= r[None, :]
  return r[None, :] <= r[:, None]
