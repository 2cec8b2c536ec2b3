"""Tile bookkeeping shared by the attention kernels: head-dim splits and document layout.

Documents are maximal runs of one non-zero segment id. The kernels need each document to
start at a multiple of the tile size and each segment id to form a single run; then every
tile holds tokens of at most one document followed by padding, and a document's blocks are
whole tiles counted from its first tile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def head_parts(dim: int) -> tuple[tuple[int, int], ...]:
  """Split a head dim into power-of-two slices (offset, size), each 16..128 wide."""
  parts, off = [], 0
  for size in (128, 128, 64, 32, 16):
    if dim - off >= size:
      parts.append((off, size))
      off += size
  if off != dim:
    raise ValueError(f"head dim {dim} must be a multiple of 16 and at most 256")
  return tuple(parts)


def head_dim_problem(dim: int) -> str | None:
  """Why a head dim cannot be split into kernel slices, or None."""
  if dim % 16 or not 16 <= dim <= 256:
    return f"head dim {dim} is not a multiple of 16 in [16, 256]"
  return None


def tile_layout(segment_ids_BT: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
  """Per tile (start_BN, end_BN): first and last tile of the document holding the tile's first
  token, or -1 for a tile that starts with padding (under the layout rules: all padding)."""
  B, T = segment_ids_BT.shape
  n = -(-T // tile)
  idx = jnp.arange(n, dtype=jnp.int32)
  first_BN = segment_ids_BT[:, ::tile]
  prev_BN = jnp.concatenate(
      [jnp.zeros((B, 1), segment_ids_BT.dtype), segment_ids_BT[:, tile - 1:(n - 1) * tile:tile]], axis=1)
  next_BN = jnp.concatenate([first_BN[:, 1:], jnp.zeros((B, 1), segment_ids_BT.dtype)], axis=1)
  real = first_BN != 0
  is_start = real & (prev_BN != first_BN)
  is_end = real & (next_BN != first_BN)
  start = jax.lax.cummax(jnp.where(is_start, idx, -1), axis=1)
  end = jax.lax.cummin(jnp.where(is_end, idx, n), axis=1, reverse=True)
  return jnp.where(real, start, -1).astype(jnp.int32), jnp.where(real, end, -1).astype(jnp.int32)


def misaligned_starts(segment_ids_BT, tile: int, xp=jnp):
  """(misaligned_B, starts_BT): per row the first token index of a document that does not start at
  a multiple of `tile` (-1 if none), and where documents start. xp: numpy or jax.numpy."""
  seg = segment_ids_BT.astype(xp.int32)
  idx = xp.arange(seg.shape[1], dtype=xp.int32)
  prev = xp.concatenate([xp.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
  starts = (seg != 0) & (seg != prev)
  bad = starts & (idx % tile != 0)
  return xp.where(bad.any(1), xp.argmax(bad, axis=1), -1).astype(xp.int32), starts


def layout_violations(segment_ids_BT, tile: int, xp=jnp):
  """(misaligned_B, repeated_B): per row, the first token index of a document that does not
  start at a multiple of `tile` (-1 if none), and the first token index of a run whose segment
  id already appeared in an earlier run of that row (-1 if none). xp: numpy or jax.numpy."""
  seg = segment_ids_BT.astype(xp.int32)
  B, T = seg.shape
  idx = xp.arange(T, dtype=xp.int32)
  misaligned, starts = misaligned_starts(seg, tile, xp)
  # A run start whose id equals an earlier run start's id: sort (id, position) pairs of starts.
  key = xp.where(starts, seg, -1)
  order = xp.lexsort((xp.broadcast_to(idx, (B, T)), key), axis=1)
  key_sorted = xp.take_along_axis(key, order, axis=1)
  dup_sorted = (key_sorted[:, 1:] == key_sorted[:, :-1]) & (key_sorted[:, 1:] > 0)
  dup_pos = xp.where(dup_sorted, order[:, 1:], T)
  first_dup = dup_pos.min(axis=1, initial=T)
  repeated = xp.where(first_dup < T, first_dup, -1)
  return misaligned.astype(xp.int32), repeated.astype(xp.int32)


def layout_message(misaligned_B, repeated_B, segment_ids_BT, tile: int) -> str | None:
  """Human-readable description of the first layout violation, or None."""
  misaligned_B, repeated_B = np.asarray(misaligned_B), np.asarray(repeated_B)
  seg = None if segment_ids_BT is None else np.asarray(segment_ids_BT)
  for b in range(misaligned_B.shape[0]):
    t = int(misaligned_B[b])
    if t >= 0:
      sid = "" if seg is None else f" (segment id {int(seg[b, t])})"
      return (f"document{sid} in batch row {b} starts at token {t}, not a multiple of the kernel "
              f"block size {tile}: pad each document to a multiple of {tile} tokens "
              f"(or use impl='xla', which accepts any segmentation)")
  for b in range(repeated_B.shape[0]):
    t = int(repeated_B[b])
    if t >= 0:
      sid = "" if seg is None else f" {int(seg[b, t])}"
      return (f"segment id{sid} in batch row {b} appears again at token {t} after another segment: "
              f"the kernels need each document to be one contiguous run with its own id")
  return None


def check_layout_eager(segment_ids_BT, tile: int) -> None:
  """Raise ValueError now if concrete segment ids break the kernel layout rules."""
  seg = np.asarray(segment_ids_BT)
  mis, rep = layout_violations(seg, tile, xp=np)
  msg = layout_message(mis, rep, seg, tile)
  if msg:
    raise ValueError(msg)


def check_layout_traced(segment_ids_BT, tile: int) -> None:
  """Stage a runtime check: a jax.debug.callback that raises ValueError on a bad layout (under
  jit it surfaces as a JaxRuntimeError carrying the ValueError text)."""
  mis, rep = layout_violations(segment_ids_BT, tile)
  sid = jnp.stack([jnp.take_along_axis(segment_ids_BT, jnp.maximum(x, 0)[:, None], axis=1)[:, 0]
                   for x in (mis, rep)], axis=1)

  def _raise(mis, rep, sid):
    msg = layout_message(mis, rep, None, tile)
    if msg:
      ids = np.asarray(sid)
      raise ValueError(f"{msg} [segment ids at the offending tokens: {ids.tolist()}]")

  jax.debug.callback(_raise, mis, rep, sid)
